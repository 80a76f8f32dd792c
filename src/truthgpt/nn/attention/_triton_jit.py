"""The Triton kernels of distance attention (l1, l2, chebyshev, lp); see triton_kernels.py.

Imported only by `triton_kernels`, and only once triton is known to be installed: this module
imports triton at the top and defines the kernels with `@triton.jit`, which decides at that
moment whether they compile for the GPU or run in Triton's interpreter (TRITON_INTERPRET=1).

Layouts (all row-major, one (b, h) slice after another):
    QT (B·H, Tqp/RUN, D, RUN), KT (B·H, Tkp/RUN, D, RUN): q and k transposed in runs of RUN
        positions (`RUN`, `_runs`), in the accumulation dtype and padded with zeros to Tqp,
        Tkp (multiples of every tile), so that a coordinate of a tile's positions is read
        without a mask or a conversion, at offsets from the tile's start known at compile time;
    V, DO (B, H, T, D) with strides given; Out (B, H, Tq, D); Delta (B·H, Tqp);
    GT, VT: dO and v in the same runs, padded, in ACC, as QT and KT;
    Lse (B·H, Tqp): each row's log-sum-exp in base 2 (of the scores times log2(e));
    DQT: the gradient of q, in QT's runs, in ACC (l2: added to atomically; the others: each
        dq program its own rows);
    DKT: the gradient of k in ACC, (B·H, MP, Tkp / RUN, D, RUN): KT's runs, one copy per
        thread of a key's rows (MP, 1 but in the split backward; the host adds them up), each
        program its own keys;
    DV: the gradient of v in ACC, (B·H, Tk, D), or as DKT where the split backward sums it
        on CUDA cores (`backward_dkdv_kernel`);
    DLam (B·H, key tiles): each backward program's part of dλ, summed by the host.
KIND is the kind's `MinkowskiKernel.native_code` (kernel_codes.KERNEL_CODES); any other code
is a compile-time error, not a silent lp.

Register blocking: a (BLOCK_M, BLOCK_N) tile of scores is held as a 4-D tensor
(RM, RN, MP, NP), query row m0 + rm·MP + mp and key n0 + rn·NP + np. Triton spreads a tensor's
last dimensions over a program's threads and repeats its first ones inside each thread, so
with MP·NP = the program's threads each thread holds RM rows × RN keys: per coordinate it
loads RM + RN values for RM·RN differences, and the distance's sum over coordinates stays
inside the thread. D is a compile-time constant: the coordinate loop is unrolled.
"""

from __future__ import annotations

import triton
import triton.language as tl

from truthgpt.nn.attention.kernel_codes import KERNEL_CODES

# A masked score: finite, so that exp(m_old − m_new) is defined while a row has seen no key.
MASK = tl.constexpr(-1e30)
# A row whose running max stayed below this saw no key; its log-sum-exp is set to −MASK, so
# that the backward's exp(s − lse) is 0 everywhere in it.
DEAD = tl.constexpr(-5e29)

# The kinds' codes, from the one table the registry and the native build read too.
L1 = tl.constexpr(KERNEL_CODES["l1"])
L2 = tl.constexpr(KERNEL_CODES["l2"])
CHEBYSHEV = tl.constexpr(KERNEL_CODES["chebyshev"])
LP = tl.constexpr(KERNEL_CODES["lp"])
LOG2E = tl.constexpr(1.4426950408889634)
# Coordinates per iteration of the coordinate loops: unrolled this far, not over all of D,
# which would multiply the compile time by D for a few loop instructions per coordinate.
UNROLL = tl.constexpr(4)
# Positions per run of the transposed layouts (QT, KT, GT, VT, DQT, DKT, DVT): per (b, h),
# (Tp / RUN, D, RUN), RUN positions one coordinate after another. From a tile's first
# position (a multiple of RUN) each coordinate of each of its positions then lies at an
# offset known at compile time: a coordinate loop's addresses are immediates on one pointer.
RUN = tl.constexpr(16)


@triton.jit
def _mm(a, b, DOT: tl.constexpr, ACC: tl.constexpr):
    """a @ b accumulated in ACC; operands in DOT (the input dtype for fp16/bf16: tensor cores,
    as flash attention does; ACC otherwise, with IEEE products: no TF32)."""
    return tl.dot(a.to(DOT), b.to(DOT), input_precision="ieee", out_dtype=ACC)


@triton.jit
def _index(start, R: tl.constexpr, S: tl.constexpr):
    """(R, S): start + s·R + r, the positions held as register r of thread s: each thread's
    are adjacent."""
    return start + tl.arange(0, R)[:, None] + tl.arange(0, S)[None, :] * R


@triton.jit
def _to_tile(x4, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """(RM, RN, MP, NP) -> (BLOCK_M, BLOCK_N) in row and key order."""
    return tl.reshape(tl.permute(x4, (2, 0, 3, 1)), (BLOCK_M, BLOCK_N))


@triton.jit
def _from_tile(x, RM: tl.constexpr, RN: tl.constexpr, MP: tl.constexpr, NP: tl.constexpr):
    """(BLOCK_M, BLOCK_N) -> (RM, RN, MP, NP)."""
    return tl.permute(tl.reshape(x, (MP, RM, NP, RN)), (1, 3, 0, 2))


@triton.jit
def _runs(t, D: tl.constexpr):
    """The offsets at coordinate 0 of positions t, counted from a multiple of RUN, in the
    (T / RUN, D, RUN) layout; coordinate d lies d·RUN further."""
    return (t // RUN) * (D * RUN) + t % RUN


@triton.jit
def _flat(x2, n: tl.constexpr):
    """(R, S) per-row (or per-key) values -> (n,) in position order."""
    return tl.reshape(tl.trans(x2), (n,))


@triton.jit
def _rows_of(x4):
    """Sum over the keys of a (RM, RN, MP, NP) tile: (RM, MP); the keys inside a thread
    first."""
    return tl.sum(tl.sum(x4, 1), 2)


@triton.jit
def _keys_of(x4):
    """Sum over the rows: (RN, NP)."""
    return tl.sum(tl.sum(x4, 0), 1)


@triton.jit
def _program(n_tiles, H, REVERSE: tl.constexpr):
    """(b·h, tile, b, h) of this program: grid axis 0 runs over b·h first, then the tiles
    (CUDA caps the other axes at 65535); REVERSE: the last tile first (causal: the heaviest)."""
    BH = tl.num_programs(0) // n_tiles
    pid = tl.program_id(0)
    bh = pid % BH
    tile = pid // BH
    if REVERSE:
        tile = n_tiles - 1 - tile
    return bh, tile, bh // H, bh % H


@triton.jit
def _head_scales(Scale, Alibi, h, ACC: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """λ of head h and its ALiBi slope times log2(e) (0 without ALiBi)."""
    lam = tl.load(Scale + h).to(ACC)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + h).to(ACC) * LOG2E
    return lam, slope


@triton.jit
def _first_row(n0, offset, BLOCK_M: tl.constexpr, CAUSAL: tl.constexpr):
    """The first query tile that sees keys from n0 on (causal: rows before n0 − offset see
    none of them)."""
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(n0 - offset, 0) // BLOCK_M) * BLOCK_M
    return lo


@triton.jit
def _distance(
    qt,
    kt,
    rows,
    keys,
    p,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    D: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
    MP: tl.constexpr,
    NP: tl.constexpr,
    gt,
    vt,
    WITH_DP: tl.constexpr,
):
    """(RM, RN, MP, NP) distances from exact differences q_d − k_d (no ‖q‖² + ‖k‖² − 2q·k
    expansion), the kind's reduction over them inside each thread. qt, kt: the tiles' first
    positions; rows (RM, 1, MP, 1), keys (1, RN, 1, NP): their offsets (`_runs`). WITH_DP:
    also dO·v in the same loop, from gt, vt (dO and v in runs like q and k), in the same
    layout; else zeros."""
    acc = tl.zeros([RM, RN, MP, NP], ACC)
    dp = tl.zeros([RM, RN, MP, NP], ACC)
    for d in tl.range(0, D, loop_unroll_factor=UNROLL):
        x = tl.load(qt + d * RUN + rows) - tl.load(kt + d * RUN + keys)
        if WITH_DP:
            dp += tl.load(gt + d * RUN + rows) * tl.load(vt + d * RUN + keys)
        if KIND == L1:
            acc += tl.abs(x)
        elif KIND == L2:
            acc += x * x
        elif KIND == CHEBYSHEV:
            acc = tl.maximum(acc, tl.abs(x))
        elif KIND == LP:  # |x|^p = 2^(p·log2|x|), 0 at x = 0
            ax = tl.abs(x)
            acc += tl.where(ax > 0, tl.exp2(p * tl.log2(tl.where(ax > 0, ax, 1.0))), 0.0)
        else:
            tl.static_assert(False, "unknown kind code")
    if KIND == L2:
        acc = tl.sqrt(acc)
    elif KIND == LP:
        acc = tl.where(acc > 0, tl.exp2(tl.log2(tl.where(acc > 0, acc, 1.0)) / p), 0.0)
    return acc, dp


@triton.jit
def _scores(
    dist,
    lam,
    rows,
    keys,
    Tq,
    Tk,
    bias_ptr,
    sbm,
    sbn,
    offset,
    slope,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
):
    """(−λ·dist − m·|i + Tk − Tq − j| (ALiBi) plus the user's additive mask)·log2(e), the
    scores in base 2 (exp2 is one instruction); MASK where the key is out of range or (causal)
    after the query's position; never below MASK. lam: −λ·log2(e), slope: m·log2(e). The
    position term comes from the indices: no Tq×Tk bias is read."""
    s = lam * dist
    if HAS_ALIBI:
        s -= slope * tl.abs(rows + offset - keys).to(s.dtype)
    if HAS_BIAS:
        ptrs = bias_ptr + rows.to(tl.int64) * sbm + keys * sbn
        bias = tl.load(ptrs, mask=(rows < Tq) & (keys < Tk), other=0.0).to(s.dtype)
        s = tl.maximum(s + bias * LOG2E, MASK)
    if CAUSAL:  # the queries are the last Tq positions: key j is visible iff j <= i + Tk − Tq,
        # which for a real row (i < Tq) is also j < Tk; padded rows are never read
        return tl.where(keys <= rows + offset, s, MASK)
    return tl.where(keys < Tk, s, MASK)


@triton.jit
def _keep(seed, bh, rows, keys, Tq, Tk, dropout_p):
    """Dropout's keep-mask for (b·h, rows, keys): Philox on the entry's global index, so the
    backward (and `dropout_keep`) regenerate it whatever the tiling."""
    idx = (bh.to(tl.int64) * Tq + rows) * Tk + keys
    return tl.rand(seed, idx) >= dropout_p


@triton.jit
def forward_kernel(
    QT,
    KT,
    V,
    Scale,
    Alibi,
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
    Tqp,
    Tkp,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    n_tiles,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
):
    """One program per (query tile, b·h), the heaviest (last, when causal) tiles first: the
    online softmax over the key tiles it can see."""
    MP: tl.constexpr = BLOCK_M // RM
    NP: tl.constexpr = BLOCK_N // RN
    bh, tile, b, h = _program(n_tiles, H, CAUSAL)
    m0 = tile * BLOCK_M
    rows2 = _index(m0, RM, MP)  # (RM, MP)
    rows = rows2[:, None, :, None]
    offs_d = tl.arange(0, BLOCK_D)
    qt = QT + bh.to(tl.int64) * D * Tqp + m0 * D
    kt = KT + bh.to(tl.int64) * D * Tkp
    rows_o = _runs(_index(0, RM, MP), D)[:, None, :, None]
    keys_o = _runs(_index(0, RN, NP), D)[None, :, None, :]
    v_ptr = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    lam, slope = _head_scales(Scale, Alibi, h, ACC, HAS_ALIBI)
    lam = -lam * LOG2E
    m_i = tl.full([RM, MP], MASK, ACC)
    l_i = tl.zeros([RM, MP], ACC)
    acc = tl.zeros([BLOCK_M, BLOCK_D], ACC)
    hi = Tk
    if CAUSAL:  # the tile's last row sees keys up to m0 + BLOCK_M − 1 + offset
        hi = tl.minimum(Tk, m0 + BLOCK_M + offset)
    for n0 in range(0, hi, BLOCK_N):
        keys = _index(n0, RN, NP)[None, :, None, :]
        dist, _ = _distance(
            qt, kt + n0 * D, rows_o, keys_o, p, KIND, ACC, D, RM, RN, MP, NP, qt, kt, False
        )
        s = _scores(
            dist,
            lam,
            rows,
            keys,
            Tq,
            Tk,
            bias_ptr,
            sbm,
            sbn,
            offset,
            slope,
            CAUSAL,
            HAS_BIAS,
            HAS_ALIBI,
        )
        m_new = tl.maximum(m_i, tl.max(tl.max(s, 1), 2))
        alpha = tl.exp2(m_i - m_new)
        pexp = tl.exp2(s - m_new[:, None, :, None])
        l_i = l_i * alpha + _rows_of(pexp)
        if DROPOUT:  # the weights that reach v are dropped, not the normaliser
            keep = _keep(seed, bh, rows, keys, Tq, Tk, dropout_p)
            pexp = tl.where(keep, pexp * drop_scale, 0.0)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        v_ptrs = v_ptr + offs_n[:, None] * svt + offs_d[None, :]
        v = tl.load(v_ptrs, mask=(offs_n[:, None] < Tk) & (offs_d[None, :] < D), other=0.0)
        alpha_rows = _flat(alpha, BLOCK_M)
        acc = acc * alpha_rows[:, None] + _mm(_to_tile(pexp, BLOCK_M, BLOCK_N), v, DOT, ACC)
        m_i = m_new
    dead = m_i < DEAD  # no visible key: zero output, zero gradients
    lse = tl.where(dead, -MASK, m_i + tl.log2(tl.where(dead, 1.0, l_i)))  # base 2
    inv = _flat(tl.where(dead, 0.0, 1.0 / tl.where(dead, 1.0, l_i)), BLOCK_M)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    out_ptrs = Out + bh.to(tl.int64) * Tq * D + offs_m[:, None] * D + offs_d[None, :]
    tl.store(out_ptrs, acc * inv[:, None], mask=(offs_m[:, None] < Tq) & (offs_d[None, :] < D))
    tl.store(Lse + bh.to(tl.int64) * Tqp + rows2, lse)


@triton.jit
def _coordinate_grad(
    qt,
    kt,
    out,
    g,
    dist,
    rows2,
    keys2,
    p,
    KIND: tl.constexpr,
    ACC: tl.constexpr,
    D: tl.constexpr,
    FOR_Q: tl.constexpr,
    gt,
    dvt,
    kept,
    WITH_DV: tl.constexpr,
    part_stride,
):
    """FOR_Q: dq_i += Σ_j g_ij ∂d_ij/∂q_i into out (DQT, the program's own rows); else
    dk_j −= the same sums over i into out (DKT, its own keys): one coordinate at a time, a
    plain read and write, the sum over the tile's other axis inside each thread when the
    layout holds that axis in registers (`backward_dkdv_kernel`, `backward_dq_kernel`).
    ∂d/∂q_d: sign(x) (l1), sign(x) where |x| is the max (chebyshev), sign(x)·(|x|/d)^(p−1)
    (lp); 0 where undefined (x = 0, d = 0), as torch.cdist. WITH_DV (dk): also
    dv_jd += Σ_i kept_ij·dO_id into dvt (v's gradient transposed), the same kind of sum.
    qt, kt, out, gt, dvt: the tiles' first positions; rows2 (RM, MP), keys2 (RN, NP): their
    offsets (`_runs`). dk (and dv) where the rows of the tile lie on MP > 1 threads: each of
    them adds its rows' sum to a copy of its own, part_stride apart (the host adds the
    copies up): no sum across threads."""
    MP: tl.constexpr = g.shape[2]
    parts = keys2[:, None, :] + tl.arange(0, MP)[None, :, None] * part_stride  # (RN, MP, NP)
    rows = rows2[:, None, :, None]
    keys = keys2[None, :, None, :]
    if KIND == LP:
        inv = 1.0 / tl.where(dist > 0, dist, 1.0)
    if KIND == CHEBYSHEV:  # at d = 0 every |x| is the max, and the gradient is 0
        g = tl.where(dist > 0, g, 0.0)
    for d in tl.range(0, D, loop_unroll_factor=UNROLL):
        x = tl.load(qt + d * RUN + rows) - tl.load(kt + d * RUN + keys)
        # g·sign(x) as g times ±1 or 0: the compare gives 1.0 or 0.0 in one instruction, x's
        # sign bit flips it in another, and the product joins the sum as a fused multiply-add
        # (`_products_summed`)
        if KIND == L1:
            factor = _flip_sign((x != 0).to(ACC), x, ACC)
        elif KIND == CHEBYSHEV:  # where |x| is the max, then x ≠ 0 (d > 0 above)
            factor = _flip_sign((tl.abs(x) == dist).to(ACC), x, ACC)
        elif KIND == LP:
            ratio = tl.abs(x) * inv
            factor = tl.exp2((p - 1.0) * tl.log2(tl.where(ratio > 0, ratio, 1.0)))
            factor = tl.where(x != 0, _flip_sign(factor, x, ACC), 0.0)
        else:
            tl.static_assert(False, "unknown kind code")
        if FOR_Q:
            dq_ptrs = out + d * RUN + rows2
            tl.store(dq_ptrs, tl.load(dq_ptrs) + tl.sum(_products_summed(g, factor, 1), 2))
        else:
            dk_ptrs = out + d * RUN + parts
            tl.store(dk_ptrs, tl.load(dk_ptrs) - _products_summed(g, factor, 0))
            if WITH_DV:
                dv_ptrs = dvt + d * RUN + parts
                do_d = tl.broadcast_to(tl.load(gt + d * RUN + rows), kept.shape)
                tl.store(dv_ptrs, tl.load(dv_ptrs) + _products_summed(kept, do_d, 0))


@triton.jit
def _halves(x, AXIS: tl.constexpr):
    """A 4-D x's entries at even and at odd indices along AXIS (0 or 1): a renaming of
    registers where that axis lies inside each thread."""
    n0: tl.constexpr = x.shape[0]
    n1: tl.constexpr = x.shape[1]
    n2: tl.constexpr = x.shape[2]
    n3: tl.constexpr = x.shape[3]
    if AXIS == 0:
        y = tl.permute(tl.reshape(x, (n0 // 2, 2, n1, n2, n3)), (0, 2, 3, 4, 1))
    else:
        y = tl.permute(tl.reshape(x, (n0, n1 // 2, 2, n2, n3)), (0, 1, 3, 4, 2))
    return tl.split(y)


@triton.jit
def _eighths(x, AXIS: tl.constexpr):
    """x along AXIS (0 or 1) in eight interleaved parts (`_halves` three times)."""
    x0, x1 = _halves(x, AXIS)
    x00, x01 = _halves(x0, AXIS)
    x10, x11 = _halves(x1, AXIS)
    x000, x001 = _halves(x00, AXIS)
    x010, x011 = _halves(x01, AXIS)
    x100, x101 = _halves(x10, AXIS)
    x110, x111 = _halves(x11, AXIS)
    return x000, x001, x010, x011, x100, x101, x110, x111


@triton.jit
def _products_summed(a, b, AXIS: tl.constexpr):
    """Σ a·b over AXIS (0 or 1) of 4-D tensors. Where that axis has a multiple of 8 entries,
    as chains of fused multiply-adds over eight interleaved parts of it, then the chains'
    sum: 1 + 1/8 instructions per product with the axis inside a thread, where tl.sum alone
    adds the products as a pairwise tree (a multiply for every other one, 1.5 per product)."""
    if a.shape[AXIS] % 8 == 0:
        a0, a1, a2, a3, a4, a5, a6, a7 = _eighths(a, AXIS)
        b0, b1, b2, b3, b4, b5, b6, b7 = _eighths(b, AXIS)
        chain = a0 * b0
        chain = a1 * b1 + chain
        chain = a2 * b2 + chain
        chain = a3 * b3 + chain
        chain = a4 * b4 + chain
        chain = a5 * b5 + chain
        chain = a6 * b6 + chain
        chain = a7 * b7 + chain
        total = tl.sum(chain, AXIS)
    else:
        total = tl.sum(a * b, AXIS)
    return total


@triton.jit
def _tile_grad(
    qt,
    kt,
    gt,
    vt,
    do,
    v,
    lse_ptr,
    delta_ptr,
    rows,
    keys,
    lam2,
    slope,
    bias_ptr,
    sbm,
    sbn,
    bh,
    Tq,
    Tk,
    rows_o,
    keys_o,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    D: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
    MP: tl.constexpr,
    NP: tl.constexpr,
    TC: tl.constexpr,
):
    """A tile's distances, probabilities as they reach v (dropped ones 0) and ds = dL/ds,
    recomputed from the saved log-sum-exp (see `backward_kernel`). dp = dO·vᵀ: TC (fp16,
    bf16), on tensor cores from the tiles do and v, moved into the tile's layout after the
    distance's loop; else on CUDA cores in that loop, from gt and vt (dO and v transposed),
    as an IEEE product of the operands' tiles would hold too many registers. qt, kt, gt, vt:
    the tiles' first positions, rows_o and keys_o the offsets (`_runs`) of rows and keys."""
    if TC:
        dist, _ = _distance(qt, kt, rows_o, keys_o, p, KIND, ACC, D, RM, RN, MP, NP, qt, kt, False)
        dp = _from_tile(_mm(do, tl.trans(v), DOT, ACC), RM, RN, MP, NP)
    else:
        dist, dp = _distance(qt, kt, rows_o, keys_o, p, KIND, ACC, D, RM, RN, MP, NP, gt, vt, True)
    s = _scores(
        dist, lam2, rows, keys, Tq, Tk, bias_ptr, sbm, sbn, offset, slope, CAUSAL, HAS_BIAS,
        HAS_ALIBI,
    )  # fmt: skip
    prob = tl.exp2(s - tl.load(lse_ptr + rows))
    kept = prob
    if DROPOUT:
        keep = _keep(seed, bh, rows, keys, Tq, Tk, dropout_p)
        kept = tl.where(keep, prob * drop_scale, 0.0)
        dp = tl.where(keep, dp * drop_scale, 0.0)
    ds = prob * (dp - tl.load(delta_ptr + rows))
    return dist, kept, ds


@triton.jit
def _lp_grads(qt, kt, dqt, dkt, g, dist, rows2, keys2, p, ACC: tl.constexpr, D: tl.constexpr):
    """lp's dq_i += Σ_j g_ij·sign(x)·(|x|/d)^(p−1) (atomically: other key tiles add to the
    same rows) and dk_j −= the same sums over i (this program's own keys), in one loop over
    the coordinates for both: the power costs some thirty instructions per term, which two
    kernels (`backward_dkdv_kernel`, `backward_dq_kernel`) would each pay, while the sums
    across threads cost a few. 0 where undefined (x = 0, d = 0), as torch.cdist."""
    rows = rows2[:, None, :, None]
    keys = keys2[None, :, None, :]
    inv = 1.0 / tl.where(dist > 0, dist, 1.0)
    for d in tl.range(0, D, loop_unroll_factor=UNROLL):
        x = tl.load(qt + d * RUN + rows) - tl.load(kt + d * RUN + keys)
        ratio = tl.abs(x) * inv
        w = g * tl.exp2((p - 1.0) * tl.log2(tl.where(ratio > 0, ratio, 1.0)))
        w = tl.where(x != 0, _flip_sign(w, x, ACC), 0.0)
        tl.atomic_add(dqt + d * RUN + rows2, _rows_of(w), sem="relaxed")
        dk_ptrs = dkt + d * RUN + keys2
        tl.store(dk_ptrs, tl.load(dk_ptrs) - _keys_of(w))


@triton.jit
def _flip_sign(w, x, dtype: tl.constexpr):
    """w with its sign flipped where x is negative: one bitwise operation."""
    if dtype == tl.float64:
        sign = x.to(tl.int64, bitcast=True) & -9223372036854775808
        flipped = (w.to(tl.int64, bitcast=True) ^ sign).to(tl.float64, bitcast=True)
    else:
        sign = x.to(tl.int32, bitcast=True) & -2147483648
        flipped = (w.to(tl.int32, bitcast=True) ^ sign).to(tl.float32, bitcast=True)
    return flipped


@triton.jit
def backward_kernel(
    QT,
    KT,
    V,
    DO,
    GT,
    VT,
    Lse,
    Delta,
    Scale,
    Alibi,
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
    Tqp,
    Tkp,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    n_tiles,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
):
    """The backward of l2 and lp: one program per (key tile, b·h), the FlashAttention-2
    layout, the heaviest (first, when causal) tiles first: it holds its keys' dv (and dk for
    l2) and walks the query tiles that see them, recomputing the probabilities from the
    saved log-sum-exp:

        p = exp(s − lse)   dv += (p∘z)ᵀ dO   dp = (dO vᵀ)∘z   ds = p∘(dp − Δ), Δ = dO·O
        dλ −= Σ ds∘dist    g = −λ·ds = dL/d dist,   z: dropout multipliers (or 1)
    """
    MP: tl.constexpr = BLOCK_M // RM
    NP: tl.constexpr = BLOCK_N // RN
    bh, tile, b, h = _program(n_tiles, H, False)
    n0 = tile * BLOCK_N
    keys2 = _index(n0, RN, NP)  # (RN, NP)
    keys = keys2[None, :, None, :]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mask_nd = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    qt = QT + bh.to(tl.int64) * D * Tqp
    kt = KT + bh.to(tl.int64) * D * Tkp + n0 * D
    dqt = DQT + bh.to(tl.int64) * D * Tqp
    dkt = DKT + bh.to(tl.int64) * D * Tkp + n0 * D
    do_ptr = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    gt = GT + bh.to(tl.int64) * D * Tqp
    vt = VT + bh.to(tl.int64) * D * Tkp + n0 * D
    rows2_o = _runs(_index(0, RM, MP), D)
    keys2_o = _runs(_index(0, RN, NP), D)
    # a tile's (positions, coordinates) in the runs' layout, from its first position
    tile_md = _runs(tl.arange(0, BLOCK_M), D)[:, None] + offs_d[None, :] * RUN
    tile_nd = _runs(tl.arange(0, BLOCK_N), D)[:, None] + offs_d[None, :] * RUN
    lam, slope = _head_scales(Scale, Alibi, h, ACC, HAS_ALIBI)
    lam2 = -lam * LOG2E
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    dk = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    k = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    if KIND == L2:  # exact (the accumulation dtype): dk's two terms nearly cancel
        k = tl.load(kt + tile_nd, mask=offs_d[None, :] < D)
    dlam = tl.zeros([RM, RN, MP, NP], ACC)
    for m0 in range(_first_row(n0, offset, BLOCK_M, CAUSAL), Tq, BLOCK_M):
        rows2 = _index(m0, RM, MP)
        rows = rows2[:, None, :, None]
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_md = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
        # dp = dO·vᵀ on CUDA cores in the distance's loop and layout: a tensor-core product
        # would come in another layout, which the coordinate loop below would then inherit
        dist, dp = _distance(
            qt + m0 * D,
            kt,
            rows2_o[:, None, :, None],
            keys2_o[None, :, None, :],
            p, KIND, ACC, D, RM, RN, MP, NP, gt + m0 * D, vt, True,
        )  # fmt: skip
        s = _scores(
            dist,
            lam2,
            rows,
            keys,
            Tq,
            Tk,
            bias_ptr,
            sbm,
            sbn,
            offset,
            slope,
            CAUSAL,
            HAS_BIAS,
            HAS_ALIBI,
        )
        lse = tl.load(Lse + bh.to(tl.int64) * Tqp + rows)
        prob = tl.exp2(s - lse)
        do = tl.load(do_ptr + offs_m[:, None] * sot + offs_d[None, :], mask=mask_md, other=0.0)
        if DROPOUT:
            keep = _keep(seed, bh, rows, keys, Tq, Tk, dropout_p)
            kept = _to_tile(tl.where(keep, prob * drop_scale, 0.0), BLOCK_M, BLOCK_N)
            dv += _mm(tl.trans(kept), do, DOT, ACC)
            dp = tl.where(keep, dp * drop_scale, 0.0)
        else:
            dv += _mm(tl.trans(_to_tile(prob, BLOCK_M, BLOCK_N)), do, DOT, ACC)
        delta = tl.load(Delta + bh.to(tl.int64) * Tqp + rows)
        ds = prob * (dp - delta)
        dlam -= ds * dist
        g = -lam * ds
        if KIND == L2:  # ∂d/∂q = (q − k)/d: dq and dk are products with w = g/d, exact ones
            w4 = tl.where(dist > 0, g / tl.where(dist > 0, dist, 1.0), 0.0)
            w = _to_tile(w4, BLOCK_M, BLOCK_N)
            q = tl.load(qt + m0 * D + tile_md, mask=offs_d[None, :] < D)
            rows_w = _flat(_rows_of(w4), BLOCK_M)
            keys_w = _flat(_keys_of(w4), BLOCK_N)
            dq = rows_w[:, None] * q - _mm(w, k, ACC, ACC)
            dk += keys_w[:, None] * k - _mm(tl.trans(w), q, ACC, ACC)
            dq_ptrs = dqt + m0 * D + tile_md
            tl.atomic_add(dq_ptrs, dq, mask=offs_d[None, :] < D, sem="relaxed")
        elif KIND == LP:
            _lp_grads(qt + m0 * D, kt, dqt + m0 * D, dkt, g, dist, rows2_o, keys2_o, p, ACC, D)
        else:
            tl.static_assert(False, "l1 and chebyshev take backward_dkdv_kernel")
    dv_ptrs = DV + bh.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    tl.store(dv_ptrs, dv, mask=mask_nd)
    if KIND == L2:  # this program's rows of dk alone: a plain store
        tl.store(dkt + tile_nd, dk, mask=offs_d[None, :] < D)
    total = tl.sum(tl.reshape(dlam, (BLOCK_M * BLOCK_N,)), 0)
    tl.store(DLam + bh.to(tl.int64) * n_tiles + tile, total)


@triton.jit
def backward_dkdv_kernel(
    QT,
    KT,
    V,
    DO,
    GT,
    VT,
    Lse,
    Delta,
    Scale,
    Alibi,
    Bias,
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
    Tqp,
    Tkp,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    n_tiles,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
    TC: tl.constexpr,
):
    """dk, dv and dλ of l1 and chebyshev: one program per (key tile, b·h), the heaviest
    (first, when causal) first, walking the query tiles that see its keys. The host gives it
    a blocking with each thread holding the rows of the tile for its keys, all of them
    (MP = 1) or an MP-th, so dk's sum over the rows stays inside the thread: no shuffle in
    the coordinate loop (with MP > 1, DKT holds MP copies per (b, h), summed by the host;
    so does DV off tensor cores). dq is
    `backward_dq_kernel`'s. dv: TC, a tensor-core product per query tile added to DV
    (B·H, Tk, D) in memory (held in registers through the coordinate loops it would crowd out
    the tile); else sums inside each thread in the dk loop, into DV in KT's runs."""
    MP: tl.constexpr = BLOCK_M // RM
    NP: tl.constexpr = BLOCK_N // RN
    bh, tile, b, h = _program(n_tiles, H, False)
    n0 = tile * BLOCK_N
    keys2 = _index(n0, RN, NP)  # (RN, NP)
    keys = keys2[None, :, None, :]
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    qt = QT + bh.to(tl.int64) * D * Tqp
    kt = KT + bh.to(tl.int64) * D * Tkp + n0 * D
    gt = GT + bh.to(tl.int64) * D * Tqp
    vt = VT + bh.to(tl.int64) * D * Tkp + n0 * D
    dkt = DKT + bh.to(tl.int64) * MP * D * Tkp + n0 * D  # MP copies (`_coordinate_grad`)
    rows2_o = _runs(_index(0, RM, MP), D)
    keys2_o = _runs(_index(0, RN, NP), D)
    do_ptr = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh
    mask_nd = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
    v_ptrs = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh + offs_n[:, None] * svt
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    lse_ptr = Lse + bh.to(tl.int64) * Tqp
    delta_ptr = Delta + bh.to(tl.int64) * Tqp
    lam, slope = _head_scales(Scale, Alibi, h, ACC, HAS_ALIBI)
    lam2 = -lam * LOG2E
    dv_ptrs = DV + bh.to(tl.int64) * Tk * D + offs_n[:, None] * D + offs_d[None, :]
    dvt = DV + bh.to(tl.int64) * MP * D * Tkp + n0 * D
    dlam = tl.zeros([RN, NP], ACC)
    dv = tl.zeros([BLOCK_N, BLOCK_D], ACC)
    for m0 in range(_first_row(n0, offset, BLOCK_M, CAUSAL), Tq, BLOCK_M):
        rows2 = _index(m0, RM, MP)
        rows = rows2[:, None, :, None]
        offs_m = m0 + tl.arange(0, BLOCK_M)
        do = qt  # unread unless TC
        v = qt
        if TC:
            mask_md = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
            do_ptrs = do_ptr + offs_m[:, None] * sot + offs_d[None, :]
            do = tl.load(do_ptrs, mask=mask_md, other=0.0)
            # v read again for each tile (from cache), not held in registers through the loops
            v = tl.load(v_ptrs + offs_d[None, :], mask=mask_nd, other=0.0)
        dist, kept, ds = _tile_grad(
            qt + m0 * D, kt, gt + m0 * D, vt, do, v, lse_ptr, delta_ptr, rows, keys, lam2, slope,
            bias_ptr, sbm, sbn, bh, Tq, Tk, rows2_o[:, None, :, None], keys2_o[None, :, None, :],
            offset, p, seed, dropout_p, drop_scale, KIND, CAUSAL, HAS_BIAS, HAS_ALIBI, DROPOUT,
            ACC, DOT, D, RM, RN, MP, NP, TC,
        )  # fmt: skip
        if TC:
            dv += _mm(tl.trans(_to_tile(kept, BLOCK_M, BLOCK_N)), do, DOT, ACC)
        dlam -= _keys_of(ds * dist)
        _coordinate_grad(
            qt + m0 * D, kt, dkt, -lam * ds, dist, rows2_o, keys2_o, p, KIND, ACC, D, False,
            gt + m0 * D, dvt, kept, not TC, D * Tkp,
        )  # fmt: skip
    if TC:
        tl.store(dv_ptrs, dv, mask=mask_nd)
    total = tl.sum(tl.reshape(dlam, (BLOCK_N,)), 0)
    tl.store(DLam + bh.to(tl.int64) * n_tiles + tile, total)


@triton.jit
def backward_dq_kernel(
    QT,
    KT,
    V,
    DO,
    GT,
    VT,
    Lse,
    Delta,
    Scale,
    Alibi,
    Bias,
    DQT,
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
    Tqp,
    Tkp,
    offset,
    p,
    seed,
    dropout_p,
    drop_scale,
    n_tiles,
    KIND: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_ALIBI: tl.constexpr,
    DROPOUT: tl.constexpr,
    ACC: tl.constexpr,
    DOT: tl.constexpr,
    D: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    RM: tl.constexpr,
    RN: tl.constexpr,
    TC: tl.constexpr,
):
    """dq of l1 and chebyshev: one program per (query tile, b·h), the heaviest first,
    walking the key tiles its rows see, as the forward does. Each thread holds every key of
    the tile (NP = 1) for its rows, so dq's sum over the keys stays inside the thread, and
    each row of dq has one writer: no atomics, the same sums in the same order every run."""
    MP: tl.constexpr = BLOCK_M // RM
    NP: tl.constexpr = BLOCK_N // RN
    bh, tile, b, h = _program(n_tiles, H, CAUSAL)
    m0 = tile * BLOCK_M
    rows2 = _index(m0, RM, MP)  # (RM, MP)
    rows = rows2[:, None, :, None]
    qt = QT + bh.to(tl.int64) * D * Tqp + m0 * D
    kt = KT + bh.to(tl.int64) * D * Tkp
    gt = GT + bh.to(tl.int64) * D * Tqp + m0 * D
    vt = VT + bh.to(tl.int64) * D * Tkp
    dqt = DQT + bh.to(tl.int64) * D * Tqp + m0 * D
    rows2_o = _runs(_index(0, RM, MP), D)
    keys2_o = _runs(_index(0, RN, NP), D)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    do_ptrs = DO + b.to(tl.int64) * sob + h.to(tl.int64) * soh + offs_m[:, None] * sot
    mask_md = (offs_m[:, None] < Tq) & (offs_d[None, :] < D)
    do = qt  # unread unless TC
    if TC:
        do = tl.load(do_ptrs + offs_d[None, :], mask=mask_md, other=0.0)
    v_ptr = V + b.to(tl.int64) * svb + h.to(tl.int64) * svh
    bias_ptr = Bias + b.to(tl.int64) * sbb + h.to(tl.int64) * sbh
    lse_ptr = Lse + bh.to(tl.int64) * Tqp
    delta_ptr = Delta + bh.to(tl.int64) * Tqp
    lam, slope = _head_scales(Scale, Alibi, h, ACC, HAS_ALIBI)
    lam2 = -lam * LOG2E
    hi = Tk
    if CAUSAL:  # the tile's last row sees keys up to m0 + BLOCK_M − 1 + offset
        hi = tl.minimum(Tk, m0 + BLOCK_M + offset)
    for n0 in range(0, hi, BLOCK_N):
        keys2 = _index(n0, RN, NP)
        keys = keys2[None, :, None, :]
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_nd = (offs_n[:, None] < Tk) & (offs_d[None, :] < D)
        v = qt
        if TC:
            v_ptrs = v_ptr + offs_n[:, None] * svt + offs_d[None, :]
            v = tl.load(v_ptrs, mask=mask_nd, other=0.0)
        dist, _, ds = _tile_grad(
            qt, kt + n0 * D, gt, vt + n0 * D, do, v, lse_ptr, delta_ptr, rows, keys, lam2, slope,
            bias_ptr, sbm, sbn, bh, Tq, Tk, rows2_o[:, None, :, None], keys2_o[None, :, None, :],
            offset, p, seed, dropout_p, drop_scale, KIND, CAUSAL, HAS_BIAS, HAS_ALIBI, DROPOUT,
            ACC, DOT, D, RM, RN, MP, NP, TC,
        )  # fmt: skip
        _coordinate_grad(
            qt, kt + n0 * D, dqt, -lam * ds, dist, rows2_o, keys2_o, p, KIND, ACC, D, True,
            qt, qt, ds, False, 0,
        )  # fmt: skip


@triton.jit
def dropout_keep_kernel(Out, seed, Tq, Tk, dropout_p, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask (1.0 = kept) the kernels above use, written out (B·H, Tq, Tk); axis 0
    of the grid runs over B·H and the row tiles (CUDA caps the others at 65535)."""
    row_tiles = tl.cdiv(Tq, BLOCK_M)
    bh = tl.program_id(0) // row_tiles
    offs_m = (tl.program_id(0) % row_tiles) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    keep = _keep(seed, bh, offs_m[:, None], offs_n[None, :], Tq, Tk, dropout_p)
    ptrs = Out + (bh.to(tl.int64) * Tq + offs_m[:, None]) * Tk + offs_n[None, :]
    tl.store(ptrs, keep.to(tl.float32), mask=(offs_m[:, None] < Tq) & (offs_n[None, :] < Tk))


__all__ = [
    "backward_dkdv_kernel",
    "backward_dq_kernel",
    "backward_kernel",
    "dropout_keep_kernel",
    "forward_kernel",
    "triton",
]
