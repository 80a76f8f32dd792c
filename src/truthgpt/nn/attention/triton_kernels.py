"""Distance attention on GPUs: flash-style Triton kernels for l1, l2, chebyshev and lp.

The same math as the native CPU kernel (native.py) and the blocked kernels (kernels.py), as
Triton kernels (`_triton_jit.py`) in the FlashAttention-2 layout:

* forward: one program per (query tile, batch·head) runs the online softmax over the key
  tiles it can see (causal: only those up to its last row) and saves the output and the
  per-row log-sum-exp;
* backward of l1 and chebyshev, two kernels as FlashAttention-2's: dk/dv, one program
  per (key tile, batch·head) walking the query tiles that see its keys, and dq, one program
  per (query tile, batch·head) walking the key tiles its rows see; each recomputes the
  tile's distances and probabilities from the saved log-sum-exp;
* backward of l2 and lp: one kernel per (key tile, batch·head) walking the query tiles,
  dq added atomically: l2's gradients are matrix products, and lp's per-coordinate term (a
  power, some thirty instructions) would cost twice over in two kernels.

The distance of a tile is computed one coordinate at a time from exact differences q_d − k_d
(no ‖q‖² + ‖k‖² − 2q·k expansion), the per-coordinate op chosen at compile time by the kind's
`MinkowskiKernel.native_code` (`KIND_CODES`): a Minkowski kind whose code the kernels know
needs no other kernel. L1 is computed as Σ|q_d − k_d|, not with |a − b| = a + b − 2·min(a, b)
as the native kernel does: on a GPU |x| is a free operand modifier, so both cost two
instructions per coordinate, and the direct form does not subtract sums of size Σ|k|. The
p·v products run on tensor cores for fp16/bf16 inputs (operands in the input dtype, fp32
accumulation, as flash attention does); fp32 and fp64 inputs use IEEE products (no TF32).
(Triton 3.9's interpreter multiplies bf16 dot operands as integers, so there bf16 inputs
take fp32 products; it also rounds to bf16 by truncation where GPUs round to nearest.)

Why two backward kernels for l1 and chebyshev, though the dq kernel computes every
distance a second time: their gradients are sums over a tile's other axis of per-coordinate
terms (dq_id = Σ_j g_ij·sign(q_id − k_jd), not a matrix product). One kernel giving both dq
and dk must sum across threads inside its coordinate loop (shuffles and barriers, once per
coordinate) and add dq atomically; two kernels each lay their tile out so that the sum stays
inside a thread (the dk/dv kernel's threads hold every row of it, the dq kernel's every
key), and write rows they alone own: no shuffle in the coordinate loops, no atomics, and dq
summed in the same order every run. benchmarks/results/triton_sass.md has the instruction
counts of both. dλ is summed per program and then on the host, in a fixed order. l2's and
lp's dq are added atomically (not bitwise reproducible between runs).

Dropout: Philox (`tl.rand`) on (seed, the entry's index ((b·H + h)·Tq + i)·Tk + j), the seed
drawn per call from torch's generator; the backward regenerates the same mask, whatever the tiles,
and `dropout_keep` returns it. Rows with no visible key give zero output and gradients.
At an exact tie q_d = k_d the subgradient of |q_d − k_d| is 0, as torch.cdist's (the native
kernel takes +1).

Triton is optional: this module imports it only when these kernels are used. With
TRITON_INTERPRET=1 set before triton is first imported, the very same kernels run in Triton's
interpreter on CPU tensors (the tests do this), slowly.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from types import ModuleType

import torch
from torch import Tensor

from truthgpt.nn.attention import kinds
from truthgpt.nn.attention.functional import SEED_RANGE, check_alibi
from truthgpt.nn.attention.kernel_codes import KERNEL_CODES
from truthgpt.nn.attention.kernels import additive_bias
from truthgpt.nn.attention.kinds import DistanceKind

# The kinds the kernels implement, by `MinkowskiKernel.native_code` (the KIND constexpr).
KIND_CODES = {code: name for name, code in KERNEL_CODES.items()}
# Tiles (query rows, keys) and warps per program, chosen by the instruction counts of their
# sm_90a machine code (benchmarks/triton_sass.py), not timed: no GPU has run these kernels
# yet. Each thread holds a block of rows × keys of the tile (`_blocking`).
FORWARD_TILE = (128, 128)
BACKWARD_TILE = (32, 128)
# fp16 and bf16 at D > 64, the dk/dv kernel (l1, chebyshev): half the keys, each on two
# threads with half the rows (dk summed from two copies). At BACKWARD_TILE its 128 keys'
# dv take D registers per thread, and at D = 128 it spilled 248 bytes.
BACKWARD_TILE_WIDE_D = (32, 64)
FORWARD_WARPS = 8
BACKWARD_WARPS = 4
# fp32 and fp64 inputs: smaller tiles. Their p·v products are IEEE ones on CUDA cores (no
# TF32), whose operands and sums stay in registers, and float64 holds each value in two:
# at the tiles above both spill (and float64's forward takes 192 KiB of shared memory).
WIDE_TILES = ((64, 64), (32, 128))
# The backward of l1 and chebyshev is two kernels: dk and dv over BACKWARD_TILE (or
# WIDE_TILES[1]), each thread holding every row of the tile for its keys; dq over DQ_TILES,
# each thread holding every key for its rows (`_blocking`). By wide (fp32, fp64).
DQ_TILES = {False: (128, 64), True: (128, 64)}
# l2's and lp's backward is one kernel (dq added atomically), with its own tiles.
# By (wide, D > 64): fp16 and bf16 at 64 × 64 spilled 3,404 bytes of registers at D = 64
# (its products w·k, wᵀ·q are IEEE ones on CUDA cores, whose operands stay in registers).
FUSED_BACKWARD_TILES = {
    (False, False): (64, 32),
    (False, True): (32, 32),
    (True, False): (32, 64),
    (True, True): (32, 64),
}
# l2's backward in fp16 and bf16, (tile, warps) by D > 64: at the tiles above and 4 warps it
# spilled 40 bytes at D = 64 and 180 at D = 128, at 6.68 and 6.96 instructions per triple.
L2_BACKWARD = {False: ((128, 32), 8), True: ((64, 32), 8)}
# Triton 3.9 warns unless fused multiply-adds are asked for explicitly; they are its default.
_OPTIONS = {"enable_fp_fusion": True}
INSTALL_HINT = "pip install 'truthgpt[gpu]' (triton==3.9.0)"

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@functools.cache
def _load() -> tuple[ModuleType | None, str | None]:
    """The kernels' module, or None and why it cannot be imported."""
    try:
        from truthgpt.nn.attention import _triton_jit
    except ImportError as err:
        return None, f"{type(err).__name__}: {err}"
    return _triton_jit, None


def available() -> bool:
    """Whether triton is installed (the kernels can be built)."""
    return _load()[0] is not None


def unavailable_reason() -> str | None:
    """Why the kernels cannot be used (triton's import error), or None."""
    return _load()[1]


def interpreted() -> bool:
    """Whether the kernels run in Triton's interpreter (TRITON_INTERPRET=1 was set before
    triton was imported): then they take CPU tensors too."""
    module = _load()[0]
    return module is not None and type(module.forward_kernel).__name__ == "InterpretedFunction"


def served_kinds() -> list[str]:
    """The registered kinds these kernels compute."""
    return [n for n in kinds.names("blocked") if _code(kinds.get(n)) is not None]


def _code(kind: DistanceKind) -> int | None:
    code = kind.kernel.native_code if kind.kernel is not None else None
    return code if code in KIND_CODES else None


def supports(q: Tensor, kind: str | DistanceKind | None = None) -> bool:
    """Whether `auto` takes these kernels: CUDA tensors, triton installed and compiling (not
    the interpreter), a kind they implement."""
    if kind is not None and _code(kinds.get(kind)) is None:
        return False
    return q.device.type == "cuda" and available() and not interpreted()


def check(q: Tensor, kind: str | DistanceKind) -> None:
    """Raise a clear error when backend='triton' cannot run for q and kind."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"backend 'triton' needs the triton package ({reason}): {INSTALL_HINT}")
    if q.device.type != "cuda" and not interpreted():
        raise ValueError(
            f"backend 'triton' runs on CUDA tensors, got {q.device.type} ones (Triton's "
            "interpreter runs it on CPU when TRITON_INTERPRET=1 is set before triton is imported)"
        )
    if _code(kinds.get(kind)) is None:
        raise ValueError(
            f"the triton kernels serve the kinds {', '.join(served_kinds())}, "
            f"not {kinds.get(kind).name!r}"
        )


@dataclasses.dataclass(frozen=True)
class KernelConfig:
    """What the kernels are compiled and launched with, besides q, k, v and λ: the kind's
    code and exponent, the masks, ALiBi's slopes, dropout (its probability and seed) and the
    tiles."""

    code: int
    p: float
    causal: bool
    bias: Tensor | None  # (B?, H?, Tq, Tk) additive, in the accumulation dtype
    dropout_p: float
    seed: int
    alibi: Tensor | None = None  # (H,) slopes, in the accumulation dtype
    forward_tile: tuple[int, int] = FORWARD_TILE
    backward_tile: tuple[int, int] = BACKWARD_TILE
    dq_tile: tuple[int, int] | None = None  # None: backward_tile transposed
    forward_warps: int = FORWARD_WARPS
    backward_warps: int = BACKWARD_WARPS


def _tl_dtype(module: ModuleType, dtype: torch.dtype):
    tl = module.tl
    return {
        torch.float16: tl.float16,
        torch.bfloat16: tl.bfloat16,
        torch.float32: tl.float32,
        torch.float64: tl.float64,
    }[dtype]


def _pow2(n: int, floor: int = 16) -> int:
    """The next power of two ≥ n and ≥ floor (tl.dot needs ≥ 16 on every side)."""
    return max(floor, 1 << max(0, n - 1).bit_length())


def _tile(tile: tuple[int, int], Tq: int, Tk: int) -> tuple[int, int]:
    """The tile, shrunk to the sequence (a decoding step has Tq = 1)."""
    return min(tile[0], _pow2(Tq)), min(tile[1], _pow2(Tk))


def _blocking(block_m: int, block_n: int, warps: int, spread: str = "even") -> tuple[int, int]:
    """(rows, keys) of a tile each thread holds. even: the tile's entries over the program's
    threads, split as evenly as powers of two allow, more rows than keys. keys: the threads
    over the keys first, each holding all the rows it can (every row when there are as many
    keys as threads), so that sums over rows stay inside a thread; rows: the same, over
    the rows."""
    threads = 32 * warps
    if spread == "keys":
        across = min(block_n, threads)  # threads along the keys
        return block_m // (threads // across), block_n // across
    if spread == "rows":
        across = min(block_m, threads)
        return block_m // across, block_n // (threads // across)
    per_thread = max(1, block_m * block_n // threads)
    rn = 1 << ((per_thread.bit_length() - 1) // 2)
    rm = per_thread // rn
    return min(rm, block_m), min(rn, block_n)


def padded_length(T: int, tiles: tuple[int, ...]) -> int:
    """T rounded up to a multiple of every tile (powers of two): the kernels read the
    transposed q and k without masks."""
    step = max(tiles)
    return -(-T // step) * step


def _shared(qt, kt, v, Tq: int, scale: Tensor, cfg: KernelConfig, acc: torch.dtype):
    """Launch arguments the two kernels share: the ALiBi slopes, the bias and its strides, the
    sizes, the constexprs. qt, kt: q and k padded to Tqp, Tkp positions, in the accumulation
    dtype (`_runs_of`)."""
    B, H, Tqp, D = _runs_shape(qt)
    Tk, Tkp = v.shape[2], _runs_shape(kt)[2]
    module = _load()[0]
    bias = cfg.bias
    if bias is not None:
        bias = bias.expand(B, H, Tq, Tk)  # strides 0 where broadcast: nothing copied
        bias_args = (bias, *bias.stride())
    else:
        bias_args = (scale, 0, 0, 0, 0)  # any tensor: never read
    dot = v.dtype if v.dtype in (torch.float16, torch.bfloat16) else acc
    if dot == torch.bfloat16 and interpreted():  # its tl.dot multiplies bf16 bits as integers
        dot = acc
    alibi = cfg.alibi if cfg.alibi is not None else scale  # any tensor: never read
    drop_scale = 1.0 / (1.0 - cfg.dropout_p)
    sizes = (H, Tq, Tk, Tqp, Tkp, Tk - Tq, cfg.p, cfg.seed, cfg.dropout_p, drop_scale)
    flags = dict(
        KIND=cfg.code,
        CAUSAL=cfg.causal,
        HAS_BIAS=bias is not None,
        HAS_ALIBI=cfg.alibi is not None,
        DROPOUT=cfg.dropout_p > 0.0,
        ACC=_tl_dtype(module, acc),
        DOT=_tl_dtype(module, dot),
        D=D,
        BLOCK_D=_pow2(D),
    )
    return (alibi, *bias_args), sizes, flags


def _meta(flags: dict, tile: tuple[int, int], warps: int, spread: str = "even") -> dict:
    rm, rn = _blocking(*tile, warps, spread)
    return dict(flags, BLOCK_M=tile[0], BLOCK_N=tile[1], RM=rm, RN=rn, num_warps=warps, **_OPTIONS)


def _split(cfg: KernelConfig) -> bool:
    """Whether the backward is two kernels (dk and dv; dq): l1 and chebyshev, whose
    per-coordinate terms are a few instructions. l2's gradients are products, and lp's
    term (a power) costs too much to compute twice: one kernel each."""
    return cfg.code in (KERNEL_CODES["l1"], KERNEL_CODES["chebyshev"])


def _backward_tiles(cfg: KernelConfig, Tq: int, Tk: int) -> list[tuple[int, int]]:
    """The backward kernels' tiles, shrunk to the sequence: the dk/dv kernel's (or l2's),
    then the dq kernel's (by default the same tile transposed: its rows spread over the
    threads as the dk/dv kernel spreads its keys)."""
    rows, keys = cfg.backward_tile
    tiles = [_tile((rows, keys), Tq, Tk)]
    if _split(cfg):
        tiles.append(_tile(cfg.dq_tile or (keys, rows), Tq, Tk))
    return tiles


def _dk_parts(cfg: KernelConfig, Tq: int, Tk: int) -> int:
    """The copies of dk (and of dv off tensor cores) the backward adds to per (b, h): the
    dk/dv kernel's threads per key (`backward_dkdv_kernel`); 1 for l2 and lp."""
    if not _split(cfg):
        return 1
    tile = _backward_tiles(cfg, Tq, Tk)[0]
    return tile[0] // _blocking(*tile, cfg.backward_warps, "keys")[0]


def forward_launch(qt, kt, v, scale, out, lse, cfg: KernelConfig) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, keyword arguments) of the forward kernel; also read by the test that
    compiles the kernels for a GPU on a machine without one. One grid axis of B·H·tiles
    programs: CUDA caps the other axes at 65535."""
    B, H, Tq = out.shape[:3]
    bias_args, sizes, flags = _shared(qt, kt, v, Tq, scale, cfg, lse.dtype)
    tile = _tile(cfg.forward_tile, Tq, v.shape[2])
    n_tiles = triton_cdiv(Tq, tile[0])
    grid = (n_tiles * B * H,)
    args = (qt, kt, v, scale, *bias_args[:2], out, lse, *v.stride()[:3], *bias_args[2:], *sizes)
    return grid, (*args, n_tiles), _meta(flags, tile, cfg.forward_warps)


def backward_launch(
    qt, kt, v, do, lse, delta, scale, dqt, dkt, dv, dlam, cfg: KernelConfig
) -> list[tuple[str, tuple, tuple, dict]]:
    """(kernel name, grid, arguments, keyword arguments) of each backward kernel, in launch
    order; dlam (B·H, key tiles of the first)."""
    B, H, Tq = do.shape[:3]
    Tk = v.shape[2]
    bias_args, sizes, flags = _shared(qt, kt, v, Tq, scale, cfg, lse.dtype)
    tiles = _backward_tiles(cfg, Tq, Tk)
    n_tiles = dlam.shape[1]
    grid = (n_tiles * B * H,)
    warps = cfg.backward_warps
    strides = (*v.stride()[:3], *do.stride()[:3])
    tc = _tensor_cores(v)
    if _split(cfg) and tc:
        gt, vt = qt, kt  # not read
    else:
        gt = _runs_of(do, _runs_shape(qt)[2], qt.dtype)
        vt = _runs_of(v, _runs_shape(kt)[2], kt.dtype)
    if not _split(cfg):
        args = (qt, kt, v, do, gt, vt, lse, delta, scale, *bias_args[:2], dqt, dkt, dv, dlam)
        args += (*v.stride()[:3], *do.stride()[:3], *bias_args[2:], *sizes, n_tiles)
        return [("backward_kernel", grid, args, _meta(flags, tiles[0], warps))]
    flags = dict(flags, TC=tc)
    args = (qt, kt, v, do, gt, vt, lse, delta, scale, *bias_args[:2], dkt, dv, dlam, *strides)
    args += (*bias_args[2:], *sizes, n_tiles)
    dkdv = ("backward_dkdv_kernel", grid, args, _meta(flags, tiles[0], warps, "keys"))
    q_tiles = triton_cdiv(Tq, tiles[1][0])
    args = (qt, kt, v, do, gt, vt, lse, delta, scale, *bias_args[:2], dqt, *strides)
    args += (*bias_args[2:], *sizes, q_tiles)
    dq = ("backward_dq_kernel", (q_tiles * B * H,), args, _meta(flags, tiles[1], warps, "rows"))
    return [dkdv, dq]


def _tensor_cores(v: Tensor) -> bool:
    """Whether the split backward takes its products (dp, dv) on tensor cores: fp16 and
    bf16 inputs. IEEE fp32 and fp64 products would hold their operands' tiles in registers;
    those inputs take them on CUDA cores inside the coordinate loops instead."""
    return v.dtype in (torch.float16, torch.bfloat16)


def _dv_transposed(v: Tensor, cfg: KernelConfig) -> bool:
    """Whether the backward sums v's gradient in runs (`_runs_of`): the split backward on
    CUDA cores, one coordinate at a time."""
    return _split(cfg) and not _tensor_cores(v)


# Positions per run of the kernels' transposed layouts (`_triton_jit.RUN`).
RUN = 16


def _runs_of(x: Tensor, length: int, dtype: torch.dtype) -> Tensor:
    """(B, H, T, D) -> (B, H, length / RUN, D, RUN) in dtype, zeros past T (length: a multiple
    of RUN): runs of RUN positions one coordinate after another. The kernels read one
    coordinate of a tile's positions at a time with no mask or conversion, at offsets from
    the tile's first position known when they are compiled."""
    B, H, T, D = x.shape
    padded = x.new_zeros(B, H, length, D, dtype=dtype)
    padded[:, :, :T] = x
    return padded.view(B, H, length // RUN, RUN, D).transpose(-1, -2).contiguous()


def _runs_shape(x: Tensor) -> tuple[int, int, int, int]:
    """(B, H, padded length, D) of a tensor in `_runs_of`'s layout."""
    B, H, n, D, run = x.shape
    return B, H, n * run, D


def _from_runs(x: Tensor, T: int) -> Tensor:
    """`_runs_of`'s layout back to (B, H, T, D) (a copy, but for D = 1)."""
    B, H, n, D, run = x.shape
    return x.transpose(-1, -2).reshape(B, H, n * run, D)[:, :, :T]


def _lengths(Tq: int, Tk: int, cfg: KernelConfig) -> tuple[int, int]:
    """The padded lengths of q and k: multiples of both kernels' tiles."""
    tiles = [_tile(cfg.forward_tile, Tq, Tk), *_backward_tiles(cfg, Tq, Tk)]
    return padded_length(Tq, [t[0] for t in tiles]), padded_length(Tk, [t[1] for t in tiles])


def _on(device: torch.device):
    """Launches on the tensors' device, not torch's current one."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonDistanceAttention(torch.autograd.Function):
    """out = softmax(−λ·d(q, k) + mask) · v; saves q and k transposed, v, the output and the
    log-sum-exp. Nothing of size Tq×Tk is held."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, cfg: KernelConfig) -> Tensor:
        B, H, Tq, D = q.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        Tqp, Tkp = _lengths(Tq, k.shape[2], cfg)
        qt = _runs_of(q.detach(), Tqp, acc)
        kt = _runs_of(k.detach(), Tkp, acc)
        v = _rows_contiguous(v.detach())
        scale = scale.detach().to(acc).contiguous()  # λ as given (fp32), not rounded to q's
        # The output in the accumulation dtype, kept for the backward: Δ = dO·O from a bf16
        # rounded O would cost dλ (a sum of Tq·Tk terms that cancel) most of its digits.
        out = torch.empty(B, H, Tq, D, dtype=acc, device=q.device)
        # −MASK: rows past the forward's last tile (a backward tile may be taller) read as rows
        # that saw no key, whose weights are 0, not as whatever the memory held
        lse = torch.full((B, H, Tqp), 1e30, dtype=acc, device=q.device)
        grid, args, meta = forward_launch(qt, kt, v, scale, out, lse, cfg)
        with _on(q.device):
            _load()[0].forward_kernel[grid](*args, **meta)
        ctx.save_for_backward(qt, kt, v, out, lse, scale)
        ctx.cfg = cfg
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qt, kt, v, out, lse, scale = ctx.saved_tensors
        cfg: KernelConfig = ctx.cfg
        B, H, Tqp, D = _runs_shape(qt)
        Tq, Tk = out.shape[2], v.shape[2]
        acc, dtype = out.dtype, v.dtype
        do = _rows_contiguous(grad_out.to(dtype))
        delta = torch.zeros(B, H, Tqp, dtype=acc, device=qt.device)
        delta[..., :Tq] = (do.to(acc) * out).sum(-1)  # dO_i · O_i
        dqt = torch.zeros_like(qt)  # added to
        parts = _dk_parts(cfg, Tq, Tk)  # copies of dk, summed below
        dkt = kt.new_zeros(B, H, parts, *kt.shape[2:])
        transposed = _dv_transposed(v, cfg)
        shape = dkt.shape if transposed else (B, H, Tk, D)
        dv = torch.zeros(shape, dtype=acc, device=v.device)  # added to
        n_tiles = triton_cdiv(Tk, _backward_tiles(cfg, Tq, Tk)[0][1])
        dlam = torch.empty(B * H, n_tiles, dtype=acc, device=qt.device)
        module = _load()[0]
        with _on(qt.device):
            for name, grid, args, meta in backward_launch(
                qt, kt, v, do, lse, delta, scale, dqt, dkt, dv, dlam, cfg
            ):
                getattr(module, name)[grid](*args, **meta)
        dq = _from_runs(dqt, Tq).to(dtype)
        dk = _from_runs(dkt.sum(2), Tk).to(dtype)
        dv = (_from_runs(dv.sum(2), Tk) if transposed else dv).to(dtype)
        dscale = dlam.view(B, H, n_tiles).sum((0, 2)) if ctx.needs_input_grad[3] else None
        return dq, dk, dv, dscale, None


def triton_cdiv(a: int, b: int) -> int:
    return -(-a // b)


@torch.compiler.disable
def triton_attention(
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
    forward_tile: tuple[int, int] | None = None,
    backward_tile: tuple[int, int] | None = None,
    alibi: Tensor | None = None,
) -> Tensor:
    """Exact attention with the Triton kernels, (B, H, Tq, D), for l1, l2, chebyshev and lp.

    Arguments as `distance_attention` (checked there). seed: dropout seed; None draws one from
    torch's global generator, so torch.manual_seed makes runs reproducible. forward_tile,
    backward_tile: (query rows, keys) per program, powers of two ≥ 16 (None: FORWARD_TILE,
    BACKWARD_TILE and DQ_TILES, or WIDE_TILES for fp32 and fp64; a backward_tile given is
    the dq kernel's too, transposed); any give the same result up to rounding (and the same
    dropout mask). alibi: (H,) ALiBi slopes m ≥ 0 or None: the scores get
    −m_h·|i + Tk − Tq − j|, computed in the kernels from the indices.
    """
    check(q, kind)
    check_alibi(alibi, q)
    spec = kinds.get(kind)
    dtype = q.dtype
    if dtype not in _DTYPES:
        q, k, v = q.float(), k.float(), v.float()
    acc = torch.float64 if q.dtype == torch.float64 else torch.float32
    if isinstance(scale, Tensor):
        scale_t = scale
    else:
        scale_t = torch.full((q.shape[1],), float(scale), dtype=acc, device=q.device)
    if dropout_p > 0.0 and seed is None:
        seed = int(torch.randint(0, SEED_RANGE, ()).item())
    wide = q.dtype in (torch.float32, torch.float64)
    defaults = WIDE_TILES if wide else (FORWARD_TILE, BACKWARD_TILE)
    if not wide and q.shape[-1] > 64:  # l2 and lp: replaced below
        defaults = (defaults[0], BACKWARD_TILE_WIDE_D)
    backward_warps = BACKWARD_WARPS
    if _code(spec) in (KERNEL_CODES["l2"], KERNEL_CODES["lp"]):
        defaults = (defaults[0], FUSED_BACKWARD_TILES[wide, q.shape[-1] > 64])
    if _code(spec) == KERNEL_CODES["l2"] and not wide and backward_tile is None:
        tile, backward_warps = L2_BACKWARD[q.shape[-1] > 64]
        defaults = (defaults[0], tile)
    dq_tile = None if backward_tile else DQ_TILES[wide]
    forward_tile = forward_tile or defaults[0]
    backward_tile = backward_tile or defaults[1]
    for tile in (forward_tile, backward_tile):
        if any(t < 16 or t & (t - 1) for t in tile):
            raise ValueError(f"tiles must be powers of two >= 16, got {tile}")
    cfg = KernelConfig(
        code=_code(spec),
        p=float(p) if spec.takes_p else 1.0,
        causal=bool(causal),
        bias=additive_bias(attn_mask, acc),
        dropout_p=float(dropout_p),
        seed=int(seed or 0),
        alibi=alibi.detach().to(acc).contiguous() if alibi is not None else None,
        forward_tile=tuple(forward_tile),
        backward_tile=tuple(backward_tile),
        dq_tile=dq_tile,
        backward_warps=backward_warps,
    )
    return TritonDistanceAttention.apply(q, k, v, scale_t, cfg).to(dtype)


def dropout_keep(
    seed: int, shape: tuple[int, int, int, int], p: float, device: torch.device | str = "cuda"
) -> Tensor:
    """The kernels' dropout keep-mask (1.0 = kept) for `seed`, (B, H, Tq, Tk) float32."""
    module, reason = _load()
    if module is None:
        raise RuntimeError(f"the triton kernels need the triton package ({reason})")
    B, H, Tq, Tk = shape
    out = torch.empty(B, H, Tq, Tk, dtype=torch.float32, device=device)
    grid = (B * H * triton_cdiv(Tq, 16), triton_cdiv(Tk, 16))
    with _on(out.device):
        module.dropout_keep_kernel[grid](out, int(seed), Tq, Tk, float(p), BLOCK_M=16, BLOCK_N=16)
    return out
