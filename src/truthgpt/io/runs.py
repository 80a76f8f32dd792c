"""Where a run keeps its checkpoints: RUN_DIR/checkpoints/step-NNNNNNN with small `latest`
and `best` pointer files, and which folder a path given by a user means."""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path
from typing import Any

from truthgpt.io.files import POINTER_LIMIT, not_regular_reason, read_json_file, read_regular_file
from truthgpt.io.manifest import MANIFEST_FILE, CheckpointError

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
WEIGHTS_FILE = "model.safetensors"
STEP_NAME = re.compile(r"^step-(\d{7,})$")


RUN_INFO = "run.json"


def find_run_info(path: Path) -> dict[str, Any] | None:
    """run.json of a run folder, also found from a checkpoint inside it (read within bounds:
    a FIFO, a device or a huge file there is refused, naming it)."""
    for folder in (path, *path.resolve().parents[:3]):
        candidate = folder / RUN_INFO
        if os.path.lexists(candidate):
            info = read_json_file(candidate, what=RUN_INFO)
            if not isinstance(info, dict):
                raise ValueError(f"{candidate}: expected a JSON object")
            return info
    return None


def step_name(step: int) -> str:
    return f"step-{step:07d}"


class CheckpointSkipped(UserWarning):
    """A newer checkpoint folder than the one used is incomplete or damaged."""


def read_pointer(path: Path) -> Path | None:
    """The checkpoint folder a pointer file names, or None when it is absent or invalid (a
    link to a device, a FIFO, a file larger than a folder name: read within bounds)."""
    try:
        name = read_regular_file(path, POINTER_LIMIT, what="pointer").decode("utf-8").strip()
    except (OSError, ValueError):  # UnicodeDecodeError among them
        return None
    if not STEP_NAME.match(name):
        return None
    folder = path.parent / name
    return folder if is_complete(folder) else None


def step_of(folder: Path) -> int:
    return int(folder.name.split("-")[1])


def is_complete(folder: Path) -> bool:
    """A real folder (not a link) holding a manifest: the last file a checkpoint gets."""
    return folder.is_dir() and not folder.is_symlink() and (folder / MANIFEST_FILE).is_file()


def step_folders(checkpoints: Path) -> list[Path]:
    """Complete step-N folders (temporary ones excluded), oldest first."""
    found = [p for p in checkpoints.iterdir() if STEP_NAME.match(p.name) and is_complete(p)]
    return sorted(found, key=step_of)


def damaged_after(checkpoints: Path, chosen: Path | None) -> list[tuple[Path, str]]:
    """(folder, why) of every step-N entry newer than `chosen` that is not a complete
    checkpoint, newest first: what a reader skips to reach `chosen`."""
    floor = step_of(chosen) if chosen is not None else -1
    found = []
    for path in checkpoints.iterdir():
        if STEP_NAME.match(path.name) and step_of(path) > floor and not is_complete(path):
            if path.is_symlink():
                why = "is a symbolic link"
            elif not path.is_dir():
                why = f"is {(not_regular_reason(path) or 'a file').removeprefix('is ')}"
            else:
                reason = not_regular_reason(path / MANIFEST_FILE)
                why = (
                    f"has no {MANIFEST_FILE} (incomplete or damaged)"
                    if reason in (None, "does not exist")
                    else f"has a {MANIFEST_FILE} that {reason}"
                )
            found.append((path, why))
    return sorted(found, key=lambda item: -step_of(item[0]))


def latest_in(checkpoints: Path) -> Path | None:
    """The folder `latest` names, else the newest complete step folder (a crash can come
    between the rename of a new checkpoint and the update of the pointer)."""
    folder = read_pointer(checkpoints / LATEST)
    if folder is None:
        steps = step_folders(checkpoints)
        folder = steps[-1] if steps else None
    return folder


def warn_skipped(checkpoints: Path, chosen: Path | None) -> None:
    """One warning line per newer step folder that a reader of `chosen` passes over."""
    using = f"using {chosen.name}" if chosen is not None else "no complete checkpoint left"
    for path, why in damaged_after(checkpoints, chosen):
        warnings.warn(f"{path}: skipped, it {why}; {using}", CheckpointSkipped, stacklevel=3)


def resolve_checkpoint(path: str | Path) -> Path:
    """The checkpoint folder meant by `path`: a checkpoint folder itself, a `checkpoints`
    folder or a run folder (both follow `latest`)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such checkpoint, checkpoints folder or run folder")
    if path.is_file() and path.name in (LATEST, BEST):
        folder = read_pointer(path)
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
    if checkpoints is not path or (path / LATEST).exists() or step_folders(path):
        folder = latest_in(checkpoints)
        warn_skipped(checkpoints, folder)
        if folder is None:
            raise CheckpointError(f"{checkpoints}: holds no complete checkpoint yet")
        return folder
    raise CheckpointError(
        f"{path}: not a checkpoint folder (no {MANIFEST_FILE} and {WEIGHTS_FILE}), a checkpoints "
        f"folder or a run folder (no {CHECKPOINTS_DIR}/)"
    )
