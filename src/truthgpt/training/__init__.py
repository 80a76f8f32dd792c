"""Training: the optimization core, the loop, monitoring."""

from truthgpt.training.core import TrainingDiverged, TruthGPTOptimizationCore, lr_at
from truthgpt.training.loop import World, build_config, parse_overrides, train
from truthgpt.training.monitoring import Monitor

__all__ = [
    "Monitor",
    "TrainingDiverged",
    "TruthGPTOptimizationCore",
    "World",
    "build_config",
    "lr_at",
    "parse_overrides",
    "train",
]
