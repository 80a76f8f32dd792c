"""DistanceAttention: λ per head, projections, KV cache, weights, errors."""

from __future__ import annotations

import math

import pytest
import torch

from truthgpt.config import ConfigError
from truthgpt.nn.attention import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    AttentionOutput,
    DistanceAttention,
    default_lambda,
    kinds,
)

KINDS = kinds.names()


def layer(kind="l1", **kw):
    torch.manual_seed(0)
    return DistanceAttention(16, 4, kind, p=3.0 if kind == "lp" else None, **kw)


def test_layout_and_names():
    m = layer()
    names = dict(m.named_parameters())
    assert set(names) == {
        "c_attn.weight",
        "c_attn.bias",
        "c_proj.weight",
        "c_proj.bias",
        "log_lambda",
    }
    assert names["c_attn.weight"].shape == (48, 16)
    assert names["log_lambda"].shape == (4,)
    assert "bias" not in "".join(dict(layer(bias=False).named_parameters()))


@pytest.mark.parametrize("kind", KINDS)
def test_default_lambda_is_used(kind):
    m = layer(kind)
    torch.testing.assert_close(
        m.lambda_, torch.full((4,), default_lambda(kind, 4, p=m.p)), rtol=1e-6, atol=0
    )


def test_default_lambda_table():
    D = 64
    assert default_lambda("dot", D) == pytest.approx(1 / 8)
    assert default_lambda("sql2", D) == pytest.approx(1 / 16)
    assert default_lambda("cosine", D) == pytest.approx(8.0)
    assert default_lambda("l1", D) == pytest.approx(2 / 8)
    assert default_lambda("l2", D) == 2.0
    assert default_lambda("chebyshev", D) == 3.0
    # lp meets l1 at p=1 and l2 at p=2, and tends to chebyshev's value
    assert default_lambda("lp", D, p=1.0) == pytest.approx(default_lambda("l1", D))
    assert default_lambda("lp", D, p=2.0) == pytest.approx(default_lambda("l2", D))
    assert default_lambda("lp", D, p=1e9) == pytest.approx(default_lambda("chebyshev", D))
    with pytest.raises(ValueError, match="p is required"):
        default_lambda("lp", D)
    assert default_lambda("Manhattan", D) == default_lambda("l1", D)  # an alias
    with pytest.raises(ValueError, match="unknown distance kind 'hamming'; registered: dot"):
        default_lambda("hamming", D)
    with pytest.raises(ValueError, match="head_dim"):
        default_lambda("l1", 0)


@pytest.mark.parametrize("kind", kinds.builtin_names())
def test_default_lambda_gives_a_sensible_score_spread(kind):
    """The defaults' claim: std of one query's scores across keys is 1-2 at initialisation."""
    g = torch.Generator().manual_seed(0)
    D = 64
    q = torch.randn(64, D, generator=g, dtype=torch.float64)
    k = torch.randn(1024, D, generator=g, dtype=torch.float64)
    scores = -kinds.get(kind).pairwise(q, k, 3.0)
    spread = (default_lambda(kind, D, p=3.0) * scores).std(dim=1).mean().item()
    assert 0.9 <= spread <= 2.0, spread


def test_lambda_positive_clamped_and_learnable():
    m = layer(lambda_init=0.5)
    torch.testing.assert_close(m.lambda_, torch.full((4,), 0.5))
    assert m.log_lambda.requires_grad
    with torch.no_grad():
        m.log_lambda.copy_(torch.tensor([-50.0, 50.0, 0.0, math.log(2.0)]))
    torch.testing.assert_close(m.lambda_, torch.tensor([LAMBDA_MIN, LAMBDA_MAX, 1.0, 2.0]))
    assert (m.lambda_ > 0).all()
    x = torch.randn(2, 5, 16)
    m(x).output.sum().backward()
    assert m.log_lambda.grad is not None and m.log_lambda.grad[2:].abs().sum() > 0


def test_lambda_not_learnable_is_still_a_parameter():
    m = layer(learnable_lambda=False)
    assert isinstance(m.log_lambda, torch.nn.Parameter)
    assert not m.log_lambda.requires_grad
    assert "log_lambda" in m.state_dict()
    m(torch.randn(2, 5, 16)).output.sum().backward()
    assert m.log_lambda.grad is None


@pytest.mark.parametrize("kind", KINDS)
def test_kv_cache_matches_full_sequence(kind):
    m = layer(kind).eval()
    x = torch.randn(2, 9, 16)
    full = m(x).output
    first = m(x[:, :4], use_cache=True)
    outputs, past = [first.output], first.past_key_value
    assert past[0].shape == (2, 4, 4, 4)
    for t in range(4, 9):
        step = m(x[:, t : t + 1], past_key_value=past, use_cache=True)
        outputs.append(step.output)
        past = step.past_key_value
    assert past[0].shape == past[1].shape == (2, 4, 9, 4)
    torch.testing.assert_close(torch.cat(outputs, dim=1), full, atol=1e-5, rtol=1e-5)
    # several new tokens at once after a prefix
    prefix = m(x[:, :6], use_cache=True).past_key_value
    chunk = m(x[:, 6:], past_key_value=prefix)
    torch.testing.assert_close(chunk.output, full[:, 6:], atol=1e-5, rtol=1e-5)


def test_output_fields():
    m = layer()
    x = torch.randn(2, 5, 16)
    out = m(x)
    assert isinstance(out, AttentionOutput)
    assert out.output.shape == (2, 5, 16)
    assert out.past_key_value is None and out.weights is None
    out = m(x, need_weights=True, use_cache=True)
    assert out.weights.shape == (2, 4, 5, 5)
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(2, 4, 5))
    assert torch.triu(out.weights, diagonal=1).abs().sum() == 0  # causal
    torch.testing.assert_close(out.output, m(x).output)


def test_attention_mask_is_passed_through():
    m = layer().eval()
    x = torch.randn(2, 5, 16)
    keep = torch.ones(2, 1, 1, 5, dtype=torch.bool)
    keep[0, ..., 0] = False
    masked = m(x, attn_mask=keep).output
    assert torch.allclose(masked[1], m(x).output[1], atol=1e-6)
    assert not torch.allclose(masked[0, 1:], m(x).output[0, 1:])


def test_dropout_only_in_training():
    m = layer("dot", dropout=0.5)
    x = torch.randn(2, 6, 16)
    m.eval()
    torch.testing.assert_close(m(x).output, m(x).output)
    m.train()
    torch.manual_seed(0)
    a = m(x).output
    torch.manual_seed(1)
    assert not torch.allclose(a, m(x).output)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(hidden_size=10, num_heads=4), "divisible"),
        (dict(num_heads=0), "num_heads"),
        (dict(distance_type="hamming"), "^distance_type: unknown distance kind 'hamming'"),
        (dict(distance_type="lp"), "p is required"),
        (dict(distance_type="lp", p=-2.0), "p must be"),
        (dict(lambda_init=0.0), "lambda_init"),
        (dict(lambda_init=1e6), "lambda_init"),
        (dict(dropout=1.5), "dropout"),
    ],
)
def test_constructor_errors(kwargs, match):
    args = dict(hidden_size=16, num_heads=4, distance_type="l1")
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        DistanceAttention(**args)


def test_distance_type_resolves_aliases_and_names_an_unknown_kind():
    assert DistanceAttention(16, 4, "Manhattan").distance_type == "l1"
    assert DistanceAttention(16, 4, "linf").distance_type == "chebyshev"
    with pytest.raises(ConfigError) as err:
        DistanceAttention(16, 4, "hamming")
    message = str(err.value)
    assert message.startswith("distance_type: unknown distance kind 'hamming'")
    assert all(kind in message for kind in KINDS)


def test_forward_errors():
    m = layer()
    with pytest.raises(ValueError, match="x must have shape"):
        m(torch.randn(2, 5, 8))
    bad_past = (torch.randn(2, 4, 3, 5), torch.randn(2, 4, 3, 5))
    with pytest.raises(ValueError, match=r"past_key_value\[0\] must have shape"):
        m(torch.randn(2, 1, 16), past_key_value=bad_past)
    with pytest.raises(ValueError, match="past_key_value must be"):
        m(torch.randn(2, 1, 16), past_key_value=torch.randn(2, 4, 3, 4))


def test_lambda_reaches_the_kernel_in_fp32_under_bf16_autocast():
    """Under bf16 autocast q, k, v are bf16 but λ stays fp32 on its way to the distance
    kernels: a change of λ far below bf16's resolution (2^-8) still changes the output."""
    m = layer("l1")
    x = torch.randn(2, 6, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        before = m(x).output
        m.log_lambda.add_(2.0**-14)  # λ × (1 + 2^-14): the same number in bf16
        assert torch.equal(m.lambda_.bfloat16(), (m.lambda_ / (1 + 2.0**-14)).bfloat16())
        after = m(x).output
    assert not torch.equal(before, after)
