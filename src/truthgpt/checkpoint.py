"""Checkpoints: folders of safetensors and JSON, written atomically and verified on load.

A checkpoint folder holds

    config.json            format version, the model config and (for a run) the training config
    model.safetensors      the weights; a tied lm_head is stored once, as wte.weight
    tokenizer.json         the run's tokenizer, when it has one
    trainer_state.json     step, tokens seen, best val loss, bad-step counters, RNG states
    optimizer.safetensors  AdamW's moments; its hyper-parameters and the GradScaler state are
                           JSON in the file's metadata
    manifest.json          the size and sha256 of every file above

Nothing is ever unpickled, so loading a checkpoint cannot run code. Every file is checked
against the manifest before it is parsed, and every tensor against the model before any is
copied in: a bad checkpoint raises `CheckpointError` naming the file and what is wrong, and
leaves the model as it was.

A folder is written under a temporary name next to its destination, fsynced and renamed into
place, so a crash at any moment leaves either the old state or the new one, never half of
each. A run keeps its checkpoints in RUN_DIR/checkpoints/step-NNNNNNN with small `latest` and
`best` pointer files, replaced atomically too (see `CheckpointManager`).
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import os
import random
import re
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import safetensors.torch
import torch
from torch import Tensor, nn

from truthgpt.config import (
    ConfigError,
    TrainConfig,
    TruthGPTConfig,
    TruthGPTOptimizationCoreConfig,
)

if TYPE_CHECKING:
    from truthgpt.nn.model import TruthGPTModel
    from truthgpt.training.core import TruthGPTOptimizationCore

FORMAT = "truthgpt-checkpoint"
FORMAT_VERSION = 1

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
OPTIMIZER_FILE = "optimizer.safetensors"
MANIFEST_FILE = "manifest.json"
_KNOWN_FILES = (CONFIG_FILE, WEIGHTS_FILE, TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE)

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
_TMP_PREFIX = ".tmp-"  # folders being written or deleted; never a valid checkpoint
_STEP_NAME = re.compile(r"^step-(\d{7,})$")
_OPTIMIZER_META_KEY = "truthgpt.optimizer"
_MAX_LISTED = 12  # tensor names listed in one error message


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign or does not fit the model; names the file."""


# ---------------------------------------------------------------------------------- writing


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_bytes(path: Path, data: bytes) -> None:
    """Write a file; callers fsync it (folders fsync all their files once, at the end)."""
    with open(path, "wb") as f:
        f.write(data)


def _json_bytes(obj: Any) -> bytes:
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def _write_manifest(folder: Path) -> None:
    files = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        files[path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "files": files}
    _write_bytes(folder / MANIFEST_FILE, _json_bytes(manifest))


def _check_replaceable(target: Path, replace_any: bool) -> None:
    """Only an empty folder or an earlier checkpoint may be replaced, unless `replace_any`."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target}: exists and is not a folder; refusing to replace it")
    if (
        not replace_any
        and target.is_dir()
        and any(target.iterdir())
        and not (target / MANIFEST_FILE).is_file()
    ):
        raise FileExistsError(
            f"{target}: folder exists and is not a truthgpt checkpoint (no {MANIFEST_FILE}); "
            "refusing to overwrite it"
        )


def write_folder_atomically(
    target: str | Path,
    write: Callable[[Path], None],
    *,
    manifest: bool = True,
    replace_any: bool = False,
) -> Path:
    """Run `write(tmp)` to fill a temporary folder beside `target`, add a manifest, then move
    it into place. A reader sees the old folder or the complete new one, never a mix.

    An existing `target` is replaced only when it is empty or a checkpoint, or `replace_any`.
    """
    target = Path(target)
    _check_replaceable(target, replace_any)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{_TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if manifest:
            _write_manifest(tmp)
        for path in tmp.iterdir():
            _fsync_path(path)
        _fsync_path(tmp)
        if target.exists():
            # Two renames: there is no atomic swap of non-empty folders in the standard library.
            # Between them the old copy still exists under its .tmp- name.
            old = parent / f"{_TMP_PREFIX}{target.name}-old-{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            os.rename(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, target)
        _fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _write_pointer(path: Path, name: str) -> None:
    """Replace a small text file naming a checkpoint folder, atomically."""
    tmp = path.with_name(f"{_TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        _write_bytes(tmp, (name + "\n").encode("utf-8"))
        _fsync_path(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _fsync_path(path.parent)


# ---------------------------------------------------------------------------------- reading


class _Reader:
    """One checkpoint folder whose files are checked against manifest.json as they are read."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.files = self._read_manifest()
        self._json: dict[str, Any] = {}
        # The set of files must agree with the manifest both ways, so a lost file (or a lost
        # manifest entry) is never mistaken for an optional part that was not saved.
        for name in self.files:
            self._check_size(name)
        for name in _KNOWN_FILES:
            if name not in self.files and (folder / name).exists():
                raise CheckpointError(f"{folder / name}: not listed in {MANIFEST_FILE}")

    def _check_size(self, name: str) -> None:
        path = self.folder / name
        if not path.is_file():
            raise CheckpointError(f"{path}: missing (listed in {MANIFEST_FILE})")
        size = path.stat().st_size
        if size != self.files[name]["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, but {self.files[name]['size']} were saved; the file was "
                "truncated or replaced"
            )

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST_FILE
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; {self.folder} is not a complete truthgpt checkpoint"
            )
        manifest = _parse_json(path, path.read_bytes())
        _check_format(manifest, path)
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CheckpointError(f"{path}: 'files' must be an object of file name -> hash")
        for name, entry in files.items():
            ok = (
                isinstance(entry, dict)
                and _is_int(entry.get("size"))
                and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)
                and re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]) is not None
                and re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9._-]*", name) is not None
            )
            if not ok:
                raise CheckpointError(f"{path}: entry {name!r} is malformed: {entry!r}")
        return files

    def has(self, name: str) -> bool:
        return name in self.files

    def path(self, name: str) -> Path:
        return self.folder / name

    def bytes(self, name: str) -> bytes:
        """The file's contents, after checking its size and sha256 against the manifest."""
        path = self.folder / name
        if name not in self.files:
            raise CheckpointError(
                f"{path}: not listed in {MANIFEST_FILE}; the checkpoint is incomplete"
            )
        entry = self.files[name]
        self._check_size(name)
        data = path.read_bytes()
        digest = hashlib.sha256(data).hexdigest()
        if digest != entry["sha256"]:
            raise CheckpointError(
                f"{path}: contents differ from what was saved (sha256 {digest[:16]}…, expected "
                f"{entry['sha256'][:16]}…); the file is corrupt or was edited"
            )
        return data

    def json(self, name: str) -> dict[str, Any]:
        """A verified JSON file that must hold an object."""
        if name not in self._json:
            path = self.folder / name
            data = _parse_json(path, self.bytes(name))
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
            self._json[name] = data
        return self._json[name]

    def tensors(self, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """A verified safetensors file: its tensors (fresh CPU copies) and its metadata."""
        path = self.folder / name
        data = self.bytes(name)
        try:
            tensors = safetensors.torch.load(data)
            header_len = int.from_bytes(data[:8], "little")
            header = json.loads(data[8 : 8 + header_len])
            metadata = header.get("__metadata__") or {}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return tensors, metadata


def _parse_json(path: Path, data: bytes) -> Any:
    try:
        return json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise CheckpointError(f"{path}: not valid JSON ({err})") from None


def _check_format(obj: Any, path: Path) -> None:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a truthgpt checkpoint file (format={obj.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    version = obj.get("format_version")
    if not _is_int(version) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this truthgpt reads "
            f"({FORMAT_VERSION}); upgrade truthgpt"
        )


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- locating


def _read_pointer(path: Path) -> Path | None:
    """The checkpoint folder a pointer file names, or None when it is absent or invalid."""
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not _STEP_NAME.match(name):
        return None
    folder = path.parent / name
    return folder if (folder / MANIFEST_FILE).is_file() else None


def _step_folders(checkpoints: Path) -> list[Path]:
    """Complete step-N folders (temporary ones excluded), oldest first."""
    found = [
        p
        for p in checkpoints.iterdir()
        if _STEP_NAME.match(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder itself, a `checkpoints`
    folder or a run folder (both follow `latest`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, checkpoints folder or run folder")
    if path.is_file() and path.name in (LATEST, BEST):
        folder = _read_pointer(path)
        if folder is None:
            raise CheckpointError(f"{path}: does not name a checkpoint folder beside it")
        return folder
    if not path.is_dir():
        raise CheckpointError(
            f"{path}: expected a checkpoint folder, a checkpoints folder or a run folder"
        )
    if (path / MANIFEST_FILE).is_file() or (path / WEIGHTS_FILE).is_file():
        return path
    checkpoints = path / CHECKPOINTS_DIR if (path / CHECKPOINTS_DIR).is_dir() else path
    if checkpoints is not path or (path / LATEST).exists() or _step_folders(path):
        folder = _read_pointer(checkpoints / LATEST)
        if folder is None:  # pointer not written yet (crash right after the rename)
            steps = _step_folders(checkpoints)
            folder = steps[-1] if steps else None
        if folder is None:
            raise CheckpointError(f"{checkpoints}: holds no complete checkpoint yet")
        return folder
    raise CheckpointError(
        f"{path}: not a checkpoint folder (no {MANIFEST_FILE} and {WEIGHTS_FILE}), a checkpoints "
        f"folder or a run folder (no {CHECKPOINTS_DIR}/)"
    )


# ---------------------------------------------------------------------------------- weights


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DDP/FSDP wrapper, or the model itself."""
    return getattr(model, "module", model)


def _weights(model: nn.Module, state_dict: dict[str, Tensor] | None = None) -> dict[str, Tensor]:
    """The state dict (the model's own, or `state_dict` gathered for it) with tied parameters
    listed once, under their first name."""
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
    weights = {}
    for name, tensor in state_dict.items():
        param = params.get(name)
        if param is not None:
            if id(param) in seen:
                continue
            seen.add(id(param))
        weights[name] = tensor
    return weights


def _check_tensors(
    expected: dict[str, Tensor], got: dict[str, Tensor], path: Path, what: str = "the model"
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mismatched tensors."""
    problems = []

    def listed(label: str, items: list[str]) -> None:
        if items:
            more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{label} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}")

    listed("missing", sorted(set(expected) - set(got)))
    listed("unexpected", sorted(set(got) - set(expected)))
    listed(
        "shape mismatch",
        [
            f"{n} {tuple(got[n].shape)} vs {tuple(t.shape)}"
            for n, t in expected.items()
            if n in got and got[n].shape != t.shape
        ],
    )
    listed(
        "dtype mismatch",
        [
            f"{n} {got[n].dtype} vs {t.dtype}"
            for n, t in expected.items()
            if n in got and got[n].shape == t.shape and got[n].dtype != t.dtype
        ],
    )
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not fit {what} (file vs expected) — " + "; ".join(problems)
        )


def _copy_weights(model: nn.Module, tensors: dict[str, Tensor]) -> None:
    targets = model.state_dict()
    with torch.no_grad():
        for name, tensor in tensors.items():
            targets[name].copy_(tensor)


def _read_weights(reader: _Reader, model: nn.Module) -> dict[str, Tensor]:
    """Weights from model.safetensors, checked against `model` (which is not touched)."""
    tensors, _ = reader.tensors(WEIGHTS_FILE)
    _check_tensors(_weights(model), tensors, reader.path(WEIGHTS_FILE))
    return tensors


def _model_config(reader: _Reader) -> TruthGPTConfig:
    config = reader.json(CONFIG_FILE)
    path = reader.path(CONFIG_FILE)
    _check_format(config, path)
    try:
        return TruthGPTConfig.from_dict(config.get("model"))  # type: ignore[arg-type]
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid model config: {err}") from None


def _build_model(config: TruthGPTConfig) -> TruthGPTModel:
    """A model of the given shape, without disturbing the global RNG (initial weights are
    overwritten anyway)."""
    from truthgpt.nn.model import TruthGPTModel

    with torch.random.fork_rng(devices=[]):
        return TruthGPTModel(config)


def _config_header() -> dict[str, Any]:
    from truthgpt import __version__

    return {"format": FORMAT, "format_version": FORMAT_VERSION, "truthgpt_version": __version__}


def save_pretrained(model: nn.Module, directory: str | Path) -> Path:
    """Write the model alone (config.json, model.safetensors, manifest.json), atomically."""
    model = _unwrap(model)
    config = {**_config_header(), "model": model.config.to_dict()}
    weights = _cpu_tensors(_weights(model))

    def write(tmp: Path) -> None:
        _write_bytes(tmp / CONFIG_FILE, _json_bytes(config))
        _write_bytes(tmp / WEIGHTS_FILE, safetensors.torch.save(weights, {"format": "pt"}))

    return write_folder_atomically(directory, write)


def load_pretrained(
    directory: str | Path, map_location: str | torch.device = "cpu"
) -> TruthGPTModel:
    """Rebuild a model, in eval mode, from `save_pretrained` output, a checkpoint or a run."""
    reader = _Reader(resolve_checkpoint(directory))
    model = _build_model(_model_config(reader))
    _copy_weights(model, _read_weights(reader, model))
    return model.to(map_location).eval()


def _cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


# ---------------------------------------------------------------------------------- optimizer


def _optimizer_params(optimizer: torch.optim.Optimizer) -> list[Tensor]:
    return [p for group in optimizer.param_groups for p in group["params"]]


def _optimizer_file(
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
    return safetensors.torch.save(_cpu_tensors(tensors), metadata)


# Implementation switches belong to the optimizer being restored into (e.g. fused on CUDA),
# not to the machine the checkpoint was written on.
_IMPLEMENTATION_KEYS = ("foreach", "fused", "capturable", "differentiable")


def _read_optimizer(reader: _Reader, optimizer: torch.optim.Optimizer) -> tuple[dict, dict | None]:
    """A state dict for `optimizer.load_state_dict`, and the GradScaler state, both checked."""
    path = reader.path(OPTIMIZER_FILE)
    tensors, metadata = reader.tensors(OPTIMIZER_FILE)
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
    _check_tensors(expected, tensors, path, what="the optimizer's parameters")
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
    if _is_number(current):
        return _is_number(saved) and math.isfinite(saved)
    if isinstance(current, tuple | list):
        return isinstance(saved, list | tuple) and len(saved) == len(current)
    return True


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# ---------------------------------------------------------------------------------- RNG


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _rng_state(device: torch.device) -> dict[str, Any]:
    """Every random generator training draws from, as plain JSON."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": np_state,
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
        "torch_cuda": None,
    }
    if device.type == "cuda":
        state["torch_cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def _parse_rng(rng: Any, path: Path) -> Callable[[], None]:
    """Check saved RNG states fully, and return the function that installs them."""
    try:
        version, internal, gauss = rng["python"]
        python_state = (version, tuple(internal), gauss)
        random.Random().setstate(python_state)  # validates without touching the global one
        np.random.RandomState().set_state(rng["numpy"])
        cpu = torch.frombuffer(
            bytearray(base64.b64decode(rng["torch_cpu"], validate=True)), dtype=torch.uint8
        )
        if cpu.numel() != torch.get_rng_state().numel():
            raise ValueError(f"torch CPU state has {cpu.numel()} bytes")
        cuda = [
            torch.frombuffer(bytearray(base64.b64decode(s, validate=True)), dtype=torch.uint8)
            for s in rng.get("torch_cuda") or []
        ]
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{path}: 'rng' holds an invalid random state ({err!r})") from None

    def restore() -> None:
        random.setstate(python_state)
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            for index, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)

    return restore


# ---------------------------------------------------------------------------------- checkpoints


def save_checkpoint(
    core: TruthGPTOptimizationCore,
    directory: str | Path,
    *,
    full_state: tuple[dict[str, Tensor], dict[str, Any] | None] | None = None,
    **extra_state: Any,
) -> Path:
    """Write everything needed to resume `core` exactly; `extra_state` (JSON values) is
    stored in trainer_state.json under "extra" and returned by `load_checkpoint`.

    `full_state` (model state dict, optimizer state dict) replaces the core's own when its
    model is sharded: see `truthgpt.training.distributed.gather_full_state`.
    """
    model = core.raw_model
    config = {
        **_config_header(),
        "model": model.config.to_dict(),
        "train": core.train_config.to_dict(),
    }
    state = {
        "step": core.step,
        "tokens_seen": core.tokens_seen,
        "best_val_loss": core.best_val_loss,
        "bad_steps_total": core.bad_steps_total,
        "bad_steps_in_a_row": core.bad_steps_in_a_row,
        # Training batches are a function of (seed, rank, step): the step is the data position.
        "sampler_position": core.step,
        "chars_per_token": core.chars_per_token,
        "eval_history": core.eval_history,
        "rng": _rng_state(core.device),
        "extra": extra_state,
    }
    try:
        state_bytes = _json_bytes(state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra_state: values must be JSON-serialisable ({err})") from None
    tokenizer = core.tokenizer
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise ValueError(f"core.tokenizer: {type(tokenizer).__name__} has no save(path) method")
    model_state, optimizer_state = full_state or (None, None)
    weights = _cpu_tensors(_weights(model, model_state))
    optimizer = (
        _optimizer_file(core.optimizer, core.scaler, optimizer_state)
        if core.optimizer is not None
        else None
    )

    def write(tmp: Path) -> None:
        _write_bytes(tmp / CONFIG_FILE, _json_bytes(config))
        _write_bytes(tmp / WEIGHTS_FILE, safetensors.torch.save(weights, {"format": "pt"}))
        _write_bytes(tmp / STATE_FILE, state_bytes)
        if optimizer is not None:
            _write_bytes(tmp / OPTIMIZER_FILE, optimizer)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)

    return write_folder_atomically(directory, write)


def _read_trainer_state(reader: _Reader) -> dict[str, Any]:
    """trainer_state.json, with every field the core relies on type-checked."""
    path = reader.path(STATE_FILE)
    state = reader.json(STATE_FILE)
    for name in ("step", "tokens_seen", "bad_steps_total", "bad_steps_in_a_row"):
        if not (_is_int(state.get(name)) and state[name] >= 0):
            raise CheckpointError(
                f"{path}: '{name}' must be an integer ≥ 0, got {state.get(name)!r}"
            )
    for name in ("best_val_loss", "chars_per_token"):
        value = state.get(name)
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool)):
            raise CheckpointError(f"{path}: '{name}' must be a number or null, got {value!r}")
    if not isinstance(state.get("eval_history", []), list):
        raise CheckpointError(f"{path}: 'eval_history' must be a list")
    if not isinstance(state.get("extra", {}), dict):
        raise CheckpointError(f"{path}: 'extra' must be an object")
    return state


def _read_tokenizer(reader: _Reader) -> Any:
    from truthgpt.data import load_tokenizer

    reader.bytes(TOKENIZER_FILE)  # verify against the manifest before parsing
    try:
        return load_tokenizer(reader.path(TOKENIZER_FILE))
    except ValueError as err:
        raise CheckpointError(str(err)) from None


def read_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a checkpoint (or a run's latest), or None when there is none."""
    reader = _Reader(resolve_checkpoint(path))
    return _read_tokenizer(reader) if reader.has(TOKENIZER_FILE) else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """The trainer state (counters, `extra` values) of a checkpoint, run or checkpoints folder."""
    return _read_trainer_state(_Reader(resolve_checkpoint(path)))


def load_checkpoint(core: TruthGPTOptimizationCore, directory: str | Path) -> dict[str, Any]:
    """Restore model, optimizer, GradScaler, counters and RNG states into `core`.

    Everything is read and checked first; on any error `core` is left as it was.
    Returns the trainer state (with the caller's extra values under "extra").
    """
    return _load_into(core, _Reader(resolve_checkpoint(directory)))


def _load_into(core: TruthGPTOptimizationCore, reader: _Reader) -> dict[str, Any]:
    model = core.raw_model
    saved = _model_config(reader)
    if saved.to_dict() != model.config.to_dict():
        ours = model.config.to_dict()
        diff = ", ".join(
            f"{k}={v!r} (checkpoint) vs {ours[k]!r}"
            for k, v in saved.to_dict().items()
            if ours[k] != v
        )
        raise CheckpointError(f"{reader.path(CONFIG_FILE)}: a different model: {diff}")
    state = _read_trainer_state(reader)
    restore_rng = _parse_rng(state.get("rng"), reader.path(STATE_FILE))
    weights = _read_weights(reader, model)

    had_optimizer = core.optimizer is not None
    scaler_before = core.scaler
    if not had_optimizer:
        core.setup_optimizer()
    assert core.optimizer is not None
    try:
        optimizer_state, scaler_state = (
            _read_optimizer(reader, core.optimizer) if reader.has(OPTIMIZER_FILE) else (None, None)
        )
        scaler = core.scaler
        if (
            scaler_state is not None
            and scaler is not None
            and set(scaler_state) != set(scaler.state_dict())
        ):
            raise CheckpointError(f"{reader.path(OPTIMIZER_FILE)}: GradScaler state is malformed")
        previous = core.optimizer.state_dict()
        if optimizer_state is not None:
            try:
                core.optimizer.load_state_dict(optimizer_state)
            except (ValueError, KeyError, TypeError, RuntimeError) as err:
                core.optimizer.load_state_dict(previous)
                raise CheckpointError(f"{reader.path(OPTIMIZER_FILE)}: {err}") from None
    except BaseException:
        if not had_optimizer:
            core.optimizer, core.scaler = None, scaler_before
        raise

    # Everything is verified: apply it.
    _copy_weights(model, weights)
    if scaler_state is not None and core.scaler is not None:
        core.scaler.load_state_dict(scaler_state)
    core.step = state["step"]
    core.tokens_seen = state["tokens_seen"]
    core.best_val_loss = state.get("best_val_loss")
    core.bad_steps_total = state["bad_steps_total"]
    core.bad_steps_in_a_row = state["bad_steps_in_a_row"]
    core.eval_history = list(state.get("eval_history", []))
    if state.get("chars_per_token") is not None and core.chars_per_token is None:
        core.chars_per_token = state["chars_per_token"]
    restore_rng()
    return state


_MODEL_FIELDS = frozenset(TruthGPTConfig.__dataclass_fields__)
_TRAIN_FIELDS = frozenset(TrainConfig.__dataclass_fields__)


def load_core(
    path: str | Path, *, device: str | None = None, **train_overrides: Any
) -> TruthGPTOptimizationCore:
    """A core rebuilt from a checkpoint (or a run folder's latest), state and tokenizer loaded.

    `train_overrides` change training fields only (e.g. max_steps=… to extend a run); the
    model is fixed by the checkpoint.
    """
    from truthgpt.training.core import TruthGPTOptimizationCore

    reader = _Reader(resolve_checkpoint(path))
    model_config = _model_config(reader)
    config_path = reader.path(CONFIG_FILE)
    train = reader.json(CONFIG_FILE).get("train")
    if not isinstance(train, dict):
        raise CheckpointError(
            f"{config_path}: no training config ('train'); it was written by save_pretrained, "
            "which keeps the model only: load it with TruthGPTModel.from_pretrained"
        )
    if device is not None:
        train_overrides["device"] = device
    for key in train_overrides:
        if key in _MODEL_FIELDS:
            raise CheckpointError(
                f"{key}: a model field, fixed by the checkpoint ({getattr(model_config, key)!r}); "
                "only training fields can be overridden"
            )
        if key not in _TRAIN_FIELDS:
            raise CheckpointError(
                f"{key}: not a training field; valid: {', '.join(sorted(_TRAIN_FIELDS))}"
            )
    saved_device = str(train.get("device", "auto"))
    if (
        "device" not in train_overrides
        and saved_device.startswith("cuda")
        and not (torch.cuda.is_available())
    ):
        train_overrides["device"] = "cpu"  # a GPU run can still be evaluated on a CPU
    try:
        train_config = TrainConfig.from_dict({**train, **train_overrides})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{config_path}: invalid training config: {err}") from None
    config = TruthGPTOptimizationCoreConfig.from_parts(model_config, train_config)

    tokenizer = _read_tokenizer(reader) if reader.has(TOKENIZER_FILE) else None
    state = _read_trainer_state(reader)
    core = TruthGPTOptimizationCore(
        config,
        chars_per_token=state.get("chars_per_token"),
        tokenizer=tokenizer,
    )
    _load_into(core, reader)
    return core


# ---------------------------------------------------------------------------------- runs


class CheckpointManager:
    """A run's checkpoints: RUN_DIR/checkpoints/step-NNNNNNN plus `latest` and `best` pointers.

    Keeps the newest `keep_last` checkpoints and the best one by validation loss.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        if not _is_int(keep_last) or keep_last < 1:
            raise ValueError(f"keep_last: must be a positive integer, got {keep_last!r}")
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last

    def save(
        self,
        core: TruthGPTOptimizationCore,
        *,
        val_loss: float | None = None,
        full_state: tuple[dict[str, Tensor], dict[str, Any] | None] | None = None,
    ) -> Path:
        """Write a checkpoint of `core` at its current step; returns its folder.

        `full_state`: the gathered state of a sharded model (see `save_checkpoint`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_leftovers()
        name = f"step-{core.step:07d}"
        extra = {"val_loss": val_loss} if val_loss is not None else {}
        path = save_checkpoint(core, self.directory / name, full_state=full_state, **extra)
        _write_pointer(self.directory / LATEST, name)
        if val_loss is not None and math.isfinite(val_loss):
            best = self.best_val_loss()
            if best is None or val_loss < best:
                _write_pointer(self.directory / BEST, name)
        self._prune()
        return path

    def latest(self) -> Path | None:
        if not self.directory.is_dir():
            return None
        folder = _read_pointer(self.directory / LATEST)
        if folder is None:
            steps = _step_folders(self.directory)
            folder = steps[-1] if steps else None
        return folder

    def best(self) -> Path | None:
        return _read_pointer(self.directory / BEST) if self.directory.is_dir() else None

    def best_val_loss(self) -> float | None:
        """The validation loss recorded with the best checkpoint, if there is one."""
        best = self.best()
        if best is None:
            return None
        try:
            value = read_trainer_state(best).get("extra", {}).get("val_loss")
        except CheckpointError:
            return None
        return float(value) if isinstance(value, int | float) else None

    def _remove_leftovers(self) -> None:
        """Temporary folders and files of a save or prune that was interrupted."""
        for path in self.directory.iterdir():
            if path.name.startswith(_TMP_PREFIX):
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def _prune(self) -> None:
        steps = _step_folders(self.directory)
        keep = set(steps[-self.keep_last :])
        keep.update(p for p in (self.latest(), self.best()) if p is not None)
        for path in steps:
            if path not in keep:
                # Rename first, so an interrupted delete never leaves a half checkpoint behind
                # under a valid name.
                doomed = path.with_name(f"{_TMP_PREFIX}{path.name}-del-{uuid.uuid4().hex[:8]}")
                os.rename(path, doomed)
                shutil.rmtree(doomed, ignore_errors=True)
