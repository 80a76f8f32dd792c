"""Small pieces several commands share."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any


def data_for_run(run: str | Path, data_dir: str | Path | None = None) -> Any:
    """The prepared data of a run: `data_dir` if given, else the folder the run was trained on."""
    from truthgpt.data import load_prepared

    if data_dir is None:
        info = find_run_info(Path(run))
        if info is None:
            raise ValueError(f"--data: {run} does not record its data folder; pass --data DATA_DIR")
        data_dir = info["data"]
    return load_prepared(data_dir)


def find_run_info(path: Path) -> dict | None:
    """run.json of a run folder, also found from a checkpoint inside it: see
    `truthgpt.io.runs.find_run_info` (imported here when called: it needs torch)."""
    from truthgpt.io.runs import find_run_info as find

    return find(path)


class KindOption(argparse.Action):
    """A string option whose help ends with the registered distance kinds.

    The list is read from the registry when the help is shown, not when the parser is built:
    every command line builds the parser, and the registry needs torch. The value itself is
    checked where the model is built (a one-line error naming it and listing the kinds).
    """

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        setattr(namespace, self.dest, values)

    @property  # type: ignore[override]
    def help(self) -> str | None:
        if self._help is None:
            return None
        from truthgpt.core import kinds

        return f"{self._help}{', '.join(kinds.names())}"

    @help.setter
    def help(self, value: str | None) -> None:
        self._help = value
