"""DistanceAttention: the multi-head self-attention layer with a learnable λ per head."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .cache import LayerCache
from .config import LAMBDA_MAX, LAMBDA_MIN, QK_NORMS, ConfigError
from .functional import AttentionCall, alibi_slopes, attend_layer, check_dropout, check_p
from .kinds import DistanceKind
from .kinds import get as get_kind
from .positions import apply_rotary

# λ lives in log space and is clamped to [LAMBDA_MIN, LAMBDA_MAX] (truthgpt.config, which
# checks a config's lambda_param against it) when used: wide enough for every kind's default
# (cosine at √D for D up to 10^6, l1 at 2/√D for D up to 4·10^6), narrow enough that a runaway
# head cannot give fully one-hot (λ huge) or uniform (λ tiny) attention.


def default_lambda(kind: str | DistanceKind, head_dim: int, *, p: float | None = None) -> float:
    """Initial λ for a kind, chosen so the score spread at initialisation is sensible.

    "Spread" is the standard deviation of the scores of one query across keys, for unit-normal
    q and k (the softmax only sees differences along a row); dot at 1/√D has spread ≈ 1. It
    matters: log λ moves only 0.2–0.4 in a 2000-step run. Each kind's value, and why, is its
    `default_lambda` entry in `truthgpt.nn.attention.kinds` (dot 1/√D, sql2 1/(2√D), cosine
    √D, l1 2/√D, l2 2, chebyshev 3; lp meets l1 at p=1, l2 at p=2 and tends to chebyshev);
    the spreads come from `benchmarks/attention.py --spread`.
    """
    spec = get_kind(kind)
    if isinstance(head_dim, bool) or not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return spec.lambda_for(head_dim, check_p(p, spec))


def distance_kind(distance_type: str) -> DistanceKind:
    """The registered kind a config's or layer's `distance_type` names (aliases resolved).

    Raises ConfigError starting with "distance_type:" that names it and lists the registered
    kinds: the config layer cannot check the name itself, since kinds live above it.
    """
    try:
        return get_kind(distance_type)
    except ValueError as err:
        raise ConfigError(
            f"distance_type: {err} (register_distance adds a kind in this process)"
        ) from None


class AttentionOutput(NamedTuple):
    """What DistanceAttention.forward returns."""

    output: Tensor  # (B, T, C)
    # (k, v), each (B, H, Tk, D), when use_cache; the LayerCache itself when one was given.
    past_key_value: tuple[Tensor, Tensor] | LayerCache | None
    weights: Tensor | None  # (B, H, T, Tk), when need_weights


class DistanceAttention(nn.Module):
    """Causal multi-head self-attention with scores -λ_h·d(q_i, k_j) (or +λ_h·sim).

    Args:
        hidden_size: C, the model width; must divide by num_heads.
        num_heads: H; each head has D = C / H dimensions.
        distance_type: a registered kind or alias (`kinds.names()`); stored as the kind's name.
        lambda_init: initial λ for every head; None takes `default_lambda`.
        learnable_lambda: whether λ is trained (it is a Parameter either way, so checkpoints
            of both settings have the same layout).
        p: the exponent for distance_type='lp'.
        dropout: dropout on the attention weights, in training only.
        bias: biases in the q/k/v and output projections.
        qk_norm: "none", "rms" or "layer": normalise every head's queries and keys over
            their D dimensions before the distance, so that distances (and so how sharp
            attention is at a given λ) do not drift with the scale the projections learn.
        qk_norm_gain: with qk_norm, a learned gain per dimension for q and one for k.
        alibi: add ALiBi's −m_h·|i − j| to every head's scores, with the standard slopes
            (`alibi_slopes`): a second distance, in positions, beside the one in features.
    """

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        distance_type: str,
        lambda_init: float | None = None,
        learnable_lambda: bool = True,
        p: float | None = None,
        dropout: float = 0.0,
        bias: bool = True,
        qk_norm: str = "none",
        qk_norm_gain: bool = False,
        alibi: bool = False,
    ) -> None:
        super().__init__()
        for name, val in (("hidden_size", hidden_size), ("num_heads", num_heads)):
            if isinstance(val, bool) or not isinstance(val, int) or val < 1:
                raise ValueError(f"{name} must be a positive int, got {val!r}")
        if hidden_size % num_heads != 0:
            raise ValueError(
                f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})"
            )
        kind = distance_kind(distance_type)
        if qk_norm not in QK_NORMS:
            raise ValueError(f"qk_norm must be one of {', '.join(QK_NORMS)}, got {qk_norm!r}")
        self.qk_norm = qk_norm
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        # Resolved and checked once here: forward builds its call without a registry lookup.
        self.kind = kind
        self.distance_type = kind.name
        self.p = check_p(p, kind)
        self.dropout = check_dropout(dropout, "dropout")

        if lambda_init is None:
            lambda_init = default_lambda(kind, self.head_dim, p=self.p)
        if isinstance(lambda_init, bool) or not isinstance(lambda_init, (int, float)):
            raise ValueError(f"lambda_init must be a positive float or None, got {lambda_init!r}")
        if not LAMBDA_MIN <= lambda_init <= LAMBDA_MAX:
            raise ValueError(
                f"lambda_init must be in [{LAMBDA_MIN}, {LAMBDA_MAX}], got {lambda_init}"
            )

        self.c_attn = nn.Linear(hidden_size, 3 * hidden_size, bias=bias)  # q, k, v for all heads
        self.c_proj = nn.Linear(hidden_size, hidden_size, bias=bias)
        self.log_lambda = nn.Parameter(
            torch.full((num_heads,), math.log(lambda_init)), requires_grad=learnable_lambda
        )
        gain = qk_norm != "none" and qk_norm_gain
        self.q_gain = nn.Parameter(torch.ones(self.head_dim)) if gain else None
        self.k_gain = nn.Parameter(torch.ones(self.head_dim)) if gain else None
        # Fixed slopes, neither a parameter nor a buffer: nothing about positions is saved,
        # and a model built on the meta device (as loaders do) needs no step to fill them in.
        # Moved to the input's device on first use, then kept there.
        self._alibi = alibi_slopes(num_heads, device="cpu") if alibi else None

    def project(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """q, k, v (B, H, T, D) of x (B, T, C): the heads the scores are computed from, q and
        k normalised over D when qk_norm is set (before any cache: cached keys are too)."""
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = (t.view(B, T, H, D).transpose(1, 2) for t in self.c_attn(x).split(C, dim=2))
        if self.qk_norm != "none":  # unit RMS, or zero mean and unit variance, times the gain
            norm = F.rms_norm if self.qk_norm == "rms" else F.layer_norm
            q = norm(q, (D,), self.q_gain, eps=1e-6)
            k = norm(k, (D,), self.k_gain, eps=1e-6)
        return q, k, v

    @property
    def lambda_(self) -> Tensor:
        """Effective λ per head, (H,): exp(log_lambda) clamped to [LAMBDA_MIN, LAMBDA_MAX]."""
        return self.log_lambda.exp().clamp(LAMBDA_MIN, LAMBDA_MAX)

    def forward(
        self,
        x: Tensor,
        *,
        past_key_value: tuple[Tensor, Tensor] | LayerCache | None = None,
        use_cache: bool = False,
        attn_mask: Tensor | None = None,
        need_weights: bool = False,
        rope: tuple[Tensor, Tensor] | None = None,
    ) -> AttentionOutput:
        """x: (B, T, C). With past_key_value the T new positions follow the cached ones: a
        (k, v) tuple is extended into a new one, a `LayerCache` in place. rope: the new
        positions' (cos, sin) from `RotaryEmbedding`; q and k are rotated before the cache,
        so cached keys keep their own positions."""
        if x.dim() != 3 or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have shape (B, T, {self.hidden_size}), got {tuple(x.shape)}")
        B, T, C = x.shape
        H, D = self.num_heads, self.head_dim
        q, k, v = self.project(x)
        if rope is not None:
            q, k = apply_rotary(q, rope), apply_rotary(k, rope)
        present: tuple[Tensor, Tensor] | LayerCache
        if isinstance(past_key_value, LayerCache):
            k, v = past_key_value.append(k, v)
            present = past_key_value
        elif past_key_value is not None:
            past_k, past_v = _check_past(past_key_value, B, H, D, x)
            k = torch.cat([past_k, k], dim=2)  # (B, H, Tk, D)
            v = torch.cat([past_v, v], dim=2)
            present = (k, v)
        else:
            present = (k, v)
        dropout = self.dropout if self.training else 0.0
        slopes = self._alibi_on(q.device)
        call = AttentionCall(
            self.kind, self.lambda_, True, attn_mask, self.p, dropout, alibi=slopes
        )
        y, weights = attend_layer(q, k, v, call, need_weights)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads
        return AttentionOutput(
            output=self.c_proj(y),
            past_key_value=present if use_cache else None,
            weights=weights,
        )

    def _alibi_on(self, device: torch.device) -> Tensor | None:
        if self._alibi is not None and self._alibi.device != device:
            self._alibi = self._alibi.to(device)
        return self._alibi

    def extra_repr(self) -> str:
        p = f", p={self.p}" if self.p is not None else ""
        return (
            f"hidden_size={self.hidden_size}, num_heads={self.num_heads}, "
            f"distance_type={self.distance_type!r}{p}, dropout={self.dropout}"
            + (f", qk_norm={self.qk_norm!r}" if self.qk_norm != "none" else "")
            + (", alibi=True" if self._alibi is not None else "")
        )


def _check_past(past: tuple[Tensor, Tensor], B: int, H: int, D: int, x: Tensor):
    if not (isinstance(past, (tuple, list)) and len(past) == 2):
        raise ValueError("past_key_value must be a (k, v) tuple of tensors (B, H, T_past, D)")
    past_k, past_v = past
    for name, t in (("past_key_value[0]", past_k), ("past_key_value[1]", past_v)):
        if (
            not isinstance(t, Tensor)
            or t.dim() != 4
            or t.shape[0] != B
            or t.shape[1] != H
            or (t.shape[3] != D)
        ):
            shape = tuple(t.shape) if isinstance(t, Tensor) else type(t).__name__
            raise ValueError(f"{name} must have shape (B={B}, H={H}, T_past, D={D}), got {shape}")
        if t.dtype != x.dtype or t.device != x.device:
            raise ValueError(
                f"{name} must have dtype {x.dtype} on {x.device}, got {t.dtype} on {t.device}"
            )
    if past_k.shape != past_v.shape:
        raise ValueError(
            f"past_key_value k and v must have the same shape, got {tuple(past_k.shape)} "
            f"and {tuple(past_v.shape)}"
        )
    return past_k, past_v
