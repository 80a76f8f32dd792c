"""AdamW's state as a safetensors file: the moments as tensors `state.{param_index}.{name}`,
hyper-parameters and the GradScaler state as JSON in the file's metadata. Read back, every
tensor is checked against the optimizer's parameters, and every value for its range, before
any is loaded."""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import safetensors.torch
import torch
from torch import Tensor

from truthgpt.config import MAX_COUNT, MAX_LEARNING_RATE, MAX_WEIGHT_DECAY, in_range
from truthgpt.io.jsonio import is_int
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
# The hyper-parameters a checkpoint carries (lr is set again every step, from the schedule),
# each with the range outside which it is not a value AdamW was trained with.
_HYPER_PARAMETERS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "lr": (lambda v: in_range(v, 0, MAX_LEARNING_RATE), f"a number in [0, {MAX_LEARNING_RATE}]"),
    "eps": (lambda v: in_range(v, 0, 1) and v > 0, "a number in (0, 1]"),
    "weight_decay": (
        lambda v: in_range(v, 0, MAX_WEIGHT_DECAY),
        f"a number in [0, {MAX_WEIGHT_DECAY}]",
    ),
    "betas": (
        lambda v: (
            isinstance(v, list | tuple)
            and len(v) == 2
            and all(in_range(b, 0, 1) and b < 1 for b in v)
        ),
        "two numbers in [0, 1)",
    ),
}
_STATE_NAME = re.compile(r"state\.(0|[1-9][0-9]*)\.(\w+)")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_SCALER_KEYS = {"scale", "growth_factor", "backoff_factor", "growth_interval", "_growth_tracker"}


def read_optimizer(
    reader: FolderReader,
    optimizer: torch.optim.Optimizer,
    name: str = OPTIMIZER_FILE,
    max_step: int = MAX_COUNT,
) -> tuple[dict, dict | None]:
    """A state dict for `optimizer.load_state_dict`, and the GradScaler state, both checked:
    the hyper-parameters' ranges, every moment finite, no parameter's step count past
    `max_step` (the trainer's own)."""
    path = reader.path(name)
    tensors, metadata = reader.tensors(name)
    try:
        meta = json.loads(metadata[_OPTIMIZER_META_KEY])
        saved_groups = meta["param_groups"]
        scalars = meta["scalar_state"]
        kind = meta["optimizer"]
        scaler = meta["scaler"]
    except (KeyError, TypeError, ValueError, RecursionError) as err:
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
            f"{path}: param_groups do not match the optimizer's ({len(sizes)} groups of "
            f"{sizes} parameters)"
        )
    if not isinstance(scalars, dict):
        raise CheckpointError(f"{path}: optimizer metadata is malformed ('scalar_state')")
    _check_scaler(scaler, path)
    groups = [
        _group(saved, current, f"{path}: param_groups[{i}]")
        for i, (saved, current) in enumerate(zip(saved_groups, current_groups, strict=True))
    ]

    params = _optimizer_params(optimizer)
    state: dict[int, dict[str, Any]] = {}
    expected: dict[str, Tensor] = {}
    for name, tensor in tensors.items():
        match = _STATE_NAME.fullmatch(name)
        if match is None or int(match[1]) >= len(params):
            raise CheckpointError(f"{path}: unexpected tensor {name!r}")
        index, key = int(match[1]), match[2]
        param = params[index]
        # Adam's per-parameter state: a float32 step count and moments shaped like the parameter.
        if key == "step":
            expected[name] = torch.empty((), dtype=torch.float32, device="meta")
        else:
            expected[name] = torch.empty(param.shape, dtype=param.dtype, device="meta")
        state.setdefault(index, {})[key] = tensor
    check_tensors(expected, tensors, path, what="the optimizer's parameters")
    for index, values in scalars.items():
        if not (
            isinstance(index, str)
            and _INDEX.fullmatch(index)
            and int(index) < len(params)
            and isinstance(values, dict)
        ):
            raise CheckpointError(f"{path}: malformed scalar state for parameter {index!r}")
        entry = state.setdefault(int(index), {})
        if set(values) & set(entry):
            raise CheckpointError(f"{path}: parameter {index} has {sorted(values)} twice")
        entry.update(values)
    if isinstance(optimizer, torch.optim.Adam | torch.optim.AdamW):
        amsgrad = bool(current_groups[0].get("amsgrad"))
        for index, values in state.items():
            _check_adam_state(values, amsgrad, max_step, f"{path}: parameter {index}")
    return {"state": state, "param_groups": groups}, scaler


def _group(saved: dict[str, Any], current: dict[str, Any], where: str) -> dict[str, Any]:
    """The optimizer's own group with the saved hyper-parameters, once each is checked.

    Options the optimizer was built with (amsgrad, maximize, …) must be the saved ones: a file
    that says otherwise holds the state of another optimizer. Keys this torch's optimizer
    does not have are left out, as it could not use them."""
    group = dict(current)
    for key, value in saved.items():
        if key == "params" or key in _IMPLEMENTATION_KEYS or key not in current:
            continue
        if key in _HYPER_PARAMETERS:
            check, want = _HYPER_PARAMETERS[key]
            if not check(value):
                raise CheckpointError(f"{where}: '{key}' must be {want}, got {value!r}")
            group[key] = tuple(value) if key == "betas" else value
        elif not (value == current[key] and type(value) is type(current[key])):
            raise CheckpointError(
                f"{where}: '{key}' is {value!r}, but the optimizer was built with {current[key]!r}"
            )
    return group


def _check_adam_state(values: dict[str, Any], amsgrad: bool, max_step: int, where: str) -> None:
    """Adam's state of one parameter: a whole step count in [0, max_step], finite moments,
    second moments ≥ 0 (their square roots divide the update)."""
    needed = {"step", "exp_avg", "exp_avg_sq"} | ({"max_exp_avg_sq"} if amsgrad else set())
    if set(values) != needed:
        missing, unknown = sorted(needed - set(values)), sorted(set(values) - needed)
        raise CheckpointError(
            f"{where}: state "
            + (f"lacks {missing}" if missing else f"has unknown entries {unknown}")
        )
    step = values["step"]
    count = float(step) if isinstance(step, Tensor) else step
    if not (in_range(count, 0, max_step) and count == int(count)):
        raise CheckpointError(
            f"{where}: 'step' must be a whole number in [0, {max_step}], got {count!r}"
        )
    for key in needed - {"step"}:
        moment = values[key]
        if not bool(torch.isfinite(moment).all()):
            raise CheckpointError(f"{where}: '{key}' holds non-finite values")
        if key != "exp_avg" and bool((moment < 0).any()):
            raise CheckpointError(f"{where}: '{key}' holds negative values")


def _check_scaler(scaler: Any, path: Any) -> None:
    """A GradScaler state (or None): a finite positive scale and factors it can apply."""
    if scaler is None:
        return
    if not isinstance(scaler, dict) or set(scaler) != _SCALER_KEYS:
        raise CheckpointError(f"{path}: 'scaler' (the GradScaler state) is malformed: {scaler!r}")
    interval = scaler["growth_interval"]
    checks = {
        "scale": in_range(scaler["scale"], 0, 2.0**127) and scaler["scale"] > 0,
        "growth_factor": in_range(scaler["growth_factor"], 1, 2.0**16)
        and scaler["growth_factor"] > 1,
        "backoff_factor": in_range(scaler["backoff_factor"], 0, 1)
        and 0 < scaler["backoff_factor"] < 1,
        "growth_interval": is_int(interval) and 0 < interval <= MAX_COUNT,
        "_growth_tracker": is_int(scaler["_growth_tracker"])
        and is_int(interval)
        and 0 <= scaler["_growth_tracker"] < interval,
    }
    for key, ok in checks.items():
        if not ok:
            raise CheckpointError(
                f"{path}: 'scaler' (the GradScaler state) has an invalid '{key}': {scaler[key]!r}"
            )
