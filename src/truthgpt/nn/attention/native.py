"""The native CPU kernel (C++, built at install time) as an autograd function.

`csrc/distance_attention.cpp` computes l1, l2, chebyshev and lp attention (the kinds whose
`MinkowskiKernel` has a `native_code`) with one parallel region per pass, an online softmax in
the forward and a recompute from the saved log-sum-exp in the backward (see the file's header
for the math). This module loads it, if it was built,
and wraps it for autograd; `functional.distance_attention` decides when to use it.

Differences from the compiled and eager kernels, both documented where users see them:
- dropout masks come from a counter-based hash of (seed, batch·head, row, key), so they do not
  depend on the tiling (`dropout_keep` returns them);
- at a tie q_d == k_d, L1's subgradient of |q_d − k_d| is +1 (the others use sign(0) = 0).
"""

from __future__ import annotations

import torch
from torch import Tensor

from truthgpt.nn.attention import kinds
from truthgpt.nn.attention.functional import SEED_RANGE
from truthgpt.nn.attention.kernels import additive_bias
from truthgpt.nn.attention.kinds import DistanceKind

try:
    from truthgpt.nn.attention import _native  # noqa: F401  (registers torch.ops.truthgpt.*)
except ImportError as err:  # not built: no compiler at install time, another platform
    UNAVAILABLE: str | None = f"{type(err).__name__}: {err}"
else:
    UNAVAILABLE = None


def available() -> bool:
    """Whether the native kernel was built and loaded."""
    return UNAVAILABLE is None


def supports(q: Tensor, kind: str | DistanceKind | None = None) -> bool:
    """The kernel runs on CPU tensors (float32 and float64; half types are widened first), for
    the kinds it implements (a `native_code` in their `MinkowskiKernel`)."""
    if kind is not None:
        kernel = kinds.get(kind).kernel
        if kernel is None or kernel.native_code is None:
            return False
    return q.device.type == "cpu"


class NativeDistanceAttention(torch.autograd.Function):
    """out = softmax(−λ·d(q, k) + mask) · v; saves q, k, v, the output and the log-sum-exp.

    q, k, v may be strided views (the model's are views of one projection): the kernel reads
    them in place as long as the head dimension is contiguous.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, code, p, causal, bias, dropout_p, seed, alibi):
        args = (code, p, causal, bias, dropout_p, seed, alibi)
        out, lse = torch.ops.truthgpt.distance_attention_forward(q, k, v, scale, *args)
        ctx.save_for_backward(q, k, v, out, lse, scale)
        ctx.args = args
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, scale = ctx.saved_tensors
        dq, dk, dv, dscale = torch.ops.truthgpt.distance_attention_backward(
            grad_out, q, k, v, out, lse, scale, *ctx.args
        )
        dscale = dscale if ctx.needs_input_grad[3] else None  # (H,): summed over the batch
        return dq, dk, dv, dscale, None, None, None, None, None, None, None


@torch.compiler.disable
def native_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str | DistanceKind,
    scale: float | Tensor,
    causal: bool = True,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    p: float | None = None,
    seed: int | None = None,
    alibi: Tensor | None = None,
) -> Tensor:
    """Exact attention with the native kernel, (B, H, Tq, D), for the kinds it implements
    (l1, l2, chebyshev, lp).

    Arguments as `distance_attention` (checked there). seed: dropout seed; None draws one from
    torch's global generator, so torch.manual_seed makes runs reproducible. alibi: (H,) ALiBi
    slopes or None; the kernel adds −m_h·|i − j| per tile from the indices (no Tq×Tk bias),
    and the slopes get no gradient.
    """
    if UNAVAILABLE is not None:
        raise RuntimeError(f"truthgpt's native attention kernel is not available ({UNAVAILABLE})")
    spec = kinds.get(kind)
    if spec.kernel is None or spec.kernel.native_code is None:
        served = [n for n in kinds.names("blocked") if kinds.get(n).kernel.native_code is not None]
        raise ValueError(
            f"the native kernel serves the kinds {', '.join(served)}, not {spec.name!r}"
        )
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # half types: compute in fp32
        q, k, v = q.float(), k.float(), v.float()
    if isinstance(scale, Tensor):
        scale_t = scale.to(q.dtype)
    else:
        scale_t = torch.full((q.shape[1],), float(scale), dtype=q.dtype)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, SEED_RANGE, ()).item())
    exponent = float(p) if spec.takes_p else 0.0
    bias = additive_bias(attn_mask, q.dtype)
    slopes = alibi.detach().to(q.dtype) if alibi is not None else None
    args = (spec.kernel.native_code, exponent, causal, bias, float(dropout_p), seed or 0, slopes)
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, scale_t)):
        out = NativeDistanceAttention.apply(q, k, v, scale_t, *args)
    else:  # inference (decoding): the operator alone, no autograd bookkeeping
        out, _ = torch.ops.truthgpt.distance_attention_forward(q, k, v, scale_t, *args)
    return out.to(dtype)


def dropout_keep(seed: int, shape: tuple[int, int, int, int], p: float) -> Tensor:
    """The native kernel's dropout keep-mask (1.0 = kept) for `seed`, (B, H, Tq, Tk)."""
    if UNAVAILABLE is not None:
        raise RuntimeError(f"truthgpt's native attention kernel is not available ({UNAVAILABLE})")
    return torch.ops.truthgpt.dropout_keep(seed, *shape, p)
