"""The Triton kernels of distance attention (l1, l2, chebyshev, lp); see triton_kernels.py.

Imported only by `triton_kernels`, and only once triton is known to be installed: this module
imports triton at the top and defines the kernels with `@triton.jit`, which decides at that
moment whether they compile for the GPU or run in Triton's interpreter (TRITON_INTERPRET=1).

Layouts (all row-major, one (b, h) slice after another):
    QT (B, H, D, Tq), KT (B, H, D, Tk): q and k transposed, so that the per-coordinate loops
        read one contiguous row of D-th coordinates per tile instead of a strided column;
    V, DO (B, H, T, D) with strides given; Out (B, H, Tq, D); Lse, Delta (B, H, Tq);
    DQT (B, H, D, Tq), DKT (B, H, D, Tk): the gradients of q and k, transposed, in ACC;
    DLam (B·H, key tiles): each backward program's part of dλ, summed by the host.
KIND is the kind's `MinkowskiKernel.native_code`: 0 l1, 1 l2, 2 chebyshev, 3 lp.
"""

from __future__ import annotations

import triton
import triton.language as tl

# A masked score: finite, so that exp(m_old − m_new) is defined while a row has seen no key.
MASK = tl.constexpr(-1e30)
# A row whose running max stayed below this saw no key; its log-sum-exp is set to −MASK, so
# that the backward's exp(s − lse) is 0 everywhere in it.
DEAD = tl.constexpr(-5e29)

L1 = tl.constexpr(0)
L2 = tl.constexpr(1)
CHEBYSHEV = tl.constexpr(2)
LP = tl.constexpr(3)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, ACC: tl.constexpr):
    """a @ b accumulated in ACC; operands in DOT (the input dtype for fp16/bf16: tensor cores,
    as flash attention does; ACC otherwise, with IEEE products: no TF32)."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee", out_dtype=ACC)


@triton.jit
def _distance(
    qt,
    kt,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    Tq,
    Tk,
    D,
    p,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(BLOCK_M, BLOCK_N) distances, one coordinate at a time: exact differences q_d − k_d
    (no ‖q‖² + ‖k‖² − 2q·k expansion), the kind's reduction over them."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], ACC)
    for d in range(D):
        qc = tl.load(qt + d * Tq + offs_m, mask=mask_m, other=0.0).to(ACC)
        kc = tl.load(kt + d * Tk + offs_n, mask=mask_n, other=0.0).to(ACC)
        x = tl.abs(qc[:, None] - kc[None, :])
        if KIND == L1:
            acc += x
        elif KIND == L2:
            acc += x * x
        elif KIND == CHEBYSHEV:
            acc = tl.maximum(acc, x)
        else:  # lp: |x|^p = 2^(p·log2|x|), 0 at x = 0
            acc += tl.where(x > 0, tl.exp2(p * tl.log2(tl.where(x > 0, x, 1.0))), 0.0)
    if KIND == L2:
        acc = tl.sqrt(acc)
    elif KIND == LP:
        acc = tl.where(acc > 0, tl.exp2(tl.log2(tl.where(acc > 0, acc, 1.0)) / p), 0.0)
    return acc


@triton.jit
def _scores(
    dist,
    lam,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    bias_ptr,
    sbm,
    sbn,
    offset,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
):
    """−λ·dist plus the user's additive mask; MASK where the key is out of range or (causal)
    after the query's position; never below MASK."""
    s = -lam * dist
    if HAS_BIAS:
        ptrs = bias_ptr + offs_m[:, None].to(tl.int64) * sbm + offs_n[None, :] * sbn
        s += tl.load(ptrs, mask=mask_m[:, None] & mask_n[None, :], other=0.0).to(s.dtype)
    valid = mask_n[None, :] & (offs_m[:, None] >= 0)
    if CAUSAL:  # the queries are the last Tq positions: key j is visible iff j <= i + Tk − Tq
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + offset)
    return tl.where(valid, tl.maximum(s, MASK), MASK)


@triton.jit
def _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p):
    """Dropout's keep-mask for (b·h, rows, keys): Philox on the entry's global index, so the
    backward (and `dropout_keep`) regenerate it whatever the tiling."""
    idx = (bh.to(tl.int64) * Tq + offs_m[:, None]) * Tk + offs_n[None, :]
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def forward_kernel(
    QT,
    KT,
    V,
    Scale,
    Bias,
    Out,
    Lse,
    svb,
    svh,
    svt,
    sbb,
    sbh,
    sbm,
    sbn,
    H,
    Tq,
    Tk,
    D,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (query tile, b·h): the online softmax over the key tiles it can see."""
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < Tq
    mask_d = offs_d < D
    qt = QT + bh.to(tl.int64) * D * Tq
    kt = KT + bh.to(tl.int64) * D * Tk
    v_ptr = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    lam = tl.load(Scale + h).to(ACC)
    m_i = tl.full([BLOCK_M], MASK, ACC)
    l_i = tl.zeros([BLOCK_M], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = Tk
    if CAUSAL:  # the tile's last row sees keys up to (pid_m + 1)·BLOCK_M − 1 + offset
        hi = tl.minimum(Tk, (pid_m + 1) * BLOCK_M + offset)
    for n0 in range(0, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Tk
        dist = _distance(
            qt, kt, offs_m, offs_n, mask_m, mask_n, Tq, Tk, D, p, KIND, ACC, BLOCK_M, BLOCK_N
        )
        s = _scores(
            dist, lam, offs_m, offs_n, mask_m, mask_n, bias_ptr, sbm, sbn, offset, CAUSAL, HAS_BIAS
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        pexp = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(pexp, 1)
        if DROPOUT:  # the weights that reach v are dropped, not the normaliser
            keep = _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p)
            pexp = tl.where(keep, pexp * drop_scale, 0.0)
        v_ptrs = v_ptr + offs_n[:, None] * svt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=mask_n[:, None] & mask_d[None, :], other=0.0)
        acc = acc * alpha[:, None] + _mm(pexp, v, DOT, ACC)
        m_i = m_new
    dead = m_i < DEAD  # no visible key: zero output, zero gradients
    out = tl.where(dead[:, None], 0.0, acc / tl.where(dead, 1.0, l_i)[:, None])
    lse = tl.where(dead, -MASK, m_i + tl.log(tl.where(dead, 1.0, l_i)))
    out_ptrs = Out + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, out, mask=mask_m[:, None] & mask_d[None, :])
    tl.store(Lse + bh.to(tl.int64) * Tq + offs_m, lse, mask=mask_m)


@triton.jit
def _coordinate_grads(
    qt,
    kt,
    dqt,
    dkt,
    g,
    dist,
    offs_m,
    offs_n,
    mask_m,
    mask_n,
    Tq,
    Tk,
    D,
    p,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
):
    """dq_i += Σ_j g_ij ∂d_ij/∂q_i and dk_j −= the same sums over i, one coordinate at a time,
    added atomically to DQT (other key tiles add to the same rows) and DKT (this program's own
    rows). ∂d/∂q_d: sign(x) (l1), sign(x) where |x| is the max (chebyshev),
    sign(x)·(|x|/d)^(p−1) (lp); 0 where undefined (x = 0, d = 0), as torch.cdist."""
    for d in range(D):
        qc = tl.load(qt + d * Tq + offs_m, mask=mask_m, other=0.0).to(ACC)
        kc = tl.load(kt + d * Tk + offs_n, mask=mask_n, other=0.0).to(ACC)
        x = qc[:, None] - kc[None, :]
        if KIND == L1:
            w = g
        elif KIND == CHEBYSHEV:
            w = tl.where(tl.abs(x) == dist, g, 0.0)
        else:  # lp
            ratio = tl.abs(x) / tl.where(dist > 0, dist, 1.0)
            w = g * tl.exp2((p - 1.0) * tl.log2(tl.where(ratio > 0, ratio, 1.0)))
        w = tl.where(x > 0, w, tl.where(x < 0, -w, 0.0))
        tl.atomic_add(dqt + d * Tq + offs_m, tl.sum(w, 1), mask=mask_m, sem="relaxed")
        tl.atomic_add(dkt + d * Tk + offs_n, -tl.sum(w, 0), mask=mask_n, sem="relaxed")


@triton.jit
def backward_kernel(
    QT,
    KT,
    V,
    DO,
    Lse,
    Delta,
    Scale,
    Bias,
    DQT,
    DKT,
    DV,
    DLam,
    svb,
    svh,
    svt,
    sob,
    soh,
    sot,
    sbb,
    sbh,
    sbm,
    sbn,
    H,
    Tq,
    Tk,
    D,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    n_tiles,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """One program per (key tile, b·h), the FlashAttention-2 layout: it holds its keys' dv
    (and dk for l2) and walks the query tiles that see them, recomputing the probabilities
    from the saved log-sum-exp:

        p = exp(s − lse)   dv += (p∘z)ᵀ dO   dp = (dO vᵀ)∘z   ds = p∘(dp − Δ), Δ = dO·O
        dλ −= Σ ds∘dist    g = −λ·ds = dL/d dist,   z: dropout multipliers (or 1)
    """
    pid_n = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // H
    h = bh % H
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_n = offs_n < Tk
    mask_d = offs_d < D
    mask_nd = mask_n[:, None] & mask_d[None, :]
    qt = QT + bh.to(tl.int64) * D * Tq
    kt = KT + bh.to(tl.int64) * D * Tk
    dqt = DQT + bh.to(tl.int64) * D * Tq
    dkt = DKT + bh.to(tl.int64) * D * Tk
    do_ptr = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    v_ptrs = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_n[:, None] * svt
    v = tl.load(v_ptrs + offs_d[None, :], mask=mask_nd, other=0.0)
    lam = tl.load(Scale + h).to(ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    k = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    if KIND == L2:
        k = tl.load(kt + offs_d[None, :] * Tk + offs_n[:, None], mask=mask_nd, other=0.0).to(ACC)
    dlam = tl.zeros([BLOCK_N], ACC)
    lo = 0
    if CAUSAL:  # rows before n0 − offset see none of these keys
        lo = (tl.maximum(pid_n * BLOCK_N - offset, 0) // BLOCK_M) * BLOCK_M
    for m0 in range(lo, Tq, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < Tq
        mask_md = mask_m[:, None] & mask_d[None, :]
        dist = _distance(
            qt, kt, offs_m, offs_n, mask_m, mask_n, Tq, Tk, D, p, KIND, ACC, BLOCK_M, BLOCK_N
        )
        s = _scores(
            dist, lam, offs_m, offs_n, mask_m, mask_n, bias_ptr, sbm, sbn, offset, CAUSAL, HAS_BIAS
        )
        lse = tl.load(Lse + bh.to(tl.int64) * Tq + offs_m, mask=mask_m, other=-MASK)
        prob = tl.exp(s - lse[:, None])
        do_ptrs = do_ptr + offs_m[:, None] * sot + offs_d[None, :]
        do = tl.load(do_ptrs, mask=mask_md, other=0.0)
        dp = _mm(do, tl.trans(v), DOT, ACC)
        if DROPOUT:
            keep = _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p)
            dv += _mm(tl.trans(tl.where(keep, prob * drop_scale, 0.0)), do, DOT, ACC)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            dv += _mm(tl.trans(prob), do, DOT, ACC)
        delta = tl.load(Delta + bh.to(tl.int64) * Tq + offs_m, mask=mask_m, other=0.0)
        ds = prob * (dp - delta[:, None])
        dlam -= tl.sum(ds * dist, 0)
        g = -lam * ds
        if KIND == L2:  # ∂d/∂q = (q − k)/d: dq and dk are matmuls with w = g/d
            w = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0)
            q = tl.load(qt + offs_d[None, :] * Tq + offs_m[:, None], mask=mask_md, other=0.0)
            dq = tl.sum(w, 1)[:, None] * q.to(ACC) - _mm(w, k, DOT, ACC)
            dk += tl.sum(w, 0)[:, None] * k - _mm(tl.trans(w), q, DOT, ACC)
            dq_ptrs = dqt + offs_d[None, :] * Tq + offs_m[:, None]
            tl.atomic_add(dq_ptrs, dq, mask=mask_md, sem="relaxed")
        else:
            _coordinate_grads(
                qt, kt, dqt, dkt, g, dist, offs_m, offs_n, mask_m, mask_n, Tq, Tk, D, p, KIND, ACC
            )
    dv_ptrs = DV + bh.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dv_ptrs, dv, mask=mask_nd)
    if KIND == L2:  # this program's rows of dk alone: a plain store
        tl.store(dkt + offs_d[None, :] * Tk + offs_n[:, None], dk, mask=mask_nd)
    tl.store(DLam + bh.to(tl.int64) * n_tiles + pid_n, tl.sum(dlam, 0))


@triton.jit
def dropout_keep_kernel(Out, seed, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask (1.0 = kept) the kernels above use, written out (B·H, Tq, Tk)."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    bh = tl.program_id(2)
    keep = _keep(seed, bh, offs_m, offs_n, Tq, Tk, dropout_p)
    ptrs = Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.float32), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


__all__ = ["backward_kernel", "dropout_keep_kernel", "forward_kernel", "triton"]
