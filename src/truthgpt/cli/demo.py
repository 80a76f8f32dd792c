"""`truthgpt demo`: the main job; every workflow on the built-in corpus in a few minutes."""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo",
        help="train, evaluate, analyse, tune, save/reload and sample on Shakespeare (~5 min)",
        description="Runs every workflow on the built-in Shakespeare corpus and writes a report "
        "with the figures measured in this run.",
    )
    p.add_argument("--minutes", type=float, default=5.0, help="time budget (default 5)")
    p.add_argument("--out", default="demo-report", help="report folder (default demo-report/)")
    p.add_argument("--distance", default="l1", help="distance kind to demonstrate (default l1)")
    p.add_argument(
        "--compare",
        default="dot",
        help="baseline kind trained for the same steps, or 'none' (default dot)",
    )
    p.add_argument("--steps", type=int, help="training steps (default: what fits the budget)")
    p.add_argument("--seed", type=int, default=1337)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truthgpt.workflows.demo import run_demo

    compare = None if args.compare.lower() == "none" else args.compare
    run_demo(
        args.out,
        minutes=args.minutes,
        distance=args.distance,
        compare=compare,
        steps=args.steps,
        seed=args.seed,
    )
    return 0
