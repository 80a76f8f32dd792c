"""A run folder's life: start a run, resume it, refuse what a resume may not change.

`run_training(options)` is everything `truthgpt train` does between parsing its command line
and its exit code, so that the command only parses and calls, and a program can start or
resume a run the same way. Progress lines go to `say` (rank 0 only).

A new run is checked whole (data, config, model, validation split) before its folder gets
anything; a resume reads each file of the checkpoint it continues from once.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.io.atomic import write_file_atomically
from truthgpt.io.folders import check_output, write_marker
from truthgpt.io.jsonio import json_bytes
from truthgpt.io.lock import RunLock
from truthgpt.io.runs import RUN_INFO, find_run_info
from truthgpt.training import distributed
from truthgpt.training.checkpoint import CheckpointManager
from truthgpt.training.core import TruthGPTOptimizationCore, load_core
from truthgpt.training.distributed import World
from truthgpt.training.loop import build_config, check_data_fits, parse_overrides, train

Say = Callable[[str], None]

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

# What a run folder holds: the marker lists it, so that the folder is known for a run's.
RUN_ENTRIES = (
    RUN_INFO,
    "checkpoints",
    "metrics.jsonl",
    "tb",
    "training_curves.png",
    "report.json",
    ".lock",
)


@dataclass(frozen=True)
class RunOptions:
    """What to run: a new run (`data` and `out`) or the run in `resume`.

    Config precedence for a new run: `preset` < `config` (a .toml or .json file) <
    `settings` ("key=value" strings, values parsed as JSON) < `fields` (values by name). A
    resume keeps its config but for the fields in `RESUMABLE`. `strategy`: "ddp" or "fsdp",
    when several processes train together."""

    data: str | None = None
    out: str | None = None
    resume: str | None = None
    preset: str | None = None
    config: str | None = None
    settings: Sequence[str] = ()
    fields: Mapping[str, Any] = field(default_factory=dict)
    strategy: str = "ddp"


@dataclass(frozen=True)
class RunResult:
    """How a run ended: its folder, its step, and the training report (None when a resume
    found the run already at max_steps and had nothing to do)."""

    run_dir: Path
    step: int
    report: dict[str, Any] | None


def run_training(options: RunOptions, *, say: Say = print) -> RunResult:
    """Start or resume the run `options` describe: in this process, or as one rank of a job
    torchrun started (then this process exits when the run ends; see
    `distributed.run_worker`)."""
    if distributed.requested():
        if not options.resume and options.out:
            # Checked before the rendezvous: right after it, rank 0 creates the folder.
            check_new_run_dir(Path(options.out), options.data)
        distributed.run_worker(lambda world: _done(train_run(options, world, say=say)))
    return train_run(options, World(), say=say)


def _done(result: RunResult) -> int:
    """A worker's exit status once its run has ended without an error."""
    return 0


def train_run(options: RunOptions, world: World, *, say: Say = print) -> RunResult:
    """Start or resume a run as the process `world` describes (rank 0 holds the folder's
    lock and writes; every rank trains)."""
    say = say if world.is_main else _quiet
    run_dir = Path(options.resume or options.out or "")
    if not options.resume and not (options.data and options.out):
        raise ValueError("train: --data and --out are required (or --resume RUN_DIR)")
    if options.resume and not run_dir.is_dir():
        raise FileNotFoundError(f"--resume: {run_dir} is not a run folder")
    if not options.resume:
        # Before any work: nothing is written to a refused folder.
        check_new_run_dir(run_dir, options.data)
    started = None if options.resume else start_run(options, world, say)  # nothing written
    manager = None
    # One writer per run: rank 0 holds the lock for the whole run; released by the OS on exit.
    with RunLock(run_dir) if world.is_main else contextlib.nullcontext():
        if started is None:
            core, data, manager = resume_run(options, world, say)
        else:
            core, data, info = started
            if world.is_main:
                check_new_run_dir(run_dir, options.data)  # again, under the lock
                write_file_atomically(run_dir / RUN_INFO, json_bytes(info))
                write_marker(run_dir, "run", RUN_ENTRIES)
        if core.step >= core.config.max_steps:  # a resume of a finished run: said so
            return RunResult(run_dir, core.step, None)
        if world.world_size > 1:
            say(f"distributed: {world.world_size} processes, strategy {options.strategy}")
        report = train(core, data, run_dir, world=world, checkpoints=manager)
    final = report.get("final_eval") or {}
    say(
        f"done: step {core.step}, val loss {final.get('loss', float('nan')):.4f}"
        + (f", {final['bits_per_char']:.3f} bits/char" if "bits_per_char" in final else "")
        + f", {report['avg_tokens_per_s'] or 0:,.0f} tok/s; run folder {run_dir}"
    )
    return RunResult(run_dir, core.step, report)


def start_run(
    options: RunOptions, world: World, say: Say
) -> tuple[TruthGPTOptimizationCore, Any, dict[str, Any]]:
    """A new run: everything is checked (data, config, model, val split) before the folder
    gets its run.json, which records the config so that a run killed before its first
    checkpoint can still be resumed. Returns the core, the data and run.json's contents."""
    from truthgpt.data import load_prepared

    assert options.data is not None
    data = load_prepared(options.data)
    overrides = parse_overrides(list(options.settings)) | dict(options.fields)
    config = build_config(
        vocab_size=data.tokenizer.vocab_size,
        preset_name=options.preset,
        config_file=options.config,
        overrides=overrides,
    )
    check_data_fits(data, config.block_size)
    core = TruthGPTOptimizationCore(
        config,
        tokenizer=data.tokenizer,
        chars_per_token=data.val.num_chars / len(data.val),
        parallelize=partial(distributed.parallelize, world=world, strategy=options.strategy),
    )
    info = {
        "data": str(Path(options.data).resolve()),
        "preset": options.preset,
        "config": config.to_dict(),
    }
    say("config:")
    say(config.to_json())
    n = core.raw_model.num_parameters()
    say(f"model: {n:,} parameters ({n * 4 / 2**20:.1f} MB in fp32) on {core.device}")
    return core, data, info


def resume_run(
    options: RunOptions, world: World, say: Say
) -> tuple[TruthGPTOptimizationCore, Any, CheckpointManager]:
    """The run in `options.resume` from its latest checkpoint, or from step 0 with the config
    its run.json records when it was stopped before its first checkpoint (a core already at
    max_steps is said to have nothing to do). Every file is read once: run.json here, each
    checkpoint through the returned manager (which the training loop goes on using)."""
    from truthgpt.data import load_prepared

    assert options.resume is not None
    run_dir = Path(options.resume)
    wrap = partial(distributed.parallelize, world=world, strategy=options.strategy)
    manager = CheckpointManager(run_dir)
    changes = resume_changes(options)
    info = find_run_info(run_dir) or {}
    manager.check_folder()
    if world.is_main:
        manager.recover()  # leftovers of a kill: temporary folders, lost pointers
        for old, new, why in manager.set_aside_damaged():
            latest = manager.latest()
            using = f"resuming from {latest.name}" if latest else "no complete checkpoint left"
            say(f"{old}: it {why}; moved aside to {new.name}; {using}")
    recorded = info.get("config")
    if isinstance(recorded, dict):
        manager.check_recorded_config(recorded, RESUMABLE)
    data_dir = options.data if options.data is not None else info.get("data")
    if data_dir is None:
        raise ValueError(f"--data: {run_dir} does not record its data folder; pass --data DATA_DIR")
    data = load_prepared(data_dir)
    latest = manager.latest()
    if latest is None:
        if not isinstance(recorded, dict):
            raise ValueError(
                f"--resume: {run_dir} holds no checkpoint and its run.json records no config; "
                "start it again with --out"
            )
        config = TruthGPTOptimizationCoreConfig.from_dict({**recorded, **changes})
        say(f"{run_dir} holds no checkpoint yet: starting it from step 0 with its recorded config")
        core = TruthGPTOptimizationCore(
            config,
            tokenizer=data.tokenizer,
            chars_per_token=data.val.num_chars / len(data.val),
            parallelize=wrap,
        )
        return core, data, manager
    contents = manager.read(latest)
    saved_tokenizer = contents.tokenizer
    if saved_tokenizer is not None and not same_tokenizer(saved_tokenizer, data):
        raise ValueError(
            f"--data: {data.data_dir} was prepared with another tokenizer than the run's "
            f"({data.tokenizer.name} vs {saved_tokenizer.name}); pass the run's data folder"
        )
    core = load_core(contents, parallelize=wrap, **changes)
    if core.step >= core.config.max_steps:
        say(
            f"{run_dir} is already at step {core.step} of max_steps={core.config.max_steps}: "
            "nothing to do (pass --max-steps to train further)"
        )
        return core, data, manager
    changed = ", ".join(f"{k}={v!r}" for k, v in changes.items())
    say(
        f"resuming {run_dir} at step {core.step} → {core.config.max_steps}"
        + (f" (changed: {changed})" if changed else "")
    )
    return core, data, manager


def resume_changes(options: RunOptions) -> dict[str, Any]:
    """The training fields a resume changes; a change of anything else is refused, named."""
    if options.preset or options.config:
        raise ValueError("--resume: a run keeps its config; --preset and --config do not apply")
    asked = parse_overrides(list(options.settings)) | dict(options.fields)
    refused = sorted(k for k in asked if k not in RESUMABLE)
    if refused:
        raise ValueError(
            f"--resume: {', '.join(refused)} cannot change in a running run (its model and "
            f"data order are fixed); a resume may change {', '.join(RESUMABLE)}"
        )
    return asked


def same_tokenizer(saved: Any, data: Any) -> bool:
    """Whether the run's tokenizer reads the data as the data's own does (checked up front,
    not as a token-id error after the first batches)."""
    if (saved.name, saved.vocab_size) != (data.tokenizer.name, data.tokenizer.vocab_size):
        return False
    ids = [int(t) for t in data.val.tokens[:2000]]
    return list(saved.encode(data.tokenizer.decode(ids))) == ids


def check_new_run_dir(run_dir: Path, data: str | None) -> None:
    """A new run goes into a new or empty folder of its own, never into its data."""
    check_output(
        run_dir,
        "run",
        inputs=[data] if data else [],
        hint=f" or continue it with --resume {run_dir}",
    )


def _quiet(*args: object, **kwargs: object) -> None:
    """`print` for ranks other than 0, which stay silent."""
