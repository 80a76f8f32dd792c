"""The compiled blocked kernel against the float64 reference, once per kind: exact gradients
and no recompilation when T changes.

Compiling costs 20-60 s cold (inductor's cache on disk makes later runs take a few seconds),
so this file holds every compiled-kernel test.
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from test_attention import reference
from truthgpt.nn.attention.kernels import KERNELS, _subnormals_kept, blocked_attention


def compiled(q, k, v, kind, scale, *args, **kwargs):
    return blocked_attention(q, k, v, kind, scale, *args, compiled=True, **kwargs)


def inputs(T, g, H=2):
    q, k, v = (torch.randn(1, H, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
    scale = torch.linspace(0.4, 0.9, H, dtype=torch.float64)
    return [t.requires_grad_() for t in (q, k, v, scale)]


def assert_matches_reference(out, q, k, v, kind, scale, p=None, mask=None):
    expected = reference(q, k, v, kind, scale, True, mask, p=p)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v, scale))
    want = torch.autograd.grad(expected.square().sum(), (q, k, v, scale))
    for a, b in zip(grads, want, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow(30)
def test_compiled_l1_kernel_gradients_and_shape_stability():
    g = torch.Generator().manual_seed(0)
    q, k, v, scale = inputs(5, g)
    assert torch.autograd.gradcheck(lambda *a: compiled(*a[:3], "l1", a[3]), (q, k, v, scale))
    assert KERNELS.compiled is not None and not KERNELS.failed, "the kernels did not compile"

    # Blocks have a fixed shape: after one more length (which makes the strides dynamic),
    # other lengths reuse the compiled kernels. Several key blocks and row chunks each.
    graphs = None
    for T in (70, 150, 300):
        if T == 150:
            graphs = counters["stats"]["unique_graphs"]
        q, k, v, scale = inputs(T, g)
        assert_matches_reference(compiled(q, k, v, "l1", scale), q, k, v, "l1", scale)
    assert counters["stats"]["unique_graphs"] == graphs, "a new sequence length recompiled"
    # Loading code built with fast math by GCC < 13 sets flush-to-zero process-wide; the kernels
    # put the caller's mode back.
    assert _subnormals_kept(), "a compiled call left subnormals flushed to zero"

    # A user mask (another compiled variant), over several blocks.
    q, k, v, scale = inputs(90, g)
    mask = torch.rand(1, 1, 90, 90, generator=g) > 0.2
    out = compiled(q, k, v, "l1", scale, attn_mask=mask)
    assert_matches_reference(out, q, k, v, "l1", scale, mask=mask)

    assert _subnormals_kept(), "a compiled call left subnormals flushed to zero"

    # Dropout: masks are drawn per (row chunk, key block), so with the same sizes the compiled
    # and eager kernels drop the same weights. A caller's own flush-to-zero stays (one more
    # compiled variant is loaded under it).
    results = []
    torch.set_flush_denormal(True)
    for flag in (True, False):
        out = blocked_attention(
            q,
            k,
            v,
            "l1",
            scale,
            dropout_p=0.25,
            seed=3,
            block_size=64,
            row_chunk=32,
            compiled=flag,
        )
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, scale))))
    flushed = not _subnormals_kept()
    torch.set_flush_denormal(False)
    assert flushed, "the kernels undid the caller's flush-to-zero"
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.slow(10)
@pytest.mark.parametrize("kind,p", [("l2", None), ("chebyshev", None), ("lp", 3.0), ("lp", 0.7)])
def test_compiled_distance_kernels_match_reference(kind, p):
    """Three key blocks and two row chunks (T = 150) against the reference; then some keys
    equal to their query (zero distance, where the naive formula's gradient is NaN): finite
    gradients equal to the eager kernel's (torch.cdist's subgradient 0)."""
    g = torch.Generator().manual_seed(1)
    q, k, v, scale = inputs(150, g)
    out = compiled(q, k, v, kind, scale, p=p)
    assert not KERNELS.failed
    assert_matches_reference(out, q, k, v, kind, scale, p=p)
    with torch.no_grad():
        k[:, :, :10] = q[:, :, :10]
    results = []
    for flag in (True, False):
        out = blocked_attention(q, k, v, kind, scale, p=p, compiled=flag)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, scale))))
    for a, b in zip(*results, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
