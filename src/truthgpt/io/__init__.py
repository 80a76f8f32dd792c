"""Files, below the model: atomic folder writes, verified manifests, tensor files, JSON.

Nothing here knows what a model or a trainer is; the formats built on it live with what they
store (`truthgpt.nn.serialization` for a model, `truthgpt.training.checkpoint` for a run).
"""

from truthgpt.io.atomic import write_file_atomically, write_folder_atomically
from truthgpt.io.jsonio import json_bytes, json_safe
from truthgpt.io.manifest import CheckpointError, FolderReader
from truthgpt.io.runs import resolve_checkpoint

__all__ = [
    "CheckpointError",
    "FolderReader",
    "json_bytes",
    "json_safe",
    "resolve_checkpoint",
    "write_file_atomically",
    "write_folder_atomically",
]
