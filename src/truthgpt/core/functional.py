"""Distance attention as a function: scores from distances between queries and keys.

    score(i, j) = -scale_h · d(q_i, k_j)      (l1, l2, sql2, chebyshev, lp, registered kinds)
    score(i, j) = +scale_h · sim(q_i, k_j)    (dot, cosine: d = −sim)

then an optional ALiBi position term −m_h·|i − j| (`alibi_slopes`), the causal mask, an
optional user mask, softmax over keys, dropout and weights @ v. The
kind (`truthgpt.nn.attention.kinds`) gives d and the path that computes the attention:

* the plain path (`_plain_attention`) materialises the (B, H, Tq, Tk) score matrix from the
  kind's `distance`. It is the readable definition, the one used when the caller asks for the
  attention weights, and the only one for kinds added with `register_distance`.
* the fast paths: kinds with `as_dot_product` (dot, cosine, squared L2) become one call to
  `F.scaled_dot_product_attention` (cosine on normalised q, k; squared L2 on q, k augmented
  by one column, exactly); kinds with a `MinkowskiKernel` (l1, l2, chebyshev, lp) run a
  flash-style kernel with an online softmax that never holds the weights, dropout included:
  the native C++ kernel, the Triton kernels on CUDA or the blocked PyTorch one, compiled or
  eager, registered by `truthgpt.nn.attention.backends`.

Every path is a backend in one registry (as Hugging Face's `AttentionInterface`): one
function `run(q, k, v, call)`, where `call` is an `AttentionCall` checked once by
`attention_call`. This module registers the two that need nothing but torch, "plain" and
"sdpa", and imports no kernel: the model runs wherever torch does, and the kernels join the
registry when `truthgpt.nn.attention` is imported.

Fully masked query rows (possible only with a user mask, never with the causal mask alone
since key i is always visible to query i) give a zero output row, zero weights and zero
gradients instead of NaN, on every path.
"""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

from .kinds import DistanceKind, FastPath
from .kinds import get as get_kind
from .kinds import names as kind_names

BACKEND_ENV = "TRUTHGPT_ATTENTION_BACKEND"
SEED_RANGE = 2**62  # dropout seeds are drawn in [0, SEED_RANGE) for every kernel


# --------------------------------------------------------------------------------------------
# one call, checked once


@dataclasses.dataclass(frozen=True)
class AttentionCall:
    """What every backend receives besides q, k and v: the settings of one attention call,
    checked once (by `attention_call`, or by the layer that built them from checked values).

    kind: the resolved registry entry (never a name: no lookups below this point).
    scale: λ, a float or a (H,) tensor (gradients flow to it).
    causal: key j is visible to query i iff j <= i + Tk − Tq (queries are the last Tq).
    attn_mask: boolean keep-mask or additive float mask, broadcastable to (B, H, Tq, Tk).
    p: the exponent of kinds that take one (lp), else None.
    dropout_p: dropout on the attention weights (applied whenever > 0).
    seed: the dropout seed of the kernels; None draws one (`dropout_seed`).
    alibi: ALiBi slopes m, a (H,) float32 tensor ≥ 0, or None: −m_h·|i − j| is added to
        the scores, with i the query's position among the keys (i + Tk − Tq). A distance in
        positions beside the distance in features; kernels compute it from (i, j).
    """

    kind: DistanceKind
    scale: float | Tensor
    causal: bool = True
    attn_mask: Tensor | None = None
    p: float | None = None
    dropout_p: float = 0.0
    seed: int | None = None
    alibi: Tensor | None = None

    def dropout_seed(self) -> int:
        """The seed of this call's dropout mask: the one given, else one drawn from torch's
        global generator, so torch.manual_seed makes runs reproducible. Drawn only by the
        kernels that need one, so the plain path's random stream is unchanged."""
        if self.seed is not None:
            return self.seed
        return int(torch.randint(0, SEED_RANGE, ()).item())

    def simplified(self) -> AttentionCall:
        """The same call on a faster kind where the math is the same (lp at p = 1 and 2)."""
        for value, other in self.kind.same_as:
            if self.p == value:
                return dataclasses.replace(self, kind=get_kind(other), p=None)
        return self


def check_p(p: object, kind: DistanceKind) -> float | None:
    """The exponent as a float for a kind that takes one (finite, > 0), else None. The one
    rule for p below the config (which also bounds it: see `truthgpt.config.MAX_P_NORM`)."""
    if not kind.takes_p:
        return None
    if p is None:
        raise ValueError(f"p is required for kind={kind.name!r} (a finite number > 0)")
    if isinstance(p, bool) or not isinstance(p, (int, float)):
        raise ValueError(f"p must be a finite number > 0, got {type(p).__name__}")
    if not (math.isfinite(p) and p > 0):
        raise ValueError(f"p must be a finite number > 0 (use kind='chebyshev' for p=inf), got {p}")
    return float(p)


def check_dropout(dropout_p: object, name: str = "dropout_p") -> float:
    """A dropout probability as a float in [0, 1), else ValueError naming `name`."""
    if isinstance(dropout_p, bool) or not isinstance(dropout_p, (int, float)):
        raise ValueError(f"{name} must be a float in [0, 1), got {type(dropout_p).__name__}")
    if not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {dropout_p}")
    return float(dropout_p)


def _check_tensors(q: Tensor, k: Tensor, v: Tensor, causal: bool) -> None:
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


def _check_scale(scale: object, q: Tensor) -> None:
    H = q.shape[1]
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


def check_mask(attn_mask: object, q: Tensor, Tk: int) -> None:
    """attn_mask is None, or a boolean or floating tensor on q's device that broadcasts to
    (B, H, Tq, Tk)."""
    if attn_mask is None:
        return
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
    B, H, Tq, _ = q.shape
    try:
        shape = torch.broadcast_shapes(attn_mask.shape, (B, H, Tq, Tk))
    except RuntimeError:
        shape = None
    if shape != (B, H, Tq, Tk):
        raise ValueError(
            f"attn_mask must broadcast to (B, H, Tq, Tk)=({B}, {H}, {Tq}, {Tk}), "
            f"got shape {tuple(attn_mask.shape)}"
        )


def alibi_slopes(num_heads: int, device: torch.device | str | None = None) -> Tensor:
    """ALiBi's slopes for `num_heads` heads, (H,) float32: the geometric sequence 2^(−8h/H),
    h = 1..H, for a power of two; otherwise those of the power of two below, then every
    other slope of the power of two above (Press et al., 2022). Fixed, never learned: each
    head gets its own reach, from nearly local (m = 1/2) to nearly global (m = 2^−8)."""
    if isinstance(num_heads, bool) or not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")

    def geometric(n: int) -> list[float]:
        start = 2.0 ** (-8.0 / n)
        return [start ** (h + 1) for h in range(n)]

    below = 2 ** math.floor(math.log2(num_heads))
    slopes = geometric(below) + geometric(2 * below)[0::2][: num_heads - below]
    return torch.tensor(slopes, dtype=torch.float32, device=device)


def check_alibi(alibi: object, q: Tensor) -> None:
    """alibi is None, or (H,) floating slopes on q's device, finite and ≥ 0 (values read on
    CPU only, as for λ)."""
    if alibi is None:
        return
    H = q.shape[1]
    if not isinstance(alibi, Tensor) or not alibi.is_floating_point() or alibi.shape != (H,):
        shape = tuple(alibi.shape) if isinstance(alibi, Tensor) else type(alibi).__name__
        raise ValueError(
            f"alibi must be None or a floating tensor of shape (H,)=({H},), got {shape}"
        )
    if alibi.device != q.device:
        raise ValueError(f"alibi must be on the device of q ({q.device}), got {alibi.device}")
    on_host = alibi.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_host and not bool((torch.isfinite(alibi) & (alibi >= 0)).all()):
        raise ValueError(f"alibi slopes must be finite and >= 0, got {alibi.tolist()}")


def alibi_bias(alibi: Tensor, Tq: int, Tk: int, dtype: torch.dtype) -> Tensor:
    """(H, Tq, Tk) position term −m_h·|i + Tk − Tq − j|: the definition every kernel's
    in-place computation is tested against (never built by the kernels themselves)."""
    i = torch.arange(Tk - Tq, Tk, device=alibi.device, dtype=torch.float64).unsqueeze(1)
    j = torch.arange(Tk, device=alibi.device, dtype=torch.float64).unsqueeze(0)
    return (-alibi.double().view(-1, 1, 1) * (i - j).abs()).to(dtype)


def attention_call(
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
    seed: int | None = None,
    alibi: Tensor | None = None,
) -> AttentionCall:
    """Check every argument of an attention call, once, and resolve the kind: raises
    ValueError naming the offending argument and what would be valid."""
    spec = get_kind(kind)
    _check_tensors(q, k, v, causal)
    _check_scale(scale, q)
    check_mask(attn_mask, q, k.shape[2])
    check_alibi(alibi, q)
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise ValueError(f"seed must be an int or None, got {type(seed).__name__}")
    return AttentionCall(
        spec,
        scale,
        bool(causal),
        attn_mask,
        check_p(p, spec),
        check_dropout(dropout_p),
        seed,
        alibi,
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
        user = _user_additive(attn_mask, dtype)
        bias = user if bias is None else bias + user
    return bias


def _user_additive(attn_mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A user mask as additive floats: boolean False → −inf, floats as they are."""
    if attn_mask.dtype == torch.bool:
        return torch.zeros(attn_mask.shape, dtype=dtype, device=attn_mask.device).masked_fill(
            ~attn_mask, -math.inf
        )
    return attn_mask.to(dtype)


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
    return -_head_scale(scale) * get_kind(kind).pairwise(q, k, p)


def _masked_softmax(scores: Tensor, bias: Tensor | None) -> Tensor:
    """Softmax over keys; rows with every key masked become zeros instead of NaN."""
    if bias is None:
        return torch.softmax(scores, dim=-1)
    scores = scores + bias
    dead = torch.isneginf(scores).all(dim=-1, keepdim=True)
    weights = torch.softmax(scores.masked_fill(dead, 0.0), dim=-1)
    return weights.masked_fill(dead, 0.0)


def _plain_attention(q, k, v, kind, scale, causal, attn_mask, p, dropout_p, alibi=None):
    """Materialising path: returns (output, weights); weights are after dropout. It computes
    in q's dtype: a λ kept in fp32 (as the layer keeps it, so that small updates of λ are
    not rounded away for the kernels that take it so) is rounded here."""
    if isinstance(scale, Tensor):
        scale = scale.to(q.dtype)
    Tq, Tk = q.shape[2], k.shape[2]
    scores = pairwise_scores(q, k, kind, scale, p)  # (B, H, Tq, Tk)
    if alibi is not None:
        scores = scores + alibi_bias(alibi, Tq, Tk, scores.dtype)
    bias = _additive_mask(Tq, Tk, causal, attn_mask, scores.dtype, q.device)
    weights = _masked_softmax(scores, bias)
    if dropout_p > 0.0:
        weights = F.dropout(weights, p=dropout_p, training=True)
    return weights @ v, weights  # (B, H, Tq, D)


# --------------------------------------------------------------------------------------------
# backends

Run = Callable[[Tensor, Tensor, Tensor, AttentionCall], Tensor]


@dataclasses.dataclass(frozen=True)
class AttentionBackend:
    """One way to compute attention, registered by name.

    run: (q, k, v, call) -> output (B, H, Tq, D); the call is checked, its kind one this
        backend serves.
    serves: the kinds' paths it computes ("plain" computes every kind).
    supports: whether `auto` may take it for these tensors and this kind (device, dtype).
    unavailable: why it cannot run in this process (not built, not installed), or None.
    device_type: the device it is `auto`'s first choice on: when it is unavailable there,
        `auto` warns once (its reason and `hint`) and takes the next one.
    auto: whether `auto` considers it at all, in registration order.
    """

    name: str
    run: Run
    serves: tuple[FastPath, ...]
    supports: Callable[[Tensor, DistanceKind], bool] = lambda q, kind: True
    unavailable: Callable[[], str | None] = lambda: None
    device_type: str | None = None
    hint: str = ""
    auto: bool = True


_BACKENDS: dict[str, AttentionBackend] = {}
_warned: set[str] = set()


def register_backend(backend: AttentionBackend) -> AttentionBackend:
    """Add (or replace) a backend; `backend=` and TRUTHGPT_ATTENTION_BACKEND then accept its
    name, and `auto` considers it after the ones registered before it."""
    if not isinstance(backend, AttentionBackend):
        raise ValueError(f"backend must be an AttentionBackend, got {type(backend).__name__}")
    if backend.name == "auto":
        raise ValueError("'auto' is not a backend's name: it chooses among them")
    _BACKENDS[backend.name] = backend
    return backend


def backend_names() -> tuple[str, ...]:
    """What `backend=` accepts: "auto" and every registered backend."""
    return ("auto", *_BACKENDS)


def get_backend(name: str) -> AttentionBackend:
    """The registered backend called `name` (ValueError listing them otherwise)."""
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {backend_names()}, got {name!r}")
    return _BACKENDS[name]


def plain_attention(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> tuple[Tensor, Tensor]:
    """The readable definition of a call: (output, weights after dropout)."""
    return _plain_attention(
        q, k, v, call.kind, call.scale, call.causal, call.attn_mask, call.p, call.dropout_p,
        call.alibi,
    )  # fmt: skip


def run_plain(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    return plain_attention(q, k, v, call)[0]


def _sdpa(
    q: Tensor, k: Tensor, v: Tensor, scale: float | Tensor, causal, attn_mask, dropout_p, alibi=None
):
    """SDPA with our causal rule (bottom-right), per-head scale and NaN-free dead rows. ALiBi
    goes in as an additive (H, Tq, Tk) mask: SDPA has no position term of its own."""
    if isinstance(scale, Tensor):
        q = q * scale.view(1, -1, 1, 1).to(q.dtype)  # fold the per-head scale into q
        scale = 1.0
    Tq, Tk = q.shape[2], k.shape[2]
    if alibi is not None:
        position = alibi_bias(alibi, Tq, Tk, q.dtype)
        attn_mask = position if attn_mask is None else _user_additive(attn_mask, q.dtype) + position
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


def _sdpa_run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
    """A kind with `as_dot_product`: SDPA on the rewritten q, k, v and scale."""
    D = v.shape[-1]
    q, k, v, scale = call.kind.as_dot_product(q, k, v, call.scale)
    out = _sdpa(q, k, v, scale, call.causal, call.attn_mask, call.dropout_p, call.alibi)
    return out if out.shape[-1] == D else out[..., :D]  # drop the columns added to v


register_backend(AttentionBackend("plain", run_plain, ("plain", "sdpa", "blocked"), auto=False))
register_backend(AttentionBackend("sdpa", _sdpa_run, ("sdpa",), auto=False))


def _backend_name(backend: str | None) -> str:
    """The backend asked for (argument, else TRUTHGPT_ATTENTION_BACKEND, else auto), checked."""
    name = backend if backend is not None else os.environ.get(BACKEND_ENV, "auto")
    if name != "auto" and name not in _BACKENDS:
        source = "backend" if backend is not None else BACKEND_ENV
        raise ValueError(f"{source} must be one of {backend_names()}, got {name!r}")
    return name


def resolve_backend(backend: str | None, q: Tensor, kind: str | DistanceKind | None = None) -> str:
    """The backend that will run for q and kind: the one asked for when it serves the kind's
    path, else (and for "auto") the path's own: "plain" or "sdpa", or for the kernel kinds
    auto's first registered backend that supports the tensors, and "plain" where no kernel
    is registered (the core without `truthgpt.nn.attention`, as an exported model runs).

    auto skips a backend that is unavailable on its own device with one warning naming what
    is missing (the native kernel on CPU, triton on CUDA); a backend asked for by name runs as
    it is (and raises if it cannot).
    """
    name = _backend_name(backend)
    spec = get_kind(kind) if kind is not None else None
    path: FastPath = spec.fast_path if spec is not None else "blocked"
    if name != "auto":
        chosen = _BACKENDS[name]
        if path in chosen.serves:
            return name
        if path == "blocked":
            raise ValueError(
                f"backend {name!r} computes the kinds {', '.join(_served_by(chosen))}, "
                f"not {spec.name if spec else 'these'!r}"
            )
    if path != "blocked":
        return path  # dot, cosine, sql2 on SDPA; registered kinds on the plain path
    for candidate in _BACKENDS.values():
        if not candidate.auto or "blocked" not in candidate.serves:
            continue
        reason = candidate.unavailable()
        if reason is None and candidate.supports(q, spec):
            return candidate.name
        if reason is not None and candidate.device_type == q.device.type:
            _warn_once(candidate, reason)
    return "plain"  # no kernel registered (the core alone, as in an exported model)


def _served_by(backend: AttentionBackend) -> list[str]:
    return [n for n in kind_names() if get_kind(n).fast_path in backend.serves]


def _warn_once(backend: AttentionBackend, reason: str) -> None:
    if backend.name in _warned:
        return
    _warned.add(backend.name)
    warnings.warn(f"truthgpt: {reason}; {backend.hint}", RuntimeWarning, stacklevel=4)


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
    alibi: Tensor | None = None,
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
        backend: a registered backend (`backend_names()`); None reads
            TRUTHGPT_ATTENTION_BACKEND (default "auto": native on CPU, triton on CUDA, else
            compiled). It chooses the kernel of the kinds with a `MinkowskiKernel` (l1, l2,
            chebyshev, lp); "plain" computes any kind the readable way. "triton" needs CUDA
            tensors (or TRITON_INTERPRET=1, which runs its kernels in Triton's interpreter).
        alibi: (H,) slopes m ≥ 0 (`alibi_slopes(H)` for the standard ones), or None: adds
            −m_h·|i + Tk − Tq − j| to the scores, computed inside the kernels.

    Returns:
        output (B, H, Tq, D), or (output, weights) when need_weights.
    """
    call = attention_call(
        q, k, v, kind, scale, causal=causal, attn_mask=attn_mask, p=p, dropout_p=dropout_p,
        alibi=alibi,
    )  # fmt: skip
    name = _backend_name(backend)  # checked for every kind, used by the kernel ones
    call = call.simplified()
    if need_weights:
        return plain_attention(q, k, v, call)
    return attend(q, k, v, call, name)


def attend(
    q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, backend: str | None = None
) -> Tensor:
    """Run a checked call on its backend (`resolve_backend`): the step after the checks,
    for callers that built `call` from values they checked once (the attention layer)."""
    return _BACKENDS[resolve_backend(backend, q, call.kind)].run(q, k, v, call)


def attend_layer(
    q: Tensor, k: Tensor, v: Tensor, call: AttentionCall, need_weights: bool = False
) -> tuple[Tensor, Tensor | None]:
    """(output, weights or None) of a call whose settings an attention layer checked when it
    was built (λ, p, dropout): only the mask, which comes with each call, is checked here.
    The weights, when wanted, come from the plain path; otherwise the call's backend runs."""
    check_mask(call.attn_mask, q, k.shape[2])
    call = call.simplified()
    if need_weights:
        return plain_attention(q, k, v, call)
    return attend(q, k, v, call), None
