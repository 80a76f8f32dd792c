"""A model folder: `config.json` (format header + the model config) and `model.safetensors`,
with a manifest. `TruthGPTModel.save_pretrained`/`from_pretrained` and the trainer's
checkpoints (which add files of their own) are built on it."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from truthgpt.config import ConfigError, TruthGPTConfig
from truthgpt.io.atomic import write_folder_atomically
from truthgpt.io.files import CONFIG_LIMIT
from truthgpt.io.jsonio import json_bytes
from truthgpt.io.manifest import (
    CheckpointError,
    FolderReader,
    check_format,
    check_replaceable,
    format_header,
    write_manifest,
)
from truthgpt.io.runs import WEIGHTS_FILE, resolve_checkpoint
from truthgpt.io.tensors import check_finite, check_tensors, tensor_bytes

CONFIG_FILE = "config.json"


def config_header() -> dict[str, Any]:
    from truthgpt import __version__

    return format_header(truthgpt_version=__version__)


def unique_tensors(
    model: nn.Module, state_dict: dict[str, Tensor] | None = None
) -> dict[str, Tensor]:
    """The state dict (the model's own, or `state_dict` gathered for it) with tied parameters
    listed once, under their first name: a tied lm_head is stored as wte.weight only."""
    if state_dict is None:
        state_dict = model.state_dict()
    if any(type(t) is not Tensor for t in state_dict.values()):
        raise ValueError(
            "model: its parameters are sharded (FSDP); save it from the full state that "
            "truthgpt.training.distributed.gather_full_state collects on every rank, and load "
            "checkpoints before distributed.parallelize"
        )
    params = dict(model.named_parameters(remove_duplicate=False))
    seen: set[int] = set()
    tensors = {}
    for name, tensor in state_dict.items():
        param = params.get(name)
        if param is not None:
            if id(param) in seen:
                continue
            seen.add(id(param))
        tensors[name] = tensor
    return tensors


def write_model_files(folder: Path, config: dict[str, Any], weights: dict[str, Tensor]) -> None:
    """config.json (with the format header) and model.safetensors, into `folder`."""
    (folder / CONFIG_FILE).write_bytes(json_bytes({**config_header(), **config}))
    (folder / WEIGHTS_FILE).write_bytes(tensor_bytes(weights))


def save_model_folder(directory: str | Path, config: TruthGPTConfig, model: nn.Module) -> Path:
    """Write a model alone (config.json, model.safetensors, manifest.json), atomically."""
    config_dict = {"model": config.to_dict()}
    weights = unique_tensors(model)
    return write_folder_atomically(
        directory,
        lambda tmp: write_model_files(tmp, config_dict, weights),
        check=check_replaceable,
        finish=write_manifest,
    )


def open_folder(path: str | Path, known_files: tuple[str, ...] = ()) -> FolderReader:
    """The verified checkpoint folder `path` means (a folder, a run, a pointer)."""
    return FolderReader(
        resolve_checkpoint(path),
        (CONFIG_FILE, WEIGHTS_FILE, *known_files),
        limits={CONFIG_FILE: CONFIG_LIMIT},
    )


# The model fields config.json has held since format 1 (every one): a folder that lacks one
# was edited, and the field's default would silently build another model. A field added in a
# later format is not listed, so that older folders load with its default.
MODEL_FIELDS_V1 = frozenset(
    {
        "vocab_size",
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "intermediate_size",
        "max_position_embeddings",
        "hidden_dropout_prob",
        "attention_probs_dropout_prob",
        "distance_type",
        "lambda_param",
        "use_learnable_lambda",
        "p_norm",
        "tie_word_embeddings",
        "layer_norm_eps",
        "bias",
    }
)


def require_fields(section: Any, required: frozenset[str], path: Path, what: str) -> None:
    """Raise, naming them, when a config section (a JSON object) lacks required fields."""
    if isinstance(section, dict):
        missing = sorted(required - set(section))
        if missing:
            raise CheckpointError(f"{path}: invalid {what} config: lacks {', '.join(missing)}")


def read_model_config(reader: FolderReader) -> TruthGPTConfig:
    """The model config of a verified folder, checked field by field."""
    config = reader.json(CONFIG_FILE)
    path = reader.path(CONFIG_FILE)
    check_format(config, path)
    require_fields(config.get("model"), MODEL_FIELDS_V1, path, "model")
    try:
        return TruthGPTConfig.from_dict(config.get("model"))  # type: ignore[arg-type]
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config: {err}") from None


def read_weights(reader: FolderReader, model: nn.Module) -> dict[str, Tensor]:
    """Weights from model.safetensors, checked against `model` (which is not touched), and
    finite: a run never saves a NaN or an infinity (it skips non-finite updates)."""
    tensors, _ = reader.tensors(WEIGHTS_FILE)
    check_tensors(unique_tensors(model), tensors, reader.path(WEIGHTS_FILE))
    check_finite(tensors, reader.path(WEIGHTS_FILE))
    return tensors


def copy_weights(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    """Copy checked tensors into the model's own (tied parameters get their one copy)."""
    targets = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)
