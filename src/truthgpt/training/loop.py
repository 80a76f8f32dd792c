"""The training loop behind `truthgpt train`: batches in, updates out, evaluation, checkpoints.

It is a plain loop over `TruthGPTOptimizationCore.train_step`. Training batches are a
deterministic function of (seed, rank, step), so a resumed run draws exactly the batches the
uninterrupted run would have drawn.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from truthgpt.config import (
    ConfigError,
    TrainConfig,
    TruthGPTConfig,
    TruthGPTOptimizationCoreConfig,
    preset,
)
from truthgpt.data import RandomBatches
from truthgpt.io.atomic import write_file_atomically
from truthgpt.io.files import CONFIG_LIMIT, not_regular_reason, read_json_file, read_toml_file
from truthgpt.io.jsonio import json_bytes, json_safe
from truthgpt.training.checkpoint import CheckpointManager
from truthgpt.training.core import TrainingDiverged, TruthGPTOptimizationCore
from truthgpt.training.distributed import World, gather_full_state, is_sharded, mean_over_ranks
from truthgpt.training.errors import RunFailed
from truthgpt.training.monitoring import Monitor


def build_config(
    *,
    vocab_size: int,
    preset_name: str | None = None,
    config_file: str | Path | None = None,
    overrides: dict[str, Any] | None = None,
) -> TruthGPTOptimizationCoreConfig:
    """Merge, in order: preset, config file (TOML or JSON, flat), overrides; then validate.

    `vocab_size` comes from the prepared data; `max_position_embeddings` grows to the block size
    when a preset or file leaves it smaller.
    """
    fields: dict[str, Any] = {}
    if preset_name:
        fields.update(preset(preset_name))
    if config_file:
        fields.update(read_config_file(config_file))
    fields.update(overrides or {})
    if "vocab_size" in fields and fields["vocab_size"] != vocab_size:
        raise ConfigError(
            f"vocab_size: the data's tokenizer has {vocab_size} tokens, the config says "
            f"{fields['vocab_size']}"
        )
    fields["vocab_size"] = vocab_size
    block = fields.get("block_size", TrainConfig.block_size)
    if fields.get("max_position_embeddings", TruthGPTConfig.max_position_embeddings) < block:
        fields["max_position_embeddings"] = block
    return TruthGPTOptimizationCoreConfig.from_dict(fields)


def read_config_file(path: str | Path) -> dict[str, Any]:
    """A flat mapping of config fields from a .toml or .json file (read within bounds: a
    FIFO, a device, a huge or deeply nested file is refused, naming it)."""
    path = Path(path)
    reason = not_regular_reason(path)
    if reason == "does not exist":
        raise FileNotFoundError(f"config file not found: {path}")
    if reason is not None:
        raise ConfigError(f"{path}: {reason}; a config file is a .toml or .json file")
    if path.suffix == ".toml":
        data = read_toml_file(path, CONFIG_LIMIT, error=ConfigError)
    elif path.suffix == ".json":
        data = read_json_file(path, CONFIG_LIMIT, what="config file", error=ConfigError)
    else:
        raise ConfigError(f"{path}: config files must end in .toml or .json")
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a table/object of config fields")
    # Accept [model] / [train] sections as well as a flat file.
    flat: dict[str, Any] = {}
    for key, value in data.items():
        if key in ("model", "train", "training") and isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def parse_overrides(items: list[str] | None) -> dict[str, Any]:
    """`key=value` strings → dict; values parse as JSON (numbers, true, null), else strings."""
    result: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"--set: expected key=value, got {item!r}")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        result[key.strip()] = value
    return result


def train(
    core: TruthGPTOptimizationCore,
    data: Any,
    run_dir: str | Path,
    *,
    world: World | None = None,
    monitor: Monitor | None = None,
    checkpoints: CheckpointManager | None = None,
) -> dict[str, Any]:
    """Train `core` on prepared `data` up to `max_steps`, evaluating and checkpointing.

    Returns the performance report plus the final validation metrics. Only the main rank
    logs and writes checkpoints. Every rank evaluates, on the same batches, so all agree on
    the result: under FSDP a forward pass needs every rank, and under DDP they would only wait.
    `checkpoints`: the run's manager when the caller has one already (a resume), so that the
    checkpoints it has read are not read again.
    """
    world = world or World()
    cfg = core.train_config
    run_dir = Path(run_dir)
    sampler = RandomBatches(
        data.train, cfg.block_size, cfg.batch_size, seed=cfg.seed, rank=world.rank
    )
    # Fail now, not after the first training interval, if the val split is too short.
    check_data_fits(data, cfg.block_size)
    manager = None
    if world.is_main:
        manager = checkpoints or CheckpointManager(run_dir)
        manager.keep_last = cfg.keep_checkpoints
    own_monitor = monitor is None
    if monitor is None:
        monitor = Monitor(
            run_dir,
            cfg.max_steps,
            start_step=core.step,
            enabled=world.is_main,
            log_interval=cfg.log_interval,
        )
    if core.optimizer is None:
        core.setup_optimizer()

    accum = cfg.gradient_accumulation_steps
    last_eval: dict[str, float] | None = None
    try:
        while core.step < cfg.max_steps:
            step = core.step
            micro = [sampler.batch(step * accum + i) for i in range(accum)]
            metrics = core.train_step(micro)
            # Each process reports its own share's loss; the log shows the global batch's.
            metrics["loss"] = mean_over_ranks(metrics["loss"], world, core.device)
            monitor.log_train(metrics)
            if metrics["skipped"]:
                monitor.log_event("skipped_step", step=core.step, reason="non-finite loss/grad")
            done = core.step >= cfg.max_steps
            if core.step % cfg.eval_interval == 0 or done:
                last_eval = core.evaluate(data.val, max_batches=cfg.eval_batches)
                core.record_eval(last_eval)
                monitor.log_eval(core.step, last_eval)
            if core.step % cfg.checkpoint_every == 0 or done:
                # FSDP: every rank sends its shards
                full_state = gather_full_state(core.model, core.optimizer)
                if manager is not None:
                    val_loss = last_eval["loss"] if last_eval and last_eval_step(core) else None
                    path = manager.save(
                        core.checkpoint_state(), val_loss=val_loss, full_state=full_state
                    )
                    monitor.log_event("checkpoint", step=core.step, path=str(path))
    except TrainingDiverged as err:
        monitor.log_event("diverged", step=core.step, message=str(err))
        monitor.print(f"stopped: {err}")
        raise
    except OSError as err:
        raise _run_failed(err, run_dir, core, manager) from err
    except KeyboardInterrupt:
        # A sharded model needs every rank to gather it, which an interrupt cannot arrange.
        if manager is not None and not is_sharded(core.model):
            path = manager.save(core.checkpoint_state())
            monitor.print(f"interrupted at step {core.step}; checkpoint saved to {path}")
        raise
    finally:
        if own_monitor:
            monitor.close()

    report = core.get_performance_report()
    report["final_eval"] = last_eval
    if world.is_main:
        try:
            write_file_atomically(run_dir / "report.json", json_bytes(json_safe(report)))
        except OSError as err:
            raise _run_failed(err, run_dir, core, manager) from err
    return report


def _run_failed(
    err: OSError, run_dir: Path, core: TruthGPTOptimizationCore, manager: CheckpointManager | None
) -> RunFailed:
    """Disk full, a permission taken away, a file replaced by a folder: the run had started,
    so it fails with exit 1, naming the path; the newest checkpoint is untouched
    (checkpoints are written atomically) and named for the resume."""
    where = err.filename or run_dir
    latest = manager.latest() if manager is not None else None
    resume = f"; {latest.name} can be resumed" if latest is not None else ""
    return RunFailed(f"{where}: {err.strerror or err} (stopped at step {core.step}{resume})")


def last_eval_step(core: TruthGPTOptimizationCore) -> bool:
    """True when the newest evaluation was made at the current step."""
    return bool(core.eval_history) and int(core.eval_history[-1]["step"]) == core.step


def check_data_fits(data: Any, block_size: int) -> None:
    """Both splits hold at least one window of block_size + 1 tokens (checked before a run
    writes anything, not after its first training interval)."""
    for name in ("train", "val"):
        split = getattr(data, name)
        if len(split) < block_size + 1:
            raise ValueError(
                f"block_size: {block_size} needs at least {block_size + 1} tokens in the "
                f"{name} split of {getattr(data, 'data_dir', 'the data')}, which has "
                f"{len(split)}"
            )
