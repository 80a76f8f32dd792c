"""`truthgpt train`: train a model on prepared data, or resume a run. The command parses its
options and calls `truthgpt.training.run.run_training`, where starting, resuming and refusing
changes live."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

from truthgpt.cli.common import KindOption
from truthgpt.config import PRESETS

if TYPE_CHECKING:
    from truthgpt.training.run import RunOptions


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a prepared data folder (or resume a run)",
        description="Train a distance-attention GPT. Config precedence: preset < --config < "
        "--set < the explicit flags.",
    )
    p.add_argument("--data", help="prepared data folder (from `truthgpt prepare`)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, tb/, plots")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting config")
    p.add_argument("--config", metavar="FILE", help="config fields from a .toml or .json file")
    p.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="set any config field"
    )
    p.add_argument("--distance", action=KindOption, help="distance_type: ")
    p.add_argument("--max-steps", type=int, help="train up to this many optimiser steps")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", help="fp32, bf16 or fp16 (fp16: CUDA only)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--seed", type=int, help="random seed (init, batches, dropout)")
    p.add_argument(
        "--nproc",
        type=int,
        metavar="N",
        help="train with N processes on this machine (starts torchrun); batch_size is per process",
    )
    p.add_argument(
        "--strategy",
        choices=("ddp", "fsdp"),
        default="ddp",
        help="with several processes: ddp keeps a replica per process, fsdp shards parameters, "
        "gradients and optimiser state (default: ddp)",
    )
    p.set_defaults(func=run)


def _flag_overrides(args: argparse.Namespace) -> dict:
    flags = {
        "distance_type": args.distance,
        "max_steps": args.max_steps,
        "device": args.device,
        "precision": args.precision,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
    }
    return {k: v for k, v in flags.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from truthgpt.training import distributed
    from truthgpt.training.run import run_training

    if args.nproc is not None:
        return distributed.launch(args.nproc, _worker_argv(args))
    run_training(_options(args), say=print)
    return 0


def _options(args: argparse.Namespace) -> RunOptions:
    from truthgpt.training.run import RunOptions

    return RunOptions(
        data=args.data,
        out=args.out,
        resume=args.resume,
        preset=args.preset,
        config=args.config,
        settings=tuple(args.set),
        fields=_flag_overrides(args),
        strategy=args.strategy,
    )


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """This command line without --nproc: what each torchrun process runs."""
    from truthgpt.cli import build_parser

    argv = [args.command]
    for key, value in vars(args).items():
        if key in ("command", "func", "nproc", "debug") or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += ["--" + key.replace("_", "-"), str(item)]
    # Every option must survive the round trip, or the workers would train something else.
    again = vars(build_parser().parse_args(argv))
    if {k: v for k, v in again.items() if k not in ("nproc", "debug")} != {
        k: v for k, v in vars(args).items() if k not in ("nproc", "debug")
    }:
        raise RuntimeError(f"--nproc: cannot pass these options on to torchrun: {argv}")
    return argv
