"""The `truthgpt` command line: it parses arguments and calls the library, nothing more.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
whose `func(args) -> int` does the work. Keeping them apart keeps each command short to read.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
import warnings
from collections.abc import Sequence

# Subcommand modules, in the order `truthgpt --help` lists them.
COMMANDS: tuple[str, ...] = (
    "demo",
    "prepare",
    "train",
    "eval",
    "generate",
    "analyze",
    "tune_lambda",
    "compare",
    "export_hf",
)


def build_parser() -> argparse.ArgumentParser:
    """The full argument parser, one subparser per command module."""
    from truthgpt import __version__

    parser = argparse.ArgumentParser(
        prog="truthgpt",
        description="Train, evaluate, analyse, tune, save and sample distance-attention GPTs.",
    )
    parser.add_argument("--version", action="version", version=f"truthgpt {__version__}")
    parser.add_argument(
        "--debug", action="store_true", help="show the traceback of an error too (any position)"
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"truthgpt.cli.{name}").register(subparsers)
    return parser


DEBUG_ENV = "TRUTHGPT_DEBUG"  # set to 1 to see the traceback of an expected failure too


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `truthgpt` console script.

    Expected failures print one line naming the path, field or argument, with no
    traceback: exit code 2 for bad input (nothing was done), 1 for a run that started and
    then failed. `--debug` (or TRUTHGPT_DEBUG=1) adds the traceback.
    """
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get(DEBUG_ENV, "") not in ("", "0")
    argv = [a for a in argv if a != "--debug"]
    args = build_parser().parse_args(argv)
    from truthgpt.training.errors import exit_code, one_line

    def show_warning(message, category, filename, lineno, file=None, line=None) -> None:
        # A warning is one line, like an error: what happened and what was done instead.
        text = " ".join(str(message).split())
        print(f"truthgpt {args.command}: warning: {text}", file=file or sys.stderr)

    try:
        with warnings.catch_warnings():  # restored on return: main may run inside a program
            warnings.showwarning = show_warning
            return int(args.func(args) or 0)
    except BaseException as err:
        code = exit_code(err)
        if code is None or debug:
            if code is None:
                raise
            traceback.print_exc()
        print(f"truthgpt {args.command}: error: {one_line(err)}", file=sys.stderr)
        return code


if __name__ == "__main__":
    raise SystemExit(main())
