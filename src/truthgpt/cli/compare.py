"""`truthgpt compare`: train several distance kinds under identical conditions, side by side."""

from __future__ import annotations

import argparse

from truthgpt.cli.common import KindOption
from truthgpt.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "compare",
        help="train several distance kinds with the same data, seeds and budget; compare",
    )
    p.add_argument(
        "--kinds",
        action=KindOption,
        default="dot,l1,l2,sql2,cosine,chebyshev",
        help="comma-separated (default %(default)s), from: ",
    )
    p.add_argument("--preset", default="char-small", choices=sorted(PRESETS))
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--seeds", type=int, default=2, help="N seeds for every kind")
    p.add_argument("--first-seed", type=int, default=0, help="seeds FIRST..FIRST+N-1 (default 0)")
    source = p.add_mutually_exclusive_group()
    source.add_argument(
        "--corpus",
        nargs="+",
        metavar="SOURCE",
        help="shakespeare or text files (char tokenizer); default shakespeare",
    )
    source.add_argument("--data", metavar="DATA_DIR", help="an already prepared data folder")
    p.add_argument(
        "--eval-batches",
        type=int,
        default=200,
        help="fixed validation batches for the final figure (default 200)",
    )
    p.add_argument(
        "--evals",
        type=int,
        default=10,
        help="validation passes along each run, for the curves (default 10; each costs "
        "EVAL_BATCHES forward batches)",
    )
    p.add_argument(
        "--set",
        metavar="KEY=VALUE",
        action="append",
        default=[],
        help="config field for every run, e.g. --set learning_rate=2e-3",
    )
    p.add_argument("--out", required=True, help="folder for results.json/.md, plot and runs")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truthgpt.training import parse_overrides
    from truthgpt.workflows.compare import compare_kinds

    compare_kinds(
        [k.strip() for k in args.kinds.split(",") if k.strip()],
        args.out,
        preset_name=args.preset,
        steps=args.steps,
        seeds=args.seeds,
        first_seed=args.first_seed,
        data_dir=args.data,
        corpus=args.corpus,
        eval_batches=args.eval_batches,
        evals=args.evals,
        overrides=parse_overrides(args.set),
    )
    return 0
