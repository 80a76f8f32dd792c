"""One writer per run folder.

`RunLock(folder)` holds an exclusive `fcntl.flock` on `folder/.lock` for as long as it is
open. The operating system releases it when the process exits, however it exits (kill -9
included), so a lock is never stale; a second writer is refused at once with one line naming
the process that holds it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat
from pathlib import Path

from truthgpt.io.files import describe, named

LOCK_FILE = ".lock"


class RunLocked(RuntimeError):
    """Another process is writing the run folder."""


class RunLock:
    """Exclusive lock on a run folder (created if needed); a context manager."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        self.path = self.folder / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> RunLock:
        if self._fd is not None:
            return self
        self.folder.mkdir(parents=True, exist_ok=True)
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as err:
            holder = _read_pid(fd)
            os.close(fd)
            if err.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            who = f"process {holder}" if holder else "another process"
            raise RunLocked(
                f"{self.folder}: {who} is writing this run; wait for it to finish or stop it"
            ) from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def _open(self) -> int:
        """The lock file, opened without following a link or waiting on a FIFO: the lock
        is written (truncated, then our pid), so it must be a regular file of this run."""
        flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
        try:
            fd = os.open(self.path, flags, 0o644)
        except OSError as err:
            if err.errno == errno.ELOOP:  # O_NOFOLLOW met a link
                raise ValueError(
                    f"{self.path}: is a symbolic link; the lock file must be a regular file "
                    "in the run folder (remove it)"
                ) from None
            raise named(err, self.path) from None
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            os.close(fd)
            raise ValueError(f"{self.path}: is {describe(mode)}, not a regular file (remove it)")
        return fd

    def release(self) -> None:
        if self._fd is not None:
            # The file stays: deleting it would let a third process lock a new inode while a
            # second still waits on the old one.
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RunLock:
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()


def _read_pid(fd: int) -> int | None:
    try:
        text = os.pread(fd, 32, 0).decode("ascii").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() else None
