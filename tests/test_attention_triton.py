"""The Triton kernels against the float64 reference, in Triton's interpreter on CPU tensors
(tests/conftest.py sets TRITON_INTERPRET=1 on machines without CUDA) or compiled on a GPU.

The interpreter runs each program as NumPy code, so the shapes are tiny and the tiles the
smallest tl.dot allows (16); sequences of 20–37 positions still span several tiles that do
not divide them. Skipped, with the reason, when triton is not installed.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
import os
import subprocess
import sys

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_attention import P, assert_same_gradients, eager_blocked, head_scale, make, reference
from truthgpt.nn.attention import distance_attention, functional, native, triton_kernels

HAVE_TRITON = importlib.util.find_spec("triton") is not None
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _skip_reason() -> str | None:
    if not HAVE_TRITON:
        return f"triton is not installed ({triton_kernels.INSTALL_HINT})"
    if DEVICE == "cpu" and not triton_kernels.interpreted():
        return "no GPU, and triton was imported without TRITON_INTERPRET=1 (tests/conftest.py)"
    return None


needs_triton = pytest.mark.skipif(_skip_reason() is not None, reason=str(_skip_reason()))
KINDS = ["l1", "l2", "chebyshev", "lp"]
TILE = (16, 16)


def run(q, k, v, kind, scale, causal=True, attn_mask=None, dropout_p=0.0, p=P, **kw):
    """The kernels on DEVICE; q, k, v and a tensor scale stay differentiable leaves on CPU."""
    kw.setdefault("forward_tile", TILE)
    kw.setdefault("backward_tile", TILE)
    to = lambda t: t.to(DEVICE) if isinstance(t, torch.Tensor) else t  # noqa: E731
    out = triton_kernels.triton_attention(
        to(q), to(k), to(v), kind, to(scale), causal, to(attn_mask), dropout_p, p=p, **kw
    )
    return out.cpu()


def test_the_kernels_load_where_triton_is_installed():
    """A broken kernel module must fail here, not turn every test below into a skip."""
    if not HAVE_TRITON:
        pytest.skip(f"triton is not installed ({triton_kernels.INSTALL_HINT})")
    assert triton_kernels.available(), triton_kernels.unavailable_reason()
    assert triton_kernels.served_kinds() == KINDS


# --------------------------------------------------------------------------------------------
# against the reference, float64


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (3, 9), (20, 37)])
def test_matches_reference_with_gradients(kind, causal, Tq, Tk):
    """Output and the gradients of q, k, v and the per-head λ; Tq < Tk puts the queries at
    the last positions; 37 keys make three tiles of 16, the last one short."""
    q, k, v = make(B=2, H=2, Tq=Tq, Tk=Tk, D=3, dtype=torch.float64, grad=True, seed=Tq)
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, kind, scale, causal)
    expected = reference(q, k, v, kind, scale, causal)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
def test_gradcheck(kind):
    """gradcheck in float64 (the interpreter computes in it), two key tiles, Tq < Tk. On a
    GPU l2's dq atomic additions may come in another order from one backward to the next."""
    q, k, v = make(B=1, H=2, Tq=5, Tk=18, D=2, dtype=torch.float64, grad=True, seed=3)
    scale = head_scale(2, torch.float64, grad=True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: run(q, k, v, kind, s), (q, k, v, scale), fast_mode=True, nondet_tol=1e-12
    )


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
def test_masks_and_fully_masked_rows(kind, mask_kind):
    """Boolean and additive masks; rows with no visible key give zeros and no gradient."""
    q, k, v = make(B=2, H=2, Tq=17, Tk=20, D=3, dtype=torch.float64, grad=True, seed=1)
    scale = head_scale(2, torch.float64, grad=True)
    g = torch.Generator().manual_seed(2)
    if mask_kind == "bool":
        mask = torch.rand(2, 1, 17, 20, generator=g) > 0.3
        mask[1, 0, 4] = False  # row 4 of batch 1 sees nothing
    else:
        mask = torch.randn(1, 2, 17, 20, generator=g, dtype=torch.float64)
        mask[0, 1, 4] = -math.inf
    out = run(q, k, v, kind, scale, attn_mask=mask)
    expected = reference(q, k, v, kind, scale, True, mask)
    torch.testing.assert_close(out, expected)
    dead = (0, 1) if mask_kind == "float" else (1, slice(None))
    assert (out[dead[0], dead[1], 4] == 0).all()
    assert_same_gradients(out, expected, (q, k, v, scale))
    (grad_q,) = torch.autograd.grad(run(q, k, v, kind, scale, attn_mask=mask).square().sum(), q)
    assert (grad_q[dead[0], dead[1], 4] == 0).all()


@needs_triton
@pytest.mark.parametrize(
    "forward_tile,backward_tile,Tq,Tk",
    [
        ((16, 32), (32, 16), 33, 37),
        ((32, 64), (16, 16), 33, 37),
        # 64-row backward tiles: the sums over a tile's rows and keys run as eight chains of
        # products, and the backward reads rows past the forward's last tile
        ((16, 16), (64, 16), 70, 70),
    ],
)
def test_every_tile_gives_the_same_result(forward_tile, backward_tile, Tq, Tk):
    q, k, v = make(B=1, H=2, Tq=Tq, Tk=Tk, D=3, dtype=torch.float64, grad=True, seed=5)
    scale = head_scale(2, torch.float64, grad=True)
    for kind in ("l1", "l2"):
        out = run(q, k, v, kind, scale, forward_tile=forward_tile, backward_tile=backward_tile)
        expected = reference(q, k, v, kind, scale)
        torch.testing.assert_close(out, expected)
        assert_same_gradients(out, expected, (q, k, v, scale))


@needs_triton
def test_lp_below_one_and_zero_distances_match_the_eager_kernel():
    """Keys equal to their query: distance 0 and zero coordinate differences, where the
    derivative is undefined; the gradients are the eager kernel's (torch.cdist: 0 there)."""
    q, k, v = make(B=1, H=2, Tq=6, Tk=6, D=3, dtype=torch.float64, seed=1)
    k[:, :, :3] = q[:, :, :3]
    k[:, :, 4, 0] = q[:, :, 4, 0]  # one tied coordinate (l1's subgradient: 0)
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = head_scale(2, torch.float64, grad=True)
    for kind, p in (("lp", 0.7), ("lp", 3.0), ("l2", None), ("chebyshev", None), ("l1", None)):
        out = run(q, k, v, kind, scale, p=p)
        torch.testing.assert_close(out, reference(q, k, v, kind, scale, p=p or P))
        expected = eager_blocked(q, k, v, kind, scale, p=p)
        got = torch.autograd.grad(out.square().sum(), (q, k, v, scale))
        want = torch.autograd.grad(expected.square().sum(), (q, k, v, scale))
        for a, b in zip(got, want, strict=True):
            assert torch.isfinite(a).all()
            torch.testing.assert_close(a, b)


@needs_triton
@settings(max_examples=12, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 2),
    Tq=st.integers(1, 20),
    extra=st.integers(0, 20),
    D=st.integers(1, 5),
    causal=st.booleans(),
    masked=st.booleans(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(KINDS),
)
def test_property(B, H, Tq, extra, D, causal, masked, seed, kind):
    """Output and all four gradients equal the reference for any shape, with or without a
    boolean mask that may leave rows with no key at all."""
    Tk = Tq + extra
    q, k, v = make(B, H, Tq, Tk, D, dtype=torch.float64, grad=True, seed=seed)
    scale = head_scale(H, torch.float64, grad=True)
    mask = None
    if masked:
        mask = torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(seed)) > 0.3
    out = run(q, k, v, kind, scale, causal, mask)
    expected = reference(q, k, v, kind, scale, causal, mask)
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))


# --------------------------------------------------------------------------------------------
# half inputs


@needs_triton
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kind", KINDS)
def test_half_inputs_accumulate_in_float32(dtype, kind):
    """fp16 and bf16 in and out, fp32 inside: errors of the order of the inputs' rounding,
    against float64 on the same rounded inputs and output gradient. The gradients are
    compared with the eager kernel's: rounded inputs make ties between coordinates likely,
    where chebyshev's gradient is torch.cdist's (every coordinate at the max), not amax's."""
    q, k, v = make(B=1, H=2, Tq=20, Tk=37, D=8, seed=4)
    q, k, v = (t.to(dtype).requires_grad_() for t in (q, k, v))
    wide = [t.detach().double().requires_grad_() for t in (q, k, v)]  # the same values
    scale = head_scale(2, grad=True)
    out = run(q, k, v, kind, scale)
    assert out.dtype == dtype
    expected = reference(*wide, kind, scale)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(0)).to(dtype)
    got = torch.autograd.grad(out, (q, k, v, scale), grad_out)
    exact = eager_blocked(*wide, kind, scale, p=P)
    want = torch.autograd.grad(exact, (*wide, scale), grad_out.double())
    for a, b in zip(got, want, strict=True):
        assert a.dtype == (dtype if a.dim() == 4 else torch.float32)
        b = b.double()
        torch.testing.assert_close(a.double(), b, atol=3e-2 * b.abs().max().item(), rtol=0)


# --------------------------------------------------------------------------------------------
# dropout


@needs_triton
@pytest.mark.parametrize("kind", ["l1", "l2"])
def test_dropout_backward_regenerates_the_forward_mask(kind):
    """The output is the reference weights times the mask `dropout_keep` reports, and every
    gradient equals the one through that mask: the backward drew the same numbers."""
    q, k, v = make(B=2, H=2, Tq=18, Tk=21, D=3, dtype=torch.float64, grad=True, seed=6)
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, kind, scale, dropout_p=0.4, seed=123)
    keep = triton_kernels.dropout_keep(123, (2, 2, 18, 21), 0.4, DEVICE).cpu().double()
    assert 0.45 < keep.mean() < 0.75
    eye = torch.eye(21, dtype=torch.float64).expand(2, 2, 21, 21)
    weights = reference(q, k, eye, kind, scale)  # (B, H, Tq, Tk)
    expected = (weights * keep / 0.6) @ v
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))
    # the mask depends on the seed and the entry only, not on the tiles
    other = run(q, k, v, kind, scale, dropout_p=0.4, seed=123, forward_tile=(32, 16))
    torch.testing.assert_close(other, out)
    assert not torch.allclose(run(q, k, v, kind, scale, dropout_p=0.4, seed=124), out)


@needs_triton
def test_dropout_rate_and_unbiasedness():
    """The mask keeps 1 − p of the entries; averaged over seeds the output is the output
    without dropout (each entry's mean has std clean·sqrt(p/(1−p)/n): allow 5)."""
    p_drop, n = 0.3, 100
    keep = triton_kernels.dropout_keep(7, (2, 4, 64, 64), p_drop, DEVICE).cpu()
    assert abs(keep.mean().item() - (1 - p_drop)) < 0.01
    q, k, _ = make(B=1, H=1, Tq=16, Tk=16, D=4, dtype=torch.float64, seed=11)
    v = torch.eye(16, dtype=torch.float64).expand(1, 1, 16, 16)
    clean = run(q, k, v, "l1", 0.5)
    mean = sum(run(q, k, v, "l1", 0.5, dropout_p=p_drop, seed=s) for s in range(n)) / n
    tolerance = 5 * clean * math.sqrt(p_drop / (1 - p_drop) / n)
    assert ((mean - clean).abs() <= tolerance + 1e-12).all()


@needs_triton
def test_dropout_seed_comes_from_the_global_generator(monkeypatch):
    monkeypatch.setenv(functional.BACKEND_ENV, "triton")
    q, k, v = make(B=1, H=2, Tq=8, Tk=8, D=3)
    torch.manual_seed(1)
    a = distance_attention(q, k, v, "l1", 0.5, dropout_p=0.5)
    torch.manual_seed(1)
    b = distance_attention(q, k, v, "l1", 0.5, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, distance_attention(q, k, v, "l1", 0.5))


# --------------------------------------------------------------------------------------------
# dispatch


@needs_triton
def test_backend_triton_through_distance_attention(monkeypatch):
    """By argument and by environment, a decoding step (Tq = 1) included; under the
    interpreter CPU tensors are accepted."""
    q, k, v = make(B=1, H=2, Tq=1, Tk=20, D=3, dtype=torch.float64)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))
    out = distance_attention(q, k, v, "chebyshev", 0.8, backend="triton")
    torch.testing.assert_close(out.cpu(), reference(q.cpu(), k.cpu(), v.cpu(), "chebyshev", 0.8))
    monkeypatch.setenv(functional.BACKEND_ENV, "triton")
    out = distance_attention(q, k, v, "lp", 0.8, p=1.5)
    torch.testing.assert_close(out.cpu(), reference(q.cpu(), k.cpu(), v.cpu(), "lp", 0.8, p=1.5))


def test_auto_takes_triton_for_what_it_supports(monkeypatch):
    """auto: native where it serves the tensors (CPU), then triton (CUDA), then compiled."""
    q, _, _ = make()
    monkeypatch.delenv(functional.BACKEND_ENV, raising=False)
    monkeypatch.setattr(native, "supports", lambda q, kind=None: False)
    monkeypatch.setattr(triton_kernels, "supports", lambda q, kind=None: True)
    assert functional.resolve_backend(None, q, "l1") == "triton"
    monkeypatch.setattr(triton_kernels, "supports", lambda q, kind=None: False)
    monkeypatch.setattr(functional, "_warned", {"native"})
    assert functional.resolve_backend(None, q, "l1") == "compiled"


def test_auto_never_takes_triton_for_cpu_tensors():
    q, _, _ = make()
    assert not triton_kernels.supports(q, "l1")


def test_clear_errors_when_triton_cannot_run(monkeypatch):
    q, k, v = make()
    monkeypatch.setattr(triton_kernels, "_load", lambda: (None, "ImportError: no triton"))
    with pytest.raises(RuntimeError, match=r"needs the triton package .*truthgpt\[gpu\]"):
        distance_attention(q, k, v, "l1", 0.5, backend="triton")
    monkeypatch.setattr(triton_kernels, "_load", lambda: (object(), None))
    monkeypatch.setattr(triton_kernels, "interpreted", lambda: False)
    with pytest.raises(ValueError, match="runs on CUDA tensors, got cpu ones"):
        distance_attention(q, k, v, "l1", 0.5, backend="triton")


@needs_triton
def test_a_kind_without_a_triton_op_is_refused():
    q, k, v = make()
    with pytest.raises(ValueError, match="the triton kernels serve the kinds l1, l2"):
        triton_kernels.triton_attention(q, k, v, "dot", 0.5)
    with pytest.raises(ValueError, match="powers of two"):
        triton_kernels.triton_attention(q, k, v, "l1", 0.5, forward_tile=(16, 24))


# --------------------------------------------------------------------------------------------
# ALiBi


ALIBI = torch.tensor([0.5, 0.125])


@needs_triton
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("Tq,Tk", [(7, 7), (20, 37)])
def test_alibi_matches_a_hand_added_bias(kind, causal, Tq, Tk):
    """−m_h·|i + Tk − Tq − j| computed in the kernels from the indices, against the float64
    reference that adds it element by element: output and the gradients of q, k, v and λ,
    over several tiles (the last one short), queries at the last positions when Tq < Tk."""
    from test_alibi import reference as alibi_reference

    q, k, v = make(B=2, H=2, Tq=Tq, Tk=Tk, D=3, dtype=torch.float64, grad=True, seed=Tk)
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, kind, scale, causal, alibi=ALIBI.to(DEVICE))
    expected = alibi_reference(q, k, v, kind, scale, ALIBI, causal, p=P)
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))
    plain = run(q, k, v, kind, scale, causal)
    assert not torch.allclose(out, plain)  # the slopes are large enough to matter


@needs_triton
@pytest.mark.parametrize("causal", [True, False])
def test_alibi_with_a_mask_and_fully_masked_rows(causal):
    """ALiBi and a boolean mask together; a row the mask hides entirely stays zero."""
    from test_alibi import reference as alibi_reference

    q, k, v = make(B=2, H=2, Tq=17, Tk=20, D=3, dtype=torch.float64, grad=True, seed=4)
    scale = head_scale(2, torch.float64, grad=True)
    mask = torch.rand(2, 1, 17, 20, generator=torch.Generator().manual_seed(5)) > 0.3
    mask[:, :, 3] = False
    out = run(q, k, v, "l1", scale, causal, mask.to(DEVICE), alibi=ALIBI.to(DEVICE))
    expected = alibi_reference(q, k, v, "l1", scale, ALIBI, causal, mask)
    torch.testing.assert_close(out, expected)
    assert out[:, :, 3].abs().max() == 0
    assert_same_gradients(out, expected, (q, k, v, scale))


@needs_triton
def test_alibi_runs_in_the_kernels_not_on_the_plain_path(monkeypatch):
    """backend='triton' with slopes (a decoding step included) never falls back to the plain
    path, and bad slopes are refused by name."""
    from test_alibi import reference as alibi_reference
    from truthgpt.nn.attention import backends

    def refuse(*args, **kwargs):
        raise AssertionError("the plain path ran")

    monkeypatch.setattr(backends, "run_plain", refuse)
    for Tq in (1, 6):
        q, k, v = make(B=1, H=2, Tq=Tq, Tk=9, D=3, dtype=torch.float64)
        slopes = ALIBI.double()
        out = distance_attention(
            q.to(DEVICE), k.to(DEVICE), v.to(DEVICE), "l2", 0.8, backend="triton",
            alibi=slopes.to(DEVICE),
        )  # fmt: skip
        torch.testing.assert_close(out.cpu(), alibi_reference(q, k, v, "l2", 0.8, slopes))
    with pytest.raises(ValueError, match="alibi"):
        triton_kernels.triton_attention(q, k, v, "l1", 0.5, alibi=torch.ones(3))


@needs_triton
def test_an_unknown_kind_code_is_a_compile_time_error(monkeypatch):
    """The codes come from kernel_codes.KERNEL_CODES, and a code the kernels do not know
    stops the launch instead of running as some other kind."""
    from truthgpt.nn.attention import _triton_jit
    from truthgpt.nn.attention.kernel_codes import KERNEL_CODES

    assert {c: n for n, c in KERNEL_CODES.items()} == triton_kernels.KIND_CODES
    for name, code in KERNEL_CODES.items():
        assert getattr(_triton_jit, name.upper()).value == code
    bogus = max(KERNEL_CODES.values()) + 1
    monkeypatch.setattr(triton_kernels, "_code", lambda kind: bogus)
    q, k, v = make(B=1, H=1, Tq=5, Tk=5, D=3)
    with pytest.raises(Exception, match="unknown kind code"):
        run(q, k, v, "l1", 0.5)


@needs_triton
def test_the_runs_layout_round_trips_and_matches_the_kernels():
    """q, k and their gradients travel in runs of RUN positions, one coordinate after
    another (`_runs_of`): the host's RUN is the kernels', and the layout gives back what it
    was given, zeros in the padding."""
    from truthgpt.nn.attention import _triton_jit

    assert _triton_jit.RUN.value == triton_kernels.RUN
    x = torch.randn(2, 3, 37, 5, dtype=torch.float64)
    runs = triton_kernels._runs_of(x, 48, torch.float64)
    assert runs.shape == (2, 3, 48 // triton_kernels.RUN, 5, triton_kernels.RUN)
    assert torch.equal(runs[0, 1, 1, 2, 3], x[0, 1, triton_kernels.RUN + 3, 2])
    assert torch.equal(triton_kernels._from_runs(runs, 37), x)
    assert not triton_kernels._from_runs(runs, 48)[:, :, 37:].any()


def test_the_grid_has_one_axis_past_cudas_65535():
    """B·H programs do not go on a grid axis CUDA caps at 65535 (a decoding step of a large
    batch): every launch puts B·H·tiles on axis 0 (up to 2³¹ − 1)."""
    if not HAVE_TRITON:
        pytest.skip(f"triton is not installed ({triton_kernels.INSTALL_HINT})")
    B, H, T, D = 70000, 1, 1, 2
    cfg = triton_kernels.KernelConfig(code=0, p=1.0, causal=True, bias=None, dropout_p=0.0, seed=0)
    Tqp, Tkp = triton_kernels._lengths(T, T, cfg)
    v, out, do = torch.zeros(B, H, T, D), torch.zeros(B, H, T, D), torch.zeros(B, H, T, D)
    qt = triton_kernels._runs_of(v, Tqp, torch.float32)
    kt = triton_kernels._runs_of(v, Tkp, torch.float32)
    lse, scale = torch.zeros(B, H, Tqp), torch.ones(H)
    grid, _, _ = triton_kernels.forward_launch(qt, kt, v, scale, out, lse, cfg)
    assert grid == (B * H,)
    dlam = torch.zeros(B * H, 1)
    for code in (0, 1):  # two kernels (the coordinate kinds), one (l2)
        cfg = dataclasses.replace(cfg, code=code)
        launches = triton_kernels.backward_launch(
            qt, kt, v, do, lse, lse, scale, qt, kt, v, dlam, cfg
        )
        assert [grid for _, grid, _, _ in launches] == [(B * H,)] * (2 - code)


@needs_triton
def test_kernels_launch_on_the_tensors_device(monkeypatch):
    """Every launch is made inside a context for q's device (torch's current device may be
    another one: cuda:1 tensors would otherwise be read by a kernel on cuda:0)."""
    seen = []
    real = triton_kernels._on

    def on(device):
        seen.append(device)
        return real(device)

    monkeypatch.setattr(triton_kernels, "_on", on)
    q, k, v = make(B=1, H=2, Tq=5, Tk=5, D=3, dtype=torch.float64, grad=True)
    run(q, k, v, "l1", 0.5).sum().backward()
    assert [d.type for d in seen] == [DEVICE, DEVICE]
    ctx = real(torch.device("cuda", 1))
    assert isinstance(ctx, torch.cuda.device) and ctx.idx == 1


@needs_triton
def test_lambda_is_not_rounded_to_the_input_dtype():
    """λ reaches the kernels in fp32 even for bf16 inputs, also through distance_attention:
    an update below bf16's resolution (2⁻⁸ relative) still changes the output."""
    q, k, v = make(B=1, H=2, Tq=16, Tk=16, D=4, seed=2)
    q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
    lam = torch.tensor([0.8, 1.1])
    a = run(q, k, v, "l1", lam).float()
    b = run(q, k, v, "l1", lam * (1 + 2**-12)).float()
    assert not torch.equal(a, b)
    q, k, v = (t.to(DEVICE) for t in (q, k, v))  # through distance_attention, as the model
    a = distance_attention(q, k, v, "l1", lam.to(DEVICE), backend="triton").float()
    b = distance_attention(q, k, v, "l1", lam.to(DEVICE) * (1 + 2**-12), backend="triton")
    assert not torch.equal(a, b.float())


def test_the_package_works_without_triton():
    """A fresh process where `import triton` fails: the package imports, CPU attention runs,
    and asking for the triton backend says what to install."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # import triton raises ImportError\n"
        "import torch\n"
        "from truthgpt.nn.attention import distance_attention, triton_kernels\n"
        "q = torch.randn(1, 2, 5, 3)\n"
        "distance_attention(q, q, q, 'l1', 0.5)\n"
        "assert not triton_kernels.available()\n"
        "try:\n"
        "    distance_attention(q, q, q, 'l1', 0.5, backend='triton')\n"
        "except RuntimeError as err:\n"
        "    print(err)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "needs the triton package" in result.stdout


# --------------------------------------------------------------------------------------------
# compiled for a GPU, without one

# (dtype, kind, causal, masked, dropout_p, D): the training path of every op, every flag,
# every dtype, D past 64.
AOT_CASES = [
    ("bf16", "l1", True, False, 0.0, 64),
    ("fp16", "l1", True, False, 0.0, 64),
    ("bf16", "l2", True, False, 0.0, 64),
    ("bf16", "lp", True, False, 0.0, 64),
    ("bf16", "chebyshev", True, True, 0.1, 64),
    ("fp32", "l2", False, True, 0.0, 64),
    ("fp64", "l1", True, False, 0.0, 64),
    ("fp16", "l1", True, False, 0.0, 128),
    ("bf16", "l1", True, False, 0.0, 128),
    ("fp32", "l1", True, False, 0.0, 64),
    ("fp32", "l1", True, False, 0.0, 128),
]


@pytest.mark.slow(50)
@pytest.mark.skipif(
    not HAVE_TRITON, reason=f"triton is not installed ({triton_kernels.INSTALL_HINT})"
)
def test_kernels_compile_for_sm90_without_spills(tmp_path):
    """Every kernel variant compiles to sm_90a machine code (ptxas included) from the very
    launches the host makes, with the runtime's specialisation. No spills: l1's forward,
    dk/dv and dq kernels in fp32, bf16 and fp16 at D ≤ 128, and l2's backward in bf16 at
    D = 64. The split backward (l1,
    chebyshev) has no shuffle or barrier in its coordinate loops: each sum over a tile's
    other axis stays in a thread;
    l1's two backward kernels in bf16 and fp16 at D = 64 execute at most 8 instructions per
    (i, j, d) triple each, as benchmarks/triton_sass.py counts them. A fresh process: in this
    one the kernels are interpreted ones."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    result = subprocess.run(
        [sys.executable, script, json.dumps(AOT_CASES)], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(rows) == sum(2 if case[1] in ("l2", "lp") else 3 for case in AOT_CASES)
    for row in rows:
        assert row["registers"] > 0, row
        if row["kernel"] in ("backward_dkdv", "backward_dq"):
            assert row["coordinate_loop_sync"] == 0, row
        if row["kind"] == "l2" and row["dtype"] == "bf16" and row["D"] == 64:
            assert row["spill_bytes"] == 0, row
        if row["kind"] != "l1" or row["dtype"] == "fp64":
            continue
        assert row["spill_bytes"] == 0, row
        split = row["kernel"] in ("backward_dkdv", "backward_dq")
        if split and row["dtype"] in ("bf16", "fp16") and row["D"] == 64:
            assert row["instructions_per_triple"] <= 8.0, row
    halves = [r for r in rows if r["kind"] == "l1" and r["dtype"] in ("bf16", "fp16")]
    assert sum(r["D"] == 64 and r["kernel"].startswith("backward") for r in halves) == 4


def _sass_meter():
    import importlib.util

    path = os.path.join(os.path.dirname(__file__), "..", "benchmarks", "triton_sass.py")
    spec = importlib.util.spec_from_file_location("triton_sass", path)
    module = sys.modules["triton_sass"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sass_meter_counts_nested_loops_once_per_coordinate():
    """benchmarks/triton_sass.py on hand-written SASS: a tile loop of 3 instructions around
    a coordinate loop of 4 executes 3 − 4 + D·4 per iteration; the trap after EXIT (a branch
    to itself) is no loop."""
    sass = "\n".join(
        [
            "        /*0000*/                   MOV R1, c[0x0][0x28] ;",
            ".L_x_0:",
            "        /*0010*/                   LDG.E R2, desc[UR4][R4.64] ;",
            ".L_x_1:",
            "        /*0020*/                   FADD R3, |R2|, R3 ;",
            "        /*0030*/                   SHFL.BFLY PT, R5, R3, 0x1, 0x1f ;",
            "        /*0040*/                   ISETP.NE.AND P0, PT, R6, RZ, PT ;",
            "        /*0050*/              @P0 BRA `(.L_x_1) ;",
            "        /*0060*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;",
            "        /*0070*/              @P1 BRA `(.L_x_0) ;",
            "        /*0080*/                   EXIT ;",
            ".L_x_2:",
            "        /*0090*/                   BRA `(.L_x_2);",
            "        /*00a0*/                   NOP;",
        ]
    )
    meter = _sass_meter()
    (counts,) = meter.loop_counts(sass, D=8)
    assert sum(counts.values()) == 8 * 4 + 3
    assert counts["fp32"] == 8 and counts["shuffle"] == 8 and counts["barrier"] == 1
    assert counts["load"] == 1 and counts["control"] == 8 + 1
    assert meter.coordinate_loop_sync(sass) == 1  # the shuffle; the barrier is outside
    assert meter.occupancy(registers=128, shared_bytes=0, num_warps=8) == 0.25
    assert meter.occupancy(registers=32, shared_bytes=100 * 1024, num_warps=4) == 0.125


@pytest.mark.slow(2)
@pytest.mark.skipif(
    not HAVE_TRITON, reason=f"triton is not installed ({triton_kernels.INSTALL_HINT})"
)
def test_sass_meter_counts_a_compiled_loop_known_by_construction(tmp_path):
    """The meter on machine code ptxas made: `chain_kernel`'s loop is CHAIN additions, one
    compare and one branch back, and the meter must find exactly that."""
    import json

    sys.path.insert(0, os.path.dirname(__file__))
    from triton_aot import CHAIN

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)
    script = os.path.join(os.path.dirname(__file__), "triton_aot.py")
    result = subprocess.run(
        [sys.executable, script, "meter"], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (loop,) = json.loads(result.stdout.splitlines()[-1])["loops"]
    assert loop == {"fp32": CHAIN + 1, "control": 1}, loop


@needs_triton
def test_strided_views_as_the_model_passes_them():
    """q, k, v as views of one (B, T, 3, H, D) projection and a transposed output gradient:
    read in place through their strides."""
    g = torch.Generator().manual_seed(9)
    qkv = torch.randn(2, 19, 3, 2, 4, generator=g, dtype=torch.float64, requires_grad=True)
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # (B, H, T, D) views
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, "l1", scale)
    expected = reference(q, k, v, "l1", scale)
    torch.testing.assert_close(out, expected)
    grad_out = torch.randn(2, 19, 2, 4, generator=g, dtype=torch.float64).transpose(1, 2)
    got = torch.autograd.grad(out, (qkv, scale), grad_out)
    want = torch.autograd.grad(expected, (qkv, scale), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
