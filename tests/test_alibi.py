"""ALiBi's position term −m_h·|i − j| in every attention path, against a float64 reference that
adds the bias by hand (outputs and the gradients of q, k, v and λ)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_attention import REFERENCE_DISTANCES, P, make
from truthgpt.nn.attention import backends, distance_attention, kinds, native, triton_kernels
from truthgpt.nn.attention.functional import alibi_slopes

KINDS = kinds.names()
BLOCKED_KINDS = kinds.names("blocked")


def hand_bias(slopes, Tq, Tk):
    """−m_h·|i + Tk − Tq − j|, written out element by element."""
    bias = torch.zeros(len(slopes), Tq, Tk, dtype=torch.float64)
    for h in range(len(slopes)):
        for i in range(Tq):
            for j in range(Tk):
                bias[h, i, j] = -float(slopes[h]) * abs(i + Tk - Tq - j)
    return bias


def reference(q, k, v, kind, scale, slopes, causal=True, attn_mask=None, p=P):
    """Naive float64 attention with the position term added by hand."""
    q, k, v = q.double(), k.double(), v.double()
    s = scale.double().view(1, -1, 1, 1) if isinstance(scale, torch.Tensor) else scale
    scores = -s * REFERENCE_DISTANCES[kind](q, k, p)
    H, Tq, Tk = q.shape[1], q.shape[2], k.shape[2]
    if Tq * Tk <= 100:
        bias = hand_bias(slopes, Tq, Tk)
    else:  # the same formula on index tensors (checked against hand_bias below)
        i = torch.arange(Tq, dtype=torch.float64)[:, None] + (Tk - Tq)
        j = torch.arange(Tk, dtype=torch.float64)[None, :]
        bias = -slopes.double().view(H, 1, 1) * (i - j).abs()
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


def assert_like_reference(out, want, inputs, **tolerance) -> None:
    """Output and the gradients of `inputs` (q, k, v, λ) equal the reference's, for one
    random output gradient."""
    torch.testing.assert_close(out.to(want.dtype), want, **tolerance)
    g = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, g)
    exp = torch.autograd.grad(want, inputs, g.to(want.dtype))
    for a, b in zip(got, exp, strict=True):
        torch.testing.assert_close(a, b, **tolerance)


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
    assert_like_reference(out, want, (q, k, v, scale))


def test_reference_bias_on_indices_is_the_hand_written_one():
    slopes = torch.tensor([0.5, 0.125, 2.0])
    i = torch.arange(4, dtype=torch.float64)[:, None] + 5
    j = torch.arange(9, dtype=torch.float64)[None, :]
    vectorised = -slopes.double().view(3, 1, 1) * (i - j).abs()
    torch.testing.assert_close(vectorised, hand_bias(slopes, 4, 9))


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
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)  # the output, tighter
    assert_like_reference(out, want, (q, k, v, scale), atol=2e-4, rtol=1e-3)


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


# --------------------------------------------------------------------------------------------
# the kernels compute the term themselves: no fallback to the plain path


def _kernel_backends() -> list[str]:
    return ["eager"] + (["native"] if native.available() else [])


@pytest.fixture
def no_plain_path(monkeypatch):
    """Any call that would fall back to the plain path fails instead."""

    def refuse(*args, **kwargs):
        raise AssertionError("the call fell back to the plain path")

    monkeypatch.setattr(backends, "run_plain", refuse)


def test_the_fixture_catches_a_fallback(no_plain_path):
    """One decoding step on a blocked backend takes the plain path on purpose: it now fails,
    so the fixture does catch a fallback."""
    q, k, v = make(Tq=1, Tk=4)
    with pytest.raises(AssertionError, match="plain path"):
        distance_attention(q, k, v, "l1", 1.0, alibi=alibi_slopes(3), backend="eager")


@pytest.mark.parametrize("backend", _kernel_backends())
@pytest.mark.parametrize("kind", BLOCKED_KINDS)
@pytest.mark.parametrize("causal", [True, False])
def test_kernels_compute_the_term_themselves(no_plain_path, backend, kind, causal):
    """Across several of the kernels' tiles (64 keys, native; 32, eager), Tq < Tk."""
    if backend == "native" and kinds.get(kind).kernel.native_code is None:
        pytest.skip("not a native kind")
    q, k, v = make(B=1, H=2, Tq=70, Tk=150, D=8, dtype=torch.float64, grad=True, seed=3)
    scale = torch.tensor([0.4, 0.9], dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.05, 0.3], dtype=torch.float64)
    out = distance_attention(
        q, k, v, kind, scale, causal=causal, p=P, alibi=slopes, backend=backend
    )
    want = reference(q, k, v, kind, scale, slopes, causal)
    assert_like_reference(out, want, (q, k, v, scale))


needs_native = pytest.mark.skipif(not native.available(), reason="native kernel not built")


@needs_native
@pytest.mark.parametrize("Tq", [1, 3, 8])  # the decoding path: one task per head
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_native_decoding_steps(no_plain_path, Tq, kind):
    q, k, v = make(B=2, H=3, Tq=Tq, Tk=200, D=16, seed=5)
    slopes = alibi_slopes(3)
    scale = torch.tensor([0.5, 0.8, 1.1])
    with torch.no_grad():
        out = distance_attention(q, k, v, kind, scale, alibi=slopes, backend="native")
    want = reference(q, k, v, kind, scale, slopes)
    torch.testing.assert_close(out.double(), want, atol=2e-5, rtol=1e-4)


@needs_native
@pytest.mark.parametrize("kind", ["l1", "l2", "chebyshev", "lp"])
@pytest.mark.parametrize("D", [3, 8])  # 8: the vector code in float64; 3: plain loops
def test_native_gradcheck_with_alibi(kind, D):
    """q, k, v and λ: λ's gradient −Σ dS·d does not see the position term."""
    q, k, v = make(B=1, H=2, Tq=66, Tk=70, D=D, dtype=torch.float64, grad=True, seed=6)
    scale = torch.tensor([0.7, 1.3], dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.02, 0.25], dtype=torch.float64)

    def f(q, k, v, scale):
        return native.native_attention(q, k, v, kind, scale, p=P, alibi=slopes)

    assert torch.autograd.gradcheck(f, (q, k, v, scale), fast_mode=True)


@needs_native
def test_native_lambda_gradient_is_minus_ds_times_distance():
    """dλ_h = −Σ dS·d written out: the score's derivative in λ, the position term aside."""
    q, k, v = make(B=1, H=2, Tq=9, Tk=9, D=4, dtype=torch.float64, seed=7)
    scale = torch.tensor([0.6, 1.1], dtype=torch.float64, requires_grad=True)
    slopes = torch.tensor([0.3, 0.7], dtype=torch.float64)
    out = native.native_attention(q, k, v, "l1", scale, alibi=slopes)
    g = torch.randn_like(out)
    (got,) = torch.autograd.grad(out, scale, g)
    dist = REFERENCE_DISTANCES["l1"](q, k, P)
    scores = (-scale.detach().view(1, 2, 1, 1) * dist + hand_bias(slopes, 9, 9)).masked_fill(
        torch.ones(9, 9, dtype=torch.bool).triu(1), -math.inf
    )
    prob = torch.softmax(scores, -1)
    dp = g @ v.transpose(-1, -2)
    ds = prob * (dp - (dp * prob).sum(-1, keepdim=True))
    torch.testing.assert_close(got, -(ds * dist).sum((0, 2, 3)))


@settings(max_examples=25, deadline=None)
@given(
    backend=st.sampled_from(_kernel_backends()),
    kind=st.sampled_from(["l1", "l2", "chebyshev", "lp"]),
    H=st.integers(1, 3),
    Tq=st.integers(1, 90),
    extra=st.integers(0, 80),
    D=st.sampled_from([1, 3, 8]),
    causal=st.booleans(),
    masked=st.booleans(),
    slopes=st.lists(st.floats(0.0, 2.0), min_size=3, max_size=3),
    seed=st.integers(0, 2**16),
)
def test_property(backend, kind, H, Tq, extra, D, causal, masked, slopes, seed):
    """Output and the gradients of q, k, v and λ equal the reference for any shape, slopes
    (zero included), causal or not, with a boolean mask that may leave rows with no key."""
    Tk = Tq + extra
    if backend == "eager" and Tq == 1:
        Tq = 2  # one decoding step is the plain path's on purpose (backends._blocked)
        Tk = max(Tk, Tq)
    q, k, v = make(B=2, H=H, Tq=Tq, Tk=Tk, D=D, dtype=torch.float64, grad=True, seed=seed)
    scale = torch.linspace(0.3, 1.2, H, dtype=torch.float64).requires_grad_()
    m = torch.tensor(slopes[:H], dtype=torch.float64)
    mask = None
    if masked:
        mask = torch.rand(2, 1, Tq, Tk, generator=torch.Generator().manual_seed(seed)) > 0.3
    run_plain = backends.run_plain
    try:
        backends.run_plain = _refuse_plain
        out = distance_attention(
            q, k, v, kind, scale, causal=causal, attn_mask=mask, p=P, alibi=m, backend=backend
        )
    finally:
        backends.run_plain = run_plain
    want = reference(q, k, v, kind, scale, m, causal, mask)
    assert_like_reference(out, want, (q, k, v, scale))


def _refuse_plain(*args, **kwargs):
    raise AssertionError("the call fell back to the plain path")
