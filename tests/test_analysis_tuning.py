"""λ tuning: only λ moves, it stays in range, and the result is never worse than before."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.data import RandomBatches, load_prepared, prepare_data
from truthgpt.nn.attention import LAMBDA_MAX, LAMBDA_MIN
from truthgpt.training import TruthGPTOptimizationCore, tune_lambda

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300))
EVAL_BATCHES = 3


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("tune")
    (root / "play.txt").write_text(TEXT, encoding="utf-8")
    prepare_data([str(root / "play.txt")], "char", root / "data")
    return load_prepared(root / "data")


def make_core(
    vocab_size: int, train_steps: int = 0, data=None, **changes
) -> TruthGPTOptimizationCore:
    fields = dict(
        vocab_size=vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        block_size=16,
        batch_size=8,
        warmup_steps=2,
        max_steps=100,
        learning_rate=1e-2,
        device="cpu",
        seed=0,
        peak_flops=1e12,
        eval_batches=EVAL_BATCHES,
        distance_type="l2",  # l1 compiles kernels on first use: slow for a test
    )
    fields.update(changes)
    core = TruthGPTOptimizationCore(TruthGPTOptimizationCoreConfig(**fields))
    if train_steps:
        sampler = RandomBatches(data.train, core.train_config.block_size, 8, seed=0)
        for step in range(train_steps):
            core.train_step(sampler.batch(step))
    return core


def snapshot(core: TruthGPTOptimizationCore) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in core.model.named_parameters()}


def assert_only_lambda_changed(core, before: dict[str, torch.Tensor]) -> None:
    for name, p in core.model.named_parameters():
        if not name.endswith("log_lambda"):
            assert torch.equal(p.detach(), before[name]), name


def val_loss(core, data) -> float:
    return core.evaluate(data.val, max_batches=EVAL_BATCHES)["loss"]


def test_tuning_moves_only_lambda_and_improves(data) -> None:
    # λ fixed far too soft during training, so tuning it has something to gain.
    core = make_core(
        data.vocab_size, train_steps=30, data=data, lambda_param=0.02, use_learnable_lambda=False
    )
    before = snapshot(core)
    flags = {name: p.requires_grad for name, p in core.model.named_parameters()}
    result = tune_lambda(core, data, num_epochs=2, steps_per_epoch=15, lr=0.05)

    assert_only_lambda_changed(core, before)
    assert flags == {name: p.requires_grad for name, p in core.model.named_parameters()}
    assert not core.model.blocks[0].attn.log_lambda.requires_grad  # learnable λ was off
    assert result["steps"] == 30 and result["skipped_steps"] == 0
    assert len(result["epochs"]) == 2
    assert result["kept"] == "tuned"
    assert result["val_loss_after"] < result["val_loss_before"]
    assert [pytest.approx([0.02, 0.02])] * 2 == result["lambda_before"]
    assert result["lambda_after"] == result["lambda_tuned"] != result["lambda_before"]
    assert core.model.lambdas().tolist() == result["lambda_after"]
    assert val_loss(core, data) == pytest.approx(result["val_loss_after"], rel=1e-6)
    assert result["clamped"] == []
    assert result["time_s"] > 0


def test_huge_lr_is_clamped_and_reported(data) -> None:
    core = make_core(data.vocab_size, train_steps=10, data=data)
    before = snapshot(core)
    result = tune_lambda(core, data, num_epochs=1, steps_per_epoch=4, lr=1e4)

    assert result["clamped"], "a step of 10^4 in log λ must leave the range"
    for entry in result["clamped"]:
        value = result["lambda_tuned"][entry["layer"]][entry["head"]]
        expected = LAMBDA_MIN if entry["bound"] == "min" else LAMBDA_MAX
        assert entry["lambda"] == expected and value == pytest.approx(expected, rel=1e-5)
        assert entry["times"] >= 1
    for p in (block.attn.log_lambda for block in core.model.blocks):
        assert bool((p >= math.log(LAMBDA_MIN) - 1e-6).all())
        assert bool((p <= math.log(LAMBDA_MAX) + 1e-6).all())
    assert_only_lambda_changed(core, before)
    assert_keeps_the_better(result)
    assert val_loss(core, data) == pytest.approx(result["val_loss_after"], rel=1e-6)


def test_worse_tuning_is_reverted_bit_for_bit(data, monkeypatch: pytest.MonkeyPatch) -> None:
    core = make_core(data.vocab_size)
    before = snapshot(core)
    real_evaluate = core.evaluate
    calls = []

    def evaluate(split, max_batches=None):  # the second measurement (after tuning) is worse
        metrics = dict(real_evaluate(split, max_batches=max_batches))
        calls.append(metrics["loss"])
        if len(calls) == 2:
            metrics["loss"] = calls[0] + 1.0
        return metrics

    monkeypatch.setattr(core, "evaluate", evaluate)
    result = tune_lambda(core, data, num_epochs=1, steps_per_epoch=3)
    assert result["kept"] == "original"
    assert result["lambda_tuned"] != result["lambda_before"]
    assert result["lambda_after"] == result["lambda_before"]
    assert result["val_loss_after"] == result["val_loss_before"]
    assert result["val_loss_tuned"] == result["val_loss_before"] + 1.0
    for name, p in core.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name  # λ included: restored exactly


def assert_keeps_the_better(result: dict) -> None:
    """The tuned λ stay only if their measured loss is lower (a check that a wrong choice
    fails, unlike after <= before, which keeping the better one makes true by definition)."""
    better = "tuned" if result["val_loss_tuned"] < result["val_loss_before"] else "original"
    assert result["kept"] == better
    assert result["val_loss_after"] == min(result["val_loss_tuned"], result["val_loss_before"])
    kept_lambda = result["lambda_tuned"] if better == "tuned" else result["lambda_before"]
    assert result["lambda_after"] == kept_lambda


def toy_batches(n: int, vocab: int = 20, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    batches = []
    for _ in range(n):
        start = torch.randint(0, vocab, (4, 1), generator=g)
        ids = (start + torch.arange(16)) % vocab
        batches.append({"input_ids": ids, "labels": ids.clone()})
    return batches


def test_iterable_of_batches_holds_out_part_for_validation() -> None:
    core = make_core(20)
    before = snapshot(core)
    result = tune_lambda(core, toy_batches(10), num_epochs=2)
    assert result["steps_per_epoch"] == 8 and result["steps"] == 16  # 2 of 10 held out
    assert_keeps_the_better(result)
    assert_only_lambda_changed(core, before)


def test_generator_serves_every_epoch_and_val_data_is_used() -> None:
    core = make_core(20)
    val = toy_batches(2, seed=1)
    result = tune_lambda(core, (b for b in toy_batches(5)), num_epochs=3, val_data=(b for b in val))
    assert result["steps"] == 15
    core.model.eval()
    assert core.evaluate(val)["loss"] == pytest.approx(result["val_loss_after"], rel=1e-6)


def test_steps_per_epoch_caps_an_iterable() -> None:
    core = make_core(20)
    result = tune_lambda(core, toy_batches(50), num_epochs=1, steps_per_epoch=4)
    assert result["steps"] == 4


def test_core_methods_delegate(data) -> None:
    core = make_core(data.vocab_size)
    result = core.optimize_attention_parameters(toy_batches(4, vocab=data.vocab_size), num_epochs=1)
    assert set(result) >= {
        "lambda_before",
        "lambda_after",
        "val_loss_before",
        "val_loss_after",
        "clamped",
        "steps",
        "time_s",
        "kept",
    }
    analysis = core.analyze_attention_patterns(data, num_samples=3)
    assert analysis["num_samples"] == 3 and analysis["block_size"] == 16
    assert len(analysis["layers"]) == 2


def test_bad_arguments(data) -> None:
    core = make_core(data.vocab_size)
    before = snapshot(core)
    with pytest.raises(ValueError, match="num_epochs"):
        tune_lambda(core, data, num_epochs=0)
    with pytest.raises(ValueError, match="lr"):
        tune_lambda(core, data, lr=-1.0)
    with pytest.raises(ValueError, match="lr"):
        tune_lambda(core, data, lr=math.nan)
    with pytest.raises(ValueError, match="steps_per_epoch"):
        tune_lambda(core, data, steps_per_epoch=0)
    with pytest.raises(ValueError, match="val_data"):
        tune_lambda(core, data.train)  # a single split has nothing held out
    with pytest.raises(ValueError, match="at least 2 batches"):
        tune_lambda(core, toy_batches(1, vocab=data.vocab_size))
    with pytest.raises(ValueError, match="data"):
        tune_lambda(core, 3.5)
    for name, p in core.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.requires_grad


def test_a_split_with_val_data(data, tmp_path: Path) -> None:
    core = make_core(data.vocab_size)
    result = tune_lambda(core, data.train, num_epochs=1, steps_per_epoch=2, val_data=data.val)
    assert result["steps"] == 2
    assert val_loss(core, data) == pytest.approx(result["val_loss_after"], rel=1e-6)


def test_an_interrupted_tuning_leaves_the_model_as_it_was(
    data, monkeypatch: pytest.MonkeyPatch
) -> None:
    core = make_core(data.vocab_size)
    before = snapshot(core)
    real_compute_loss = core.compute_loss
    calls = []

    def compute_loss(batch):
        calls.append(1)
        if len(calls) == 3:  # after two λ updates
            raise KeyboardInterrupt
        return real_compute_loss(batch)

    monkeypatch.setattr(core, "compute_loss", compute_loss)
    with pytest.raises(KeyboardInterrupt):
        tune_lambda(core, data, num_epochs=1, steps_per_epoch=5)
    for name, p in core.model.named_parameters():
        assert torch.equal(p.detach(), before[name]), name
        assert p.requires_grad and p.grad is None


def test_an_endless_iterable_is_capped(data) -> None:
    core = make_core(data.vocab_size)
    endless = iter(RandomBatches(data.train, 16, 4, seed=5))
    result = tune_lambda(core, endless, num_epochs=2, steps_per_epoch=3)
    assert result["steps"] == 6 and result["steps_per_epoch"] == 3
