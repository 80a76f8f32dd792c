"""Distance attention on GPUs: flash-style Triton kernels for l1, l2, chebyshev and lp.

The same math as the native CPU kernel (native.py) and the blocked kernels (kernels.py), as
two Triton kernels (`_triton_jit.py`) in the FlashAttention-2 layout:

* forward: one program per (query tile, batch·head) runs the online softmax over the key
  tiles it can see (causal: only those up to its last row) and saves the output and the
  per-row log-sum-exp;
* backward: one program per (key tile, batch·head) keeps its keys' dv (and dk for l2) in
  registers and walks the query tiles that see them, recomputing each tile's distances and
  probabilities from the saved log-sum-exp.

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

dq: atomics, not a second pass. A separate pass over query tiles would recompute every
distance a second time, and for these kinds the distance (D operations per score on CUDA
cores) is the cost, unlike a dot product on tensor cores; with atomics one per-coordinate
loop per tile gives both dq (added atomically in fp32 to rows other key tiles also add to)
and dk (this program's own rows). The price is a dq summed in no fixed order: not bitwise
reproducible between runs. dλ is summed per program and then on the host, in a fixed order.

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

import dataclasses
import functools
from types import ModuleType

import torch
from torch import Tensor

from truthgpt.nn.attention import kinds
from truthgpt.nn.attention.kernels import additive_bias
from truthgpt.nn.attention.kinds import DistanceKind

# The kinds the kernels implement, by `MinkowskiKernel.native_code` (the KIND constexpr).
KIND_CODES = {0: "l1", 1: "l2", 2: "chebyshev", 3: "lp"}
# Tiles (query rows, keys) and warps per program: ones for which ptxas reports no register
# spills in bf16 at D = 64 on sm_90 (tests/test_attention_triton.py compiles them), not
# timed: no GPU has run these kernels yet. The backward also holds v and dv (and k, dk
# for l2) for its keys, so it takes fewer query rows per step.
FORWARD_TILE = (64, 64)
BACKWARD_TILE = (32, 64)
FORWARD_WARPS = 8
BACKWARD_WARPS = 8
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
    code and exponent, the masks, dropout (its probability and seed) and the tiles."""

    code: int
    p: float
    causal: bool
    bias: Tensor | None  # (B?, H?, Tq, Tk) additive, in the accumulation dtype
    dropout_p: float
    seed: int
    forward_tile: tuple[int, int] = FORWARD_TILE
    backward_tile: tuple[int, int] = BACKWARD_TILE
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


def _shared(qt: Tensor, kt: Tensor, scale: Tensor, cfg: KernelConfig, acc: torch.dtype):
    """Launch arguments the two kernels share: the bias and its strides, the sizes, the
    constexprs. qt, kt: (B, H, D, T), in the input dtype."""
    B, H, D, Tq = qt.shape
    Tk = kt.shape[3]
    module = _load()[0]
    bias = cfg.bias
    if bias is not None:
        bias = bias.expand(B, H, Tq, Tk)  # strides 0 where broadcast: nothing copied
        bias_args = (bias, *bias.stride())
    else:
        bias_args = (scale, 0, 0, 0, 0)  # any tensor: never read
    dot = qt.dtype if qt.dtype in (torch.float16, torch.bfloat16) else acc
    if dot == torch.bfloat16 and interpreted():  # its tl.dot multiplies bf16 bits as integers
        dot = acc
    drop_scale = 1.0 / (1.0 - cfg.dropout_p)
    sizes = (H, Tq, Tk, D, Tk - Tq, cfg.p, cfg.seed, cfg.dropout_p, drop_scale)
    flags = dict(
        KIND=cfg.code,
        CAUSAL=cfg.causal,
        HAS_BIAS=bias is not None,
        DROPOUT=cfg.dropout_p > 0.0,
        ACC=_tl_dtype(module, acc),
        DOT=_tl_dtype(module, dot),
        BLOCK_D=_pow2(D),
    )
    return bias_args, sizes, flags


def forward_launch(qt, kt, v, scale, out, lse, cfg: KernelConfig) -> tuple[tuple, tuple, dict]:
    """(grid, arguments, keyword arguments) of the forward kernel; also read by the test that
    compiles the kernels for a GPU on a machine without one."""
    B, H, _, Tq = qt.shape
    bias_args, sizes, flags = _shared(qt, kt, scale, cfg, lse.dtype)
    block_m, block_n = _tile(cfg.forward_tile, Tq, kt.shape[3])
    grid = (triton_cdiv(Tq, block_m), B * H)
    args = (qt, kt, v, scale, bias_args[0], out, lse, *v.stride()[:3], *bias_args[1:], *sizes)
    meta = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=cfg.forward_warps, **_OPTIONS)
    return grid, args, meta


def backward_launch(qt, kt, v, do, lse, delta, scale, dqt, dkt, dv, dlam, cfg: KernelConfig):
    """(grid, arguments, keyword arguments) of the backward kernel; dlam (B·H, key tiles)."""
    B, H, _, Tq = qt.shape
    bias_args, sizes, flags = _shared(qt, kt, scale, cfg, lse.dtype)
    block_m, block_n = _tile(cfg.backward_tile, Tq, kt.shape[3])
    n_tiles = dlam.shape[1]
    grid = (n_tiles, B * H)
    args = (qt, kt, v, do, lse, delta, scale, bias_args[0], dqt, dkt, dv, dlam)
    args += (*v.stride()[:3], *do.stride()[:3], *bias_args[1:], *sizes, n_tiles)
    meta = dict(flags, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=cfg.backward_warps, **_OPTIONS)
    return grid, args, meta


def _transposed(x: Tensor) -> Tensor:
    """(B, H, T, D) -> contiguous (B, H, D, T): the kernels read one coordinate of a tile's
    rows at a time, which is then one contiguous run."""
    return x.transpose(-1, -2).contiguous()


def _rows_contiguous(x: Tensor) -> Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


class TritonDistanceAttention(torch.autograd.Function):
    """out = softmax(−λ·d(q, k) + mask) · v; saves q and k transposed, v, the output and the
    log-sum-exp. Nothing of size Tq×Tk is held."""

    @staticmethod
    def forward(ctx, q: Tensor, k: Tensor, v: Tensor, scale: Tensor, cfg: KernelConfig) -> Tensor:
        B, H, Tq, D = q.shape
        acc = torch.float64 if q.dtype == torch.float64 else torch.float32
        qt, kt, v = _transposed(q.detach()), _transposed(k.detach()), _rows_contiguous(v.detach())
        scale = scale.detach().to(acc).contiguous()
        # The output in the accumulation dtype, kept for the backward: Δ = dO·O from a bf16
        # rounded O would cost dλ (a sum of Tq·Tk terms that cancel) most of its digits.
        out = torch.empty(B, H, Tq, D, dtype=acc, device=q.device)
        lse = torch.empty(B, H, Tq, dtype=acc, device=q.device)
        grid, args, meta = forward_launch(qt, kt, v, scale, out, lse, cfg)
        _load()[0].forward_kernel[grid](*args, **meta)
        ctx.save_for_backward(qt, kt, v, out, lse, scale)
        ctx.cfg = cfg
        return out.to(q.dtype)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        qt, kt, v, out, lse, scale = ctx.saved_tensors
        cfg: KernelConfig = ctx.cfg
        B, H, D, Tq = qt.shape
        Tk = kt.shape[3]
        acc, dtype = out.dtype, v.dtype
        do = _rows_contiguous(grad_out.to(dtype))
        delta = (do.to(acc) * out).sum(-1).contiguous()  # (B, H, Tq): dO_i · O_i
        dqt = torch.zeros(B, H, D, Tq, dtype=acc, device=qt.device)  # added to atomically
        dkt = torch.zeros(B, H, D, Tk, dtype=acc, device=qt.device)
        dv = torch.empty(B, H, Tk, D, dtype=dtype, device=v.device)
        n_tiles = triton_cdiv(Tk, _tile(cfg.backward_tile, Tq, Tk)[1])
        dlam = torch.empty(B * H, n_tiles, dtype=acc, device=qt.device)
        launch = backward_launch(qt, kt, v, do, lse, delta, scale, dqt, dkt, dv, dlam, cfg)
        grid, args, meta = launch
        _load()[0].backward_kernel[grid](*args, **meta)
        dq = dqt.transpose(-1, -2).to(dtype)
        dk = dkt.transpose(-1, -2).to(dtype)
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
    forward_tile: tuple[int, int] = FORWARD_TILE,
    backward_tile: tuple[int, int] = BACKWARD_TILE,
) -> Tensor:
    """Exact attention with the Triton kernels, (B, H, Tq, D), for l1, l2, chebyshev and lp.

    Arguments as `distance_attention` (checked there). seed: dropout seed; None draws one from
    torch's global generator, so torch.manual_seed makes runs reproducible. forward_tile,
    backward_tile: (query rows, keys) per program, powers of two ≥ 16; any give the same
    result up to rounding (and the same dropout mask).
    """
    check(q, kind)
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
        seed = int(torch.randint(0, 2**62, ()).item())
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
        forward_tile=tuple(forward_tile),
        backward_tile=tuple(backward_tile),
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
    grid = (triton_cdiv(Tq, 16), triton_cdiv(Tk, 16), B * H)
    module.dropout_keep_kernel[grid](out, int(seed), Tq, Tk, float(p), BLOCK_M=16, BLOCK_N=16)
    return out
