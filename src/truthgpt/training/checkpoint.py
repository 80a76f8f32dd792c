"""A run's checkpoint: a model folder plus what resuming needs, written atomically, verified
on load.

    config.json            format version, the model config and the training config
    model.safetensors      the weights; a tied lm_head is stored once, as wte.weight
    tokenizer.json         the run's tokenizer, when it has one
    trainer_state.json     `TrainState`, the RNG states and the caller's extra values
    optimizer.safetensors  AdamW's moments; hyper-parameters and GradScaler state as metadata
    manifest.json          the size and sha256 of every file above

Loading mirrors saving: `read_checkpoint` reads each small file once into a
`CheckpointContents` value, and `load_checkpoint` loads it into the objects it is given (a
`CheckpointState`), checking everything before it applies anything, so a bad checkpoint leaves
them as they were. A run keeps its checkpoints in RUN_DIR/checkpoints/step-NNNNNNN with
`latest` and `best` pointers (`CheckpointManager`).
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from truthgpt.config import ConfigError, TrainConfig, TruthGPTConfig
from truthgpt.io.atomic import fsync_path, remove_folder, remove_leftovers, write_file_atomically
from truthgpt.io.atomic import write_folder_atomically as _write_folder
from truthgpt.io.files import check_depth, named, not_regular_reason
from truthgpt.io.jsonio import is_int, json_bytes, parse_json
from truthgpt.io.manifest import (
    CheckpointError,
    FolderReader,
    check_replaceable,
    write_manifest,
)
from truthgpt.io.pretrained import (
    CONFIG_FILE,
    copy_weights,
    open_folder,
    read_model_config,
    read_weights,
    require_fields,
    unique_tensors,
    write_model_files,
)
from truthgpt.io.runs import (
    BEST,
    CHECKPOINTS_DIR,
    LATEST,
    damaged_after,
    read_pointer,
    step_folders,
    step_name,
)
from truthgpt.training.optim_state import OPTIMIZER_FILE, optimizer_bytes, read_optimizer
from truthgpt.training.rng import parse_rng_state, rng_state
from truthgpt.training.state import TrainState

TOKENIZER_FILE = "tokenizer.json"
STATE_FILE = "trainer_state.json"
RUN_FILES = (TOKENIZER_FILE, STATE_FILE, OPTIMIZER_FILE)

FullState = tuple[dict[str, Tensor], dict[str, Any] | None]


@dataclass(frozen=True)
class CheckpointState:
    """What a checkpoint holds, as the objects that hold it (torchtitan's `Stateful` idea):
    checkpoints are written from these and the manager never reaches into the trainer.
    The trainer hands them over with `TruthGPTOptimizationCore.checkpoint_state()`."""

    model: nn.Module
    model_config: TruthGPTConfig
    train_config: TrainConfig
    state: TrainState
    optimizer: torch.optim.Optimizer | None
    scaler: torch.amp.GradScaler | None
    tokenizer: Any
    device: torch.device


def save_checkpoint(
    directory: str | Path,
    objects: CheckpointState,
    *,
    full_state: FullState | None = None,
    extra: dict[str, Any] | None = None,
) -> Path:
    """Write everything needed to resume exactly; `extra` (JSON values) is stored in
    trainer_state.json under "extra".

    `full_state` (model state dict, optimizer state dict) replaces the model's and optimizer's
    own when the model is sharded: see `truthgpt.training.distributed.gather_full_state`.
    """
    o = objects
    config = {"model": o.model_config.to_dict(), "train": o.train_config.to_dict()}
    trainer_state = {**o.state.state_dict(), "rng": rng_state(o.device), "extra": extra or {}}
    try:
        state_bytes = json_bytes(trainer_state)
    except (TypeError, ValueError) as err:
        raise ValueError(f"extra_state: values must be JSON-serialisable ({err})") from None
    tokenizer = o.tokenizer
    if tokenizer is not None and not callable(getattr(tokenizer, "save", None)):
        raise ValueError(f"tokenizer: {type(tokenizer).__name__} has no save(path) method")
    model_state, optimizer_state = full_state or (None, None)
    weights = unique_tensors(o.model, model_state)
    optimizer_file = (
        optimizer_bytes(o.optimizer, o.scaler, optimizer_state) if o.optimizer is not None else None
    )

    def write(tmp: Path) -> None:
        write_model_files(tmp, config, weights)
        (tmp / STATE_FILE).write_bytes(state_bytes)
        if optimizer_file is not None:
            (tmp / OPTIMIZER_FILE).write_bytes(optimizer_file)
        if tokenizer is not None:
            tokenizer.save(tmp / TOKENIZER_FILE)

    return _write_folder(directory, write, check=check_replaceable, finish=write_manifest)


def open_checkpoint(path: str | Path) -> FolderReader:
    """The verified checkpoint folder `path` means (a checkpoint, a run, a pointer)."""
    return open_folder(path, RUN_FILES)


@dataclass
class ResumeState:
    """What trainer_state.json holds, checked: counters, extra values, RNG restore."""

    state: TrainState
    extra: dict[str, Any]
    restore_rng: Callable[[], None]
    raw: dict[str, Any]

    def as_dict(self) -> dict[str, Any]:
        """trainer_state.json as checked: the counters, and the caller's values under "extra"."""
        return {**self.raw, **self.state.state_dict(), "extra": self.extra}


def read_resume_state(reader: FolderReader) -> ResumeState:
    """trainer_state.json of a verified folder, every field checked."""
    path = reader.path(STATE_FILE)
    saved = reader.json(STATE_FILE)
    for name in ("step", "tokens_seen", "bad_steps_total", "bad_steps_in_a_row"):
        if name not in saved:  # required since format 1; later fields may be absent
            raise CheckpointError(f"{path}: '{name}' is missing")
    extra = saved.get("extra", {})
    if not isinstance(extra, dict):
        raise CheckpointError(f"{path}: 'extra' must be an object")
    return ResumeState(
        state=TrainState.from_state_dict(saved, path),
        extra=extra,
        restore_rng=parse_rng_state(saved.get("rng"), path),
        raw=saved,
    )


_MODEL_FIELDS = frozenset(TruthGPTConfig.__dataclass_fields__)
_TRAIN_FIELDS = frozenset(TrainConfig.__dataclass_fields__)
# The training fields config.json has held since format 1 (see MODEL_FIELDS_V1).
TRAIN_FIELDS_V1 = frozenset(
    {
        "learning_rate",
        "min_lr",
        "warmup_steps",
        "max_steps",
        "lr_decay_steps",
        "weight_decay",
        "beta1",
        "beta2",
        "grad_clip",
        "batch_size",
        "block_size",
        "gradient_accumulation_steps",
        "precision",
        "device",
        "seed",
        "eval_interval",
        "eval_batches",
        "log_interval",
        "checkpoint_every",
        "keep_checkpoints",
        "max_bad_steps",
        "peak_flops",
    }
)


def read_train_config(reader: FolderReader, overrides: dict[str, Any] | None = None) -> TrainConfig:
    """The training config of a checkpoint with `overrides` (training fields only: the model
    is fixed by the checkpoint) applied, validated."""
    path = reader.path(CONFIG_FILE)
    train = reader.json(CONFIG_FILE).get("train")
    if not isinstance(train, dict):
        raise CheckpointError(
            f"{path}: no training config ('train'); it was written by save_pretrained, which "
            "keeps the model only: load it with TruthGPTModel.from_pretrained"
        )
    require_fields(train, TRAIN_FIELDS_V1, path, "training")
    overrides = dict(overrides or {})
    for key in overrides:
        if key in _MODEL_FIELDS:
            raise CheckpointError(
                f"{key}: a model field, fixed by the checkpoint; only training fields can be "
                "overridden"
            )
        if key not in _TRAIN_FIELDS:
            raise CheckpointError(
                f"{key}: not a training field; valid: {', '.join(sorted(_TRAIN_FIELDS))}"
            )
    saved_device = str(train.get("device", "auto"))
    if (
        "device" not in overrides
        and saved_device.startswith("cuda")
        and not torch.cuda.is_available()
    ):
        overrides["device"] = "cpu"  # a GPU run can still be evaluated on a CPU
    try:
        return TrainConfig.from_dict({**train, **overrides})
    except (ConfigError, TypeError) as err:
        raise CheckpointError(f"{path}: invalid training config: {err}") from None


def check_same_model(contents: CheckpointContents, config: TruthGPTConfig) -> None:
    """Raise, naming every differing field, unless the checkpoint holds a model like this."""
    saved = contents.model_config.to_dict()
    ours = config.to_dict()
    if saved != ours:
        diff = ", ".join(
            f"{k}={v!r} (checkpoint) vs {ours[k]!r}" for k, v in saved.items() if ours[k] != v
        )
        raise CheckpointError(f"{contents.reader.path(CONFIG_FILE)}: a different model: {diff}")


def read_checkpoint_tokenizer(reader: FolderReader, vocab_size: int | None = None) -> Any:
    """The tokenizer saved in a verified folder, or None when there is none. It is parsed
    from the bytes checked against the manifest: the file is read once. `vocab_size`: the
    model's, when the caller has read its config already."""
    from truthgpt.data.tokenization import tokenizer_from_dict

    if not reader.has(TOKENIZER_FILE):
        return None
    path = reader.path(TOKENIZER_FILE)
    data = parse_json(path, reader.bytes(TOKENIZER_FILE), CheckpointError)
    check_depth(data, path, CheckpointError)
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: does not hold a JSON object")
    try:
        tokenizer = tokenizer_from_dict(data, origin=f"tokenizer file {str(path)!r}")
    except ValueError as err:
        message = str(err) if str(path) in str(err) else f"{path}: {err}"
        raise CheckpointError(message) from None
    if vocab_size is None:
        vocab_size = read_model_config(reader).vocab_size
    if tokenizer.vocab_size > vocab_size:
        raise CheckpointError(
            f"{path}: 'vocab_size' {tokenizer.vocab_size} exceeds the model's ({vocab_size}); "
            "its ids would index past the embedding"
        )
    return tokenizer


class CheckpointContents:
    """A checkpoint's small files, each read and checked once, when first asked for (so
    that errors come in the order the callers check things): config.json, trainer_state.json
    and tokenizer.json. What a resume decides on comes from here; the weights and the
    optimizer state are read once too, when `load_checkpoint` loads them. `reader` is the
    verified folder (its manifest read), which keeps the parsed JSON it has read."""

    def __init__(self, reader: FolderReader) -> None:
        self.reader = reader

    @property
    def path(self) -> Path:
        return self.reader.folder

    @cached_property
    def model_config(self) -> TruthGPTConfig:
        return read_model_config(self.reader)

    @cached_property
    def resume(self) -> ResumeState:
        return read_resume_state(self.reader)

    @cached_property
    def tokenizer(self) -> Any:
        return read_checkpoint_tokenizer(self.reader, self.model_config.vocab_size)

    @property
    def step(self) -> int:
        return self.resume.state.step


def read_checkpoint(source: str | Path | FolderReader) -> CheckpointContents:
    """The checkpoint `source` means (a folder, a run, a pointer, or an open reader), to be
    read once; nothing is applied to anything."""
    reader = source if isinstance(source, FolderReader) else open_checkpoint(source)
    return CheckpointContents(reader)


def load_checkpoint(contents: CheckpointContents, objects: CheckpointState) -> dict[str, Any]:
    """Load a checkpoint into the objects it is given, the mirror of `save_checkpoint`: the
    model's weights, the optimizer's and GradScaler's state (when `objects` has them), the
    train state (in place: whoever holds it sees the checkpoint's counters) and the RNG
    states. Everything is read and checked before anything is applied, so a bad checkpoint
    leaves the objects as they were. Returns trainer_state.json as checked."""
    reader = contents.reader
    check_same_model(contents, objects.model_config)
    resume = contents.resume
    weights = read_weights(reader, objects.model)
    optimizer_state = scaler_state = None
    if objects.optimizer is not None and reader.has(OPTIMIZER_FILE):
        optimizer_state, scaler_state = read_optimizer(
            reader, objects.optimizer, max_step=resume.state.step
        )
    if (
        scaler_state is not None
        and objects.scaler is not None
        and set(scaler_state) != set(objects.scaler.state_dict())
    ):
        raise CheckpointError(f"{reader.path(OPTIMIZER_FILE)}: GradScaler state is malformed")
    if optimizer_state is not None:
        assert objects.optimizer is not None
        previous = objects.optimizer.state_dict()
        try:
            objects.optimizer.load_state_dict(optimizer_state)
        except (ValueError, KeyError, TypeError, RuntimeError) as err:
            objects.optimizer.load_state_dict(previous)
            raise CheckpointError(f"{reader.path(OPTIMIZER_FILE)}: {err}") from None

    # Everything is verified: apply it.
    copy_weights(objects.model, weights)
    if scaler_state is not None and objects.scaler is not None:
        objects.scaler.load_state_dict(scaler_state)
    objects.state.load(resume.state)
    resume.restore_rng()
    return resume.as_dict()


def read_tokenizer(path: str | Path) -> Any:
    """The tokenizer saved with a checkpoint (or a run's latest), or None when there is none."""
    return read_checkpoint_tokenizer(open_checkpoint(path))


def read_trainer_state(path: str | Path | FolderReader) -> dict[str, Any]:
    """The trainer state (counters, `extra` values) of a checkpoint, run or checkpoints folder."""
    reader = path if isinstance(path, FolderReader) else open_checkpoint(path)
    return read_resume_state(reader).as_dict()


class CheckpointManager:
    """A run's checkpoints: RUN_DIR/checkpoints/step-NNNNNNN plus `latest` and `best` pointers.

    Keeps the newest `keep_last` checkpoints and the best one by validation loss.
    """

    def __init__(self, run_dir: str | Path, keep_last: int = 2) -> None:
        self.run_dir = Path(run_dir)
        self.directory = self.run_dir / CHECKPOINTS_DIR
        self.keep_last = keep_last
        # The checkpoints and pointers read so far. A run has one writer, this manager under
        # the run's lock: a checkpoint is never changed once written (only replaced or
        # removed, here) and a pointer changes only here, so each file is read once.
        self._read: dict[Path, CheckpointContents] = {}
        self._pointers: dict[str, Path | None] = {}

    @property
    def keep_last(self) -> int:
        return self._keep_last

    @keep_last.setter
    def keep_last(self, value: int) -> None:
        if not is_int(value) or value < 1:
            raise ValueError(f"keep_last: must be a positive integer, got {value!r}")
        self._keep_last = value

    def read(self, folder: Path) -> CheckpointContents:
        """The checkpoint in `folder` (a step folder of this run), read once per manager."""
        if folder not in self._read:
            self._read[folder] = read_checkpoint(folder)
        return self._read[folder]

    def _trainer_state(self, folder: Path) -> dict[str, Any]:
        return self.read(folder).resume.as_dict()

    def _pointer(self, name: str) -> Path | None:
        """The complete checkpoint the pointer `name` names, read once."""
        if name not in self._pointers:
            self._pointers[name] = read_pointer(self.directory / name)
        return self._pointers[name]

    def _point(self, name: str, folder: Path) -> None:
        write_file_atomically(self.directory / name, (folder.name + "\n").encode("utf-8"))
        self._pointers[name] = folder

    def check_folder(self) -> None:
        """Refuse a checkpoints entry that is not a real folder of the run: a link (writes
        would land in another folder, another run's perhaps), a file, a FIFO or a device.
        Absent is fine: the first checkpoint creates it."""
        path = self.directory
        if path.is_symlink():
            raise CheckpointError(
                f"{path}: is a symbolic link; a run writes its checkpoints only inside its folder"
            )
        if os.path.lexists(path) and not path.is_dir():
            why = not_regular_reason(path) or "is a file, not a regular file"
            raise CheckpointError(f"{path}: {why.replace('a regular file', 'a folder')}")

    def save(
        self,
        objects: CheckpointState,
        *,
        val_loss: float | None = None,
        full_state: FullState | None = None,
    ) -> Path:
        """Write a checkpoint of `objects` (`core.checkpoint_state()`) at their step; returns
        its folder. `full_state`: the gathered state of a sharded model (`save_checkpoint`)."""
        self.directory.mkdir(parents=True, exist_ok=True)
        remove_leftovers(self.directory)
        name = step_name(objects.state.step)
        extra = {"val_loss": val_loss} if val_loss is not None else None
        self._read.pop(self.directory / name, None)  # replaced, if it was there
        try:
            path = save_checkpoint(
                self.directory / name, objects, full_state=full_state, extra=extra
            )
        except OSError as err:  # a write() names no file: name the checkpoint
            raise named(err, str(self.directory / name))  # noqa: B904
        self._point(LATEST, path)
        if val_loss is not None and math.isfinite(val_loss):
            best = self.best_val_loss()
            if best is None or val_loss < best:
                self._point(BEST, path)
        self._prune()
        return path

    def recover(self) -> None:
        """Undo what a kill can leave behind: temporary folders and files, a `latest` or
        `best` pointer that is missing or names no complete checkpoint."""
        if not self.directory.is_dir():
            return
        remove_leftovers(self.directory)
        latest = self.latest()
        if latest is not None and self._pointer(LATEST) != latest:
            self._point(LATEST, latest)
        if self.best() is None:
            losses = {}
            for folder in step_folders(self.directory):
                try:
                    value = self._trainer_state(folder).get("extra", {}).get("val_loss")
                except CheckpointError:
                    continue
                if isinstance(value, int | float) and math.isfinite(value):
                    losses[folder] = value
            if losses:
                best = min(losses, key=losses.__getitem__)
                self._point(BEST, best)

    def latest(self) -> Path | None:
        """The checkpoint `latest` names, else the newest complete one (as `latest_in`)."""
        if not self.directory.is_dir():
            return None
        folder = self._pointer(LATEST)
        if folder is None:
            steps = step_folders(self.directory)
            folder = steps[-1] if steps else None
        return folder

    def set_aside_damaged(self) -> list[tuple[Path, Path, str]]:
        """Rename every step folder newer than the latest complete checkpoint, and not one
        itself, to damaged-step-N: training on from the older one would otherwise fail when
        it reaches that step and finds the name taken. Returns (old, new, why) of each."""
        if not self.directory.is_dir():
            return []
        moved = []
        for path, why in damaged_after(self.directory, self.latest()):
            new = self.directory / f"damaged-{path.name}"
            n = 1
            while new.exists() or new.is_symlink():
                n += 1
                new = self.directory / f"damaged-{path.name}-{n}"
            os.rename(path, new)
            moved.append((path, new, why))
        if moved:
            fsync_path(self.directory)
        return moved

    def check_recorded_config(self, recorded: dict[str, Any], may_change: Iterable[str]) -> None:
        """Raise unless every checkpoint of the run holds the config its run.json records
        (`recorded`, flat), but for the training fields a resume `may_change`: a checkpoint
        copied in from another run is refused before it is trained on."""
        if not self.directory.is_dir():
            return
        may_change = set(may_change)
        for folder in step_folders(self.directory):
            saved = self.read(folder).reader.json(CONFIG_FILE)
            parts = [saved.get("train"), saved.get("model")]
            fields = {k: v for part in parts if isinstance(part, dict) for k, v in part.items()}
            differ = [
                f"{key}={value!r} (checkpoint) vs {recorded[key]!r}"
                for key, value in fields.items()
                if key in recorded and key not in may_change and recorded[key] != value
            ]
            if differ:
                raise CheckpointError(
                    f"{folder}: not a checkpoint of this run: {', '.join(differ)} (run.json); "
                    "move it out of the run"
                )

    def best(self) -> Path | None:
        return self._pointer(BEST) if self.directory.is_dir() else None

    def best_val_loss(self) -> float | None:
        """The validation loss recorded with the best checkpoint, if there is one."""
        best = self.best()
        if best is None:
            return None
        try:
            value = self._trainer_state(best).get("extra", {}).get("val_loss")
        except CheckpointError:
            return None
        return float(value) if isinstance(value, int | float) else None

    def _prune(self) -> None:
        steps = step_folders(self.directory)
        keep = set(steps[-self.keep_last :])
        keep.update(p for p in (self.latest(), self.best()) if p is not None)
        for path in steps:
            if path not in keep:
                self._read.pop(path, None)
                remove_folder(path)
