"""truthgpt: GPT-style language models with distance-based attention.

score(i, j) = -λ_h · d(q_i, k_j) for d in L1, L2, squared L2, Chebyshev, Lp, plus cosine and
the dot-product baseline, causal and multi-head, with a learnable positive λ per head.

The names below load on first use, so `import truthgpt.config` or `import truthgpt.nn`
loads only what it needs (not the trainer).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.2.0"

_EXPORTS = {
    "ConfigError": "truthgpt.config",
    "TrainConfig": "truthgpt.config",
    "TruthGPTConfig": "truthgpt.config",
    "TruthGPTOptimizationCoreConfig": "truthgpt.config",
    "DistanceAttention": "truthgpt.nn.attention",
    "distance_attention": "truthgpt.nn.attention",
    "register_distance": "truthgpt.nn.attention",
    "CausalLMOutput": "truthgpt.nn.model",
    "TruthGPTModel": "truthgpt.nn.model",
    "TruthGPTOptimizationCore": "truthgpt.training",
}

__all__ = [
    "CausalLMOutput",
    "ConfigError",
    "DistanceAttention",
    "TrainConfig",
    "TruthGPTConfig",
    "TruthGPTModel",
    "TruthGPTOptimizationCore",
    "TruthGPTOptimizationCoreConfig",
    "__version__",
    "distance_attention",
    "register_distance",
]

if TYPE_CHECKING:
    from truthgpt.config import (
        ConfigError,
        TrainConfig,
        TruthGPTConfig,
        TruthGPTOptimizationCoreConfig,
    )
    from truthgpt.nn.attention import DistanceAttention, distance_attention, register_distance
    from truthgpt.nn.model import CausalLMOutput, TruthGPTModel
    from truthgpt.training import TruthGPTOptimizationCore


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'truthgpt' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
