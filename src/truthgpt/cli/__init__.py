"""The `truthgpt` command line: it parses arguments and calls the library, nothing more.

Each subcommand lives in its own module exposing `register(subparsers)`, which adds a parser
whose `func(args) -> int` does the work. Keeping them apart keeps each command short to read.
"""

from __future__ import annotations

import argparse
import importlib
import sys
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
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name in COMMANDS:
        importlib.import_module(f"truthgpt.cli.{name}").register(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `truthgpt` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ValueError, FileNotFoundError, FileExistsError) as err:
        # Bad input is the user's to fix: say what is wrong, without a traceback.
        print(f"truthgpt {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    raise SystemExit(main())
