"""The atomic writers: every file and folder reaches the disk before it is renamed into
place, and a replacement interrupted at any point leaves the old folder or the new one."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from truthgpt.io.atomic import (
    remove_leftovers,
    restore_interrupted,
    write_file_atomically,
    write_folder_atomically,
)


def contents(folder: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()
    }


def fill(files: dict[str, bytes]):
    def write(tmp: Path) -> None:
        for name, data in files.items():
            (tmp / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp / name).write_bytes(data)

    return write


@pytest.fixture
def events(monkeypatch) -> list[tuple[str, str]]:
    """Every fsync (the path of the descriptor) and rename, in order."""
    seen: list[tuple[str, str]] = []
    fsync, rename = os.fsync, os.rename

    def recording_fsync(fd: int) -> None:
        seen.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def recording_rename(src, dst) -> None:
        seen.append(("rename", f"{src} -> {dst}"))
        rename(src, dst)

    monkeypatch.setattr(os, "fsync", recording_fsync)
    monkeypatch.setattr(os, "rename", recording_rename)
    return seen


def test_every_file_and_folder_is_fsynced_before_the_rename(tmp_path, events) -> None:
    target = tmp_path / "out"
    write_folder_atomically(target, fill({"a": b"1", "b": b"2", "sub/c": b"3"}))
    renames = [i for i, (kind, _) in enumerate(events) if kind == "rename"]
    assert len(renames) == 1
    before = {Path(path).name for kind, path in events[: renames[0]] if kind == "fsync"}
    tmp_name = events[renames[0]][1].split(" -> ")[0].rsplit("/", 1)[1]
    # the three files, the sub-folder holding c, and the folder itself
    assert before == {"a", "b", "c", "sub", tmp_name}
    assert events[renames[0] + 1 :] == [("fsync", str(tmp_path))]  # the rename made durable
    assert contents(target) == {"a": b"1", "b": b"2", "sub/c": b"3"}


def test_a_single_file_is_fsynced_then_renamed_then_its_folder_fsynced(
    tmp_path, events, monkeypatch
) -> None:
    path, replace = tmp_path / "pointer", os.replace
    monkeypatch.setattr(
        os, "replace", lambda src, dst: (events.append(("replace", str(dst))), replace(src, dst))
    )
    write_file_atomically(path, b"step-0000002\n")
    assert [kind for kind, _ in events] == ["fsync", "replace", "fsync"]
    assert Path(events[0][1]).name.startswith(".tmp-pointer-")
    assert events[1:] == [("replace", str(path)), ("fsync", str(tmp_path))]
    assert path.read_bytes() == b"step-0000002\n"


def test_a_failed_replacement_puts_the_old_folder_back(tmp_path, monkeypatch) -> None:
    target = tmp_path / "out"
    write_folder_atomically(target, fill({"old.txt": b"old"}))
    rename, calls = os.rename, []

    def second_fails(src, dst):
        calls.append(dst)
        if len(calls) == 2:  # the new folder into place, after the old one moved aside
            raise OSError("disk unplugged")
        rename(src, dst)

    monkeypatch.setattr(os, "rename", second_fails)
    with pytest.raises(OSError, match="disk unplugged"):
        write_folder_atomically(target, fill({"new.txt": b"new"}), check=lambda _: None)
    monkeypatch.undo()
    assert contents(target) == {"old.txt": b"old"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


KILLED_BETWEEN_RENAMES = """
import os, sys
from pathlib import Path
from truthgpt.io.atomic import write_folder_atomically
rename, calls = os.rename, []
def killed(src, dst):
    calls.append(dst)
    if len(calls) == 2:
        os._exit(9)  # a kill -9 after the old folder moved aside, before the new one is in
    rename(src, dst)
os.rename = killed
def write(tmp):
    (tmp / "new.txt").write_bytes(b"new")
write_folder_atomically(Path(sys.argv[1]), write, check=lambda _: None)
"""


def test_a_kill_between_the_two_renames_loses_nothing(tmp_path) -> None:
    """The old folder is under its .tmp- name and the target is missing: a checkpoint
    folder's clean-up of leftovers puts the old one back (rather than deleting it)."""
    target = tmp_path / "out"
    write_folder_atomically(target, fill({"old.txt": b"old"}))
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target)])
    assert child.returncode == 9
    assert not target.exists()
    remove_leftovers(tmp_path)
    assert contents(target) == {"old.txt": b"old"}
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_the_next_write_restores_then_checks(tmp_path) -> None:
    """After a kill between the renames, the next write sees the old folder (restored) and
    its check applies to it: here the default refuses a non-empty folder."""
    target = tmp_path / "out"
    write_folder_atomically(target, fill({"old.txt": b"old"}))
    child = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(target)])
    assert child.returncode == 9 and not target.exists()
    with pytest.raises(FileExistsError, match="not empty"):
        write_folder_atomically(target, fill({"new.txt": b"new"}))
    assert contents(target) == {"old.txt": b"old"}
    assert not list(tmp_path.glob("*-old-*"))


def test_restore_touches_only_the_folder_it_names(tmp_path) -> None:
    (tmp_path / ".tmp-out-old-0123abcd").mkdir()
    (tmp_path / ".tmp-other-old-89abcdef").mkdir()
    assert restore_interrupted(tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".tmp-other-old-89abcdef", "out"]
    assert not restore_interrupted(tmp_path / "out")  # it exists now: nothing to do
