"""The distance kinds: one registry entry per kind, read by everything that depends on the kind.

A kind is a name (plus aliases), its pairwise distance d(q, k), its initial λ for a head size
and the fast path that serves it. Every score is −λ_h · d(q_i, k_j); the similarities enter as
negated distances (dot: d = −q·k, cosine: d = −cos(q, k)), which is exact in floating point.

`distance` is the definition: the plain path (`functional._plain_attention`) computes it as a
(…, Tq, Tk) matrix with autograd, and every fast path must match it. The fast paths:

* `as_dot_product` (dot, cosine, sql2): q, k, v and λ rewritten so that dot-product scores
  give the same softmax, then one `F.scaled_dot_product_attention` call;
* `kernel` (l1, l2, chebyshev, lp): a `MinkowskiKernel`, the per-kind operations of the
  flash-style kernels (the blocked ones in kernels.py, compiled or eager, and the native C++
  one), which never hold the T×T weights;
* neither: the plain path alone, O(Tq·Tk) memory per head. Kinds added with
  `register_distance` take it.

A new built-in kind is one `_builtin(DistanceKind(...))` entry below plus one row of the
float64 reference table in tests/test_attention.py.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor

from .kernel_codes import KERNEL_CODES

# Cosine normalises q and k; a zero vector is divided by this instead of by 0.
COSINE_EPS = 1e-6

FastPath = Literal["sdpa", "blocked", "plain"]
FAST_PATHS: tuple[FastPath, ...] = ("sdpa", "blocked", "plain")


@dataclasses.dataclass(frozen=True)
class MinkowskiKernel:
    """How the flash-style kernels compute a distance that reduces |q_d − k_d| over the
    coordinates d (l1, l2, chebyshev, lp); they recompute it tile by tile in the backward.

    Compiled, the blocked kernels run `reduce` and `pair_grad` (or `linear_grad`) on
    broadcasts that inductor fuses away; eager, they call `torch.cdist` with `cdist_p` and its
    backward. Where a derivative is undefined (q_d = k_d for l1 and lp, d = 0) the operations
    use the subgradient 0, as `torch.cdist` does.
    """

    # torch.cdist's exponent for this distance; None: the call's p.
    cdist_p: float | None
    # reduce(x, p): x = |q − k| of shape (…, R, D, b) -> (…, R, b) distances.
    reduce: Callable[[Tensor, float], Tensor]
    # pair_grad(g, d, q, k, p): g · ∂d/∂q per coordinate, broadcast over (…, D).
    pair_grad: Callable[[Tensor, Tensor, Tensor, Tensor, float], Tensor] | None = None
    # linear_grad(g, d) -> w where g · ∂d/∂q = w · (q − k) (l2): dq and dk are then two
    # matmuls each instead of a broadcast over (R, b, D).
    linear_grad: Callable[[Tensor, Tensor], Tensor] | None = None
    # The kind's code in the native kernel (csrc/); None: not implemented there.
    native_code: int | None = None

    def __post_init__(self) -> None:
        if (self.pair_grad is None) == (self.linear_grad is None):
            raise ValueError("MinkowskiKernel: give exactly one of pair_grad and linear_grad")

    def exponent(self, p: float) -> float:
        """torch.cdist's p for this distance, given the call's p."""
        return p if self.cdist_p is None else self.cdist_p


@dataclasses.dataclass(frozen=True)
class DistanceKind:
    """One distance kind; see the module docstring for what reads which field."""

    name: str
    # distance(q, k) (distance(q, k, p) when takes_p): q (…, Tq, D), k (…, Tk, D) ->
    # (…, Tq, Tk), differentiable by autograd. Scores are −λ·distance.
    distance: Callable[..., Tensor]
    # default_lambda(head_dim) (default_lambda(head_dim, p) when takes_p) -> initial λ > 0.
    default_lambda: Callable[..., float]
    aliases: tuple[str, ...] = ()
    # The kind has the exponent p (distance_attention's p, the config's p_norm).
    takes_p: bool = False
    # (p, kind): at these p the kind equals another one, whose faster path is used instead.
    same_as: tuple[tuple[float, str], ...] = ()
    # d(c·q, c·k) = c·d(q, k), as for every norm of q − k: the model scales the default λ with
    # its width for these kinds (`truthgpt.nn.model.initial_lambda`).
    linear_in_scale: bool = False
    # (q, k, v, scale) -> (q', k', v', scale'): dot-product attention on these gives this
    # kind's attention; v' may have extra columns, dropped from the output.
    as_dot_product: Callable[..., tuple[Tensor, Tensor, Tensor, float | Tensor]] | None = None
    kernel: MinkowskiKernel | None = None

    def __post_init__(self) -> None:
        if self.as_dot_product is not None and self.kernel is not None:
            raise ValueError(f"distance kind {self.name!r}: one fast path at most")

    @property
    def fast_path(self) -> FastPath:
        """Which path `distance_attention` takes when the weights are not asked for."""
        if self.as_dot_product is not None:
            return "sdpa"
        return "blocked" if self.kernel is not None else "plain"

    def pairwise(self, q: Tensor, k: Tensor, p: float | None = None) -> Tensor:
        """The (…, Tq, Tk) distances; p is used only by kinds that take it."""
        return self.distance(q, k, p) if self.takes_p else self.distance(q, k)

    def lambda_for(self, head_dim: int, p: float | None = None) -> float:
        """The initial λ for heads of `head_dim` dimensions."""
        if self.takes_p:
            return float(self.default_lambda(head_dim, p))
        return float(self.default_lambda(head_dim))


# --------------------------------------------------------------------------------------------
# the registry

_KINDS: dict[str, DistanceKind] = {}  # by name, in registration order
_LOOKUP: dict[str, str] = {}  # every name and alias -> the kind's name
_BUILTIN: list[str] = []


def names(fast_path: FastPath | None = None) -> tuple[str, ...]:
    """The registered kinds (built-in ones first), or those that `fast_path` serves."""
    if fast_path is not None and fast_path not in FAST_PATHS:
        raise ValueError(f"fast_path must be one of {FAST_PATHS}, got {fast_path!r}")
    return tuple(n for n, kind in _KINDS.items() if fast_path in (None, kind.fast_path))


def builtin_names() -> tuple[str, ...]:
    """The kinds that come with truthgpt (they can be neither replaced nor removed)."""
    return tuple(_BUILTIN)


def get(name: str | DistanceKind) -> DistanceKind:
    """The kind called `name` or one of its aliases, in any case; a kind is returned as is.

    Raises ValueError naming `name` and listing the registered kinds.
    """
    if isinstance(name, DistanceKind):
        return name
    if not isinstance(name, str):
        raise ValueError(f"a distance kind is named by a string, got {type(name).__name__}")
    found = _LOOKUP.get(name.lower())
    if found is None:
        raise ValueError(f"unknown distance kind {name!r}; registered: {', '.join(_KINDS)}")
    return _KINDS[found]


def _check_name(name: object, what: str) -> str:
    if not isinstance(name, str) or not name or any(c.isspace() or c == "," for c in name):
        # commas separate kinds on the command line (`truthgpt compare --kinds a,b`)
        raise ValueError(f"{what} must be a non-empty string without spaces or commas: {name!r}")
    return name.lower()


def _register(kind: DistanceKind) -> DistanceKind:
    name = _check_name(kind.name, "a distance kind's name")
    aliases = [_check_name(a, f"an alias of {name!r}") for a in kind.aliases]
    for key in (name, *aliases):
        owner = _LOOKUP.get(key)
        if owner in _BUILTIN:
            what = "is built in" if key == owner else f"is an alias of the built-in {owner!r}"
            raise ValueError(f"distance kind {key!r} {what} and cannot be replaced")
        if owner is not None:
            raise ValueError(
                f"{key!r} already names the distance kind {owner!r}; unregister that kind first"
            )
    if len(set(aliases)) != len(aliases) or name in aliases:
        raise ValueError(f"distance kind {name!r}: aliases repeat a name: {kind.aliases!r}")
    kind = dataclasses.replace(kind, name=name, aliases=tuple(aliases))
    _KINDS[name] = kind
    for key in (name, *aliases):
        _LOOKUP[key] = name
    return kind


def register_distance(
    name: str,
    fn: Callable[[Tensor, Tensor], Tensor],
    *,
    default_lambda: float | Callable[[int], float],
    aliases: Sequence[str] = (),
) -> DistanceKind:
    """Add a distance kind, served by the plain path.

    fn(q, k): q (…, Tq, D) and k (…, Tk, D) -> distances (…, Tq, Tk), differentiable by
    autograd; the scores are −λ_h · fn(q, k), so smaller means closer. The plain path holds
    the (B, H, Tq, Tk) scores (and whatever fn's autograd keeps): O(Tq·Tk) memory per head.
    default_lambda: the initial λ, a number or a function of the head size D.

    The kind then trains, generates with the KV cache, saves and loads like a built-in one; a
    checkpoint stores only its name, so the loading process must register it too.
    """
    if not callable(fn):
        raise ValueError(f"fn must be callable (q, k) -> distances, got {type(fn).__name__}")
    if callable(default_lambda):
        lam = default_lambda
    elif (
        isinstance(default_lambda, int | float)
        and not isinstance(default_lambda, bool)
        and math.isfinite(default_lambda)
        and default_lambda > 0
    ):
        value = float(default_lambda)

        def lam(head_dim: int) -> float:
            return value

    else:
        raise ValueError(
            f"default_lambda must be a positive number or a function of the head size, "
            f"got {default_lambda!r}"
        )
    if isinstance(aliases, str):
        aliases = (aliases,)
    return _register(DistanceKind(name, fn, lam, aliases=tuple(aliases)))


def unregister(name: str) -> None:
    """Remove a kind added with `register_distance` (and its aliases)."""
    kind = get(name)
    if kind.name in _BUILTIN:
        raise ValueError(f"distance kind {kind.name!r} is built in and cannot be removed")
    del _KINDS[kind.name]
    for key in (kind.name, *kind.aliases):
        del _LOOKUP[key]


def _builtin(kind: DistanceKind) -> None:
    _BUILTIN.append(_register(kind).name)


# --------------------------------------------------------------------------------------------
# built-in distances
#
# torch.cdist without the matmul expansion: exact at small distances; at zero distance its
# gradient is 0 (the subgradient of |x| at 0), finite for l2; its backward holds O(Tq·Tk) per
# head, never O(Tq·Tk·D).


def _cdist(q: Tensor, k: Tensor, p: float) -> Tensor:
    return torch.cdist(q, k, p=p, compute_mode="donot_use_mm_for_euclid_dist")


def _dot(q: Tensor, k: Tensor) -> Tensor:
    return -(q @ k.transpose(-2, -1))


def _cosine(q: Tensor, k: Tensor) -> Tensor:
    qn = F.normalize(q, dim=-1, eps=COSINE_EPS)
    kn = F.normalize(k, dim=-1, eps=COSINE_EPS)
    return -(qn @ kn.transpose(-2, -1))


def _sql2(q: Tensor, k: Tensor) -> Tensor:
    return _cdist(q, k, 2.0).square()


def _l1(q: Tensor, k: Tensor) -> Tensor:
    return _cdist(q, k, 1.0)


def _l2(q: Tensor, k: Tensor) -> Tensor:
    return _cdist(q, k, 2.0)


def _chebyshev(q: Tensor, k: Tensor) -> Tensor:
    return _cdist(q, k, math.inf)


def _lp(q: Tensor, k: Tensor, p: float) -> Tensor:
    return _cdist(q, k, p)


# --------------------------------------------------------------------------------------------
# as dot products


def _dot_as_dot(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor):
    return q, k, v, scale


def _cosine_as_dot(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor):
    qn = F.normalize(q, dim=-1, eps=COSINE_EPS)
    kn = F.normalize(k, dim=-1, eps=COSINE_EPS)
    return qn, kn, v, scale


def _sql2_as_dot(q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor):
    """Squared L2 as exact dot-product attention on augmented vectors.

    -s‖q−k‖² = -s‖q‖² + s(2 q·k − ‖k‖²); the first term is constant along a query row and
    cancels in the softmax, so q' = [q, 1], k' = [k, −‖k‖²/2] and scale 2s give the same
    weights. ‖k‖² is computed in fp32 at least. v gets a zero column too: SDPA's fused CPU
    kernel needs equal head sizes and otherwise falls back to materialising the weights.
    """
    wide = torch.promote_types(k.dtype, torch.float32)
    k_sq = k.to(wide).square().sum(-1, keepdim=True).to(k.dtype)  # (B, H, Tk, 1)
    q_aug = torch.cat([q, torch.ones_like(q[..., :1])], dim=-1)  # (B, H, Tq, D+1)
    k_aug = torch.cat([k, -0.5 * k_sq], dim=-1)  # (B, H, Tk, D+1)
    v_aug = torch.cat([v, torch.zeros_like(v[..., :1])], dim=-1)  # (B, H, Tk, D+1)
    return q_aug, k_aug, v_aug, scale * 2.0


# --------------------------------------------------------------------------------------------
# the blocked kernels' operations
#
# ∂dist/∂q per coordinate x = q_d − k_d: sign(x) (l1), x/dist (l2), sign(x) where |x| is the
# max (chebyshev), sign(x)·(|x|/dist)^(p−1) (lp).


def _signed(g: Tensor, q: Tensor, k: Tensor) -> Tensor:
    """g · sign(q − k), written with two selects (cheaper than sign() times g)."""
    return torch.where(q > k, g, torch.where(q < k, -g, 0.0))


def _sum_reduce(x: Tensor, p: float) -> Tensor:
    return x.sum(-2)


def _root_sum_square_reduce(x: Tensor, p: float) -> Tensor:
    return x.square().sum(-2).sqrt()


def _max_reduce(x: Tensor, p: float) -> Tensor:
    return x.amax(-2)


def _power_reduce(x: Tensor, p: float) -> Tensor:
    return x.pow(p).sum(-2).pow(1.0 / p)


def _l1_grad(g: Tensor, d: Tensor, q: Tensor, k: Tensor, p: float) -> Tensor:
    return _signed(g, q, k)


def _l2_weight(g: Tensor, d: Tensor) -> Tensor:
    return torch.where(d > 0, g / torch.where(d > 0, d, 1.0), 0.0)


def _chebyshev_grad(g: Tensor, d: Tensor, q: Tensor, k: Tensor, p: float) -> Tensor:
    x = q - k
    return torch.where(x.abs() == d, _signed(g, q, k), 0.0)  # every coordinate at the max


def _lp_grad(g: Tensor, d: Tensor, q: Tensor, k: Tensor, p: float) -> Tensor:
    x = q - k
    ratio = torch.where(d > 0, x.abs() / torch.where(d > 0, d, 1.0), 1.0)
    return _signed(g * ratio.pow(p - 1.0), q, k)  # sign(x) · (|x| / d)^(p−1)


# --------------------------------------------------------------------------------------------
# the entries
#
# default λ: chosen so that the score spread at initialisation is sensible. "Spread" is the
# standard deviation of one query's scores across keys for unit-normal q and k (the softmax
# sees only differences along a row); `benchmarks/attention.py --spread` measures it. It
# matters: log λ moves only 0.2–0.4 in a 2000-step run. TruthGPTModel scales the λ of the
# kinds with `linear_in_scale` by √(128 / hidden_size) (`truthgpt.nn.model.initial_lambda`).

# dot: 1/√D, the standard transformer scale; spread ≈ 1.
_builtin(
    DistanceKind(
        "dot",
        _dot,
        lambda D: 1.0 / math.sqrt(D),
        aliases=("dot_product",),
        as_dot_product=_dot_as_dot,
    )
)
# cosine: √D; √D·cos(q, k) is dot attention at 1/√D on q, k RMS-normalised (norm √D); ≈ 1.
_builtin(DistanceKind("cosine", _cosine, math.sqrt, as_dot_product=_cosine_as_dot))
# l1: 2/√D, best measured on char-level Shakespeare (1/√D and 4/√D worse, 1/D far too soft);
# spread ≈ 1.5.
_builtin(
    DistanceKind(
        "l1",
        _l1,
        lambda D: 2.0 / math.sqrt(D),
        aliases=("manhattan",),
        kernel=MinkowskiKernel(
            1.0, _sum_reduce, pair_grad=_l1_grad, native_code=KERNEL_CODES["l1"]
        ),
        linear_in_scale=True,
    )
)
# l2: 2; the spread of ‖q−k‖ is ≈ 0.86 for any D, so this gives ≈ 1.7.
_builtin(
    DistanceKind(
        "l2",
        _l2,
        lambda D: 2.0,
        aliases=("euclidean",),
        kernel=MinkowskiKernel(
            2.0, _root_sum_square_reduce, linear_grad=_l2_weight, native_code=KERNEL_CODES["l2"]
        ),
        linear_in_scale=True,
    )
)
# sql2: 1/(2√D); −λ‖q−k‖² = 2λ·q·k − λ‖k‖² + (row constant): dot's scale on q·k, and the ‖k‖²
# term lifts the spread to ≈ 1.2.
_builtin(
    DistanceKind(
        "sql2",
        _sql2,
        lambda D: 0.5 / math.sqrt(D),
        aliases=("squared_l2", "sq_l2"),
        as_dot_product=_sql2_as_dot,
    )
)
# chebyshev: 3; the spread of max|q−k| is 0.53–0.63 for D in 16–128, so this gives ≈ 1.7.
_builtin(
    DistanceKind(
        "chebyshev",
        _chebyshev,
        lambda D: 3.0,
        aliases=("linf",),
        kernel=MinkowskiKernel(
            math.inf, _max_reduce, pair_grad=_chebyshev_grad, native_code=KERNEL_CODES["chebyshev"]
        ),
        linear_in_scale=True,
    )
)


# lp: 2·D^(1/2−1/p) for p ≤ 2, 3 − 2/p above: l1's value at p=1, l2's at p=2, tending to
# chebyshev's as p→∞; spread 1.0–1.9 for p in [0.5, ∞), D ≤ 128.
def _lp_lambda(D: int, p: float) -> float:
    return 2.0 * D ** (0.5 - 1.0 / p) if p <= 2 else 3.0 - 2.0 / p


_builtin(
    DistanceKind(
        "lp",
        _lp,
        _lp_lambda,
        takes_p=True,
        same_as=((1.0, "l1"), (2.0, "l2")),
        kernel=MinkowskiKernel(
            None, _power_reduce, pair_grad=_lp_grad, native_code=KERNEL_CODES["lp"]
        ),
        linear_in_scale=True,
    )
)
