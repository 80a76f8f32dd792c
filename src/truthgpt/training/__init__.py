"""Training: the optimization core, its state and checkpoints, the loop, distribution, and
runs (start, resume)."""

from truthgpt.training.core import TrainingDiverged, TruthGPTOptimizationCore, load_core, lr_at
from truthgpt.training.distributed import World
from truthgpt.training.loop import build_config, parse_overrides, train
from truthgpt.training.monitoring import Monitor
from truthgpt.training.run import RunOptions, RunResult, run_training
from truthgpt.training.state import TrainState
from truthgpt.training.tuning import tune_lambda

__all__ = [
    "Monitor",
    "RunOptions",
    "RunResult",
    "TrainState",
    "TrainingDiverged",
    "TruthGPTOptimizationCore",
    "World",
    "build_config",
    "load_core",
    "lr_at",
    "parse_overrides",
    "run_training",
    "train",
    "tune_lambda",
]
