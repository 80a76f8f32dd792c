"""Blocked distance attention: online softmax over key blocks, backward recomputed per block.

    score(i, j) = -scale_h · dist(q_i, k_j),   dist with a MinkowskiKernel (kinds.py):
                                               l1, l2, chebyshev, lp

The broadcast formula holds a (B, H, Tq, Tk, D) tensor (34 GB at B=4, H=8, T=2048, D=64).
Here the keys are cut into blocks of `block` keys and the queries into chunks of at most
`rows` rows. The forward keeps, per query row, the running max m, the running sum l of
exp(score − m) and the running weighted sum of values (the "flash attention" recurrence), so
nothing of size Tq×Tk is held. The backward recomputes each block's scores from q, k and the
saved log-sum-exp, the way flash attention does:

    p_ij  = exp(s_ij − lse_i)               ds_ij = p_ij · (dO_i·v_j − dO_i·O_i)
    dv_j  = Σ_i p_ij dO_i                   g_ij  = −scale · ds_ij  (dL/d dist_ij)
    dscale = −Σ_ij ds_ij · dist_ij          dq_i = Σ_j g_ij ∂dist_ij/∂q_i,  dk_j = −Σ_i (same)

with ∂dist/∂q per coordinate from the kind's `MinkowskiKernel` (kinds.py): sign(q_d − k_d)
for l1, (q − k)/dist for l2, and so on; the subgradient 0 where it is undefined.

Work is organised per key block: key block j meets the query rows that can see it (causal:
rows from j·block − (Tk − Tq) on), in chunks of `rows`. Blocks above the diagonal are never
computed, and each call is large: a few dozen calls per pass at T=1024 instead of hundreds,
which matters on a shared machine where every parallel region waits for its slowest thread.

The per-block functions below are plain PyTorch. They are compiled with `torch.compile`
(inductor turns each into fused C++ loops, so the (rows, block, D) broadcast is never
materialised), with fast floating-point math enabled for these kernels only: it lets the C++
compiler keep several partial sums, 5-6x faster than one accumulation chain. dq and dk are
separate functions: compiled together, inductor would store the shared sign(q − k) block
(for l2 they are two matmuls each).
Without a working compiler (one warning), or with compiled=False, the same functions run
eagerly, with the distances and their sign-weighted sums taken from `torch.cdist` and its
backward (ATen's fused loops, sign(0) = 0 too) instead of the broadcast formulas, which eager
mode would materialise as (B, H, rows, block, D) tensors.

Threads: the compiled loops use torch's thread count, with a barrier after each loop. When
other processes keep every core busy, each barrier waits for a descheduled thread and the
kernel slows down several times more than SDPA does (one parallel region per call);
TRUTHGPT_KERNEL_THREADS=1 (read when the kernels are first compiled) makes them single-
threaded, which is slower on an idle machine but degrades gracefully on a shared one.

Inductor compiles each function once for the first shapes it sees and once more with dynamic
sizes and strides when they change (the row count varies between calls): no recompilation per
sequence length. Masked scores use a large finite negative (MASK_VALUE), not -inf, so that
the recurrence never computes inf − inf; rows whose every key is masked give a zero output
and zero gradients.
"""

from __future__ import annotations

import os
import warnings

import torch
import torch._dynamo.exc
import torch._inductor.exc
from torch import Tensor

from truthgpt.nn.attention import kinds
from truthgpt.nn.attention.functional import SEED_RANGE
from truthgpt.nn.attention.kinds import DistanceKind, MinkowskiKernel

# Masked scores; finite so that exp(m_old − m_new) is defined when a whole block is masked.
MASK_VALUE = -1e30
# Rows whose running max stayed below this saw no unmasked key.
_DEAD_ROW = MASK_VALUE / 2

BLOCK_SIZE = 64  # keys per block (compiled); a short tail block is zero-padded and masked
ROW_CHUNK = 256  # query rows per call (compiled): bounds the (rows, block) temporaries
EAGER_BLOCK_SIZE = 32  # eager fallback (cdist-based blocks): measured a little faster
EAGER_ROW_CHUNK = 64


# --------------------------------------------------------------------------------------------
# per-block math (plain PyTorch; compiled below)


def _dist(q: Tensor, kt: Tensor, kernel: MinkowskiKernel, p: float) -> Tensor:
    """(B, H, R, D) × (B, H, D, b) -> (B, H, R, b) distances.

    Compiled: the broadcast formula, which inductor fuses into one loop (k is transposed so
    that the vector loop runs along keys). Eager: `torch.cdist`, ATen's fused loop.
    """
    if not torch.compiler.is_compiling():
        mode = "donot_use_mm_for_euclid_dist"  # exact differences, not ‖q‖² + ‖k‖² − 2q·k
        return torch.cdist(q, kt.transpose(-1, -2), p=kernel.exponent(p), compute_mode=mode)
    x = (q[..., :, :, None] - kt[..., None, :, :]).abs()  # (B, H, R, D, b), fused away
    return kernel.reduce(x, p)


def _fwd_block(q, kt, v, scale, bias, m, l, acc, drop, kernel, p):
    """One key block of the online softmax for R query rows: returns updated (m, l, acc).

    drop: dropout multipliers (0 or 1/(1−p)) for this block, or None; they scale the weights
    that reach v, not the normaliser l.
    """
    s = -scale * _dist(q, kt, kernel, p) + bias  # (B, H, R, b)
    m_new = torch.maximum(m, s.amax(-1, keepdim=True))  # (B, H, R, 1)
    alpha = torch.exp(m - m_new)
    pexp = torch.exp(s - m_new)
    l_new = l * alpha + pexp.sum(-1, keepdim=True)
    if drop is not None:
        pexp = pexp * drop
    return m_new, l_new, acc * alpha + pexp @ v


def _bwd_block(q, kt, v, do, lse, delta, scale, bias, drop, kernel, p):
    """Recompute one block's probabilities; return g = dL/d(dist) (B, H, R, b), the
    distances, the dv part (B, H, b, D) and the dscale part (B, H)."""
    dist = _dist(q, kt, kernel, p)
    s = -scale * dist + bias
    prob = torch.exp(s - lse)  # (B, H, R, b)
    dp = do @ v.transpose(-1, -2)  # (B, H, R, b)
    if drop is not None:
        dv = (prob * drop).transpose(-1, -2) @ do
        dp = dp * drop
    else:
        dv = prob.transpose(-1, -2) @ do
    ds = prob * (dp - delta)  # dL/d(score); delta = dO·O holds with dropout too
    dscale = -(ds * dist).sum((-1, -2))
    return -scale * ds, dist, dv, dscale


def _dq_block(g, dist, q, k, kernel, p):
    """dq (B, H, R, D) = Σ_j g_ij · ∂dist_ij/∂q_i."""
    if not torch.compiler.is_compiling():  # eager: cdist's own backward
        return torch.ops.aten._cdist_backward(g.contiguous(), q, k, kernel.exponent(p), dist)
    if kernel.linear_grad is not None:  # ∂d/∂q = w·(q − k): two matmuls
        w = kernel.linear_grad(g, dist)
        return w.sum(-1, keepdim=True) * q - w @ k
    qi, kj = q[..., :, None, :], k[..., None, :, :]  # (B, H, R, b, D), fused away
    return kernel.pair_grad(g[..., None], dist[..., None], qi, kj, p).sum(-2)


def _dk_block(g, dist, q, k, kernel, p):
    """dk (B, H, b, D) = Σ_i g_ij · ∂dist_ij/∂k_j = −Σ_i g_ij · ∂dist_ij/∂q_i."""
    g_t, dist_t = g.transpose(-1, -2), dist.transpose(-1, -2)  # (B, H, b, R)
    if not torch.compiler.is_compiling():
        pp = kernel.exponent(p)
        return torch.ops.aten._cdist_backward(g_t.contiguous(), k, q, pp, dist_t.contiguous())
    if kernel.linear_grad is not None:
        w = kernel.linear_grad(g_t, dist_t)
        return w.sum(-1, keepdim=True) * k - w @ q
    qi, kj = q[..., None, :, :], k[..., :, None, :]  # (B, H, b, R, D), fused away
    return -kernel.pair_grad(g_t[..., None], dist_t[..., None], qi, kj, p).sum(-2)


# --------------------------------------------------------------------------------------------
# compiled or eager


_COMPILE_ERRORS = (
    torch._dynamo.exc.BackendCompilerFailed,  # inductor's errors, wrapped by dynamo
    torch._inductor.exc.CppCompileError,
    torch._inductor.exc.InvalidCxxCompiler,
    OSError,  # the compiler could not be run at all
)


_SUBNORMAL = 5e-324  # a variable: Python would fold a product of two constants


def _subnormals_kept() -> bool:
    """Whether this thread's floating-point unit keeps subnormals (neither FTZ nor DAZ)."""
    return _SUBNORMAL * 1.0 != 0.0


class _Kernels:
    """The four block functions, compiled on first use; eager if compilation fails."""

    def __init__(self) -> None:
        self.compiled: dict[str, object] | None = None
        self.failed = False

    def call(self, compiled: bool, fn, *args):
        if not compiled or self.failed:
            return fn(*args)
        if self.compiled is None:
            options: dict = {"cpp.enable_unsafe_math_opt_flag": True}
            if threads := os.environ.get("TRUTHGPT_KERNEL_THREADS"):
                options["cpp.threads"] = int(threads)
            self.compiled = {
                f.__name__: torch.compile(f, fullgraph=True, options=options)
                for f in (_fwd_block, _bwd_block, _dq_block, _dk_block)
            }
        kept = _subnormals_kept()
        try:
            # Each (kernel, p, dtype, dropout or not) is a compiled variant, twice (static and
            # dynamic shapes): more than dynamo's default limit of 8 per function when one
            # process uses several kinds. Past the limit it would silently run eagerly.
            with torch._dynamo.config.patch(recompile_limit=64):
                return self.compiled[fn.__name__](*args)
        except _COMPILE_ERRORS as err:  # no C++ compiler, unsupported platform, ...
            # Only a failure to compile switches to the eager kernels (for the rest of the
            # process: every later call would fail the same way); any other error is the
            # caller's and propagates.
            self.failed = True
            first_line = str(err).splitlines()[0] if str(err) else ""
            warnings.warn(
                f"truthgpt: compiling the L1 attention kernels failed ({type(err).__name__}: "
                f"{first_line}); using the eager blocked kernels, which are several times "
                "slower",
                RuntimeWarning,
                stacklevel=2,
            )
            return fn(*args)
        finally:
            # The fast math asked for above (-funsafe-math-optimizations) makes GCC < 13 link
            # crtfastmath.o into each compiled variant; loading one flushes subnormals to zero
            # in the whole process (every later float op, Python's own too). Put back what the
            # caller had: the kernels keep their speed, the process its floating-point mode.
            if kept and not _subnormals_kept():
                torch.set_flush_denormal(False)

    def sizes(self, compiled: bool) -> tuple[int, int]:
        """(key block, row chunk) for the mode that will run."""
        if compiled and not self.failed:
            return BLOCK_SIZE, ROW_CHUNK
        return EAGER_BLOCK_SIZE, EAGER_ROW_CHUNK


KERNELS = _Kernels()


# --------------------------------------------------------------------------------------------
# the schedule


def _pad_rows(x: Tensor, b: int) -> Tensor:
    """x (..., T, D) zero-padded to a multiple of b rows (x itself when T already is one)."""
    short = -x.shape[-2] % b
    return torch.nn.functional.pad(x, (0, 0, 0, short)) if short else x


def _rows(x: Tensor, r0: int, r1: int) -> Tensor:
    """Rows [r0, r1) of x (..., T, D) as a contiguous tensor.

    The kernels always receive contiguous inputs: views would give inductor strides that
    relate to sizes differently from call to call (a chunk that is the whole tensor or not),
    each relation one more compiled variant. The copy is O(rows·D), the call O(rows·block·D).
    """
    return x[..., r0:r1, :].contiguous()


class _Plan:
    """Which (key block, row chunk) pairs are computed, and each pair's mask and dropout.

    Key c is visible to query r iff c <= r + offset (causal; offset = Tk − Tq) and c < Tk; the
    user's additive mask (if any) is added on top. Dropout multipliers of a pair come from a
    generator seeded with (seed, first row, key block), so the backward regenerates them.
    """

    def __init__(
        self, q, Tk, kernel, p, block, rows, causal, user_bias, dropout_p, seed, compiled, alibi
    ):
        B, H, Tq, _ = q.shape
        self.compiled = compiled
        self.kernel, self.p = kernel, p
        self.B, self.H, self.Tq, self.Tk, self.block, self.rows = B, H, Tq, Tk, block, rows
        self.nk = -(-Tk // block)
        self.causal, self.offset = causal, Tk - Tq
        self.user_bias, self.dropout_p, self.seed = user_bias, dropout_p, seed
        self.dtype, self.device = q.dtype, q.device
        # ALiBi slopes (1, H, 1, 1) or None; they get no gradient
        self.alibi = None if alibi is None else alibi.detach().to(q.dtype).view(1, H, 1, 1)

    def chunks(self, j: int) -> list[tuple[int, int]]:
        """Row ranges [r0, r1) that meet key block j."""
        first = max(0, j * self.block - self.offset) if self.causal else 0
        return [(r, min(r + self.rows, self.Tq)) for r in range(first, self.Tq, self.rows)]

    def bias(self, r0: int, r1: int, j: int) -> Tensor:
        """Additive mask (and ALiBi's term) for rows [r0, r1) × key block j, broadcastable to
        (B, H, R, b)."""
        b = self.block
        c0 = j * b
        bias = torch.zeros(1, 1, r1 - r0, b, dtype=self.dtype, device=self.device)
        if c0 + b > self.Tk or (self.causal and c0 + b - 1 > r0 + self.offset):
            rows = torch.arange(r0, r1, device=self.device)[:, None]
            cols = torch.arange(c0, c0 + b, device=self.device)[None, :]
            keep = cols < self.Tk
            if self.causal:
                keep = keep & (cols <= rows + self.offset)
            bias = bias.masked_fill(~keep, MASK_VALUE)
        if self.alibi is not None:  # −m·|i − j| of this tile only, from the indices
            rows = torch.arange(r0 + self.offset, r1 + self.offset, device=self.device)
            cols = torch.arange(c0, c0 + b, device=self.device)
            distance = (rows[:, None] - cols[None, :]).abs().to(self.dtype)  # (R, b)
            bias = (bias - self.alibi * distance).clamp(min=MASK_VALUE)  # (1, H, R, b)
        if self.user_bias is not None:
            ub = self.user_bias[..., r0:r1, c0 : c0 + b]
            bias = (bias + ub).clamp(min=MASK_VALUE)
        return bias

    def drop(self, r0: int, r1: int, j: int) -> Tensor | None:
        """Dropout multipliers, (B, H, R, b): 0 or 1/(1−p); None without dropout."""
        if self.dropout_p == 0.0:
            return None
        shape = (self.B, self.H, r1 - r0, self.block)
        return dropout_multipliers(self.seed, r0, j, shape, self.dropout_p, self.dtype, self.device)


def _mix(*values: int) -> int:
    """A 63-bit generator seed from integers, the same in every Python (unlike hash()):
    splitmix64's finaliser folded over them."""
    x = 0
    for value in values:
        x = (x ^ (value & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        x = (x ^ (x >> 31)) * 0x94D049BB133111EB & 0xFFFFFFFFFFFFFFFF
        x ^= x >> 29
    return x & (2**63 - 1)


def dropout_multipliers(seed: int, r0: int, j: int, shape, p: float, dtype, device) -> Tensor:
    """The dropout multipliers the kernel uses for rows from r0 × key block j under `seed`."""
    gen = torch.Generator(device=device).manual_seed(_mix(seed, r0, j))
    keep = torch.rand(shape, generator=gen, device=device) >= p
    return keep.to(dtype) / (1.0 - p)


def additive_bias(attn_mask: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    """The user mask as a 4-D additive float tensor (masked = MASK_VALUE), or None."""
    if attn_mask is None:
        return None
    if attn_mask.dtype == torch.bool:
        bias = torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device)
        bias = bias.masked_fill(~attn_mask, MASK_VALUE)
    else:
        bias = attn_mask.to(dtype).clamp(min=MASK_VALUE)
    while bias.dim() < 4:
        bias = bias.unsqueeze(0)
    return bias


def _user_bias(attn_mask: Tensor | None, Tk: int, block: int, dtype) -> Tensor | None:
    """User mask as an additive float tensor, broadcastable to (B, H, Tq, Tk_pad)."""
    bias = additive_bias(attn_mask, dtype)
    if bias is None:
        return None
    pad_k = (-Tk) % block if bias.shape[-1] != 1 else 0
    if pad_k:  # padded keys are masked by the plan itself
        bias = torch.nn.functional.pad(bias, (0, pad_k))
    return bias


# --------------------------------------------------------------------------------------------
# autograd


class BlockedDistanceAttention(torch.autograd.Function):
    """Exact attention for the kinds with a `MinkowskiKernel`; saves q, k, v, the output, k
    transposed and the log-sum-exp.

    Query rows are views of q; the only O(T·D) copy is k transposed (plus padded k and v when
    Tk is not a multiple of the block). Nothing of size Tq×Tk is held.
    """

    @staticmethod
    def forward(ctx, q, k, v, scale, scale_is_tensor, plan: _Plan):
        q, k, v = q.detach(), k.detach(), v.detach()  # one compiled variant: no requires_grad
        B, H, Tq, D = q.shape
        b = plan.block
        kp, vp = _pad_rows(k, b), _pad_rows(v, b)  # (B, H, Tk_pad, D)
        # k transposed, block by block: (nk, B, H, D, b). One contiguous (D, b) tile per head;
        # slicing a (D, Tk) transpose instead would put its rows Tk floats apart, which
        # thrashes the cache sets.
        ktb = kp.view(B, H, plan.nk, b, D).permute(2, 0, 1, 4, 3).contiguous()
        scale_h = scale.detach().to(q.dtype).view(1, H, 1, 1)
        m = torch.full((B, H, Tq, 1), MASK_VALUE, dtype=q.dtype, device=q.device)
        l = torch.zeros(B, H, Tq, 1, dtype=q.dtype, device=q.device)
        acc = torch.zeros(B, H, Tq, D, dtype=q.dtype, device=q.device)
        for j in range(plan.nk):
            kt_j, v_j = ktb[j], _rows(vp, j * b, (j + 1) * b)
            for r0, r1 in plan.chunks(j):
                args = (_rows(q, r0, r1), kt_j, v_j, scale_h, plan.bias(r0, r1, j))
                state = [_rows(t, r0, r1) for t in (m, l, acc)]
                drop = plan.drop(r0, r1, j)
                new = KERNELS.call(
                    plan.compiled, _fwd_block, *args, *state, drop, plan.kernel, plan.p
                )
                for full, upd in zip((m, l, acc), new, strict=True):
                    full[..., r0:r1, :] = upd
        dead = m < _DEAD_ROW  # every key masked: zero output, no gradient
        out = acc.div_(l).masked_fill_(dead, 0.0)  # (B, H, Tq, D)
        lse = torch.where(dead, -MASK_VALUE, m + torch.log(l))
        ctx.save_for_backward(q, kp, vp, ktb, out, lse, scale_h)
        ctx.plan, ctx.scale_is_tensor = plan, scale_is_tensor
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, kp, vp, ktb, out, lse, scale_h = ctx.saved_tensors
        plan, b = ctx.plan, ctx.plan.block
        do = grad_out.detach().to(q.dtype)
        delta = (do * out).sum(-1, keepdim=True)  # (B, H, Tq, 1): dO_i · O_i
        dq, dk, dv = torch.zeros_like(q), torch.zeros_like(kp), torch.zeros_like(vp)
        dscale = torch.zeros(plan.B, plan.H, dtype=q.dtype, device=q.device)
        for j in range(plan.nk):
            keys = slice(j * b, (j + 1) * b)
            k_j, v_j, kt_j = _rows(kp, j * b, (j + 1) * b), _rows(vp, j * b, (j + 1) * b), ktb[j]
            for r0, r1 in plan.chunks(j):
                rows = slice(r0, r1)
                q_r, do_r = _rows(q, r0, r1), _rows(do, r0, r1)
                args = (q_r, kt_j, v_j, do_r, _rows(lse, r0, r1), _rows(delta, r0, r1), scale_h)
                mask_drop_kind = (plan.bias(r0, r1, j), plan.drop(r0, r1, j), plan.kernel, plan.p)
                g, dist, dv_part, dscale_part = KERNELS.call(
                    plan.compiled, _bwd_block, *args, *mask_drop_kind
                )
                dv[..., keys, :] += dv_part
                dscale += dscale_part
                dist_args = (g, dist, q_r, k_j, plan.kernel, plan.p)
                dq[..., rows, :] += KERNELS.call(plan.compiled, _dq_block, *dist_args)
                dk[..., keys, :] += KERNELS.call(plan.compiled, _dk_block, *dist_args)
        Tk = plan.Tk
        dscale = dscale.sum(0) if ctx.scale_is_tensor else None
        return dq, dk[..., :Tk, :], dv[..., :Tk, :], dscale, None, None


@torch.compiler.disable
def blocked_attention(
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
    block_size: int | None = None,
    row_chunk: int | None = None,
    seed: int | None = None,
    compiled: bool = True,
    alibi: Tensor | None = None,
) -> Tensor:
    """Blocked exact attention for a kind with a `MinkowskiKernel` (`kinds.names("blocked")`),
    (B, H, Tq, D). Arguments as `distance_attention` (checked there).

    compiled: compile the block functions with inductor (eager if that fails, one warning);
        False runs them eagerly (cdist-based).
    block_size, row_chunk: keys per block and query rows per call (defaults depend on whether
    the kernels are compiled); any positive values give the same result.
    seed: dropout seed; None draws one from torch's global generator (so torch.manual_seed
    makes runs reproducible). The masks are drawn per (row chunk, key block), so they differ
    between compiled and eager mode unless both sizes are given.
    alibi: (H,) ALiBi slopes or None: −m_h·|i − j| is added to each (rows × block) tile from
    the indices; the slopes get no gradient.
    """
    spec = kinds.get(kind)
    if spec.kernel is None:
        raise ValueError(
            f"the blocked kernels serve the kinds {', '.join(kinds.names('blocked'))}, "
            f"not {spec.name!r}"
        )
    default_block, default_rows = KERNELS.sizes(compiled)
    block, rows = block_size or default_block, row_chunk or default_rows
    H = q.shape[1]
    is_tensor = isinstance(scale, Tensor)
    scale_t = scale if is_tensor else torch.full((H,), float(scale), device=q.device)
    dtype = q.dtype
    if dtype not in (torch.float32, torch.float64):  # half types: compute in fp32
        q, k, v = q.float(), k.float(), v.float()
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, SEED_RANGE, ()).item())
    user_bias = _user_bias(attn_mask, k.shape[2], block, q.dtype)
    exponent = float(p) if spec.takes_p else 0.0
    plan = _Plan(
        q,
        k.shape[2],
        spec.kernel,
        exponent,
        block,
        rows,
        causal,
        user_bias,
        float(dropout_p),
        seed,
        compiled,
        alibi,
    )
    return BlockedDistanceAttention.apply(q, k, v, scale_t, is_tensor, plan).to(dtype)


def l1_attention(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, *args, **kwargs):
    """`blocked_attention` for kind='l1'."""
    return blocked_attention(q, k, v, "l1", scale, *args, **kwargs)
