"""`truthgpt train`: train a model on prepared data, or resume a run."""

from __future__ import annotations

import argparse
import json
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING

from truthgpt.cli.common import KindOption
from truthgpt.config import PRESETS

if TYPE_CHECKING:
    from truthgpt.training import World


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
    from truthgpt.training import World, distributed

    if args.nproc is not None:
        return distributed.launch(args.nproc, _worker_argv(args))
    if distributed.requested():  # one of the processes torchrun started
        if not args.resume and args.out:
            # Checked before the rendezvous: right after it, rank 0 creates the folder.
            _check_new_run_dir(Path(args.out))
        distributed.run_worker(lambda world: _train(args, world))
    return _train(args, World())


def _train(args: argparse.Namespace, world: World) -> int:
    from truthgpt.cli.common import data_for_run
    from truthgpt.data import load_prepared
    from truthgpt.training import (
        TruthGPTOptimizationCore,
        build_config,
        distributed,
        load_core,
        parse_overrides,
        train,
    )

    say = print if world.is_main else _quiet
    wrap = partial(distributed.parallelize, world=world, strategy=args.strategy)
    if args.resume:
        run_dir = Path(args.resume)
        train_overrides = {
            k: v
            for k, v in _flag_overrides(args).items()
            if k in ("max_steps", "device", "precision", "checkpoint_every")
        }
        core = load_core(run_dir, parallelize=wrap, **train_overrides)
        data = data_for_run(run_dir, args.data)
        say(f"resuming {run_dir} at step {core.step} → {core.train_config.max_steps}")
    else:
        if not args.data or not args.out:
            raise ValueError("train: --data and --out are required (or --resume RUN_DIR)")
        data = load_prepared(args.data)
        overrides = parse_overrides(args.set) | _flag_overrides(args)
        config = build_config(
            vocab_size=data.tokenizer.vocab_size,
            preset_name=args.preset,
            config_file=args.config,
            overrides=overrides,
        )
        run_dir = Path(args.out)
        if world.is_main:
            _check_new_run_dir(run_dir)
        core = TruthGPTOptimizationCore(
            config,
            tokenizer=data.tokenizer,
            chars_per_token=data.val.num_chars / len(data.val),
            parallelize=wrap,
        )
        if world.is_main:
            run_dir.mkdir(parents=True, exist_ok=True)
            info = {"data": str(Path(args.data).resolve()), "preset": args.preset}
            (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        say("config:")
        say(config.to_json())
        n = core.raw_model.num_parameters()
        say(f"model: {n:,} parameters ({n * 4 / 2**20:.1f} MB in fp32) on {core.device}")

    if world.world_size > 1:
        say(f"distributed: {world.world_size} processes, strategy {args.strategy}")
    report = train(core, data, run_dir, world=world)
    final = report.get("final_eval") or {}
    say(
        f"done: step {core.step}, val loss {final.get('loss', float('nan')):.4f}"
        + (f", {final['bits_per_char']:.3f} bits/char" if "bits_per_char" in final else "")
        + f", {report['avg_tokens_per_s'] or 0:,.0f} tok/s; run folder {run_dir}"
    )
    return 0


def _quiet(*args: object, **kwargs: object) -> None:
    """`print` for ranks other than 0, which stay silent."""


def _worker_argv(args: argparse.Namespace) -> list[str]:
    """This command line without --nproc: what each torchrun process runs."""
    from truthgpt.cli import build_parser

    argv = [args.command]
    for key, value in vars(args).items():
        if key in ("command", "func", "nproc") or value is None:
            continue
        for item in value if isinstance(value, list) else [value]:
            argv += ["--" + key.replace("_", "-"), str(item)]
    # Every option must survive the round trip, or the workers would train something else.
    again = vars(build_parser().parse_args(argv))
    if {k: v for k, v in again.items() if k != "nproc"} != {
        k: v for k, v in vars(args).items() if k != "nproc"
    }:
        raise RuntimeError(f"--nproc: cannot pass these options on to torchrun: {argv}")
    return argv


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"--out: {run_dir} is not empty; choose a new folder or continue it with "
            f"--resume {run_dir}"
        )
