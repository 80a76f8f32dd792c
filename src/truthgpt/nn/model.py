"""`TruthGPTModel`: the core model (`truthgpt.core.model`) with its safetensors folders.

The core model imports only torch, so that an export can carry it whole; reading and writing
verified model folders needs `truthgpt.io` and lives here, in a subclass that every part of
the library builds. Everything else of the model is the core's, re-exported.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch

from truthgpt.core import model as core
from truthgpt.core.config import TruthGPTConfig
from truthgpt.core.model import (
    LAMBDA_REFERENCE_WIDTH,
    MLP,
    Block,
    CausalLMOutput,
    PastKeyValues,
    initial_lambda,
)
from truthgpt.io import pretrained
from truthgpt.io.manifest import FolderReader
from truthgpt.io.runs import WEIGHTS_FILE
from truthgpt.io.tensors import TensorSpec, check_tensors, read_header

__all__ = [
    "LAMBDA_REFERENCE_WIDTH",
    "MLP",
    "Block",
    "CausalLMOutput",
    "PastKeyValues",
    "TruthGPTModel",
    "check_weights_file",
    "initial_lambda",
    "weight_specs",
]


class TruthGPTModel(core.TruthGPTModel):
    """Decoder-only language model with distance attention, saved and loaded as verified
    safetensors folders."""

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write `config.json` + `model.safetensors` (+ manifest), atomically."""
        return pretrained.save_model_folder(directory, self.config, self)

    @classmethod
    def from_pretrained(
        cls, directory: str | Path, map_location: str | torch.device = "cpu"
    ) -> TruthGPTModel:
        """Rebuild a model, in eval mode, from `save_pretrained` output, a checkpoint or a run.

        Every file is verified and every tensor checked before any is copied in."""
        reader = pretrained.open_folder(directory)
        config = pretrained.read_model_config(reader)
        check_weights_file(reader, config)
        with torch.random.fork_rng(devices=[]):  # initial weights are overwritten anyway
            model = cls(config)
        pretrained.copy_weights(model, pretrained.read_weights(reader, model))
        return model.to(map_location).eval()


def weight_specs(config: TruthGPTConfig) -> dict[str, TensorSpec]:
    """The names, shapes and dtypes of the tensors `save_pretrained` writes for `config`, from
    a model of one block on the meta device: nothing is allocated, and since every block is
    alike, 1024 layers cost what one does."""
    with torch.device("meta"):
        model = TruthGPTModel(dataclasses.replace(config, num_hidden_layers=1))
    specs = {}
    for name, tensor in pretrained.unique_tensors(model).items():
        spec = TensorSpec(tuple(tensor.shape), tensor.dtype)
        if name.startswith("blocks.0."):
            for i in range(config.num_hidden_layers):
                specs[f"blocks.{i}.{name.removeprefix('blocks.0.')}"] = spec
        else:
            specs[name] = spec
    return specs


def check_weights_file(reader: FolderReader, config: TruthGPTConfig) -> None:
    """Refuse, before any model is built, a folder whose model.safetensors does not hold the
    tensors of `config` (read from its header alone): a config edited to ask for 2^20
    positions or 1024 layers then costs a comparison, not the memory of that model.

    A distance kind this process has not registered raises the registry's `ConfigError`: the
    folder may be sound, and registering the kind is the fix."""
    expected = weight_specs(config)
    check_tensors(expected, read_header(reader, WEIGHTS_FILE), reader.path(WEIGHTS_FILE))
