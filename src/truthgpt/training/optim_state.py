"""AdamW's state as a safetensors file: the moments as tensors `state.{param_index}.{name}`,
hyper-parameters and the GradScaler state as JSON in the file's metadata. Read back, every
tensor is checked against the optimizer's parameters before any is loaded."""

from __future__ import annotations

import json
import math
import re
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from truthgpt.io.jsonio import is_number
from truthgpt.io.manifest import CheckpointError, FolderReader
from truthgpt.io.tensors import check_tensors, cpu_tensors

OPTIMIZER_FILE = "optimizer.safetensors"
_OPTIMIZER_META_KEY = "truthgpt.optimizer"


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def optimizer_bytes(
    optimizer: torch.optim.Optimizer,
    scaler: torch.amp.GradScaler | None,
    state_dict: dict[str, Any] | None = None,
) -> bytes:
    """AdamW state (the optimizer's own, or `state_dict` gathered for it) as safetensors:
    tensors by `state.{param_index}.{name}`, the rest as JSON."""
    if state_dict is None:
        state_dict = optimizer.state_dict()
    tensors: dict[str, Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for index, state in state_dict["state"].items():
        for key, value in state.items():
            if isinstance(value, Tensor):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars.setdefault(str(index), {})[key] = value
    meta = {
        "optimizer": type(optimizer).__name__,
        "param_groups": state_dict["param_groups"],
        "scalar_state": scalars,
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    metadata = {"format": "pt", _OPTIMIZER_META_KEY: json.dumps(meta)}
    return safetensors.torch.save(cpu_tensors(tensors), metadata)


# Implementation switches belong to the optimizer being restored into (e.g. fused on CUDA),
# not to the machine the checkpoint was written on.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def read_optimizer(
    reader: FolderReader,
    optimizer: torch.optim.Optimizer,
    name: str = OPTIMIZER_FILE,
) -> tuple[dict, dict | None]:
    """A state dict for `optimizer.load_state_dict`, and the GradScaler state, both checked."""
    path = reader.path(name)
    tensors, metadata = reader.tensors(name)
    try:
        meta = json.loads(metadata[_OPTIMIZER_META_KEY])
        saved_groups = meta["param_groups"]
        scalars = meta["scalar_state"]
        kind = meta["optimizer"]
        scaler = meta["scaler"]
    except (KeyError, TypeError, json.JSONDecodeError) as err:
        raise CheckpointError(
            f"{path}: optimizer metadata is missing or corrupt ({err!r})"
        ) from None
    if kind != type(optimizer).__name__:
        raise CheckpointError(
            f"{path}: holds {kind} state, but the optimizer is {type(optimizer).__name__}"
        )
    current_groups = optimizer.state_dict()["param_groups"]
    sizes = [len(g["params"]) for g in current_groups]
    if not (
        isinstance(saved_groups, list)
        and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in saved_groups)
        and [len(g["params"]) for g in saved_groups] == sizes
    ):
        raise CheckpointError(
            f"{path}: parameter groups do not match the optimizer's ({len(sizes)} groups of "
            f"{sizes} parameters)"
        )
    if not isinstance(scalars, dict) or not (scaler is None or isinstance(scaler, dict)):
        raise CheckpointError(f"{path}: optimizer metadata is malformed")

    params = _optimizer_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    expected: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        match = re.fullmatch(r"state\.(\d+)\.(\w+)", name)
        if match is None or int(match[1]) >= len(params):
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        index, key = int(match[1]), match[2]
        param = params[index]
        # Adam's per-parameter state: a float32 step count and moments shaped like the parameter.
        if key == "step":
            expected[name] = torch.empty((), dtype=torch.float32)
        else:
            expected[name] = torch.empty(param.shape, dtype=param.dtype)
        state.setdefault(index, {})[key] = tensor
    check_tensors(expected, tensors, path, what="the optimizer's parameters")
    for index, values in scalars.items():
        if not (index.isdigit() and int(index) < len(params) and isinstance(values, dict)):
            raise CheckpointError(f"{path}: malformed scalar state for parameter {index!r}")
        entry = state.setdefault(int(index), {})
        if set(values) & set(entry):
            raise CheckpointError(f"{path}: parameter {index} has {sorted(values)} twice")
        entry.update(values)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        needed = {"step", "exp_avg", "exp_avg_sq"}
        for index, values in state.items():
            if not needed <= set(values):
                raise CheckpointError(
                    f"{path}: state of parameter {index} lacks {sorted(needed - set(values))}"
                )
    groups = []
    for saved, current in zip(saved_groups, current_groups, strict=True):
        for key, value in saved.items():
            if not _same_kind(value, current.get(key, value)):
                raise CheckpointError(
                    f"{path}: param_groups {key}={value!r} is not like {current[key]!r}"
                )
        group = {**saved, "params": current["params"]}
        group.update({k: current[k] for k in _IMPLEMENTATION_KEYS if k in current})
        if "betas" in group:
            group["betas"] = tuple(group["betas"])
        groups.append(group)
    return {"state": state, "param_groups": groups}, scaler


def _same_kind(saved: Any, current: Any) -> bool:
    """Whether a saved hyper-parameter has the type of the optimizer's own value."""
    if is_number(current):
        return is_number(saved) and math.isfinite(saved)
    if isinstance(current, tuple | list):
        return isinstance(saved, list | tuple) and len(saved) == len(current)
    return True
