"""Writes that a crash cannot leave half done.

A folder is filled under a temporary name beside its destination, every file and the folder
fsynced, then renamed into place: a reader sees the old folder or the complete new one. Every
writer in truthgpt (checkpoints, prepared data, analyses, tuned runs, exports) goes through
`write_folder_atomically`; small files (pointers, reports) through `write_file_atomically`.
"""

from __future__ import annotations

import os
import shutil
import uuid
import warnings
from collections.abc import Callable
from pathlib import Path

TMP_PREFIX = ".tmp-"  # folders and files being written or deleted; never valid output
OLD_MARK = "-old-"  # .tmp-NAME-old-XXXXXXXX: a folder being replaced, until the new one is in


def fsync_path(path: Path) -> None:
    """Flush a file or folder to disk (a folder's fsync makes the renames in it durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def refuse_link(target: Path) -> None:
    """A link is never written through, replaced or deleted: renaming it would leave the
    folder it points to beside a new real folder, and the link behind under a .tmp- name."""
    if target.is_symlink():
        raise FileExistsError(
            f"{target}: is a symbolic link (to {os.readlink(target)}); truthgpt does not write "
            "through links: pass the folder itself"
        )


def delete_tree(path: Path) -> None:
    """Delete a folder of ours that has been renamed out of the way; a link is only unlinked.
    What cannot be deleted is reported, not hidden: it is left under its .tmp- name."""
    if path.is_symlink() or not path.is_dir():
        path.unlink(missing_ok=True)
        return
    failed: list[str] = []
    shutil.rmtree(path, onerror=lambda _f, p, _e: failed.append(p))
    if failed:
        warnings.warn(f"{path}: could not delete {failed[0]} (left in place)", stacklevel=2)


def refuse_non_folder(target: Path) -> None:
    """A file or a link is never replaced by a folder."""
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise FileExistsError(f"{target}: exists and is not a folder; refusing to replace it")


def refuse_non_empty(target: Path) -> None:
    """The default rule: only a missing or empty folder may be replaced."""
    refuse_non_folder(target)
    if target.is_dir() and any(target.iterdir()):
        raise FileExistsError(f"{target}: folder is not empty; refusing to replace it")


def write_folder_atomically(
    target: str | Path,
    write: Callable[[Path], None],
    *,
    check: Callable[[Path], None] = refuse_non_empty,
    finish: Callable[[Path], None] | None = None,
) -> Path:
    """Run `write(tmp)` to fill a temporary folder beside `target`, then move it into place.

    `check(target)` raises when `target` may not be replaced; it runs before any work and
    again just before the rename (something may have appeared meanwhile). `finish(tmp)` runs
    after `write`, e.g. to add a manifest of what was written.
    """
    target = Path(target)
    refuse_link(target)
    restore_interrupted(target)
    check(target)
    parent = target.parent
    parent.mkdir(parents=True, exist_ok=True)
    tmp = parent / f"{TMP_PREFIX}{target.name}-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        write(tmp)
        if finish is not None:
            finish(tmp)
        # Files, and sub-folders too: a file's name is durable once its folder is fsynced.
        for path in sorted(tmp.rglob("*"), reverse=True):
            if not path.is_symlink():
                fsync_path(path)
        fsync_path(tmp)
        refuse_link(target)
        check(target)
        if target.exists():
            # Two renames: there is no atomic swap of non-empty folders in the standard library.
            # Between them the old copy exists under a .tmp-NAME-old- name: a failure puts it
            # back at once, a kill leaves it for `restore_interrupted`.
            old = parent / f"{TMP_PREFIX}{target.name}{OLD_MARK}{uuid.uuid4().hex[:8]}"
            os.rename(target, old)
            try:
                os.rename(tmp, target)
            except BaseException:
                os.rename(old, target)
                raise
            fsync_path(parent)
            delete_tree(old)
        else:
            os.rename(tmp, target)
        fsync_path(parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def write_files_into(folder: str | Path, write: Callable[[Path], None]) -> list[Path]:
    """Run `write(tmp)` in a temporary folder beside `folder`, then move each file it made
    into `folder` (created if needed), replacing files of the same name and keeping the rest.

    Each file is replaced atomically and only once all of them are written and fsynced, so
    a failure while writing leaves `folder` as it was.
    """
    folder = Path(folder)
    refuse_non_folder(folder)
    done: list[Path] = []

    def move_in(tmp: Path) -> None:
        write(tmp)
        for path in sorted(tmp.iterdir()):
            fsync_path(path)
        folder.mkdir(parents=True, exist_ok=True)
        for path in sorted(tmp.iterdir()):
            os.replace(path, folder / path.name)
            done.append(folder / path.name)
        fsync_path(folder)

    staging = folder.parent / f"{TMP_PREFIX}{folder.name}-{uuid.uuid4().hex[:8]}"
    staging.parent.mkdir(parents=True, exist_ok=True)
    staging.mkdir()
    try:
        move_in(staging)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return done


def write_file_atomically(path: str | Path, data: bytes) -> Path:
    """Replace one file with `data`: a reader sees the old contents or the new, never a mix."""
    path = Path(path)
    tmp = path.with_name(f"{TMP_PREFIX}{path.name}-{uuid.uuid4().hex[:8]}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.replace(tmp, path)
        except OSError as err:  # it names the temporary file: name the one it replaces
            raise type(err)(err.errno, err.strerror, str(path)) from None
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def remove_folder(path: Path) -> None:
    """Delete a folder so that an interruption never leaves part of it under its own name:
    rename first, then delete."""
    doomed = path.with_name(f"{TMP_PREFIX}{path.name}-del-{uuid.uuid4().hex[:8]}")
    refuse_link(path)
    os.rename(path, doomed)
    delete_tree(doomed)


def _replaced_name(path: Path) -> str | None:
    """NAME for a `.tmp-NAME-old-XXXXXXXX` folder (one being replaced), else None."""
    name = path.name
    if not name.startswith(TMP_PREFIX) or name[-len(OLD_MARK) - 8 : -8] != OLD_MARK:
        return None
    return name[len(TMP_PREFIX) : -len(OLD_MARK) - 8] or None


def restore_interrupted(target: Path) -> bool:
    """Put back the folder that a replacement of `target` moved aside, when a kill came
    between the two renames (`target` is missing, its old copy is under a .tmp- name).
    Returns whether one was restored."""
    if os.path.lexists(target) or not target.parent.is_dir():
        return False
    for path in sorted(target.parent.glob(f"{TMP_PREFIX}*{OLD_MARK}*")):
        if _replaced_name(path) == target.name and path.is_dir() and not path.is_symlink():
            os.rename(path, target)
            fsync_path(target.parent)
            return True
    return False


def remove_leftovers(folder: Path) -> None:
    """Temporary folders and files of a write or delete that was interrupted; a folder that
    was being replaced when the write was killed is put back first."""
    for path in list(folder.iterdir()):
        name = _replaced_name(path)
        if name is not None:
            restore_interrupted(folder / name)
    for path in folder.iterdir():
        if path.name.startswith(TMP_PREFIX):
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path, ignore_errors=True)
            else:
                path.unlink(missing_ok=True)
