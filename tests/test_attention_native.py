"""The native C++ kernel against the float64 reference, at lengths that span several of its
(64 × 64) tiles, and the backend choice (argument, environment, fallback with one warning).

The per-backend tests in test_attention.py run it on short sequences as well.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from test_attention import (
    BLOCKED_KINDS,
    P,
    assert_same_gradients,
    eager_blocked,
    head_scale,
    make,
    reference,
)
from truthgpt.nn.attention import distance_attention, functional, kernels, kinds, native
from truthgpt.nn.attention.kernel_codes import KERNEL_CODES

pytestmark = pytest.mark.skipif(
    not native.available(), reason=f"native kernel not built: {native.UNAVAILABLE}"
)
NATIVE_KINDS = [kd for kd in BLOCKED_KINDS if kinds.get(kd).kernel.native_code is not None]
# Every kind the native kernel implements, lp also below p = 1.
KINDS_P = [(kd, P if kinds.get(kd).takes_p else None) for kd in NATIVE_KINDS] + [("lp", 0.7)]


def run(q, k, v, kind, scale, p=None, **kw):
    return native.native_attention(q, k, v, kind, scale, p=p, **kw)


@pytest.mark.parametrize("kind,p", KINDS_P)
@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("D", [3, 8])  # D = 8: the vector code in float64; 3: plain loops
def test_gradcheck_across_tiles(kind, p, causal, D):
    """Tq < Tk, both past one tile and not multiples of it; per-head λ."""
    q, k, v = make(B=1, H=2, Tq=66, Tk=70, D=D, dtype=torch.float64, grad=True, seed=2)
    scale = head_scale(2, torch.float64, grad=True)
    # fast_mode: random projections of the Jacobian, same check, a fraction of the time
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: run(q, k, v, kind, s, p, causal=causal),
        (q, k, v, scale),
        fast_mode=True,
    )


@pytest.mark.parametrize("kind,p", KINDS_P)
# every register tile's chunking at every vector width (16 to 128), and plain loops (24)
@pytest.mark.parametrize("D", [16, 32, 64, 128, 24])
@pytest.mark.parametrize("threads", [1, 2])
def test_float32_matches_reference(kind, p, D, threads):
    """float32 at T = 150 (three tiles); one head per batch row leaves fewer tasks than
    threads, so the backward splits the keys into groups and sums their dq."""
    if D == 128 and kind == "lp" and p < 1:  # same loops as D = 64; float32 rounding of
        pytest.skip("(sum of 128 |x|^0.7)^(1/0.7) exceeds these tolerances")
    torch.set_num_threads(threads)
    try:
        q, k, v = make(B=2, H=1, Tq=150, Tk=150, D=D, grad=True, seed=D)
        scale = torch.tensor([2.0 / D**0.5], requires_grad=True)
        out = run(q, k, v, kind, scale, p)
        expected = reference(q, k, v, kind, scale, True, p=p or P)
        torch.testing.assert_close(out.double(), expected, atol=1e-4, rtol=1e-4)
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(D))
        got = torch.autograd.grad(out, (q, k, v, scale), grad_out)
        want = torch.autograd.grad(expected, (q, k, v, scale), grad_out.double())
        for a, b in zip(got[:3], want[:3], strict=True):
            b = b.double()
            torch.testing.assert_close(a.double(), b, atol=2e-4 * b.abs().max(), rtol=1e-3)
        # dλ sums T² terms that cancel: float32 rounding of each is relative to the terms
        torch.testing.assert_close(got[3].double(), want[3].double(), atol=0, rtol=5e-3)
    finally:
        torch.set_num_threads(1)


@settings(max_examples=30, deadline=None)
@given(
    B=st.integers(1, 2),
    H=st.integers(1, 3),
    Tq=st.integers(1, 140),
    extra=st.integers(0, 70),
    D=st.sampled_from([1, 2, 5, 8, 16]),
    causal=st.booleans(),
    seed=st.integers(0, 2**16),
    kind=st.sampled_from(NATIVE_KINDS),
    masked=st.booleans(),
)
def test_property(B, H, Tq, extra, D, causal, seed, kind, masked):
    """Output and all four gradients equal the reference for any shape, with or without a
    boolean mask that may leave rows with no key at all."""
    Tk = Tq + extra
    q, k, v = make(B, H, Tq, Tk, D, dtype=torch.float64, grad=True, seed=seed)
    scale = head_scale(H, torch.float64, grad=True)
    mask = None
    if masked:
        mask = torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(seed)) > 0.3
    out = run(q, k, v, kind, scale, P, causal=causal, attn_mask=mask)
    expected = reference(q, k, v, kind, scale, causal, mask)
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))


def test_additive_mask_and_float_scale_gradcheck():
    q, k, v = make(B=2, H=1, Tq=70, Tk=70, D=2, dtype=torch.float64, grad=True, seed=4)
    mask = torch.randn(2, 1, 70, 70, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda q, k, v: run(q, k, v, "l1", 0.9, attn_mask=mask), (q, k, v), fast_mode=True
    )


def test_l1_tie_takes_subgradient_plus_one():
    """At q_d == k_d the native kernel's subgradient of |q_d − k_d| is +1 (documented); the
    reference written with that subgradient agrees, ties and all."""
    q, k, v = make(B=1, H=2, Tq=20, Tk=20, D=4, dtype=torch.float64, seed=8)
    k[..., ::2, :2] = q[..., ::2, :2]  # many exact ties
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, "l1", scale)
    diff = q[:, :, :, None, :] - k[:, :, None, :, :]
    dist = torch.where(diff >= 0, diff, -diff).sum(-1)  # autograd: +1 at diff == 0
    keep = torch.ones(20, 20, dtype=torch.bool).tril()
    scores = (-scale.view(1, -1, 1, 1) * dist).masked_fill(~keep, -torch.inf)
    expected = torch.softmax(scores, -1) @ v
    torch.testing.assert_close(out, expected)
    assert_same_gradients(out, expected, (q, k, v, scale))


@pytest.mark.parametrize("kind", ["l2", "chebyshev", "lp"])
def test_zero_distance_gives_finite_equal_gradients(kind):
    """Keys equal to their query (distance 0, zero coordinate differences): the gradients of
    the eager kernel (torch.cdist's: 0 where the derivative is undefined; the naive formula's
    autograd gives NaN there)."""
    q, k, v = make(B=2, H=2, Tq=70, Tk=70, D=8, dtype=torch.float64, seed=1)
    k[:, :, :10] = q[:, :, :10]
    q, k, v = (t.requires_grad_() for t in (q, k, v))
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, kind, scale, 0.7)
    torch.testing.assert_close(out, reference(q, k, v, kind, scale, p=0.7))
    expected = eager_blocked(q, k, v, kind, scale, p=0.7)
    got = torch.autograd.grad(out.square().sum(), (q, k, v, scale))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v, scale))
    for a, b in zip(got, want, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)


def test_dropout_uses_its_hash_mask_in_forward_and_backward():
    """The output is the reference weights times the mask `dropout_keep` reports, over
    several tiles; gradients through the same mask match."""
    q, k, v = make(B=2, H=2, Tq=70, Tk=75, D=3, dtype=torch.float64, grad=True)
    scale = head_scale(2, torch.float64, grad=True)
    out = run(q, k, v, "l1", scale, dropout_p=0.4, seed=123)
    keep = native.dropout_keep(123, (2, 2, 70, 75), 0.4).double()
    eye = torch.eye(75, dtype=torch.float64).expand(2, 2, 75, 75)
    weights = reference(q, k, eye, "l1", scale)  # (B, H, Tq, Tk)
    expected = (weights * keep / 0.6) @ v
    torch.testing.assert_close(out, expected)
    # 21,000 Bernoulli(0.6) draws: their mean has std sqrt(0.6 · 0.4 / n); allow 4 of them
    n = keep.numel()
    assert abs(keep.mean().item() - 0.6) < 4 * (0.6 * 0.4 / n) ** 0.5
    assert_same_gradients(out, expected, (q, k, v, scale))


def test_dropout_seed_from_global_generator():
    q, k, v = make(Tq=8, Tk=8)
    torch.manual_seed(1)
    a = run(q, k, v, "l1", 0.5, dropout_p=0.5)
    torch.manual_seed(1)
    b = run(q, k, v, "l1", 0.5, dropout_p=0.5)
    torch.manual_seed(2)
    c = run(q, k, v, "l1", 0.5, dropout_p=0.5)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a, c)


def test_half_inputs_are_computed_in_float32():
    q, k, v = make(Tq=70, Tk=70, D=16)
    out = run(q.bfloat16(), k.bfloat16(), v.bfloat16(), "l1", 0.5)
    assert out.dtype == torch.bfloat16
    expected = reference(q.bfloat16(), k.bfloat16(), v.bfloat16(), "l1", 0.5)
    torch.testing.assert_close(out.double(), expected, atol=2e-2, rtol=0)


# The checks that need a fresh process share one: starting one (torch, truthgpt) costs more
# than the checks themselves. Each prints one JSON line; the tests below read them.
FRESH_PROCESS_CHECKS = """
import json, torch
from pathlib import Path
from truthgpt.nn.attention import native

# subnormals: first, before anything else has run in this process
q = torch.randn(1, 2, 80, 16, requires_grad=True)
native.native_attention(q, q, q, 'l1', 0.5).sum().backward()
x = 1e-39
print(json.dumps({'python': x * 0.5, 'torch': (torch.tensor([1e-39]) * 0.5).item()}))

# the rise of the resident-set high-water mark over forward + backward at T = 4096
def status(field):
    for line in Path('/proc/self/status').read_text().splitlines():
        if line.startswith(field + ':'):
            return int(line.split()[1]) * 1024
q, k, v = (torch.randn(1, 1, 4096, 16, requires_grad=True) for _ in range(3))
for kind in ('l1', 'l2'):
    native.native_attention(q, k, v, kind, 0.5).sum().backward()  # warm-up
Path('/proc/self/clear_refs').write_text('5')
before = status('VmRSS')
for kind in ('l1', 'l2'):
    native.native_attention(q, k, v, kind, 0.5).sum().backward()
print(json.dumps({'peak': status('VmHWM') - before}))
"""


@pytest.fixture(scope="module")
def fresh_process() -> list[dict]:
    """The JSON lines FRESH_PROCESS_CHECKS printed, in a process that ran nothing else (no
    compiled call) with glibc returning freed blocks to the system."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(
        [sys.executable, "-c", FRESH_PROCESS_CHECKS], capture_output=True, text=True, env=env
    )
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def test_subnormal_floats_survive_an_l1_call(fresh_process):
    """The kernel changes no floating-point state (the compiled kernel's fast-math flag
    flushes subnormals to zero for the whole process); a fresh process, so that no earlier
    compiled call has set it."""
    subnormal = fresh_process[0]
    assert subnormal["python"] > 0, "subnormal flushed"
    assert subnormal["torch"] > 0, "subnormal flushed (torch)"


# --------------------------------------------------------------------------------------------
# choosing the backend


def test_auto_picks_native_and_each_backend_can_be_forced(monkeypatch):
    calls = []
    monkeypatch.setattr(native, "native_attention", lambda *a, **kw: calls.append("native") or a[0])
    monkeypatch.setattr(
        kernels,
        "blocked_attention",
        lambda *a, compiled, **kw: calls.append("compiled" if compiled else "eager") or a[0],
    )
    q, k, v = make()
    monkeypatch.delenv(functional.BACKEND_ENV, raising=False)
    distance_attention(q, k, v, "l1", 0.5)
    distance_attention(q, k, v, "l2", 0.5, backend="eager")
    distance_attention(q, k, v, "chebyshev", 0.5, backend="compiled")
    monkeypatch.setenv(functional.BACKEND_ENV, "eager")
    distance_attention(q, k, v, "l1", 0.5)
    distance_attention(q, k, v, "l1", 0.5, backend="native")  # the argument wins
    assert calls == ["native", "eager", "compiled", "eager", "native"]


def test_unknown_backend_names_the_argument_or_variable(monkeypatch):
    q, k, v = make()
    with pytest.raises(ValueError, match="backend must be one of"):
        distance_attention(q, k, v, "l1", 0.5, backend="cuda")
    monkeypatch.setenv(functional.BACKEND_ENV, "fast")
    with pytest.raises(ValueError, match="TRUTHGPT_ATTENTION_BACKEND must be one of"):
        distance_attention(q, k, v, "l1", 0.5)


def test_without_the_native_kernel_auto_warns_once_and_falls_back(monkeypatch):
    monkeypatch.setattr(native, "UNAVAILABLE", "ImportError: no module named _native")
    monkeypatch.setattr(functional, "_warned", set())
    monkeypatch.delenv(functional.BACKEND_ENV, raising=False)
    used = []

    def eager_instead(*args, compiled, **kwargs):
        used.append(compiled)
        return real(*args, compiled=False, **kwargs)

    real = kernels.blocked_attention
    monkeypatch.setattr(kernels, "blocked_attention", eager_instead)
    q, k, v = make(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="native attention kernel is not available"):
        out = distance_attention(q, k, v, "l1", 0.5)
    torch.testing.assert_close(out, reference(q, k, v, "l1", 0.5))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once
        distance_attention(q, k, v, "l1", 0.5)
    assert used == [True, True]  # auto went on to the compiled kernel
    with pytest.raises(RuntimeError, match="native attention kernel is not available"):
        distance_attention(q, k, v, "l1", 0.5, backend="native")


def test_no_t_by_t_matrix_is_held_on_a_long_sequence(fresh_process):
    """T = 4096 in one head: a T×T float32 matrix would be 64 MiB; forward + backward stay
    far below (q, k, v and their gradients are 0.25 MiB each). Measured in a fresh process
    as the rise of the resident-set high-water mark, with glibc returning freed blocks."""
    peak = fresh_process[1]["peak"]
    assert peak < 16 * 2**20, f"peak rose by {peak / 2**20:.1f} MiB"


@pytest.mark.parametrize("kind,p", KINDS_P)
def test_causal_offset_user_mask_dead_rows_and_per_head_lambda(kind, p):
    """One fixed case of what the property test only samples: causal with Tq < Tk over
    several tiles (queries are the last Tq positions), a per-batch boolean mask used by the
    backward too, whole rows with no visible key (zero output, zero gradient), and a
    different λ in every head (dλ per head)."""
    B, H, Tq, Tk, D = 2, 3, 70, 135, 8
    q, k, v = make(B, H, Tq, Tk, D, dtype=torch.float64, grad=True, seed=11)
    scale = torch.tensor([0.25, 0.7, 1.3], dtype=torch.float64, requires_grad=True)
    mask = torch.rand(B, 1, Tq, Tk, generator=torch.Generator().manual_seed(3)) > 0.4
    mask[0, :, 5] = False  # row 5 of batch 0 sees nothing
    mask[1, :, 64:67] = False  # rows in the second query tile of batch 1
    out = run(q, k, v, kind, scale, p, causal=True, attn_mask=mask)
    expected = reference(q, k, v, kind, scale, True, mask, p=p or P)
    torch.testing.assert_close(out, expected)
    dead = out[0, :, 5].abs().sum() + out[1, :, 64:67].abs().sum()
    assert dead.item() == 0.0
    grad_out = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator())
    got = torch.autograd.grad(out, (q, k, v, scale), grad_out)
    want = torch.autograd.grad(expected, (q, k, v, scale), grad_out)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b)
    assert got[0][0, :, 5].abs().sum().item() == 0.0  # a dead row's query gets no gradient
    assert len(set(got[3].tolist())) == H  # one dλ per head


def test_kind_codes_come_from_the_one_table():
    """The registry's codes are the table's, and the kernel reads each code as that distance
    (its enum is built from the same table by setup.py)."""
    assert {kd: kinds.get(kd).kernel.native_code for kd in NATIVE_KINDS} == KERNEL_CODES
    q, k, v = make(B=1, H=2, Tq=9, Tk=9, D=4, dtype=torch.float64)
    scale = torch.tensor([0.5, 1.5], dtype=torch.float64)
    for kind, code in KERNEL_CODES.items():
        out, _ = torch.ops.truthgpt.distance_attention_forward(
            q, k, v, scale, code, P, True, None, 0.0, 0
        )
        torch.testing.assert_close(out, reference(q, k, v, kind, scale, True, p=P))


@pytest.mark.parametrize("code", [-1, max(KERNEL_CODES.values()) + 1, 99])
def test_an_unknown_kind_code_is_rejected(code):
    q, k, v = make(B=1, H=2, Tq=3, Tk=3, D=4)
    scale = torch.ones(2)
    with pytest.raises(RuntimeError, match=f"unknown kind code {code}"):
        torch.ops.truthgpt.distance_attention_forward(q, k, v, scale, code, 0.0, True, None, 0.0, 0)
    out = torch.zeros(1, 2, 3, 4)
    lse = torch.zeros(1, 2, 3)
    with pytest.raises(RuntimeError, match=f"unknown kind code {code}"):
        torch.ops.truthgpt.distance_attention_backward(
            out, q, k, v, out, lse, scale, code, 0.0, True, None, 0.0, 0
        )


@pytest.mark.parametrize("kind,p", KINDS_P)
@pytest.mark.parametrize("layout", ["cache", "projection"])
@pytest.mark.parametrize("Tq", [1, 5])
def test_decoding_reads_strided_keys(kind, p, layout, Tq):
    """A decoding step (at most 8 queries: one task per head) on keys as the model passes them:
    a cache's view [:, :, :end] of a longer buffer (rows contiguous, read in place), or heads
    of one projection (rows H·D apart, gathered); float32 at D = 64 (the vector code)."""
    B, H, Tk, D = 2, 3, 150, 64
    g = torch.Generator().manual_seed(11)
    if layout == "cache":
        k, v = (torch.randn(B, H, Tk + 40, D, generator=g)[:, :, :Tk] for _ in range(2))
    else:
        k, v = (torch.randn(B, Tk, H, D, generator=g).transpose(1, 2) for _ in range(2))
    q = torch.randn(B, H, Tq, D, generator=g)
    scale = head_scale(H) / D**0.5
    with torch.no_grad():
        out = run(q, k, v, kind, scale, p)
    expected = reference(q, k, v, kind, scale, True, p=p or P)
    torch.testing.assert_close(out.double(), expected, atol=3e-5, rtol=1e-4)


def test_the_kernel_refuses_to_build_without_the_kind_codes():
    """common.h takes its enum from setup.py's -DTG_KIND_* flags (kernel_codes.py) and stops
    without them, rather than fall back to codes of its own."""
    compiler = shutil.which("c++") or shutil.which("g++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    header = Path(native.__file__).parent / "csrc" / "common.h"
    cmd = [compiler, "-std=c++17", "-fsyntax-only", "-x", "c++", str(header)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    assert res.returncode != 0 and "TG_KIND_L1" in res.stderr
    flags = [f"-DTG_KIND_{name.upper()}={code}" for name, code in KERNEL_CODES.items()]
    res = subprocess.run([*cmd, *flags], capture_output=True, text=True)
    assert res.returncode == 0, res.stderr
