"""The attention options studied in benchmarks/results/scale.md: q/k normalisation before the
distance (qk_norm, qk_norm_gain) and a learning rate of its own for log λ (lambda_lr_scale)."""

from __future__ import annotations

import pytest
import torch

from test_training import batch_at, straight_and_resumed, tiny_config
from truthgpt.config import ConfigError, TruthGPTConfig
from truthgpt.nn.attention import DistanceAttention, distance_attention
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import TruthGPTOptimizationCore, load_core


def layer(kind: str, **options) -> DistanceAttention:
    torch.manual_seed(0)
    return DistanceAttention(16, 2, kind, bias=False, **options).double()


def reference(m: DistanceAttention, x: torch.Tensor, norm) -> torch.Tensor:
    """The layer's output computed by hand: project, normalise each head's q and k, attend."""
    B, T, C = x.shape
    q, k, v = (t.view(B, T, 2, 8).transpose(1, 2) for t in m.c_attn(x).split(C, dim=2))
    q, k = norm(q, m.q_gain), norm(k, m.k_gain)
    y = distance_attention(q, k, v, m.distance_type, m.lambda_, backend="eager")
    return m.c_proj(y.transpose(1, 2).reshape(B, T, C))


def rms(x, gain):
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 if gain is None else gain)


def standardise(x, gain):
    x = x - x.mean(-1, keepdim=True)
    return x / x.pow(2).mean(-1, keepdim=True).add(1e-6).sqrt() * (1 if gain is None else gain)


@pytest.mark.parametrize("kind", ["l1", "l2", "dot", "cosine"])
@pytest.mark.parametrize(("qk_norm", "norm"), [("rms", rms), ("layer", standardise)])
@pytest.mark.parametrize("gain", [False, True])
def test_qk_norm_matches_the_formula(kind, qk_norm, norm, gain):
    m = layer(kind, qk_norm=qk_norm, qk_norm_gain=gain)
    if gain:
        with torch.no_grad():  # gains away from 1, so that a gain left out is seen
            m.q_gain.uniform_(0.5, 2.0)
            m.k_gain.uniform_(0.5, 2.0)
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    torch.testing.assert_close(m(x).output, reference(m, x, norm), rtol=1e-10, atol=1e-12)


def test_rms_norm_makes_attention_blind_to_the_scale_of_q_and_k():
    """Why the option exists: without it, projections that grow sharpen distance attention."""
    plain, normed = layer("l1"), layer("l1", qk_norm="rms")
    x = torch.randn(2, 7, 16, dtype=torch.float64)
    before = [m(x).output for m in (plain, normed)]
    for m in (plain, normed):
        with torch.no_grad():
            m.c_attn.weight[:32] *= 3.0  # the q and k rows
    assert not torch.allclose(plain(x).output, before[0], atol=1e-3)
    torch.testing.assert_close(normed(x).output, before[1], rtol=0, atol=1e-5)  # eps aside


def test_gains_exist_only_with_a_norm_and_learn():
    assert layer("l1", qk_norm_gain=True).q_gain is None  # no norm: nothing to scale
    m = layer("l1", qk_norm="rms", qk_norm_gain=True)
    m(torch.randn(1, 5, 16, dtype=torch.float64)).output.square().sum().backward()
    assert m.q_gain.grad.abs().sum() > 0 and m.k_gain.grad.abs().sum() > 0


def test_cached_decoding_equals_the_full_forward():
    config = TruthGPTConfig(
        vocab_size=30, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=16, distance_type="l1", qk_norm="rms", qk_norm_gain=True,
    )  # fmt: skip
    torch.manual_seed(0)
    model = TruthGPTModel(config).eval()
    assert model.blocks[0].attn.qk_norm == "rms" and model.blocks[0].attn.q_gain is not None
    ids = torch.randint(0, 30, (1, 10))
    with torch.no_grad():
        full = model(ids).logits
        out = model(ids[:, :6], use_cache=True)
        steps = [out.logits]
        for i in range(6, 10):
            out = model(ids[:, i : i + 1], past_key_values=out.past_key_values, use_cache=True)
            steps.append(out.logits)
    torch.testing.assert_close(torch.cat(steps, dim=1), full, rtol=1e-5, atol=1e-5)


def test_save_and_load_keep_the_option(tmp_path):
    core = TruthGPTOptimizationCore(tiny_config(qk_norm="layer", qk_norm_gain=True))
    core.train_step(batch_at(0))
    core.save_checkpoint(tmp_path / "c")
    again = load_core(tmp_path / "c")
    assert again.config.qk_norm == "layer" and again.config.qk_norm_gain is True
    for (name, a), b in zip(
        core.model.state_dict().items(), again.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("qk_norm", "l2", "qk_norm: must be one of none, rms, layer"),
        ("qk_norm_gain", "yes", "qk_norm_gain: must be true or false"),
        ("lambda_lr_scale", 0, r"lambda_lr_scale: must be in \(0, 1000\]"),
        ("lambda_lr_scale", 1e4, r"lambda_lr_scale: must be in \(0, 1000\]"),
    ],
)
def test_bad_values_are_named(field, value, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(**{field: value})


def test_lambda_lr_scale_gives_log_lambda_its_own_rate():
    lambdas = lambda core: {id(b.attn.log_lambda) for b in core.raw_model.blocks}  # noqa: E731
    same = TruthGPTOptimizationCore(tiny_config(distance_type="l1"))
    assert len(same.setup_optimizer().param_groups) == 2  # the layout of earlier releases
    core = TruthGPTOptimizationCore(tiny_config(distance_type="l1", lambda_lr_scale=10.0))
    before = core.raw_model.lambdas().log()
    core.train_step(batch_at(0))
    groups = core.optimizer.param_groups
    own = [g for g in groups if {id(p) for p in g["params"]} == lambdas(core)]
    assert len(groups) == 3 and len(own) == 1 and own[0]["weight_decay"] == 0.0
    assert own[0]["lr"] == pytest.approx(10 * groups[0]["lr"]) and groups[0]["lr"] > 0
    # AdamW's first step moves each weight by about its lr: λ by ten times the others' rate
    moved = (core.raw_model.lambdas().log() - before).abs()
    torch.testing.assert_close(moved, torch.full_like(moved, own[0]["lr"]), rtol=0.05, atol=0)


def test_lambda_lr_scale_resumes_exactly(tmp_path):
    config = tiny_config(distance_type="l1", lambda_lr_scale=5.0)
    _, losses, resumed, again = straight_and_resumed(config, tmp_path / "c", 4, 2)
    assert len(resumed.optimizer.param_groups) == 3 and again == losses[2:]


@pytest.mark.parametrize("kind", ["l1", "l2", "chebyshev", "lp", "dot", "cosine", "sql2"])
def test_default_lambda_is_scaled_with_width_for_norms_of_q_minus_k(kind):
    """At width 128 every kind starts at the registry's λ; 4× wider, the norms of q − k start
    at half of it (their scores grow with the size of q and k), the dot-product kinds not."""
    from truthgpt.nn.attention import default_lambda
    from truthgpt.nn.model import initial_lambda

    p = 3.0 if kind == "lp" else None
    for width, heads in ((128, 4), (512, 8)):
        config = TruthGPTConfig(
            vocab_size=30, hidden_size=width, num_attention_heads=heads, distance_type=kind,
            num_hidden_layers=1, max_position_embeddings=8,
        )  # fmt: skip
        registry = default_lambda(kind, width // heads, p=p)
        scaled = kind in ("l1", "l2", "chebyshev", "lp") and width == 512
        assert initial_lambda(config) == pytest.approx(registry / 2 if scaled else registry)
        torch.testing.assert_close(
            TruthGPTModel(config).lambdas()[0],
            torch.full((heads,), initial_lambda(config)),
            rtol=1e-6,
            atol=0,
        )
        given = TruthGPTConfig(**{**config.to_dict(), "lambda_param": 0.3})
        assert initial_lambda(given) == 0.3  # an explicit λ is taken as it is
