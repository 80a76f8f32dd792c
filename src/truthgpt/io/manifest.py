"""Verified folders: `manifest.json` lists the size and sha256 of every file, and a reader
checks each file against it before parsing it.

Nothing is ever unpickled, so reading a folder cannot run code; a missing, truncated, edited
or foreign file raises `CheckpointError` naming the file and what is wrong.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import safetensors.torch
from torch import Tensor

from truthgpt.io.files import (
    CONFIG_LIMIT,
    STATE_LIMIT,
    check_depth,
    not_regular_reason,
    read_regular_file,
)
from truthgpt.io.jsonio import is_int, json_bytes, parse_json

FORMAT = "truthgpt-checkpoint"
FORMAT_VERSION = 1
MANIFEST_FILE = "manifest.json"
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")
_SHA256 = re.compile(r"[0-9a-f]{64}")


class CheckpointError(ValueError):
    """A checkpoint is missing, corrupt, foreign or does not fit the model; names the file."""


def format_header(**fields: Any) -> dict[str, Any]:
    """The fields that mark a JSON file as truthgpt's, and which version of the format."""
    return {"format": FORMAT, "format_version": FORMAT_VERSION, **fields}


def check_format(obj: Any, path: Path) -> None:
    """Raise unless `obj` is a JSON object of this format, in a version this code reads."""
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: expected a JSON object, got {type(obj).__name__}")
    if obj.get("format") != FORMAT:
        raise CheckpointError(
            f"{path}: not a truthgpt checkpoint file (format={obj.get('format')!r}, "
            f"expected {FORMAT!r})"
        )
    version = obj.get("format_version")
    if not is_int(version) or version < 1:
        raise CheckpointError(f"{path}: format_version must be a positive integer, got {version!r}")
    if version > FORMAT_VERSION:
        raise CheckpointError(
            f"{path}: format_version {version} is newer than this truthgpt reads "
            f"({FORMAT_VERSION}); upgrade truthgpt"
        )


def write_manifest(folder: Path) -> None:
    """List every file of `folder` with its size and sha256 (the last file written)."""
    files = {}
    for path in sorted(folder.iterdir()):
        data = path.read_bytes()
        files[path.name] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / MANIFEST_FILE).write_bytes(json_bytes(format_header(files=files)))


def check_replaceable(target: Path) -> None:
    """Only an empty folder or an earlier verified folder may be replaced by a new one."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target}: exists and is not a folder; refusing to replace it")
    if target.is_dir() and any(target.iterdir()) and not (target / MANIFEST_FILE).is_file():
        raise FileExistsError(
            f"{target}: folder exists and is not a truthgpt checkpoint (no {MANIFEST_FILE}); "
            "refusing to overwrite it"
        )


class FolderReader:
    """One folder whose files are checked against manifest.json as they are read.

    `known_files` are the names a writer may put there: one present on disk but absent from
    the manifest is an error, so a lost manifest entry is never taken for an optional part.
    `limits` caps the size of named files (JSON files not named: `STATE_LIMIT`), checked
    against the manifest before any file but the manifest is read.
    """

    def __init__(
        self,
        folder: Path,
        known_files: Iterable[str] = (),
        limits: Mapping[str, int] | None = None,
    ) -> None:
        self.folder = folder
        self.limits = dict(limits or {})
        self.files = self._read_manifest()
        self._json: dict[str, dict[str, Any]] = {}
        for name in self.files:
            self._check_size(name)
        for name in known_files:
            if name not in self.files and (folder / name).exists():
                raise CheckpointError(f"{folder / name}: not listed in {MANIFEST_FILE} ('files')")

    def limit(self, name: str) -> int | None:
        """The most bytes `name` may hold, if it is capped."""
        return self.limits.get(name, STATE_LIMIT if name.endswith(".json") else None)

    def _check_size(self, name: str) -> None:
        path = self.folder / name
        limit = self.limit(name)
        if limit is not None and self.files[name]["size"] > limit:
            raise CheckpointError(
                f"{path}: {self.files[name]['size']:,} bytes listed in {MANIFEST_FILE}, more "
                f"than a {name} may hold ({limit:,}); refusing to read it"
            )
        reason = not_regular_reason(path)
        if reason is not None:
            missing = reason == "does not exist"
            raise CheckpointError(
                f"{path}: {'missing' if missing else reason} (listed in {MANIFEST_FILE})"
            )
        size = path.stat().st_size
        if size != self.files[name]["size"]:
            raise CheckpointError(
                f"{path}: {size} bytes, but {self.files[name]['size']} were saved; the file was "
                "truncated or replaced"
            )

    def _read_manifest(self) -> dict[str, dict[str, Any]]:
        path = self.folder / MANIFEST_FILE
        reason = not_regular_reason(path)
        if reason is not None and reason != "does not exist":
            raise CheckpointError(f"{path}: {reason}")
        if not path.is_file():
            raise CheckpointError(
                f"{path}: missing; {self.folder} is not a complete truthgpt checkpoint"
            )
        data = read_regular_file(path, CONFIG_LIMIT, what=MANIFEST_FILE, error=CheckpointError)
        manifest = check_depth(parse_json(path, data, CheckpointError), path, CheckpointError)
        check_format(manifest, path)
        files = manifest.get("files")
        if not isinstance(files, dict):
            raise CheckpointError(f"{path}: 'files' must be an object of file name -> hash")
        for name, entry in files.items():
            ok = (
                isinstance(entry, dict)
                and is_int(entry.get("size"))
                and entry["size"] >= 0
                and isinstance(entry.get("sha256"), str)
                and _SHA256.fullmatch(entry["sha256"]) is not None
                and _NAME.fullmatch(name) is not None
            )
            if not ok:
                raise CheckpointError(f"{path}: entry {name!r} is malformed: {entry!r}")
        return files

    def has(self, name: str) -> bool:
        return name in self.files

    def size(self, name: str) -> int:
        """The size of a listed file, checked against the manifest (its contents are not)."""
        if name not in self.files:
            raise CheckpointError(
                f"{self.folder / name}: not listed in {MANIFEST_FILE} ('files'); the checkpoint "
                "is incomplete"
            )
        self._check_size(name)
        return self.files[name]["size"]

    def path(self, name: str) -> Path:
        return self.folder / name

    def bytes(self, name: str) -> bytes:
        """The file's contents, after checking its size and sha256 against the manifest."""
        path = self.folder / name
        self.size(name)
        entry = self.files[name]
        data = read_regular_file(path, entry["size"], what=name, error=CheckpointError)
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
            data = parse_json(path, self.bytes(name), CheckpointError)
            check_depth(data, path, CheckpointError)
            if not isinstance(data, dict):
                raise CheckpointError(f"{path}: expected a JSON object, got {type(data).__name__}")
            self._json[name] = data
        return self._json[name]

    def tensors(self, name: str) -> tuple[dict[str, Tensor], dict[str, str]]:
        """A verified safetensors file: its tensors (fresh CPU copies) and its metadata."""
        path = self.folder / name
        data = self.bytes(name)
        header_len = int.from_bytes(data[:8], "little")
        try:
            header = parse_json(path, data[8 : 8 + header_len], CheckpointError, unique_keys=True)
        except CheckpointError as err:
            reason = str(err).removeprefix(f"{path}: ")
            raise CheckpointError(f"{path}: not a readable safetensors file ({reason})") from None
        try:
            tensors = safetensors.torch.load(data)
            metadata = header.get("__metadata__") or {}
        except Exception as err:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: not a readable safetensors file ({err})") from None
        return tensors, metadata
