"""Deprecated: release 0.1's attention package, now `truthgpt.nn.attention`.

Its modules (`functional`, `module`, `kernels`, `native`) are the new ones under their old
names, so `from truthgpt.attention.functional import distance_attention` still works.
"""

import sys

from truthgpt._moved import warn_moved

warn_moved("truthgpt.attention", "truthgpt.nn.attention")

from truthgpt.nn.attention import (  # noqa: E402
    LAMBDA_MAX,
    LAMBDA_MIN,
    AttentionOutput,
    DistanceAttention,
    default_lambda,
    distance_attention,
    functional,
    kernels,
    kinds,
    module,
    native,
)

for _module in (functional, kernels, module, native):
    sys.modules[f"{__name__}.{_module.__name__.rsplit('.', 1)[1]}"] = _module

# 0.1's tuple of kind names; the registry (`truthgpt.nn.attention.kinds`) holds them now.
DISTANCE_KINDS = tuple(kinds.builtin_names())

__all__ = [
    "DISTANCE_KINDS",
    "LAMBDA_MAX",
    "LAMBDA_MIN",
    "AttentionOutput",
    "DistanceAttention",
    "default_lambda",
    "distance_attention",
]
