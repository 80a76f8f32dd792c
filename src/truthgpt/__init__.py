"""truthgpt: GPT-style language models with distance-based attention.

score(i, j) = -λ_h · d(q_i, k_j) for d in L1, L2, squared L2, Chebyshev, Lp, plus cosine and
the dot-product baseline, causal and multi-head, with a learnable positive λ per head.
"""

__version__ = "0.1.0"

from truthgpt.attention import DistanceAttention, distance_attention
from truthgpt.config import (
    ConfigError,
    TrainConfig,
    TruthGPTConfig,
    TruthGPTOptimizationCoreConfig,
)
from truthgpt.model import CausalLMOutput, TruthGPTModel
from truthgpt.training import TruthGPTOptimizationCore

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
]
