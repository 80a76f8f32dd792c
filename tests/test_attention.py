"""distance_attention against a naive float64 reference written here, for every kind.

The tests run over every registered kind; REFERENCE_DISTANCES holds each one's naive formula,
so a new kind is one registry entry plus one row there. Tests that take the `backend` fixture
run once per backend of the blocked kinds (l1, l2, chebyshev, lp): the native C++ kernel and
the eager blocked kernel. The compiled kernel costs 20-60 s to compile, so
tests/test_attention_compiled.py covers it, against the same reference.
"""

from __future__ import annotations

import math
import os
import warnings

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from truthgpt.nn.attention import distance_attention, kinds, native
from truthgpt.nn.attention.functional import BACKEND_ENV
from truthgpt.nn.attention.kernels import blocked_attention, dropout_multipliers

P = 3.0  # the exponent used for kind="lp"
KINDS = kinds.names()  # every registered kind
BLOCKED_KINDS = kinds.names("blocked")  # the kinds with a MinkowskiKernel
needs_native = pytest.mark.skipif(
    not native.available(), reason=f"native kernel not built: {native.UNAVAILABLE}"
)


@pytest.fixture(params=["native", "eager"])
def backend(request, monkeypatch):
    """Runs a test once per backend of the blocked kinds (the default for the process)."""
    if request.param == "native" and not native.available():
        pytest.skip(f"native kernel not built: {native.UNAVAILABLE}")
    monkeypatch.setenv(BACKEND_ENV, request.param)
    return request.param


def test_native_kernel_is_built_where_required():
    """The Makefile (and so CI) requires the native kernel: a build that silently fell back
    would otherwise leave its tests skipped."""
    if os.environ.get("TRUTHGPT_REQUIRE_NATIVE") != "1":
        pytest.skip("TRUTHGPT_REQUIRE_NATIVE is not set")
    assert native.available(), native.UNAVAILABLE


def eager_blocked(*args, **kwargs):
    """The blocked kernel, eagerly (its block sizes are arguments)."""
    return blocked_attention(*args, compiled=False, **kwargs)


def l1_eager(q, k, v, scale, *args, **kwargs):
    return eager_blocked(q, k, v, "l1", scale, *args, **kwargs)


def _diff(q, k):
    """q (…, Tq, D), k (…, Tk, D) -> q_i − k_j, (…, Tq, Tk, D)."""
    return q[..., :, None, :] - k[..., None, :, :]


def _prod(q, k):
    return q[..., :, None, :] * k[..., None, :, :]


def _unit(x):
    return x / x.norm(dim=-1, keepdim=True).clamp(min=1e-6)


# The naive formula of every kind, one row each: (q, k, p) -> (…, Tq, Tk) distances from the
# (…, Tq, Tk, D) broadcast. Scores are −λ·d, so the similarities enter negated.
REFERENCE_DISTANCES = {
    "dot": lambda q, k, p: -_prod(q, k).sum(-1),
    "cosine": lambda q, k, p: -_prod(_unit(q), _unit(k)).sum(-1),
    "l1": lambda q, k, p: _diff(q, k).abs().sum(-1),
    "l2": lambda q, k, p: _diff(q, k).pow(2).sum(-1).sqrt(),
    "sql2": lambda q, k, p: _diff(q, k).pow(2).sum(-1),
    "chebyshev": lambda q, k, p: _diff(q, k).abs().amax(-1),
    "lp": lambda q, k, p: _diff(q, k).abs().pow(p).sum(-1).pow(1 / p),
}


def test_every_registered_kind_has_a_reference_row():
    """The tests below run over the registry; a kind without a row would go untested."""
    assert set(kinds.builtin_names()) <= set(REFERENCE_DISTANCES)
    missing = set(kinds.names()) - set(REFERENCE_DISTANCES)
    assert not missing, f"no reference row for {sorted(missing)}"


def reference(q, k, v, kind, scale, causal=True, attn_mask=None, p=P):
    """Naive float64 attention from the kind's row of REFERENCE_DISTANCES."""
    q, k, v = q.double(), k.double(), v.double()
    s = scale.double().view(1, -1, 1, 1) if isinstance(scale, torch.Tensor) else scale
    scores = -s * REFERENCE_DISTANCES[kind](q, k, p)
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(Tq)[:, None]
        j = torch.arange(Tk)[None, :]
        scores = scores.masked_fill(j > i + Tk - Tq, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            scores = scores.masked_fill(~attn_mask, -math.inf)
        else:
            scores = scores + attn_mask.double()
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0)
    return weights @ v


def assert_same_gradients(out, expected, inputs):
    """The gradients of `out` and of the reference `expected` with respect to `inputs` agree,
    for one random output gradient."""
    grad_out = torch.randn_like(out)
    got = torch.autograd.grad(out, inputs, grad_out)
    want = torch.autograd.grad(expected, inputs, grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)


def make(B=2, H=3, Tq=6, Tk=6, D=5, dtype=torch.float32, seed=0, grad=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, T, D, generator=g, dtype=dtype) for T in (Tq, Tk, Tk))
    if grad:
        q, k, v = (t.requires_grad_() for t in (q, k, v))
    return q, k, v


def head_scale(H, dtype=torch.float32, grad=False):
    s = torch.linspace(0.3, 1.2, H, dtype=dtype)
    return s.requires_grad_() if grad else s


# --------------------------------------------------------------------------------------------
# forward against the reference


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 9), (1, 6)])
@pytest.mark.parametrize("per_head", [False, True])
def test_matches_reference(kind, causal, Tq, Tk, per_head, backend):
    q, k, v = make(Tq=Tq, Tk=Tk)
    scale = head_scale(3) if per_head else 0.7
    expected = reference(q, k, v, kind, scale, causal)
    out = distance_attention(q, k, v, kind, scale, causal=causal, p=P)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)
    out_w, weights = distance_attention(q, k, v, kind, scale, causal=causal, p=P, need_weights=True)
    torch.testing.assert_close(out_w.double(), expected, atol=1e-5, rtol=0)
    assert weights.shape == (2, 3, Tq, Tk)
    torch.testing.assert_close(weights.sum(-1), torch.ones(2, 3, Tq))


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masks_match_reference(kind, mask_kind, backend):
    q, k, v = make(Tq=5, Tk=8)
    g = torch.Generator().manual_seed(1)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 5, 8, generator=g) > 0.3
        mask[..., -1] = True  # every row keeps the last key (visible under causal)
    else:
        mask = torch.randn(1, 3, 5, 8, generator=g)
    expected = reference(q, k, v, kind, 0.8, True, mask)
    out = distance_attention(q, k, v, kind, 0.8, attn_mask=mask, p=P)
    torch.testing.assert_close(out.double(), expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("kind", KINDS)
def test_padding_mask_from_model(kind, backend):
    """The model passes key-padding masks of shape (B, 1, 1, Tk)."""
    q, k, v = make(Tq=6, Tk=6)
    mask = torch.ones(2, 1, 1, 6, dtype=torch.bool)
    mask[1, ..., :2] = False  # left padding in the second sequence
    out = distance_attention(q, k, v, kind, 0.8, attn_mask=mask, p=P)
    torch.testing.assert_close(
        out.double(), reference(q, k, v, kind, 0.8, True, mask), atol=1e-5, rtol=0
    )


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_fully_masked_rows_are_zero_not_nan(kind, need_weights, backend):
    q, k, v = make(Tq=5, Tk=5, dtype=torch.float64, grad=True)
    scale = head_scale(3, torch.float64, grad=True)
    mask = torch.ones(2, 3, 5, 5, dtype=torch.bool)
    mask[0, 1, 2] = False  # row 2 of head 1 sees nothing
    result = distance_attention(
        q, k, v, kind, scale, attn_mask=mask, p=P, need_weights=need_weights
    )
    out = result[0] if need_weights else result
    assert torch.isfinite(out).all()
    assert (out[0, 1, 2] == 0).all()
    torch.testing.assert_close(out, reference(q, k, v, kind, scale, True, mask))
    out.square().sum().backward()
    for t in (q, k, v, scale):
        assert torch.isfinite(t.grad).all()
    # the dead row's query gets no gradient
    assert (q.grad[0, 1, 2] == 0).all()
    if need_weights:
        assert (result[1][0, 1, 2] == 0).all()


# --------------------------------------------------------------------------------------------
# gradients


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("need_weights", [False, True])
def test_gradcheck_every_kind(kind, need_weights, backend):
    q, k, v = make(B=1, H=2, Tq=3, Tk=4, D=3, dtype=torch.float64, grad=True)
    scale = head_scale(2, torch.float64, grad=True)

    def f(q, k, v, scale):
        r = distance_attention(q, k, v, kind, scale, p=P, need_weights=need_weights)
        return r[0] if need_weights else r

    assert torch.autograd.gradcheck(f, (q, k, v, scale))


@pytest.mark.parametrize("kind", BLOCKED_KINDS)
@pytest.mark.parametrize("block,rows", [(2, 3), (3, 2), (5, 1), (8, 8)])
@pytest.mark.parametrize("causal", [True, False])
def test_gradcheck_eager_blocked_kernel(kind, block, rows, causal):
    """The blocked kernel itself: key blocks and row chunks that do not divide T, Tq < Tk,
    per-head scale."""
    q, k, v = make(B=1, H=2, Tq=4, Tk=7, D=3, dtype=torch.float64, grad=True, seed=3)
    scale = head_scale(2, torch.float64, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: eager_blocked(
            q, k, v, kind, s, causal, p=P, block_size=block, row_chunk=rows
        ),
        (q, k, v, scale),
    )


@pytest.mark.parametrize("kind", BLOCKED_KINDS)
def test_eager_blocked_kernel_gradcheck_with_mask_and_float_scale(kind):
    q, k, v = make(B=2, H=1, Tq=5, Tk=5, D=2, dtype=torch.float64, grad=True, seed=4)
    mask = torch.randn(2, 1, 5, 5, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: eager_blocked(
            q, k, v, kind, 0.9, attn_mask=mask, p=0.8, block_size=2, row_chunk=2
        ),
        (q, k, v),
    )


@settings(max_examples=40, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Tq=st.integers(1, 13),
    extra=st.integers(0, 6),
    D=st.integers(1, 6),
    block=st.integers(1, 9),
    rows=st.integers(1, 9),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(BLOCKED_KINDS),
)
def test_eager_blocked_kernel_property(B, H, Tq, extra, D, block, rows, causal, seed, kind):
    """Output and all four gradients equal the reference for any kind, shape, key block and
    row chunk."""
    Tk = Tq + extra
    q, k, v = make(B, H, Tq, Tk, D, dtype=torch.float64, grad=True, seed=seed)
    scale = head_scale(H, torch.float64, grad=True)
    out = eager_blocked(q, k, v, kind, scale, causal, p=P, block_size=block, row_chunk=rows)
    expected = reference(q, k, v, kind, scale, causal)
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))


def test_eager_l1_ties_use_zero_subgradient():
    """Eager and compiled kernels: q_id == k_jd gives sign(0) = 0, so that coordinate gives
    no gradient through the distance (the native kernel's choice: test_attention_native.py)."""
    q = torch.zeros(1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    k = torch.zeros(1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    v = torch.randn(1, 1, 2, 1, dtype=torch.float64, requires_grad=True)
    scale = torch.ones(1, dtype=torch.float64, requires_grad=True)
    l1_eager(q, k, v, scale, block_size=1).sum().backward()
    assert (q.grad == 0).all() and (k.grad == 0).all() and (scale.grad == 0).all()
    assert v.grad.abs().sum() > 0


@pytest.mark.parametrize("kind", ["l2", "lp", "cosine"])
def test_finite_gradient_at_zero_distance(kind, backend):
    q = torch.randn(1, 2, 4, 3, dtype=torch.float64)
    k = q.clone().requires_grad_()  # every query coincides with its own key
    q.requires_grad_()
    v = torch.randn(1, 2, 4, 3, dtype=torch.float64, requires_grad=True)
    for need_weights in (False, True):
        r = distance_attention(q, k, v, kind, 1.0, p=0.7, need_weights=need_weights)
        (r[0] if need_weights else r).sum().backward()
        assert torch.isfinite(q.grad).all() and torch.isfinite(k.grad).all()


def test_cosine_zero_vectors_are_safe():
    q, k, v = make()
    q[0, 0, 1] = 0.0
    k[0, 0, 0] = 0.0
    q.requires_grad_()
    out = distance_attention(q, k, v, "cosine", 4.0)
    out.sum().backward()
    assert torch.isfinite(out).all() and torch.isfinite(q.grad).all()


def test_lp_with_p_one_or_two_equals_l1_or_l2(backend):
    q, k, v = make()
    for p, kind in ((1.0, "l1"), (2.0, "l2")):
        torch.testing.assert_close(
            distance_attention(q, k, v, "lp", 0.5, p=p), distance_attention(q, k, v, kind, 0.5)
        )


def test_failed_compilation_warns_once_and_falls_back(monkeypatch):
    from truthgpt.nn.attention import kernels

    def broken_compile(fn, **kwargs):
        def call(*args):
            raise torch._inductor.exc.InvalidCxxCompiler()

        return call

    monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels())
    monkeypatch.setattr(kernels.torch, "compile", broken_compile)
    q, k, v = make(Tq=6, Tk=6, dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="compiling the L1 attention kernels failed"):
        out = kernels.l1_attention(q, k, v, 0.5)
    torch.testing.assert_close(out, reference(q, k, v, "l1", 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        kernels.l1_attention(q, k, v, 0.5)


def test_an_error_that_is_not_a_compile_failure_propagates(monkeypatch):
    """A bug or a bad input must not silently switch the process to the eager kernels."""
    from truthgpt.nn.attention import kernels

    def failing_compile(fn, **kwargs):
        def call(*args):
            raise ValueError("not a compiler problem")

        return call

    monkeypatch.setattr(kernels, "KERNELS", kernels._Kernels())
    monkeypatch.setattr(kernels.torch, "compile", failing_compile)
    q, k, v = make(Tq=6, Tk=6, dtype=torch.float64)
    with pytest.raises(ValueError, match="not a compiler problem"):
        kernels.l1_attention(q, k, v, 0.5)
    assert not kernels.KERNELS.failed


# --------------------------------------------------------------------------------------------
# dropout


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_zeroes_or_rescales_weights(kind, backend):
    q, k, v = make(Tq=8, Tk=8)
    _, clean = distance_attention(q, k, v, kind, 0.5, p=P, need_weights=True)
    torch.manual_seed(0)
    _, dropped = distance_attention(q, k, v, kind, 0.5, p=P, dropout_p=0.5, need_weights=True)
    kept = dropped != 0
    assert 0 < kept.sum() < clean.count_nonzero()
    torch.testing.assert_close(dropped[kept], clean[kept] * 2)
    torch.manual_seed(1)
    a = distance_attention(q, k, v, kind, 0.5, p=P, dropout_p=0.5)
    torch.manual_seed(1)
    b = distance_attention(q, k, v, kind, 0.5, p=P, dropout_p=0.5)
    torch.testing.assert_close(a, b)  # reproducible under a seed
    assert not torch.allclose(a, distance_attention(q, k, v, kind, 0.5, p=P))


@pytest.mark.parametrize("kind", KINDS)
def test_dropout_is_unbiased_and_drops_at_its_rate(kind, backend):
    """With v = identity the output is the dropped weights themselves, so every fast path
    (SDPA, native, eager) shows its mask."""
    check_dropout_statistics(kind, need_weights=False)


@pytest.mark.parametrize("kind", KINDS)
def test_materialising_dropout_is_unbiased_and_drops_at_its_rate(kind):
    check_dropout_statistics(kind, need_weights=True)


def check_dropout_statistics(kind, need_weights):
    """Over 300 seeds the mean equals the weights without dropout, the share of zeroed
    visible weights is p, and every kept weight is scaled by exactly 1 / (1 − p)."""
    p_drop, T, n = 0.3, 16, 300
    q, k, _ = make(B=1, H=2, Tq=T, Tk=T, D=T, dtype=torch.float64, seed=11)
    v = torch.eye(T, dtype=torch.float64).expand(1, 2, T, T)

    def attend(dropout_p):
        out = distance_attention(
            q, k, v, kind, 0.5, p=P, dropout_p=dropout_p, need_weights=need_weights
        )
        return out[0] if need_weights else out

    clean = attend(0.0)
    samples = []
    for seed in range(n):
        torch.manual_seed(seed)
        samples.append(attend(p_drop))
    samples = torch.stack(samples)
    visible = clean > 0
    # each entry is clean · Z / (1 − p), Z ~ Bernoulli(1 − p): its mean's std is
    # clean · sqrt(p / (1 − p) / n); allow 5 of them
    tolerance = 5 * clean * math.sqrt(p_drop / (1 - p_drop) / n)
    assert ((samples.mean(0) - clean).abs() <= tolerance + 1e-12).all()
    kept = samples[:, visible] != 0
    assert abs(1 - kept.double().mean().item() - p_drop) < 0.01
    scaled = samples[:, visible] * (1 - p_drop) / clean[visible]  # 0 or 1
    assert ((scaled - 1).abs() < 1e-9)[kept].all()


def test_eager_l1_kernel_dropout_matches_reference_with_its_masks():
    """One key block, one row chunk: the output is the reference weights times the kernel's
    multipliers."""
    q, k, v = make(B=2, H=2, Tq=5, Tk=7, D=3, dtype=torch.float64)
    out = l1_eager(q, k, v, 0.6, dropout_p=0.4, block_size=8, row_chunk=8, seed=123)
    z = dropout_multipliers(123, 0, 0, (2, 2, 5, 8), 0.4, torch.float64, q.device)
    z = z[..., :7]  # the key block is padded to 8
    eye = torch.eye(7, dtype=torch.float64).expand(2, 2, 7, 7)
    weights = reference(q, k, eye, "l1", 0.6)  # softmax weights, (B, H, Tq, Tk)
    torch.testing.assert_close(out, (weights * z) @ v)
    assert (z == 0).any() and (z != 0).any()


@pytest.mark.parametrize("kind", BLOCKED_KINDS)
def test_eager_blocked_kernel_dropout_gradcheck(kind):
    """Several blocks: the backward regenerates the forward's multipliers exactly."""
    q, k, v = make(B=1, H=2, Tq=5, Tk=5, D=2, dtype=torch.float64, grad=True, seed=5)
    scale = head_scale(2, torch.float64, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: eager_blocked(
            q, k, v, kind, s, dropout_p=0.3, p=P, block_size=2, row_chunk=3, seed=7
        ),
        (q, k, v, scale),
    )


# --------------------------------------------------------------------------------------------
# bad arguments


def _args():
    q, k, v = make()
    return q, k, v


@pytest.mark.parametrize(
    "change,match",
    [
        (dict(kind="hamming"), r"unknown distance kind 'hamming'; registered: dot, cosine"),
        (dict(kind=3), "named by a string"),
        (dict(kind="lp", p=None), "p is required"),
        (dict(kind="lp", p=0.0), "p must be"),
        (dict(kind="lp", p=-1.0), "p must be"),
        (dict(kind="lp", p=math.inf), "p must be"),
        (dict(scale=0.0), "scale must be"),
        (dict(scale=-1.0), "scale must be"),
        (dict(scale=math.nan), "scale must be"),
        (dict(scale=True), "scale must be"),
        (dict(scale=torch.ones(2)), r"scale must be .* shape \(H,\)"),
        (dict(scale=torch.tensor([1.0, -1.0, 1.0])), "scale must be positive"),
        (dict(k=torch.randn(2, 3, 6, 4)), "k must have shape"),
        (dict(v=torch.randn(2, 3, 5, 5)), "v must have the shape of k"),
        (dict(q=torch.randn(3, 6, 5)), "q must have shape"),
        (dict(k=torch.randn(2, 3, 6, 5, dtype=torch.float64)), "k must have the dtype"),
        (dict(q=torch.ones(2, 3, 6, 5, dtype=torch.long)), "q must be a floating"),
        (dict(k=torch.randn(2, 3, 4, 5), v=torch.randn(2, 3, 4, 5)), "Tk >= Tq"),
        (dict(attn_mask=torch.ones(2, 3, 6, 7, dtype=torch.bool)), "attn_mask must broadcast"),
        (dict(attn_mask=torch.ones(6, 6, dtype=torch.long)), "attn_mask must be boolean"),
        (dict(dropout_p=1.0), "dropout_p must be"),
        (dict(dropout_p=-0.1), "dropout_p must be"),
    ],
)
def test_bad_arguments_raise_clear_errors(change, match):
    q, k, v = _args()
    kw = dict(q=q, k=k, v=v, kind="l1", scale=0.5)
    kw.update(change)
    extra = {name: kw.pop(name) for name in ("attn_mask", "p", "dropout_p") if name in kw}
    with pytest.raises(ValueError, match=match):
        distance_attention(kw["q"], kw["k"], kw["v"], kw["kind"], kw["scale"], **extra)


# --------------------------------------------------------------------------------------------
# the backend registry


def test_a_registered_backend_serves_its_kinds_by_name(monkeypatch):
    """One signature for every backend: a new one is one `register_backend` call, after
    which `backend=` takes its name; it gets a checked call with the resolved kind."""
    from truthgpt.nn.attention import functional
    from truthgpt.nn.attention.functional import AttentionBackend, register_backend

    seen = []

    def run(q, k, v, call):
        seen.append(call)
        return functional.run_plain(q, k, v, call)

    monkeypatch.setattr(functional, "_BACKENDS", dict(functional._BACKENDS))
    register_backend(AttentionBackend("mine", run, ("blocked",), auto=False))
    assert "mine" in functional.backend_names()
    q, k, v = make(dtype=torch.float64)
    scale = head_scale(3, torch.float64)
    out = distance_attention(q, k, v, "manhattan", scale, backend="mine")
    torch.testing.assert_close(out, reference(q, k, v, "l1", scale))
    (call,) = seen
    assert call.kind is kinds.get("l1") and call.causal and call.scale is scale
    with pytest.raises(
        ValueError, match="backend 'sdpa' computes the kinds dot, cosine, sql2, not 'l1'"
    ):
        distance_attention(q, k, v, "l1", 0.5, backend="sdpa")  # sdpa serves dot-like kinds
    distance_attention(q, k, v, "dot", 0.5, backend="mine")  # a kernel backend: dot on SDPA
    assert len(seen) == 1


def test_plain_backend_computes_every_kind(monkeypatch):
    q, k, v = make(dtype=torch.float64)
    for kind in KINDS:
        out = distance_attention(q, k, v, kind, 0.7, p=P, backend="plain")
        torch.testing.assert_close(out, reference(q, k, v, kind, 0.7))
