"""Deprecated: release 0.1's checkpoint module, split by concern in 0.2.0.

Files and folders moved to `truthgpt.io`, the model folder to `TruthGPTModel.save_pretrained`
and `from_pretrained`, a run's checkpoints to `truthgpt.training.checkpoint` and
`truthgpt.training.load_core`. The 0.1 functions below keep their signatures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from truthgpt._moved import warn_moved

warn_moved("truthgpt.checkpoint", "truthgpt.io and truthgpt.training.checkpoint")

from truthgpt.io import CheckpointError, resolve_checkpoint, write_folder_atomically  # noqa: E402
from truthgpt.io.manifest import FORMAT, FORMAT_VERSION, MANIFEST_FILE  # noqa: E402
from truthgpt.io.pretrained import CONFIG_FILE  # noqa: E402
from truthgpt.io.runs import BEST, CHECKPOINTS_DIR, LATEST, WEIGHTS_FILE  # noqa: E402
from truthgpt.nn.model import TruthGPTModel  # noqa: E402
from truthgpt.training import TruthGPTOptimizationCore, load_core  # noqa: E402
from truthgpt.training.checkpoint import (  # noqa: E402
    STATE_FILE,
    TOKENIZER_FILE,
    CheckpointManager,
    read_tokenizer,
    read_trainer_state,
)
from truthgpt.training.optim_state import OPTIMIZER_FILE  # noqa: E402


def save_pretrained(model: TruthGPTModel, directory: str | Path) -> Path:
    """0.1's `save_pretrained(model, directory)`: `model.save_pretrained(directory)`."""
    return model.save_pretrained(directory)


def load_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> TruthGPTModel:
    """0.1's `load_pretrained`: `TruthGPTModel.from_pretrained(directory, map_location=…)`."""
    return TruthGPTModel.from_pretrained(directory, map_location=map_location)


def save_checkpoint(core: TruthGPTOptimizationCore, directory: str | Path, **kwargs: Any) -> Path:
    """0.1's `save_checkpoint(core, directory)`: `core.save_checkpoint(directory)`."""
    return core.save_checkpoint(directory, **kwargs)


def load_checkpoint(core: TruthGPTOptimizationCore, directory: str | Path) -> dict[str, Any]:
    """0.1's `load_checkpoint(core, directory)`: `core.load_checkpoint(directory)`."""
    return core.load_checkpoint(directory)


__all__ = [
    "BEST",
    "CHECKPOINTS_DIR",
    "CONFIG_FILE",
    "FORMAT",
    "FORMAT_VERSION",
    "LATEST",
    "MANIFEST_FILE",
    "OPTIMIZER_FILE",
    "STATE_FILE",
    "TOKENIZER_FILE",
    "WEIGHTS_FILE",
    "CheckpointError",
    "CheckpointManager",
    "load_checkpoint",
    "load_core",
    "load_pretrained",
    "read_tokenizer",
    "read_trainer_state",
    "resolve_checkpoint",
    "save_checkpoint",
    "save_pretrained",
    "write_folder_atomically",
]
