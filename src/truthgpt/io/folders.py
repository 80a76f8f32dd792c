"""Which folders a command may write, replace or delete: only those it can prove it wrote.

Every folder a command writes (a run, prepared data, an analysis, an export, a demo report, a
comparison) holds a marker, `.truthgpt.json`, naming its kind and listing the entries written
into it. A command may replace a non-empty folder only when the marker names the kind it
writes and the folder holds nothing the marker does not list: a file a user added beside
ours is proof enough that the folder is no longer only ours. Everything else is refused
before any work, with one line naming the folder: a link (never written through), a file,
one of the command's own inputs (or a folder holding one, or inside one), a folder without
write permission, a folder another kind of command wrote.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

from truthgpt.io.atomic import TMP_PREFIX, write_file_atomically, write_folder_atomically
from truthgpt.io.files import CONFIG_LIMIT, UnreadableFile, read_json_file
from truthgpt.io.jsonio import JSONFileError, json_bytes

MARKER_FILE = ".truthgpt.json"
MARKER_FORMAT = "truthgpt-folder"
KINDS = ("run", "prepared data", "analysis", "export", "demo report", "comparison")
IGNORED = frozenset({".lock"})  # a run's lock file stays when a run fails before it starts


class FolderRefused(FileExistsError):
    """A command would replace, delete or write into a folder it may not touch."""


def write_marker(folder: Path, kind: str, entries: Iterable[str] | None = None) -> None:
    """Mark `folder` as a `kind` folder of truthgpt's holding `entries` (default: what it
    holds now). Written last, so a folder is marked only once it is complete."""
    if kind not in KINDS:
        raise ValueError(f"kind: {kind!r} is not one of {', '.join(KINDS)}")
    if entries is None:
        entries = (p.name for p in folder.iterdir() if p.name != MARKER_FILE)
    names = sorted(set(entries) - {MARKER_FILE})
    data = json_bytes({"format": MARKER_FORMAT, "kind": kind, "entries": names})
    write_file_atomically(folder / MARKER_FILE, data)  # a run's folder gets it in place


def read_marker(folder: Path) -> tuple[str, frozenset[str]] | None:
    """(kind, listed entries) of a marked folder; None when it has no readable marker."""
    path = folder / MARKER_FILE
    if not path.exists() and not path.is_symlink():
        return None
    try:
        marker = read_json_file(path, CONFIG_LIMIT, what="folder marker")
    except (OSError, UnreadableFile, JSONFileError):
        return None
    if not isinstance(marker, dict) or marker.get("format") != MARKER_FORMAT:
        return None
    kind, entries = marker.get("kind"), marker.get("entries")
    if kind not in KINDS or not isinstance(entries, list):
        return None
    if not all(isinstance(e, str) for e in entries):
        return None
    return kind, frozenset(entries)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(path))


def _writable(path: Path) -> bool:
    """Whether `path` (a folder) may be written: its owner-write bit is set (also honoured for
    root, who could write anyway: a read-only folder is a user's "do not touch") and the
    process has write access."""
    return bool(path.stat().st_mode & stat.S_IWUSR) and os.access(path, os.W_OK | os.X_OK)


def check_output(
    target: str | Path,
    kind: str,
    *,
    flag: str = "--out",
    replace: bool = False,
    replace_flag: str | None = None,
    inputs: Iterable[str | Path] = (),
    legacy: Callable[[Path], bool] | None = None,
    hint: str = "",
) -> None:
    """Raise `FolderRefused` unless `target` may become a `kind` folder.

    `target` may be missing or empty; when it is not empty it may be replaced only with
    `replace` (the user asked, by `replace_flag`; a demo report is always replaceable) and
    only if it is a `kind` folder of truthgpt's holding only what its marker lists (or what
    `legacy(target)`, for folders of releases before the marker, recognises). `inputs` are
    the paths the command reads: the target may be none of them, hold one or lie inside one.
    """
    target = Path(target)
    name = f"{flag}: {target}"
    if target.is_symlink():
        raise FolderRefused(
            f"{name} is a symbolic link (to {os.readlink(target)}); truthgpt does not write "
            "through links: pass the folder itself"
        )
    if target.exists() and not target.is_dir():
        raise FolderRefused(f"{name} exists and is not a folder; refusing to replace it")
    here = _resolved(target)
    for source in inputs:
        there = _resolved(Path(source))
        if here == there or there in here.parents:
            raise FolderRefused(f"{name} is the input {source}; choose another folder")
        if here in there.parents:
            raise FolderRefused(f"{name} holds the input {source}; choose another folder")
    existing = target if target.exists() else _nearest_existing(target.parent)
    if not _writable(existing):
        raise FolderRefused(f"{flag}: {existing} is read-only; refusing to write there")
    if not target.is_dir():
        return
    entries = {p.name for p in target.iterdir()} - IGNORED
    if not entries:
        return
    what = f"{_article(kind)} {kind} folder"
    if not replace:
        how = f" or pass {replace_flag} to replace it" if replace_flag else ""
        raise FolderRefused(f"{name} is not empty; choose a new folder{how}{hint}")
    marker = read_marker(target)
    if marker is None:
        if legacy is not None and legacy(target):
            return
        raise FolderRefused(
            f"{name} is not empty and is not {what} written by truthgpt (no {MARKER_FILE}); "
            "refusing to replace it: choose a new folder or empty it yourself"
        )
    marked_kind, listed = marker
    if marked_kind != kind:
        raise FolderRefused(
            f"{name} is {_article(marked_kind)} {marked_kind} folder, not {what}; refusing to "
            "replace it"
        )
    foreign = sorted(e for e in entries - listed - {MARKER_FILE} if not e.startswith(TMP_PREFIX))
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        raise FolderRefused(
            f"{name} holds {foreign[0]!r}{more}, which truthgpt did not write; refusing to "
            "replace it: move it out first"
        )


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _nearest_existing(path: Path) -> Path:
    """`path` or its nearest ancestor that exists (where a new folder would be created)."""
    path = _resolved(path)
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def write_owned_folder(
    target: str | Path,
    kind: str,
    write: Callable[[Path], None],
    *,
    flag: str = "--out",
    replace: bool = False,
    replace_flag: str | None = None,
    inputs: Iterable[str | Path] = (),
    legacy: Callable[[Path], bool] | None = None,
) -> Path:
    """`write_folder_atomically` with `check_output`'s rule, checked before any work and
    again just before the rename; the new folder gets a marker of `kind`."""
    inputs = list(inputs)

    def check(path: Path) -> None:
        check_output(
            path,
            kind,
            flag=flag,
            replace=replace,
            replace_flag=replace_flag,
            inputs=inputs,
            legacy=legacy,
        )

    return write_folder_atomically(
        target, write, check=check, finish=lambda tmp: write_marker(tmp, kind)
    )
