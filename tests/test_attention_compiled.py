"""The compiled kernels, once: exact gradients and no recompilation when T changes.

Compiling costs 20-60 s cold (inductor's cache on disk makes later runs take a few seconds);
every other attention test runs the block functions eagerly (cdist-based).
"""

from __future__ import annotations

import pytest
import torch
from torch._dynamo.utils import counters

from truthgpt.attention.kernels import KERNELS, blocked_attention, l1_attention


def test_compiled_l1_kernel_gradients_and_shape_stability(monkeypatch):
    monkeypatch.setenv("TRUTHGPT_COMPILE", "1")
    g = torch.Generator().manual_seed(0)

    def inputs(T):
        q, k, v = (torch.randn(1, 2, T, 4, generator=g, dtype=torch.float64) for _ in range(3))
        scale = torch.tensor([0.4, 0.9], dtype=torch.float64)
        return [t.requires_grad_() for t in (q, k, v, scale)]

    q, k, v, scale = inputs(5)
    assert torch.autograd.gradcheck(l1_attention, (q, k, v, scale))
    assert KERNELS.compiled is not None and not KERNELS.failed, "the kernels did not compile"

    # Blocks have a fixed shape: after one more length (which makes the strides dynamic),
    # other lengths reuse the compiled kernels. All agree with the eager block functions.
    graphs = None
    for T in (70, 150, 300):
        if T == 150:
            graphs = counters["stats"]["unique_graphs"]
        q, k, v, scale = inputs(T)
        out = l1_attention(q, k, v, scale)
        grads = torch.autograd.grad(out.square().sum(), (q, k, v, scale))
        monkeypatch.setenv("TRUTHGPT_COMPILE", "0")  # cdist-based eager blocks
        eager = l1_attention(q, k, v, scale)
        eager_grads = torch.autograd.grad(eager.square().sum(), (q, k, v, scale))
        monkeypatch.setenv("TRUTHGPT_COMPILE", "1")
        torch.testing.assert_close(out, eager)
        for a, b in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(a, b)
    assert counters["stats"]["unique_graphs"] == graphs, "a new sequence length recompiled"

    # A user mask and dropout (other compiled variants) agree with the eager path as well.
    q, k, v, scale = inputs(90)
    mask = torch.rand(1, 1, 90, 90, generator=g) > 0.2
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TRUTHGPT_COMPILE", flag)
        # dropout masks are drawn per (row chunk, key block): same sizes in both modes
        out = l1_attention(
            q, k, v, scale, attn_mask=mask, dropout_p=0.25, seed=3, block_size=64, row_chunk=32
        )
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, scale))))
    for a, b in zip(*results, strict=True):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("kind,p", [("l2", None), ("chebyshev", None), ("lp", 3.0), ("lp", 0.7)])
def test_compiled_distance_kernels_match_eager(monkeypatch, kind, p):
    """One block of 60 rows (static shapes only, to keep compiling short), some keys equal to
    their query (zero distance, zero coordinate differences): finite, equal gradients."""
    g = torch.Generator().manual_seed(1)
    q, k, v = (torch.randn(2, 2, 60, 8, generator=g, dtype=torch.float64) for _ in range(3))
    k[:, :, :10] = q[:, :, :10]
    scale = torch.tensor([0.5, 1.5], dtype=torch.float64)
    q, k, v, scale = (t.requires_grad_() for t in (q, k, v, scale))
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv("TRUTHGPT_COMPILE", flag)
        out = blocked_attention(q, k, v, kind, scale, p=p)
        results.append((out, *torch.autograd.grad(out.square().sum(), (q, k, v, scale))))
    assert not KERNELS.failed
    for a, b in zip(*results, strict=True):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b)
