"""Distance attention: the math (`distance_attention`) and the layer (`DistanceAttention`).

`distance_attention(q, k, v, kind, scale)` knows nothing about layers; `DistanceAttention`
owns the projections, the per-head λ and the KV cache.
"""

from truthgpt.nn.attention.functional import DISTANCE_KINDS, distance_attention
from truthgpt.nn.attention.module import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    AttentionOutput,
    DistanceAttention,
    default_lambda,
)

__all__ = [
    "DISTANCE_KINDS",
    "LAMBDA_MAX",
    "LAMBDA_MIN",
    "AttentionOutput",
    "DistanceAttention",
    "default_lambda",
    "distance_attention",
]
