"""`truthgpt eval`: evaluate a trained run on its validation (or training) split, as JSON."""

from __future__ import annotations

import argparse
import json


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("eval", help="evaluate a run; prints JSON")
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run or checkpoint folder")
    p.add_argument("--data", metavar="DATA_DIR", help="prepared data (default: the run's)")
    p.add_argument("--split", choices=("val", "train"), default="val")
    p.add_argument("--max-batches", type=int, help="evaluate only this many batches")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truthgpt.cli.common import data_for_run
    from truthgpt.training import load_core

    core = load_core(args.run, **({"device": args.device} if args.device else {}))
    data = data_for_run(args.run, args.data)
    split = data.val if args.split == "val" else data.train
    metrics = core.evaluate(split, max_batches=args.max_batches)
    print(json.dumps({"split": args.split, "step": core.step, **metrics}, indent=2))
    return 0
