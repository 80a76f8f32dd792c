"""`truthgpt train`: train a model on prepared data, or resume a run."""

from __future__ import annotations

import argparse
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
            _check_new_run_dir(Path(args.out), args.data)
        distributed.run_worker(lambda world: _train(args, world))
    return _train(args, World())


# Training fields a resume may change (the rest, and every model field, are the run's).
RESUMABLE = (
    "max_steps",
    "checkpoint_every",
    "eval_interval",
    "eval_batches",
    "log_interval",
    "lr_decay_steps",
    "keep_checkpoints",
    "max_bad_steps",
    "device",
    "precision",
)


def _train(args: argparse.Namespace, world: World) -> int:
    from truthgpt.io.atomic import write_file_atomically
    from truthgpt.io.folders import write_marker
    from truthgpt.io.jsonio import json_bytes
    from truthgpt.io.lock import RunLock

    say = print if world.is_main else _quiet
    run_dir = Path(args.resume or args.out or "")
    if not args.resume and not (args.data and args.out):
        raise ValueError("train: --data and --out are required (or --resume RUN_DIR)")
    if args.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run folder")
    if not args.resume:
        # Before any work: nothing is written to a refused folder.
        _check_new_run_dir(run_dir, args.data)
    started = None if args.resume else _start(args, world, say)  # checked, nothing written
    # One writer per run: rank 0 holds the lock for the whole run; released by the OS on exit.
    with RunLock(run_dir) if world.is_main else _no_lock():
        if started is None:
            core, data = _resume(args, run_dir, world, say)
        else:
            core, data, info = started
            if world.is_main:
                _check_new_run_dir(run_dir, args.data)  # again, under the lock
                write_file_atomically(run_dir / "run.json", json_bytes(info))
                write_marker(run_dir, "run", RUN_ENTRIES)
        if core is None:
            return 0
        if world.world_size > 1:
            say(f"distributed: {world.world_size} processes, strategy {args.strategy}")
        from truthgpt.training import train

        report = train(core, data, run_dir, world=world)
    final = report.get("final_eval") or {}
    say(
        f"done: step {core.step}, val loss {final.get('loss', float('nan')):.4f}"
        + (f", {final['bits_per_char']:.3f} bits/char" if "bits_per_char" in final else "")
        + f", {report['avg_tokens_per_s'] or 0:,.0f} tok/s; run folder {run_dir}"
    )
    return 0


def _start(args: argparse.Namespace, world: World, say) -> tuple:
    """A new run: everything is checked (data, config, model, val split) before the folder
    gets its run.json, which records the config so that a run killed before its first
    checkpoint can still be resumed."""
    from truthgpt.data import load_prepared
    from truthgpt.training import (
        TruthGPTOptimizationCore,
        build_config,
        distributed,
        parse_overrides,
    )
    from truthgpt.training.loop import check_data_fits

    data = load_prepared(args.data)
    overrides = parse_overrides(args.set) | _flag_overrides(args)
    config = build_config(
        vocab_size=data.tokenizer.vocab_size,
        preset_name=args.preset,
        config_file=args.config,
        overrides=overrides,
    )
    check_data_fits(data, config.block_size)
    core = TruthGPTOptimizationCore(
        config,
        tokenizer=data.tokenizer,
        chars_per_token=data.val.num_chars / len(data.val),
        parallelize=partial(distributed.parallelize, world=world, strategy=args.strategy),
    )
    info = {
        "data": str(Path(args.data).resolve()),
        "preset": args.preset,
        "config": config.to_dict(),
    }
    say("config:")
    say(config.to_json())
    n = core.raw_model.num_parameters()
    say(f"model: {n:,} parameters ({n * 4 / 2**20:.1f} MB in fp32) on {core.device}")
    return core, data, info


def _resume(args: argparse.Namespace, run_dir: Path, world: World, say) -> tuple:
    """The run in `run_dir` from its latest checkpoint, or from step 0 with the config its
    run.json records when it was stopped before its first checkpoint."""
    from truthgpt.cli.common import data_for_run, find_run_info
    from truthgpt.training import TruthGPTOptimizationCore, distributed, load_core
    from truthgpt.training.checkpoint import CheckpointManager, read_tokenizer

    wrap = partial(distributed.parallelize, world=world, strategy=args.strategy)
    manager = CheckpointManager(run_dir)
    changes = parse_overrides_for_resume(args)
    info = find_run_info(run_dir) or {}
    manager.check_folder()
    if world.is_main:
        manager.recover()  # leftovers of a kill: temporary folders, lost pointers
        for old, new, why in manager.set_aside_damaged():
            latest = manager.latest()
            using = f"resuming from {latest.name}" if latest else "no complete checkpoint left"
            say(f"{old}: it {why}; moved aside to {new.name}; {using}")
    if isinstance(info.get("config"), dict):
        manager.check_recorded_config(info["config"], RESUMABLE)
    data = data_for_run(run_dir, args.data)
    if manager.latest() is None:
        if not isinstance(info.get("config"), dict):
            raise ValueError(
                f"--resume: {run_dir} holds no checkpoint and its run.json records no config; "
                "start it again with --out"
            )
        from truthgpt.config import TruthGPTOptimizationCoreConfig

        config = TruthGPTOptimizationCoreConfig.from_dict({**info["config"], **changes})
        say(f"{run_dir} holds no checkpoint yet: starting it from step 0 with its recorded config")
        core = TruthGPTOptimizationCore(
            config,
            tokenizer=data.tokenizer,
            chars_per_token=data.val.num_chars / len(data.val),
            parallelize=wrap,
        )
        return core, data
    saved_tokenizer = read_tokenizer(run_dir)
    if saved_tokenizer is not None and not _same_tokenizer(saved_tokenizer, data):
        raise ValueError(
            f"--data: {data.data_dir} was prepared with another tokenizer than the run's "
            f"({data.tokenizer.name} vs {saved_tokenizer.name}); pass the run's data folder"
        )
    core = load_core(run_dir, parallelize=wrap, **changes)
    if core.step >= core.config.max_steps:
        say(
            f"{run_dir} is already at step {core.step} of max_steps={core.config.max_steps}: "
            "nothing to do (pass --max-steps to train further)"
        )
        return None, data
    changed = ", ".join(f"{k}={v!r}" for k, v in changes.items())
    say(
        f"resuming {run_dir} at step {core.step} → {core.config.max_steps}"
        + (f" (changed: {changed})" if changed else "")
    )
    return core, data


def parse_overrides_for_resume(args: argparse.Namespace) -> dict:
    """The training fields a resume changes; a change of anything else is refused, named."""
    from truthgpt.training import parse_overrides

    if args.preset or args.config:
        raise ValueError("--resume: a run keeps its config; --preset and --config do not apply")
    asked = parse_overrides(args.set) | _flag_overrides(args)
    refused = sorted(k for k in asked if k not in RESUMABLE)
    if refused:
        raise ValueError(
            f"--resume: {', '.join(refused)} cannot change in a running run (its model and "
            f"data order are fixed); a resume may change {', '.join(RESUMABLE)}"
        )
    return asked


def _same_tokenizer(saved, data) -> bool:
    """Whether the run's tokenizer reads the data as the data's own does (checked up front,
    not as a token-id error after the first batches)."""
    if (saved.name, saved.vocab_size) != (data.tokenizer.name, data.tokenizer.vocab_size):
        return False
    ids = [int(t) for t in data.val.tokens[:2000]]
    return list(saved.encode(data.tokenizer.decode(ids))) == ids


class _no_lock:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _quiet(*args: object, **kwargs: object) -> None:
    """`print` for ranks other than 0, which stay silent."""


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


# What a run folder holds: the marker lists it, so that the folder is known for a run's.
RUN_ENTRIES = (
    "run.json",
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "training_curves.png",
    "report.json",
    ".lock",
)


def _check_new_run_dir(run_dir: Path, data: str | None) -> None:
    """A new run goes into a new or empty folder of its own, never into its data."""
    from truthgpt.io.folders import check_output

    check_output(
        run_dir,
        "run",
        inputs=[data] if data else [],
        hint=f" or continue it with --resume {run_dir}",
    )
