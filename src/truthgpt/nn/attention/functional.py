"""Distance attention as a function: scores from distances between queries and keys.

    score(i, j) = -scale_h · d(q_i, k_j)      (l1, l2, sql2, chebyshev, lp, registered kinds)
    score(i, j) = +scale_h · sim(q_i, k_j)    (dot, cosine: d = −sim)

then the causal mask, an optional user mask, softmax over keys, dropout and weights @ v. The
kind (`truthgpt.nn.attention.kinds`) gives d and the path that computes the attention:

* the plain path (`_plain_attention`) materialises the (B, H, Tq, Tk) score matrix from the
  kind's `distance`. It is the readable definition, the one used when the caller asks for the
  attention weights, and the only one for kinds added with `register_distance`.
* the fast paths: kinds with `as_dot_product` (dot, cosine, squared L2) become one call to
  `F.scaled_dot_product_attention` (cosine on normalised q, k; squared L2 on q, k augmented
  by one column, exactly); kinds with a `MinkowskiKernel` (l1, l2, chebyshev, lp) run a
  flash-style kernel with an online softmax that never holds the weights, dropout included:
  the native C++ kernel (`truthgpt.nn.attention.native`), the Triton kernels on CUDA
  (`truthgpt.nn.attention.triton_kernels`) or the blocked PyTorch one, compiled or eager
  (`truthgpt.nn.attention.kernels`); see BACKENDS.

Fully masked query rows (possible only with a user mask, never with the causal mask alone
since key i is always visible to query i) give a zero output row, zero weights and zero
gradients instead of NaN, on every path.
"""

from __future__ import annotations

import math
import os
import warnings

import torch
import torch.nn.functional as F
from torch import Tensor

from truthgpt.nn.attention import kinds, native, triton_kernels
from truthgpt.nn.attention.kernels import blocked_attention
from truthgpt.nn.attention.kinds import DistanceKind

# Kernels for the kinds with a MinkowskiKernel (l1, l2, chebyshev, lp). "auto" takes the first
# that serves the tensors, in this order: the native C++ kernel (CPU), the Triton kernels
# (CUDA, when triton is installed), the blocked kernel compiled by inductor, the same blocked
# kernel run eagerly. TRUTHGPT_ATTENTION_BACKEND sets the default for a process.
BACKENDS: tuple[str, ...] = ("auto", "native", "triton", "compiled", "eager")
BACKEND_ENV = "TRUTHGPT_ATTENTION_BACKEND"


# --------------------------------------------------------------------------------------------
# argument checks


def _check_args(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: DistanceKind,
    scale: float | Tensor,
    causal: bool,
    attn_mask: Tensor | None,
    p: float | None,
    dropout_p: float,
) -> None:
    """Raise ValueError naming the offending argument and what would be valid."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 4:
            raise ValueError(f"{name} must have shape (B, H, T, D), got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{name} must be a floating point tensor, got dtype {t.dtype}")
    B, H, Tq, D = q.shape
    if k.shape[0] != B or k.shape[1] != H or k.shape[3] != D:
        raise ValueError(
            f"k must have shape (B={B}, H={H}, Tk, D={D}) to match q, got {tuple(k.shape)}"
        )
    if v.shape != k.shape:
        raise ValueError(f"v must have the shape of k {tuple(k.shape)}, got {tuple(v.shape)}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise ValueError(f"{name} must have the dtype of q ({q.dtype}), got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} must be on the device of q ({q.device}), got {t.device}")
    Tk = k.shape[2]
    if causal and Tk < Tq:
        raise ValueError(
            f"with causal=True the keys must include every query position (Tk >= Tq), "
            f"got Tq={Tq}, Tk={Tk}"
        )
    if isinstance(scale, Tensor):
        if scale.shape != (H,):
            raise ValueError(
                f"scale must be a positive float or a tensor of shape (H,)=({H},), "
                f"got a tensor of shape {tuple(scale.shape)}"
            )
        if scale.device != q.device:
            raise ValueError(f"scale must be on the device of q ({q.device}), got {scale.device}")
        if not scale.is_floating_point():
            raise ValueError(f"scale must be a floating point tensor, got dtype {scale.dtype}")
        # The values are read only on the host: on an accelerator that would be a wait per
        # layer (the layer's λ = exp(log λ) clamped is positive by construction).
        if (
            scale.device.type == "cpu"
            and not torch.compiler.is_compiling()
            and not bool((scale > 0).all())
        ):
            raise ValueError(f"scale must be positive in every head, got {scale.tolist()}")
    elif isinstance(scale, bool) or not isinstance(scale, (int, float)):
        raise ValueError(
            f"scale must be a positive float or a tensor of shape (H,), got {type(scale).__name__}"
        )
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be a positive finite number, got {scale}")
    if kind.takes_p:
        if p is None:
            raise ValueError(f"p is required for kind={kind.name!r} (a finite number > 0)")
        if isinstance(p, bool) or not isinstance(p, (int, float)):
            raise ValueError(f"p must be a finite number > 0, got {type(p).__name__}")
        if not (math.isfinite(p) and p > 0):
            raise ValueError(
                f"p must be a finite number > 0 (use kind='chebyshev' for p=inf), got {p}"
            )
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"dropout_p must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be in [0, 1), got {dropout_p}")
    if attn_mask is not None:
        if not isinstance(attn_mask, Tensor):
            raise ValueError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
        if attn_mask.dtype != torch.bool and not attn_mask.is_floating_point():
            raise ValueError(
                "attn_mask must be boolean (True = attend) or floating (added to the scores), "
                f"got dtype {attn_mask.dtype}"
            )
        if attn_mask.device != q.device:
            raise ValueError(
                f"attn_mask must be on the device of q ({q.device}), got {attn_mask.device}"
            )
        try:
            shape = torch.broadcast_shapes(attn_mask.shape, (B, H, Tq, Tk))
        except RuntimeError:
            shape = None
        if shape != (B, H, Tq, Tk):
            raise ValueError(
                f"attn_mask must broadcast to (B, H, Tq, Tk)=({B}, {H}, {Tq}, {Tk}), "
                f"got shape {tuple(attn_mask.shape)}"
            )


# --------------------------------------------------------------------------------------------
# masks


def causal_keep_mask(Tq: int, Tk: int, device: torch.device | str | None = None) -> Tensor:
    """(Tq, Tk) boolean mask, True where key j is visible to query i: j <= i + Tk - Tq.

    The queries are the last Tq of the Tk positions (a KV cache holds the first Tk - Tq), so
    the mask is aligned bottom-right; SDPA's is_causal aligns it top-left and is only used
    when Tq == Tk.
    """
    i = torch.arange(Tq, device=device).unsqueeze(1)
    j = torch.arange(Tk, device=device).unsqueeze(0)
    return j <= i + (Tk - Tq)


def _additive_mask(
    Tq: int, Tk: int, causal: bool, attn_mask: Tensor | None, dtype: torch.dtype, device
) -> Tensor | None:
    """Causal rule and user mask as one additive float mask (0 or -inf, plus user values)."""
    bias = None
    if causal:
        keep = causal_keep_mask(Tq, Tk, device)
        bias = torch.zeros(Tq, Tk, dtype=dtype, device=device).masked_fill(~keep, -math.inf)
    if attn_mask is not None:
        if attn_mask.dtype == torch.bool:
            user = torch.zeros(attn_mask.shape, dtype=dtype, device=device)
            user = user.masked_fill(~attn_mask, -math.inf)
        else:
            user = attn_mask.to(dtype)
        bias = user if bias is None else bias + user
    return bias


def _dead_rows(bias: Tensor | None) -> Tensor | None:
    """Boolean (..., Tq, 1) marking query rows where every key is masked, or None if none."""
    if bias is None:
        return None
    dead = torch.isneginf(bias).all(dim=-1, keepdim=True)
    return dead if bool(dead.any()) else None


# --------------------------------------------------------------------------------------------
# scores


def _head_scale(scale: float | Tensor) -> float | Tensor:
    """Scale as a float or a (1, H, 1, 1) tensor that broadcasts over (B, H, Tq, Tk)."""
    return scale.view(1, -1, 1, 1) if isinstance(scale, Tensor) else scale


def pairwise_scores(
    q: Tensor, k: Tensor, kind: str | DistanceKind, scale: float | Tensor, p: float | None = None
) -> Tensor:
    """Scores (B, H, Tq, Tk) before masking, −scale · the kind's distance: the definition every
    fast path must match."""
    return -_head_scale(scale) * kinds.get(kind).pairwise(q, k, p)


def _masked_softmax(scores: Tensor, bias: Tensor | None) -> Tensor:
    """Softmax over keys; rows with every key masked become zeros instead of NaN."""
    if bias is None:
        return torch.softmax(scores, dim=-1)
    scores = scores + bias
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)
    return weights.masked_fill(dead, 0.0)


def _plain_attention(q, k, v, kind, scale, causal, attn_mask, p, dropout_p):
    """Materialising path: returns (output, weights); weights are after dropout."""
    Tq, Tk = q.shape[2], k.shape[2]
    scores = pairwise_scores(q, k, kind, scale, p)  # (B, H, Tq, Tk)
    bias = _additive_mask(Tq, Tk, causal, attn_mask, scores.dtype, q.device)
    weights = _masked_softmax(scores, bias)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ v, weights  # (B, H, Tq, D)


# --------------------------------------------------------------------------------------------
# fast paths


def _sdpa(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, causal, attn_mask, dropout_p):
    """SDPA with our causal rule (bottom-right), per-head scale and NaN-free dead rows."""
    if isinstance(scale, Tensor):
        q = q * scale.view(1, -1, 1, 1).to(q.dtype)  # fold the per-head scale into q
        scale = 1.0
    Tq, Tk = q.shape[2], k.shape[2]
    if attn_mask is None and (not causal or Tq == Tk):
        return F.scaled_dot_product_attention(
            q, k, v, dropout_p=dropout_p, is_causal=causal, scale=scale
        )
    if attn_mask is None and Tq == 1:  # one new token sees every cached key
        return F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, scale=scale)
    bias = _additive_mask(Tq, Tk, causal, attn_mask, q.dtype, q.device)
    dead = _dead_rows(bias)
    if dead is not None:  # let dead rows see every key, then zero their output
        bias = bias.masked_fill(dead, 0.0)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout_p, scale=scale)
    return out if dead is None else out.masked_fill(dead, 0.0)


def _as_sdpa(q, k, v, kind: DistanceKind, scale, causal, attn_mask, dropout_p):
    """A kind with `as_dot_product`: SDPA on the rewritten q, k, v and scale."""
    D = v.shape[-1]
    out = _sdpa(*kind.as_dot_product(q, k, v, scale), causal, attn_mask, dropout_p)
    return out if out.shape[-1] == D else out[..., :D]  # drop the columns added to v


# --------------------------------------------------------------------------------------------
# public entry point


def distance_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    kind: str | DistanceKind,
    scale: float | Tensor,
    *,
    causal: bool = True,
    attn_mask: Tensor | None = None,
    p: float | None = None,
    dropout_p: float = 0.0,
    need_weights: bool = False,
    backend: str | None = None,
) -> Tensor | tuple[Tensor, Tensor]:
    """Attention whose scores are (negated, scaled) distances between queries and keys.

    Args:
        q: (B, H, Tq, D) queries. k, v: (B, H, Tk, D), Tk >= Tq when causal; the queries are
            the last Tq positions, so key j is visible to query i iff j <= i + Tk - Tq.
        kind: a registered kind (`kinds.names()`) or one of its aliases.
        scale: λ > 0, a float or a (H,) tensor (one per head; gradients flow to it).
        causal: apply the causal rule above.
        attn_mask: boolean keep-mask (True = attend) or additive float mask, broadcastable
            to (B, H, Tq, Tk). Rows with every key masked give zeros, not NaN.
        p: the exponent for kind='lp' (finite, > 0); ignored by kinds without one.
        dropout_p: dropout on the attention weights (applied whenever > 0; pass 0 in eval).
        need_weights: also return the (B, H, Tq, Tk) weights (materialising path).
        backend: the kernel for the kinds with a `MinkowskiKernel` (l1, l2, chebyshev, lp),
            one of BACKENDS; None reads TRUTHGPT_ATTENTION_BACKEND (default "auto": native on
            CPU, triton on CUDA, else compiled, else eager). "triton" needs CUDA tensors (or
            TRITON_INTERPRET=1, which runs its kernels in Triton's interpreter on CPU).

    Returns:
        output (B, H, Tq, D), or (output, weights) when need_weights.
    """
    kind = kinds.get(kind)
    _check_args(q, k, v, kind, scale, causal, attn_mask, p, dropout_p)
    # λ as given goes to the Triton kernels, which take it in fp32 (a bf16 λ would drop
    # small updates); the other paths compute the scores in q's dtype
    exact_scale = scale
    if isinstance(scale, Tensor):
        scale = scale.to(q.dtype)
    backend = _backend_name(backend)  # checked for every kind, used by the blocked ones
    for value, other in kind.same_as:  # same math, faster paths (lp at p = 1 and 2)
        if p == value:
            kind, p = kinds.get(other), None
            break
    if need_weights or kind.fast_path == "plain":
        out, weights = _plain_attention(q, k, v, kind, scale, causal, attn_mask, p, dropout_p)
        return (out, weights) if need_weights else out
    if kind.fast_path == "sdpa":
        return _as_sdpa(q, k, v, kind, scale, causal, attn_mask, dropout_p)
    backend = resolve_backend(backend, q, kind)
    if backend == "native":  # also the decoding step (Tq = 1): one parallel pass over heads
        return native.native_attention(q, k, v, kind, scale, causal, attn_mask, dropout_p, p=p)
    if backend == "triton":  # also the decoding step: one launch, nothing Tq×Tk held
        return triton_kernels.triton_attention(
            q, k, v, kind, exact_scale, causal, attn_mask, dropout_p, p=p
        )
    if q.shape[2] == 1:  # one decoding step holds only Tk scores per head: plain is cheap
        out, _ = _plain_attention(q, k, v, kind, scale, causal, attn_mask, p, dropout_p)
        return out
    compiled = backend == "compiled"
    return blocked_attention(
        q, k, v, kind, scale, causal, attn_mask, dropout_p, p=p, compiled=compiled
    )


_warned: set[str] = set()


def _backend_name(backend: str | None) -> str:
    """The backend asked for (argument, else TRUTHGPT_ATTENTION_BACKEND, else auto), checked."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if name not in BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source} must be one of {BACKENDS}, got {name!r}")
    return name


def resolve_backend(backend: str | None, q: Tensor, kind: str | DistanceKind | None = None) -> str:
    """The backend that will run for q (and kind): the one asked for, or auto's first
    available one.

    auto falls back from native to compiled with one warning naming what is missing (on CPU);
    a backend asked for by name is used as it is (native raises if it was not built, triton
    if triton is missing or the tensors are not on CUDA).
    """
    name = _backend_name(backend)
    if name != "auto":
        return name
    if native.available() and native.supports(q, kind):
        return "native"
    if triton_kernels.supports(q, kind):
        return "triton"
    if q.device.type != "cpu":  # the native kernel is for CPU tensors: nothing to warn about
        if q.device.type == "cuda" and not triton_kernels.available() and "triton" not in _warned:
            _warned.add("triton")
            warnings.warn(
                f"truthgpt: triton is not installed ({triton_kernels.unavailable_reason()}); "
                "using the compiled blocked kernel, which is far slower on GPUs. "
                f"{triton_kernels.INSTALL_HINT}",
                RuntimeWarning,
                stacklevel=3,
            )
        return "compiled"
    if not native.available() and "native" not in _warned:
        _warned.add("native")
        warnings.warn(
            f"truthgpt: the native attention kernel is not available ({native.UNAVAILABLE}); "
            "using the compiled blocked kernel (the first call compiles it, 20-30 s). "
            "Reinstall with a C++ compiler present to build it.",
            RuntimeWarning,
            stacklevel=3,
        )
    return "compiled"
