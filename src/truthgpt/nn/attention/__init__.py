"""Distance attention: the kinds (`kinds`), the math (`distance_attention`) and the layer
(`DistanceAttention`).

`kinds` is the registry of distance kinds, which everything else reads; `register_distance`
adds one. `distance_attention(q, k, v, kind, scale)` knows nothing about layers;
`DistanceAttention` owns the projections, the per-head λ and the KV cache.
"""

from truthgpt.core import kinds
from truthgpt.core.functional import (
    AttentionBackend,
    AttentionCall,
    distance_attention,
    register_backend,
)
from truthgpt.core.kinds import DistanceKind, register_distance
from truthgpt.core.module import (
    LAMBDA_MAX,
    LAMBDA_MIN,
    AttentionOutput,
    DistanceAttention,
    default_lambda,
)
from truthgpt.nn.attention import backends  # the kernels join the registry

__all__ = [
    "LAMBDA_MAX",
    "LAMBDA_MIN",
    "AttentionBackend",
    "AttentionCall",
    "AttentionOutput",
    "DistanceAttention",
    "DistanceKind",
    "backends",
    "default_lambda",
    "distance_attention",
    "kinds",
    "register_backend",
    "register_distance",
]
