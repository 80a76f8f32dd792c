"""Where a run keeps its checkpoints: RUN_DIR/checkpoints/step-NNNNNNN with small `latest`
and `best` pointer files, and which folder a path given by a user means."""

from __future__ import annotations

import re
from pathlib import Path

from truthgpt.io.manifest import MANIFEST_FILE, CheckpointError

CHECKPOINTS_DIR = "checkpoints"
LATEST = "latest"
BEST = "best"
WEIGHTS_FILE = "model.safetensors"
STEP_NAME = re.compile(r"^step-(\d{7,})$")


def step_name(step: int) -> str:
    return f"step-{step:07d}"


def read_pointer(path: Path) -> Path | None:
    """The checkpoint folder a pointer file names, or None when it is absent or invalid."""
    try:
        name = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    if not STEP_NAME.match(name):
        return None
    folder = path.parent / name
    return folder if (folder / MANIFEST_FILE).is_file() else None


def step_folders(checkpoints: Path) -> list[Path]:
    """Complete step-N folders (temporary ones excluded), oldest first."""
    found = [
        p
        for p in checkpoints.iterdir()
        if STEP_NAME.match(p.name) and p.is_dir() and (p / MANIFEST_FILE).is_file()
    ]
    return sorted(found, key=lambda p: int(p.name.split("-")[1]))


def latest_in(checkpoints: Path) -> Path | None:
    """The folder `latest` names, else the newest complete step folder (a crash can come
    between the rename of a new checkpoint and the update of the pointer)."""
    folder = read_pointer(checkpoints / LATEST)
    if folder is None:
        steps = step_folders(checkpoints)
        folder = steps[-1] if steps else None
    return folder


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
        if folder is None:
            raise CheckpointError(f"{checkpoints}: holds no complete checkpoint yet")
        return folder
    raise CheckpointError(
        f"{path}: not a checkpoint folder (no {MANIFEST_FILE} and {WEIGHTS_FILE}), a checkpoints "
        f"folder or a run folder (no {CHECKPOINTS_DIR}/)"
    )
