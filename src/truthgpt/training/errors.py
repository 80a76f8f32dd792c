"""The failures a run expects, and how a command reports them: one line, an exit code."""

from __future__ import annotations

from truthgpt.io.lock import RunLocked


class TrainingDiverged(RuntimeError):
    """Too many consecutive steps had a non-finite loss or gradient."""


class RunFailed(RuntimeError):
    """A run that started could not go on: a write failed (disk full, permissions). Its
    newest checkpoint is left as it was, so the run can resume once the cause is fixed."""


class DistributedSetupError(RuntimeError):
    """The processes of a distributed run could not find or reach each other."""


def exit_code(err: BaseException) -> int | None:
    """2 for the user's input (nothing was done), 1 for a run that started and then failed,
    None for anything else (a bug: its traceback is worth showing)."""
    if isinstance(err, ValueError | OSError | RunLocked):
        # A value, a path (missing, read-only, not a folder, no space), a locked run.
        return 2
    if isinstance(err, TrainingDiverged | RunFailed | DistributedSetupError):
        return 1
    return None


def one_line(err: BaseException) -> str:
    """The error's message on one line (an OSError: its path and reason)."""
    if isinstance(err, OSError) and err.strerror:
        text = f"{err.filename}: {err.strerror}" if err.filename else err.strerror
    else:
        text = str(err) or type(err).__name__
    return " ".join(text.split())
