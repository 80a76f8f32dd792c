"""The optimization core: schedule, steps, accumulation, non-finite steps, evaluation."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from truthgpt.config import ConfigError, TrainConfig, TruthGPTOptimizationCoreConfig
from truthgpt.training import TrainingDiverged, TruthGPTOptimizationCore, build_config, lr_at
from truthgpt.training.loop import parse_overrides, read_config_file

VOCAB = 40


def tiny_config(**changes) -> TruthGPTOptimizationCoreConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        block_size=16,
        batch_size=4,
        warmup_steps=2,
        max_steps=20,
        learning_rate=3e-3,
        min_lr=3e-4,
        device="cpu",
        seed=0,
    )
    fields.update(changes)
    return TruthGPTOptimizationCoreConfig(**fields)


def batch_at(step: int, batch_size: int = 4, length: int = 16) -> dict[str, torch.Tensor]:
    """A learnable toy language: each token is the previous one plus one, mod VOCAB."""
    g = torch.Generator().manual_seed(step)
    start = torch.randint(0, VOCAB, (batch_size, 1), generator=g)
    ids = (start + torch.arange(length)) % VOCAB
    return {"input_ids": ids, "labels": ids.clone()}


def test_original_usage_learns_a_simple_language():
    core = TruthGPTOptimizationCore(
        tiny_config(distance_type="l1", max_steps=60, learning_rate=1e-2)
    )
    core.setup_optimizer()
    losses = [core.train_step(batch_at(i))["loss"] for i in range(60)]
    assert losses[-1] < 0.5 * losses[0]
    metrics = core.train_step(batch_at(99))
    for key in ("loss", "lr", "grad_norm", "step_time_s", "tokens_per_s", "mfu", "memory_mb"):
        assert key in metrics and math.isfinite(metrics[key]), key
    # 4 sequences of 16 tokens in the measured step time
    assert metrics["tokens_per_s"] == pytest.approx(4 * 16 / metrics["step_time_s"], rel=1e-12)
    assert 0 < metrics["mfu"] < 1
    report = core.get_performance_report()
    assert report["steps"] == 61 and report["tokens_seen"] == 61 * 4 * 16
    assert report["num_parameters"] == core.model.num_parameters()


def test_step_metrics_and_report_follow_from_the_steps():
    """tokens/s is the step's tokens (every micro-batch) over its measured time; MFU is the
    model's FLOPs per token times tokens/s over the given peak; the report averages the steps
    after the first (which carries one-off costs) and totals all of them."""
    peak = 1e12
    core = TruthGPTOptimizationCore(tiny_config(gradient_accumulation_steps=2, peak_flops=peak))
    rows = [core.train_step(batch_at(i, batch_size=8)) for i in range(4)]
    flops = core.raw_model.flops_per_token(16)
    for row in rows:
        assert row["tokens_per_s"] == pytest.approx(8 * 16 / row["step_time_s"], rel=1e-12)
        assert row["mfu"] == pytest.approx(flops * row["tokens_per_s"] / peak, rel=1e-12)
    report = core.get_performance_report()
    assert report["tokens_seen"] == 4 * 8 * 16
    steady = rows[1:]
    mean_tps = sum(r["tokens_per_s"] for r in steady) / len(steady)
    assert report["avg_tokens_per_s"] == pytest.approx(mean_tps, rel=1e-12)
    mean_time = sum(r["step_time_s"] for r in steady) / len(steady)
    assert report["avg_step_time_s"] == pytest.approx(mean_time, rel=1e-12)
    assert report["total_train_time_s"] == pytest.approx(sum(r["step_time_s"] for r in rows))
    assert report["first_loss"] == rows[0]["loss"] and report["last_loss"] == rows[-1]["loss"]


def raw_gradients(core, batch):
    """The gradient of the loss of `batch` at the core's current weights, unclipped."""
    core.model.train()
    loss, _ = core.compute_loss(batch)
    params = list(core.model.parameters())
    return dict(zip(params, torch.autograd.grad(loss, params), strict=True))


def global_norm(tensors):
    return torch.linalg.vector_norm(torch.stack([t.norm() for t in tensors])).item()


@pytest.mark.parametrize("grad_clip", [0.5, 100.0, 0.0])
def test_update_uses_gradients_clipped_to_grad_clip(grad_clip):
    """The optimiser steps with the gradient scaled by grad_clip / norm when its global norm
    exceeds grad_clip, and unchanged otherwise (or with grad_clip = 0: no clipping); the
    reported grad_norm is the norm before clipping."""
    core = TruthGPTOptimizationCore(tiny_config(grad_clip=grad_clip))
    batch = batch_at(0)
    raw = raw_gradients(core, batch)
    raw_norm = global_norm(raw.values())
    assert raw_norm > 1.0  # well above 0.5 and well below 100 at this initialisation
    factor = grad_clip / raw_norm if 0 < grad_clip < raw_norm else 1.0

    applied = {}

    def record(optimizer, args, kwargs):
        for group in optimizer.param_groups:
            for p in group["params"]:
                applied[p] = p.grad.detach().clone()

    core.setup_optimizer().register_step_pre_hook(record)
    metrics = core.train_step(batch)
    assert metrics["grad_norm"] == pytest.approx(raw_norm, rel=1e-5)
    assert applied.keys() == raw.keys()
    expected_norm = min(grad_clip, raw_norm) if grad_clip > 0 else raw_norm
    assert global_norm(applied.values()) == pytest.approx(expected_norm, rel=1e-5)
    for p, grad in applied.items():
        torch.testing.assert_close(grad, raw[p] * factor, rtol=1e-5, atol=1e-8)


def test_lr_schedule_warmup_then_cosine_to_min():
    cfg = TrainConfig(learning_rate=1.0, min_lr=0.1, warmup_steps=10, max_steps=110)
    lrs = [lr_at(s, cfg) for s in range(120)]
    assert lrs[0] < lrs[5] < lrs[9] < 1.0
    assert lrs[10] == pytest.approx(1.0)
    assert all(a >= b for a, b in itertools.pairwise(lrs[10:111]))
    assert lrs[110] == pytest.approx(0.1) and lrs[119] == pytest.approx(0.1)
    assert lrs[60] == pytest.approx(0.55)


def test_tuple_batches_are_already_shifted():
    core = TruthGPTOptimizationCore(tiny_config())
    b = batch_at(0)
    x = b["input_ids"]
    loss_dict, _ = core.compute_loss(b)
    loss_tuple, counted = core.compute_loss((x[:, :-1], x[:, 1:]))
    assert counted == 4 * 15
    assert loss_dict.item() == pytest.approx(loss_tuple.item(), rel=1e-5)


def test_same_seed_same_losses():
    def run() -> list[float]:
        core = TruthGPTOptimizationCore(tiny_config(hidden_dropout_prob=0.1))
        return [core.train_step(batch_at(i))["loss"] for i in range(5)]

    assert run() == run()


def test_gradient_accumulation_matches_one_big_batch():
    big = batch_at(0, batch_size=8)
    one = TruthGPTOptimizationCore(tiny_config())
    two = TruthGPTOptimizationCore(tiny_config(gradient_accumulation_steps=2))
    m1, m2 = one.train_step(big), two.train_step(big)
    assert m1["loss"] == pytest.approx(m2["loss"], rel=1e-5)
    assert m1["grad_norm"] == pytest.approx(m2["grad_norm"], rel=1e-4)
    for p1, p2 in zip(one.model.parameters(), two.model.parameters(), strict=True):
        # Adam normalises the step, so near-zero gradients amplify rounding: compare with
        # an absolute tolerance far below the step size (lr ≈ 1e-3 here).
        torch.testing.assert_close(p1, p2, rtol=1e-4, atol=1e-5)


def test_weight_decay_skips_lambda_norms_and_biases():
    core = TruthGPTOptimizationCore(tiny_config())
    opt = core.setup_optimizer()
    decayed = {id(p) for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    for name, p in core.model.named_parameters():
        assert (id(p) in decayed) == (p.dim() >= 2), name


def test_non_finite_step_is_skipped_then_run_stops():
    core = TruthGPTOptimizationCore(tiny_config(max_bad_steps=3))
    core.train_step(batch_at(0))
    before = {n: p.detach().clone() for n, p in core.model.named_parameters()}
    with torch.no_grad():
        core.model.blocks[0].mlp.c_fc.bias.fill_(float("nan"))
    for i in range(2):
        metrics = core.train_step(batch_at(1 + i))
        assert metrics["skipped"] == 1.0 and math.isnan(metrics["loss"])
    for name, p in core.model.named_parameters():
        if name != "blocks.0.mlp.c_fc.bias":
            assert torch.equal(p, before[name]), f"{name} changed on a skipped step"
    with pytest.raises(TrainingDiverged, match="3 consecutive"):
        core.train_step(batch_at(5))
    assert core.state.bad_steps_total == 3


def test_evaluate_is_deterministic_and_consistent():
    core = TruthGPTOptimizationCore(tiny_config(hidden_dropout_prob=0.2), chars_per_token=2.5)
    batches = [batch_at(100 + i) for i in range(3)]
    a, b = core.evaluate(batches), core.evaluate(batches)
    assert a == b
    assert a["perplexity"] == pytest.approx(math.exp(a["loss"]))
    assert a["bits_per_token"] == pytest.approx(a["loss"] / math.log(2))
    # bits per char = bits per token × tokens per char = bits per token / chars per token
    assert a["bits_per_char"] == pytest.approx(a["loss"] / math.log(2) / 2.5, rel=1e-12)
    assert core.evaluate(batches, max_batches=1)["tokens"] == 4 * 15
    assert a["loss"] == pytest.approx(math.log(VOCAB), rel=0.05)  # untrained: about ln V


def test_bits_per_char_of_a_split_uses_its_own_token_and_char_counts():
    """A token split knows its characters: bits per char = loss / ln 2 × tokens / chars, the
    formula `bits_per_char` applies to prepared metadata, whatever chars_per_token the core
    was given."""
    import numpy as np

    from truthgpt.data import bits_per_char
    from truthgpt.data.dataset import TokenSplit

    tokens = np.concatenate([batch_at(200 + i)["input_ids"].flatten().numpy() for i in range(2)])
    split = TokenSplit("val", tokens.astype(np.uint16), num_chars=3 * len(tokens) + 7)
    core = TruthGPTOptimizationCore(tiny_config(), chars_per_token=1.0)
    result = core.evaluate(split)
    ratio = len(tokens) / split.num_chars
    assert result["bits_per_char"] == pytest.approx(result["loss"] / math.log(2) * ratio, rel=1e-12)
    meta = {"splits": {"val": {"tokens": len(tokens), "chars": split.num_chars}}}
    assert bits_per_char(result["loss"], meta) == pytest.approx(result["bits_per_char"], rel=1e-12)
    assert bits_per_char(2.0, {"splits": {"val": {"tokens": 3, "chars": 12}}}) == pytest.approx(
        2.0 / math.log(2) / 4
    )


def test_bf16_autocast_trains_on_cpu():
    core = TruthGPTOptimizationCore(tiny_config(precision="bf16", distance_type="l1"))
    seen = []
    hook = core.model.blocks[0].mlp.c_fc.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    losses = [core.train_step(batch_at(i))["loss"] for i in range(30)]
    hook.remove()
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    assert seen and set(seen) == {torch.bfloat16}, "the matmuls did not run in bf16"
    assert core.model.blocks[0].mlp.c_fc.weight.dtype == torch.float32  # master weights
    fp32 = TruthGPTOptimizationCore(tiny_config(distance_type="l1"))
    seen.clear()
    hook = fp32.model.blocks[0].mlp.c_fc.register_forward_hook(
        lambda module, args, out: seen.append(out.dtype)
    )
    fp32.train_step(batch_at(0))
    hook.remove()
    assert set(seen) == {torch.float32}


def straight_and_resumed(config, folder, steps: int, stop: int):
    """(core trained `steps` steps in one go, its losses, core resumed from a checkpoint
    saved after `stop` steps and trained to `steps`, its losses after the resume)."""
    from truthgpt.training import load_core

    straight = TruthGPTOptimizationCore(config)
    losses = [straight.train_step(batch_at(i))["loss"] for i in range(steps)]
    first = TruthGPTOptimizationCore(config)
    for i in range(stop):
        first.train_step(batch_at(i))
    first.save_checkpoint(folder)
    resumed = load_core(folder)
    again = [resumed.train_step(batch_at(i))["loss"] for i in range(stop, steps)]
    return straight, losses, resumed, again


def test_bf16_run_checkpoints_and_resumes_exactly(tmp_path):
    config = tiny_config(precision="bf16", distance_type="l1")
    straight, losses, resumed, again = straight_and_resumed(config, tmp_path / "c", 6, 3)
    assert resumed.config.precision == "bf16"
    assert again == losses[3:]
    for (name, a), b in zip(
        straight.model.named_parameters(), resumed.model.parameters(), strict=True
    ):
        assert torch.equal(a, b), name


def test_fp16_on_cpu_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match="precision: fp16 needs a CUDA device"):
        TruthGPTOptimizationCore(tiny_config(precision="fp16"))


def test_bad_batches_are_named():
    core = TruthGPTOptimizationCore(tiny_config())
    with pytest.raises(ValueError, match="input_ids"):
        core.train_step({"labels": torch.zeros(2, 4, dtype=torch.long)})
    with pytest.raises(ValueError, match="labels shape"):
        core.train_step(
            {
                "input_ids": torch.zeros(2, 4, dtype=torch.long),
                "labels": torch.zeros(2, 3, dtype=torch.long),
            }
        )
    with pytest.raises(ValueError, match="outside the vocabulary"):
        core.train_step({"input_ids": torch.full((2, 4), VOCAB, dtype=torch.long)})


def test_build_config_merges_preset_file_and_overrides(tmp_path):
    toml = tmp_path / "c.toml"
    toml.write_text("[model]\nnum_hidden_layers = 2\n[train]\nlearning_rate = 0.002\n")
    cfg = build_config(
        vocab_size=65,
        preset_name="char-small",
        config_file=toml,
        overrides=parse_overrides(["distance_type=dot", "max_steps=7", "lambda_param=null"]),
    )
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.learning_rate) == (128, 2, 0.002)
    assert (cfg.distance_type, cfg.max_steps, cfg.vocab_size) == ("dot", 7, 65)
    with pytest.raises(ConfigError, match="unknown field"):
        build_config(vocab_size=65, overrides={"hiden_size": 3})
    with pytest.raises(ConfigError, match="vocab_size"):
        build_config(vocab_size=65, overrides={"vocab_size": 3})
    with pytest.raises(ConfigError, match="--set"):
        parse_overrides(["novalue"])
    bad = tmp_path / "bad.toml"
    bad.write_text("x = [")
    with pytest.raises(ConfigError, match=r"bad\.toml"):
        read_config_file(bad)


def test_config_errors_name_the_field():
    with pytest.raises(ConfigError, match="learning_rate"):
        tiny_config(learning_rate=-1)
    with pytest.raises(ConfigError, match="precision"):
        tiny_config(precision="fp8")
    with pytest.raises(ConfigError, match="min_lr"):
        tiny_config(min_lr=1.0)
    cfg = tiny_config()
    assert TruthGPTOptimizationCoreConfig.from_json(cfg.to_json()) == cfg
