"""Blocked L1 attention: online softmax over key blocks, backward recomputed per block.

    score(i, j) = -scale_h · Σ_d |q_id − k_jd|

The broadcast formula holds a (B, H, Tq, Tk, D) tensor (34 GB at B=4, H=8, T=2048, D=64).
Here queries and keys are cut into fixed-size blocks; the forward keeps, per query row, the
running max m, the running sum l of exp(score − m) and the running weighted sum of values
(the "flash attention" recurrence), so nothing of size Tq×Tk is held. The backward recomputes
each block's scores from q, k and the saved log-sum-exp, the way flash attention does:

    p_ij  = exp(s_ij − lse_i)               ds_ij = p_ij · (dO_i·v_j − dO_i·O_i)
    dv_j  = Σ_i p_ij dO_i                   dq_id = −scale · Σ_j ds_ij · sign(q_id − k_jd)
    dscale = −Σ_ij ds_ij · dist_ij          dk_jd = +scale · Σ_i ds_ij · sign(q_id − k_jd)

sign(0) = 0: at a tie q_id == k_jd the subgradient 0 is used, in forward and backward alike.

The per-block functions below are plain PyTorch. They are compiled with `torch.compile`
(inductor turns each into one fused C++ loop, so the (bq, bk, D) broadcast is never
materialised), with fast floating-point math enabled for these kernels only: it lets the C++
compiler keep several partial sums, which is 5-6x faster than a single accumulation chain.
dq and dk are separate functions: compiled together, inductor would store the shared
sign(q − k) block. Without a working compiler, or with TRUTHGPT_COMPILE=0, the same functions
run eagerly (one warning), materialising one (N, bq, bk, D) block at a time.

Blocks are laid out block-major, (n_blocks, B·H, block, D), so every kernel call sees tensors
of the same shape and strides whatever the sequence length: inductor compiles once per
dtype / head_dim / block size (B·H becomes a dynamic dimension after it first changes).
Masked scores use a large finite negative (MASK_VALUE), not -inf, so that the recurrence never
computes inf − inf; rows whose every key is masked give a zero output and zero gradients.
"""

from __future__ import annotations

import os
import warnings

import torch
from torch import Tensor

# Masked scores; finite so that exp(m_old − m_new) is defined when a whole block is masked.
MASK_VALUE = -1e30
# Rows whose running max stayed below this saw no unmasked key.
_DEAD_ROW = MASK_VALUE / 2

BLOCK_SIZE = 64  # compiled kernels: fixed, the tail block is padded
EAGER_BLOCK_SIZE = 32  # eager fallback: bounds the (N, bq, bk, D) block it materialises


# --------------------------------------------------------------------------------------------
# per-block math (plain PyTorch; compiled below)


def _l1_dist(q: Tensor, kt: Tensor) -> Tensor:
    """(B, H, bq, D) × (B, H, D, bk) -> (B, H, bq, bk) L1 distances; k is transposed so that
    the vector loop runs along keys."""
    return (q[..., :, :, None] - kt[..., None, :, :]).abs().sum(-2)


def _fwd_block(q, kt, v, scale, bias, m, l, acc, drop=None):
    """One key block of the online softmax: returns updated (m, l, acc).

    drop: dropout multipliers (0 or 1/(1−p)) for this block; they scale the weights that
    reach v, not the normaliser l.
    """
    s = -scale * _l1_dist(q, kt) + bias  # (B, H, bq, bk)
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # (B, H, bq, 1)
    alpha = torch.exp(m - m_new)
    pexp = torch.exp(s - m_new)
    l_new = l * alpha + pexp.sum(-1, keepdim=True)
    if drop is not None:
        pexp = pexp * drop
    return m_new, l_new, acc * alpha + pexp @ v


def _bwd_block(q, kt, v, do, lse, delta, scale, bias, drop=None):
    """Recompute one block's probabilities; return ds (B, H, bq, bk), the dv part and the
    dscale part (B, H)."""
    dist = _l1_dist(q, kt)
    s = -scale * dist + bias
    p = torch.exp(s - lse)  # (B, H, bq, bk)
    dp = do @ v.transpose(-1, -2)  # (B, H, bq, bk)
    if drop is not None:
        dv = (p * drop).transpose(-1, -2) @ do  # (B, H, bk, D)
        dp = dp * drop
    else:
        dv = p.transpose(-1, -2) @ do
    ds = p * (dp - delta)  # delta = dO·O holds with dropout too
    dscale = -(ds * dist).sum((-1, -2))
    return ds, dv, dscale


def _dq_block(ds, q, k, scale):
    """dq (B, H, bq, D) = −scale · Σ_j ds_ij · sign(q_i − k_j)."""
    sgn = torch.sign(q[..., :, None, :] - k[..., None, :, :])  # (B, H, bq, bk, D), fused away
    return -scale * (ds[..., None] * sgn).sum(-2)


def _dk_block(ds, q, k, scale):
    """dk (B, H, bk, D) = +scale · Σ_i ds_ij · sign(q_i − k_j)."""
    sgn = torch.sign(q[..., None, :, :] - k[..., :, None, :])  # (B, H, bk, bq, D), fused away
    return scale * (ds.transpose(-1, -2)[..., None] * sgn).sum(-2)


# --------------------------------------------------------------------------------------------
# compiled or eager


class _Kernels:
    """The four block functions, compiled on first use; eager if compilation is unavailable."""

    def __init__(self) -> None:
        self.compiled: dict[str, object] | None = None
        self.failed = False

    @staticmethod
    def compile_enabled() -> bool:
        return os.environ.get("TRUTHGPT_COMPILE", "1") != "0"

    def _build(self) -> dict[str, object]:
        options = {"cpp.enable_unsafe_math_opt_flag": True}
        return {
            f.__name__: torch.compile(f, fullgraph=True, options=options)
            for f in (_fwd_block, _bwd_block, _dq_block, _dk_block)
        }

    def use_compiled(self) -> bool:
        return self.compile_enabled() and not self.failed

    def call(self, fn, *args):
        if not self.use_compiled():
            return fn(*args)
        if self.compiled is None:
            self.compiled = self._build()
        try:
            return self.compiled[fn.__name__](*args)
        except Exception as err:  # no C++ compiler, unsupported platform, ...
            self.failed = True
            warnings.warn(
                f"truthgpt: compiling the L1 attention kernels failed ({type(err).__name__}: "
                f"{str(err).splitlines()[0] if str(err) else ''}); using the eager blocked "
                "kernels, which are several times slower",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args)

    def block_size(self) -> int:
        return BLOCK_SIZE if self.use_compiled() else EAGER_BLOCK_SIZE


KERNELS = _Kernels()


# --------------------------------------------------------------------------------------------
# blocks


def _pad_rows(x: Tensor, b: int) -> Tensor:
    """x (..., T, D) zero-padded to a multiple of b rows (x itself when T already is one)."""
    short = -x.shape[-2] % b
    return torch.nn.functional.pad(x, (0, 0, 0, short)) if short else x


def _block(x: Tensor, i: int, b: int) -> Tensor:
    """Rows [i·b, (i+1)·b) of x (..., T_pad, D), a view."""
    return x[..., i * b : (i + 1) * b, :]


class _Plan:
    """Which (query block, key block) pairs are computed, and each pair's mask and dropout.

    Key c is visible to query r iff c <= r + offset (causal; offset = Tk − Tq) and c < Tk; the
    user's additive mask (if any) is added on top. Dropout multipliers of block (i, j) come
    from a generator seeded with (seed, i, j), so the backward regenerates the forward's.
    """

    def __init__(self, q: Tensor, Tk: int, block: int, causal: bool, user_bias, dropout_p, seed):
        B, H, Tq, _ = q.shape
        self.B, self.H, self.Tq, self.Tk, self.block = B, H, Tq, Tk, block
        self.nq, self.nk = -(-Tq // block), -(-Tk // block)
        self.causal, self.offset = causal, Tk - Tq
        self.user_bias, self.dropout_p, self.seed = user_bias, dropout_p, seed
        self.dtype, self.device = q.dtype, q.device
        self.zeros = torch.zeros(1, 1, block, block, dtype=q.dtype, device=q.device)

    def visible(self, i: int, j: int) -> bool:
        if not self.causal:
            return True
        last_row = min((i + 1) * self.block, self.Tq) - 1
        return j * self.block <= last_row + self.offset

    def bias(self, i: int, j: int) -> Tensor:
        """Additive mask for block (i, j), broadcastable to (B, H, bq, bk); zeros where every
        key is visible (one compiled variant instead of two, for the price of an add)."""
        b = self.block
        fully_visible = (j + 1) * b <= self.Tk and (
            not self.causal or (j + 1) * b - 1 <= i * b + self.offset
        )
        if fully_visible:
            bias = self.zeros
        else:
            rows = torch.arange(i * b, (i + 1) * b, device=self.device)[:, None]
            cols = torch.arange(j * b, (j + 1) * b, device=self.device)[None, :]
            keep = cols < self.Tk
            if self.causal:
                keep = keep & (cols <= rows + self.offset)
            bias = self.zeros.masked_fill(~keep, MASK_VALUE)
        if self.user_bias is not None:
            ub = self.user_bias[..., i * b : (i + 1) * b, j * b : (j + 1) * b]
            bias = (bias + ub).clamp(min=MASK_VALUE)
        return bias

    def drop(self, i: int, j: int) -> Tensor | None:
        """Dropout multipliers for block (i, j), (B, H, bq, bk): 0 or 1/(1−p); None without."""
        if self.dropout_p == 0.0:
            return None
        shape = (self.B, self.H, self.block, self.block)
        return dropout_multipliers(self.seed, i, j, shape, self.dropout_p, self.dtype, self.device)


def dropout_multipliers(seed: int, i: int, j: int, shape, p: float, dtype, device) -> Tensor:
    """The dropout multipliers the kernel uses for block (i, j) under `seed`."""
    gen = torch.Generator(device=device).manual_seed(hash((seed, i, j)) & (2**63 - 1))
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def _user_bias(attn_mask: Tensor | None, Tq: int, Tk: int, block: int, dtype) -> Tensor | None:
    """User mask as an additive float tensor, broadcastable to (B, H, Tq_pad, Tk_pad)."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, MASK_VALUE)
    else:
        bias = attn_mask.to(dtype).clamp(min=MASK_VALUE)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    pad_q = (-Tq) % block if bias.shape[-2] != 1 else 0
    pad_k = (-Tk) % block if bias.shape[-1] != 1 else 0
    if pad_q or pad_k:  # padded keys are masked by the plan itself; padded rows are dropped
        bias = torch.nn.functional.pad(bias, (0, pad_k, 0, pad_q))
    return bias


# --------------------------------------------------------------------------------------------
# autograd


class L1Attention(torch.autograd.Function):
    """Exact L1 attention; saves q, k, v, the output, k transposed and the log-sum-exp.

    Blocks are views of the inputs, so the only O(T·D) copy is k transposed (plus padded
    copies when a length is not a multiple of the block); nothing of size Tq×Tk is held.
    Views keep one stride pattern per (B, T), so inductor compiles each function once with
    static and once with dynamic strides.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, scale_is_tensor, plan: _Plan):
        q, k, v = q.detach(), k.detach(), v.detach()  # one compiled variant: no requires_grad
        B, H, Tq, D = q.shape
        b = plan.block
        qp, kp, vp = _pad_rows(q, b), _pad_rows(k, b), _pad_rows(v, b)  # (B, H, T_pad, D)
        ktp = kp.transpose(-1, -2).contiguous()  # (B, H, D, Tk_pad)
        scale_h = scale.detach().to(q.dtype).view(1, H, 1, 1)
        out = torch.empty(B, H, plan.nq * b, D, dtype=q.dtype, device=q.device)
        lse = torch.empty(plan.nq, B, H, b, 1, dtype=q.dtype, device=q.device)
        for i in range(plan.nq):
            q_i = _block(qp, i, b)
            m = torch.full((B, H, b, 1), MASK_VALUE, dtype=q.dtype, device=q.device)
            l = torch.zeros(B, H, b, 1, dtype=q.dtype, device=q.device)
            acc = torch.zeros(B, H, b, D, dtype=q.dtype, device=q.device)
            for j in range(plan.nk):
                if plan.visible(i, j):
                    kt_j = ktp[..., j * b : (j + 1) * b]
                    args = (q_i, kt_j, _block(vp, j, b), scale_h, plan.bias(i, j), m, l, acc)
                    m, l, acc = KERNELS.call(_fwd_block, *args, plan.drop(i, j))
            dead = m < _DEAD_ROW  # every key masked: zero output, no gradient
            _block(out, i, b).copy_(torch.where(dead, 0.0, acc / l))
            lse[i] = torch.where(dead, -MASK_VALUE, m + torch.log(l))
        ctx.save_for_backward(qp, kp, vp, ktp, out, lse, scale_h)
        ctx.plan, ctx.scale_is_tensor = plan, scale_is_tensor
        return out[..., :Tq, :]

    @staticmethod
    def backward(ctx, grad_out):
        qp, kp, vp, ktp, out, lse, scale_h = ctx.saved_tensors
        plan, b = ctx.plan, ctx.plan.block
        do = _pad_rows(grad_out.detach().to(qp.dtype), b)
        delta = (do * out).sum(-1, keepdim=True)  # (B, H, Tq_pad, 1): dO_i · O_i
        dq, dk, dv = torch.zeros_like(qp), torch.zeros_like(kp), torch.zeros_like(vp)
        dscale = torch.zeros(plan.B, plan.H, dtype=qp.dtype, device=qp.device)
        for j in range(plan.nk):
            k_j, v_j, kt_j = _block(kp, j, b), _block(vp, j, b), ktp[..., j * b : (j + 1) * b]
            for i in range(plan.nq):
                if not plan.visible(i, j):
                    continue
                q_i, do_i, delta_i = _block(qp, i, b), _block(do, i, b), _block(delta, i, b)
                args = (q_i, kt_j, v_j, do_i, lse[i], delta_i, scale_h, plan.bias(i, j))
                ds, dv_j, dscale_ij = KERNELS.call(_bwd_block, *args, plan.drop(i, j))
                _block(dv, j, b).add_(dv_j)
                dscale += dscale_ij
                _block(dq, i, b).add_(KERNELS.call(_dq_block, ds, q_i, k_j, scale_h))
                _block(dk, j, b).add_(KERNELS.call(_dk_block, ds, q_i, k_j, scale_h))
        Tq, Tk = plan.Tq, plan.Tk
        dscale = dscale.sum(0) if ctx.scale_is_tensor else None
        return dq[..., :Tq, :], dk[..., :Tk, :], dv[..., :Tk, :], dscale, None, None


@torch.compiler.disable
def l1_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    scale: float | Tensor,
    causal: bool = True,
    attn_mask: Tensor | None = None,
    dropout_p: float = 0.0,
    *,
    block_size: int | None = None,
    seed: int | None = None,
) -> Tensor:
    """Blocked exact L1 attention, (B, H, Tq, D). Arguments as `distance_attention`.

    block_size: query and key block length (default: BLOCK_SIZE compiled, EAGER_BLOCK_SIZE
    eager); any positive value is exact, the tail block is padded and masked.
    seed: dropout seed; None draws one from torch's global generator (so torch.manual_seed
    makes runs reproducible).
    """
    block = block_size or KERNELS.block_size()
    H = q.shape[1]
    is_tensor = isinstance(scale, Tensor)
    scale_t = scale if is_tensor else torch.full((H,), float(scale), device=q.device)
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # half types: compute in fp32
        q, k, v = q.float(), k.float(), v.float()
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, 2**31 - 1, ()).item())
    user_bias = _user_bias(attn_mask, q.shape[2], k.shape[2], block, q.dtype)
    plan = _Plan(q, k.shape[2], block, causal, user_bias, float(dropout_p), seed)
    return L1Attention.apply(q, k, v, scale_t, is_tensor, plan).to(dtype)
