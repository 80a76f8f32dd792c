"""ALiBi's position term −m_h·|i − j| in every attention path, against a float64 reference that
adds the bias by hand (outputs and the gradients of q, k, v and λ)."""

from __future__ import annotations

import math

import pytest
import torch

from test_attention import REFERENCE_DISTANCES, P, make
from truthgpt.nn.attention import distance_attention, kinds, native, triton_kernels
from truthgpt.nn.attention.functional import alibi_slopes

KINDS = kinds.names()
BLOCKED_KINDS = kinds.names("blocked")


def reference(q, k, v, kind, scale, slopes, causal=True, attn_mask=None, p=P):
    """Naive float64 attention with the position term written out element by element."""
    q, k, v = q.double(), k.double(), v.double()
    s = scale.double().view(1, -1, 1, 1) if isinstance(scale, torch.Tensor) else scale
    scores = -s * REFERENCE_DISTANCES[kind](q, k, p)
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    bias = torch.zeros(H, Tq, Tk, dtype=torch.float64)
    for h in range(H):
        for i in range(Tq):
            for j in range(Tk):
                bias[h, i, j] = -float(slopes[h]) * abs(i + Tk - Tq - j)
    scores = scores + bias
    if causal:
        i = torch.arange(Tq)[:, None]
        j = torch.arange(Tk)[None, :]
        scores = scores.masked_fill(j > i + Tk - Tq, -math.inf)
    if attn_mask is not None:
        scores = scores.masked_fill(~attn_mask, -math.inf)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return weights @ v


def test_slopes_are_alibis_geometric_sequence():
    """Powers of two: 2^(−8h/H); other head counts: the power below, then every other slope of
    the power above (the values of the ALiBi paper's reference code)."""
    assert alibi_slopes(8).tolist() == [2.0**-h for h in range(1, 9)]
    torch.testing.assert_close(alibi_slopes(4), torch.tensor([2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8]))
    six = [2.0**-2, 2.0**-4, 2.0**-6, 2.0**-8, 2.0**-1, 2.0**-3]
    torch.testing.assert_close(alibi_slopes(6), torch.tensor(six))
    assert alibi_slopes(1).tolist() == [2.0**-8]
    with pytest.raises(ValueError, match="num_heads"):
        alibi_slopes(0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
def test_every_kind_on_its_own_path(kind, causal):
    """The path each kind takes by default (SDPA for dot, cosine, sql2; the kernels for the
    rest), forward and the gradients of q, k, v and λ."""
    q, k, v = make(H=4, Tq=5, Tk=7, D=6, dtype=torch.float64, grad=True)
    scale = torch.linspace(0.3, 1.2, 4, dtype=torch.float64).requires_grad_()
    slopes = alibi_slopes(4).double() * 4  # steep enough to matter at these lengths
    out = distance_attention(q, k, v, kind, scale, causal=causal, p=P, alibi=slopes)
    want = reference(q, k, v, kind, scale, slopes, causal)
    torch.testing.assert_close(out, want)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, scale), g)
    exp = torch.autograd.grad(want, (q, k, v, scale), g)
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b)


def _backends() -> list[str]:
    names = ["plain", "eager"]
    if native.available():
        names.append("native")
    if triton_kernels.available() and triton_kernels.interpreted():
        names.append("triton")
    return names


@pytest.mark.parametrize("backend", _backends())
@pytest.mark.parametrize("kind", BLOCKED_KINDS)
def test_kernel_backends_with_a_user_mask(backend, kind):
    """Every backend of the kernel kinds, with a boolean user mask and a dead row, Tq < Tk
    (the queries are the last positions, as in decoding with a cache)."""
    q, k, v = make(B=2, H=3, Tq=4, Tk=9, D=5, grad=True)
    scale = torch.tensor([0.5, 0.8, 1.1], requires_grad=True)
    slopes = alibi_slopes(3) * 3
    mask = torch.rand(2, 1, 4, 9, generator=torch.Generator().manual_seed(1)) > 0.3
    mask[0, 0, 1] = False  # one dead row
    out = distance_attention(
        q, k, v, kind, scale, attn_mask=mask, p=P, alibi=slopes, backend=backend
    )
    want = reference(q, k, v, kind, scale, slopes, True, mask)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v, scale), g)
    exp = torch.autograd.grad(want, (q, k, v, scale), g.double())
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, atol=2e-4, rtol=1e-3)


def test_zero_slopes_change_nothing():
    q, k, v = make()
    scale = torch.tensor([0.5, 0.8, 1.1])
    plain = distance_attention(q, k, v, "l1", scale)
    zero = distance_attention(q, k, v, "l1", scale, alibi=torch.zeros(3))
    torch.testing.assert_close(zero, plain)


@pytest.mark.parametrize(
    "alibi, message",
    [
        (torch.ones(4), r"alibi must be None or a floating tensor of shape \(H,\)=\(3,\)"),
        (torch.ones(3, dtype=torch.long), "alibi must be None or a floating tensor"),
        ([0.5, 0.5, 0.5], "alibi must be None or a floating tensor"),
        (torch.tensor([0.5, -0.1, 0.5]), "alibi slopes must be finite and >= 0"),
        (torch.tensor([0.5, math.nan, 0.5]), "alibi slopes must be finite and >= 0"),
    ],
)
def test_bad_slopes_are_named(alibi, message):
    q, k, v = make()
    with pytest.raises(ValueError, match=message):
        distance_attention(q, k, v, "l1", 1.0, alibi=alibi)
