"""Distributed training on CPU with gloo: two processes on 127.0.0.1, a tiny model, few steps.

One pair of spawned processes runs every two-process scenario in turn (process start-up is
the expensive part): DDP and FSDP against one process fed the same examples, then the training
loop with checkpoints. A torchrun launch through `truthgpt train --nproc 2` covers the command
line. The reference runs and the resumes happen here, in one process.
"""

from __future__ import annotations

import json
import os
import socket
from functools import partial
from pathlib import Path

import pytest
import safetensors.torch
import torch
import torch.multiprocessing as mp

from truthgpt.cli import main
from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.data import load_prepared, prepare_data
from truthgpt.training import TruthGPTOptimizationCore, World, distributed, load_core, train
from truthgpt.training.checkpoint import CheckpointManager, read_trainer_state

# one worker's group: two ranks in every test (conftest.py)
pytestmark = pytest.mark.slow(25)
VOCAB = 40
STEPS = 3
EXAMPLES_PER_STEP = 4  # the global batch
TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n"


def tiny_config(**changes) -> TruthGPTOptimizationCoreConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=16,
        distance_type="l2",
        block_size=16,
        batch_size=1,
        gradient_accumulation_steps=1,
        warmup_steps=1,
        max_steps=STEPS,
        learning_rate=1e-2,
        min_lr=1e-3,
        device="cpu",
        seed=0,
        peak_flops=1e12,
    )
    fields.update(changes)
    return TruthGPTOptimizationCoreConfig(**fields)


def example(step: int, index: int) -> torch.Tensor:
    """Example `index` of step `step`'s global batch: a (1, 16) row of token ids."""
    g = torch.Generator().manual_seed(1000 * step + index)
    return torch.randint(0, VOCAB, (1, 16), generator=g)


def as_batch(rows: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.cat(rows)
    return {"input_ids": ids, "labels": ids.clone()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters()}


# ------------------------------------------------------------------------------ the workers


def _worker(rank: int, port: int, out: str, data_dir: str) -> None:
    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE="2",
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)
    distributed.run_worker(lambda world: _scenarios(world, Path(out), data_dir), timeout_s=120)


def _scenarios(world: World, out: Path, data_dir: str) -> int:
    def global_loss(metrics: dict) -> dict:
        """Each process reports its own share's loss; the run's loss is their mean."""
        loss = distributed.mean_over_ranks(metrics["loss"], world, torch.device("cpu"))
        return {**metrics, "loss": loss}

    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    rank = world.rank
    report: dict = {}

    # DDP: 2 ranks × 2 micro-batches of one example; gradients are all-reduced once a step.
    ddp = partial(distributed.parallelize, world=world, strategy="ddp")
    fsdp = partial(distributed.parallelize, world=world, strategy="fsdp")
    core = TruthGPTOptimizationCore(tiny_config(gradient_accumulation_steps=2), parallelize=ddp)
    hook_calls = []

    def counting_allreduce(state, bucket):
        hook_calls.append(core.step)
        return default_hooks.allreduce_hook(None, bucket)

    core.model.register_comm_hook(None, counting_allreduce)
    metrics = [
        global_loss(core.train_step([as_batch([example(step, 2 * rank + i)]) for i in range(2)]))
        for step in range(STEPS)
    ]
    report["ddp"] = {"metrics": metrics, "hook_calls": hook_calls, "tokens": core.tokens_seen}
    safetensors.torch.save_file(params(core.raw_model), out / f"ddp-rank{rank}.safetensors")

    # FSDP: 2 ranks × one batch of two examples.
    core = TruthGPTOptimizationCore(tiny_config(batch_size=2), parallelize=fsdp)
    metrics = [
        global_loss(core.train_step(as_batch([example(step, 2 * rank + i) for i in range(2)])))
        for step in range(STEPS)
    ]
    report["fsdp"] = {"metrics": metrics}
    full_state = distributed.gather_full_state(core.model, core.optimizer)  # every rank
    if world.is_main:
        try:
            CheckpointManager(out / "unused").save(
                core.checkpoint_state()
            )  # a sharded model needs full_state
        except ValueError as err:
            report["fsdp"]["save_without_full_state"] = str(err)
        CheckpointManager(out / "fsdp-run").save(core.checkpoint_state(), full_state=full_state)
    torch.distributed.barrier()  # the checkpoint is complete before any rank reads it

    # Resume that checkpoint under FSDP on both ranks: AdamW's state is sharded again.
    core = load_core(out / "fsdp-run", parallelize=fsdp)
    step = core.train_step(as_batch([example(STEPS, 2 * rank + i) for i in range(2)]))
    report["fsdp"]["resumed_step"] = global_loss(step)
    full_state = distributed.gather_full_state(core.model, core.optimizer)
    if world.is_main:
        CheckpointManager(out / "fsdp-resumed").save(core.checkpoint_state(), full_state=full_state)

    # The training loop under DDP on prepared data: rank 0 checkpoints, every rank evaluates.
    data = load_prepared(data_dir)
    config = tiny_config(
        vocab_size=data.vocab_size,
        batch_size=2,
        max_steps=4,
        eval_interval=2,
        eval_batches=2,
        checkpoint_every=2,
        log_interval=1,
    )
    core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer, parallelize=ddp)
    loop_report = train(core, data, out / "loop-run", world=world)
    report["loop"] = {"eval_history": core.eval_history, "tokens": loop_report["tokens_seen"]}

    # Both ranks resume from the step-2 checkpoint: steps 3 and 4 come out bit for bit again.
    resumed = load_core(out / "loop-run" / "checkpoints" / "step-0000002", parallelize=ddp)
    train(resumed, data, out / "loop-resumed", world=world)
    report["loop"]["resumed_losses"] = [m["loss"] for m in resumed.history]
    report["loop"]["losses"] = [m["loss"] for m in core.history]
    report["loop"]["resumed_exactly"] = all(
        torch.equal(a, b)
        for a, b in zip(core.raw_model.parameters(), resumed.raw_model.parameters(), strict=True)
    )

    (out / f"report-rank{rank}.json").write_text(json.dumps(report), encoding="utf-8")
    return 0


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Runs the scenarios in two processes; returns (their output folder, the data folder)."""
    root = tmp_path_factory.mktemp("distributed")
    (root / "corpus.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare_data([str(root / "corpus.txt")], "char", root / "data", val_fraction=0.2)
    out = root / "out"
    out.mkdir()
    mp.spawn(_worker, args=(free_port(), str(out), str(root / "data")), nprocs=2, join=True)
    return out, root / "data"


def reports(out: Path) -> list[dict]:
    return [json.loads((out / f"report-rank{r}.json").read_text()) for r in range(2)]


def reference_run(**changes) -> tuple[TruthGPTOptimizationCore, list[dict]]:
    """One process, 4 micro-batches of one example: the same global batch, accumulated."""
    core = TruthGPTOptimizationCore(tiny_config(gradient_accumulation_steps=4, **changes))
    metrics = [
        core.train_step([as_batch([example(step, i)]) for i in range(EXAMPLES_PER_STEP)])
        for step in range(STEPS)
    ]
    return core, metrics


# ------------------------------------------------------------------------------ the tests


def test_ddp_matches_one_process_on_the_same_global_batch(two_ranks) -> None:
    out, _ = two_ranks
    ref_core, ref_metrics = reference_run()
    rank0, rank1 = (safetensors.torch.load_file(out / f"ddp-rank{r}.safetensors") for r in (0, 1))
    # Both replicas end bit-identical ...
    assert rank0.keys() == rank1.keys() == params(ref_core.raw_model).keys()
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # ... and equal to the one-process run, up to the order of float additions.
    for name, expected in params(ref_core.raw_model).items():
        torch.testing.assert_close(rank0[name], expected, rtol=1e-4, atol=1e-5, msg=name)
    for report in reports(out):
        ddp = report["ddp"]
        for got, ref in zip(ddp["metrics"], ref_metrics, strict=True):
            # The reported loss is the mean over both ranks: the global batch's loss.
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
        assert ddp["tokens"] == ref_core.tokens_seen == STEPS * EXAMPLES_PER_STEP * 16
        # no_sync: one all-reduce per optimiser step (the whole tiny model is one bucket),
        # not one per micro-batch.
        assert ddp["hook_calls"] == list(range(STEPS))


def test_fsdp_matches_one_process_and_its_checkpoint_loads_in_one(two_ranks) -> None:
    out, _ = two_ranks
    ref_core, ref_metrics = reference_run()
    for report in reports(out):
        for got, ref in zip(report["fsdp"]["metrics"], ref_metrics, strict=True):
            assert got["loss"] == pytest.approx(ref["loss"], rel=1e-5)
            assert got["grad_norm"] == pytest.approx(ref["grad_norm"], rel=1e-4)
    # Saving needs the state gathered on every rank; rank 0's shards alone are refused.
    assert "sharded (FSDP)" in reports(out)[0]["fsdp"]["save_without_full_state"]
    assert not (out / "unused" / "checkpoints").exists() or not any(
        (out / "unused" / "checkpoints").iterdir()
    )
    # The checkpoint is the ordinary unsharded format, loaded by a single process ...
    core = load_core(out / "fsdp-run")
    assert core.step == STEPS and core.world_size == 1
    got, expected = params(core.raw_model), params(ref_core.raw_model)
    assert got.keys() == expected.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)
    # ... with AdamW's moments gathered too, parameter for parameter in the same order.
    assert core.optimizer is not None and ref_core.optimizer is not None
    ours, ref = core.optimizer.state_dict()["state"], ref_core.optimizer.state_dict()["state"]
    assert ours.keys() == ref.keys() and len(ours) == len(expected)
    for index in ref:
        assert float(ours[index]["step"]) == STEPS
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(ours[index][key], ref[index][key], rtol=1e-3, atol=1e-7)
    # ... and training goes on from it, in one process ...
    metrics = core.train_step([as_batch([example(STEPS, i)]) for i in range(EXAMPLES_PER_STEP)])
    ref_step = ref_core.train_step(
        [as_batch([example(STEPS, i)]) for i in range(EXAMPLES_PER_STEP)]
    )
    assert core.step == STEPS + 1 and metrics["loss"] == pytest.approx(ref_step["loss"], rel=1e-5)
    # ... or in two, each loading the same checkpoint and sharding its optimizer state again.
    for report in reports(out):
        assert report["fsdp"]["resumed_step"]["loss"] == pytest.approx(ref_step["loss"], rel=1e-5)
    resumed, expected = (
        params(load_core(out / "fsdp-resumed").raw_model),
        params(ref_core.raw_model),
    )
    for name in expected:
        torch.testing.assert_close(resumed[name], expected[name], rtol=1e-4, atol=1e-5, msg=name)


def test_loop_checkpoints_from_rank_0_and_resumes_in_one_process(two_ranks, capsys) -> None:
    out, data_dir = two_ranks
    run_dir = out / "loop-run"
    rank0, rank1 = (r["loop"] for r in reports(out))
    # Every rank evaluated the same batches and agrees; tokens count both ranks' batches.
    assert [e["step"] for e in rank0["eval_history"]] == [2.0, 4.0]
    assert rank0["eval_history"] == rank1["eval_history"]
    assert rank0["tokens"] == rank1["tokens"] == 4 * 2 * 2 * 16
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("step-*")) == [
        "step-0000002",
        "step-0000004",
    ]
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"] == [1, 2, 3, 4]  # rank 0 only
    state = read_trainer_state(run_dir)
    assert state["step"] == 4 and state["tokens_seen"] == 4 * 2 * 2 * 16
    # Resuming with the same two processes repeats steps 3 and 4 exactly.
    assert rank0["resumed_exactly"] and rank1["resumed_exactly"]
    assert rank0["resumed_losses"] == rank0["losses"][2:]

    # Resume with one process instead of two: the same files, batch_size per process.
    (run_dir / "run.json").write_text(json.dumps({"data": str(data_dir)}), encoding="utf-8")
    assert main(["train", "--resume", str(run_dir), "--max-steps", "6"]) == 0
    assert "resuming" in capsys.readouterr().out
    state = read_trainer_state(run_dir)
    assert state["step"] == 6 and state["tokens_seen"] == 4 * 2 * 2 * 16 + 2 * 2 * 16


def test_cli_nproc_runs_fsdp_under_torchrun_and_resumes_alone_and_with_fsdp(
    tmp_path: Path, capfd
) -> None:
    (tmp_path / "corpus.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare_data([str(tmp_path / "corpus.txt")], "char", tmp_path / "data", val_fraction=0.2)
    settings = [
        "hidden_size=32", "num_hidden_layers=2", "num_attention_heads=2", "block_size=16",
        "batch_size=2", "warmup_steps=1", "eval_interval=2", "eval_batches=2",
        "checkpoint_every=2", "log_interval=1", "peak_flops=1e12",
    ]  # fmt: skip
    args = ["train", "--data", str(tmp_path / "data"), "--out", str(tmp_path / "run")]
    args += ["--distance", "l2", "--device", "cpu", "--max-steps", "2"]
    for item in settings:
        args += ["--set", item]
    assert main([*args, "--nproc", "2", "--strategy", "fsdp"]) == 0
    printed = capfd.readouterr()
    assert printed.out.count("distributed: 2 processes, strategy fsdp") == 1  # rank 0 speaks
    assert "done: step 2" in printed.out
    assert "Traceback" not in printed.err and "abort" not in printed.err.lower()
    assert read_trainer_state(tmp_path / "run")["tokens_seen"] == 2 * 2 * 2 * 16

    assert main(["train", "--resume", str(tmp_path / "run"), "--max-steps", "3"]) == 0
    assert "done: step 3" in capfd.readouterr().out

    # and back under two FSDP processes, from the one-process checkpoint
    resume = ["train", "--resume", str(tmp_path / "run"), "--max-steps", "4"]
    assert main([*resume, "--nproc", "2", "--strategy", "fsdp"]) == 0
    printed = capfd.readouterr()
    assert "done: step 4" in printed.out and "Traceback" not in printed.err
    assert read_trainer_state(tmp_path / "run")["step"] == 4


def test_a_rendezvous_nobody_joins_fails_with_what_to_check(monkeypatch) -> None:
    port = free_port()
    env = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}
    env |= {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(distributed.DistributedSetupError) as err:
        distributed.setup(timeout_s=1)
    message = str(err.value)
    assert f"127.0.0.1:{port}" in message and "MASTER_ADDR" in message and "firewall" in message
    assert not torch.distributed.is_initialized()


@pytest.mark.parametrize(
    ("env", "match"),
    [
        ({"RANK": "2", "WORLD_SIZE": "2"}, "RANK < WORLD_SIZE"),
        ({"RANK": "x", "WORLD_SIZE": "2"}, "RANK: expected an integer"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_PORT": "1"}, "MASTER_ADDR"),
        ({"RANK": "0", "WORLD_SIZE": "2", "MASTER_ADDR": "h"}, "MASTER_PORT: not set"),
    ],
)
def test_setup_names_a_bad_environment_variable(monkeypatch, env, match) -> None:
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert distributed.requested()
    with pytest.raises(ValueError, match=match):
        distributed.setup()


def test_bad_strategy_and_nproc_are_refused(capsys) -> None:
    core = TruthGPTOptimizationCore(tiny_config())
    with pytest.raises(ValueError, match="strategy: expected one of ddp, fsdp"):
        distributed.parallelize(core.model, World(0, 2), "zero")
    assert distributed.parallelize(core.model, World(), "fsdp") is core.model  # one process
    assert main(["train", "--nproc", "0", "--data", "d", "--out", "o"]) == 2
    assert "--nproc: must be at least 1" in capsys.readouterr().err


def test_an_interrupted_fsdp_run_keeps_its_last_periodic_checkpoint(tmp_path: Path) -> None:
    """Ctrl-C during a two-process FSDP run: no final save is possible (every rank must gather
    the shards), but the last periodic checkpoint stays complete and resumable."""
    import signal
    import subprocess
    import sys
    import time

    (tmp_path / "corpus.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare_data([str(tmp_path / "corpus.txt")], "char", tmp_path / "data", val_fraction=0.2)
    run = tmp_path / "run"
    settings = [
        "hidden_size=32", "num_hidden_layers=1", "num_attention_heads=2", "block_size=16",
        "batch_size=2", "warmup_steps=1", "eval_interval=1000", "eval_batches=1",
        "checkpoint_every=2", "log_interval=1", "peak_flops=1e12",
    ]  # fmt: skip
    cmd = [sys.executable, "-m", "truthgpt", "train", "--data", str(tmp_path / "data")]
    cmd += ["--out", str(run), "--device", "cpu", "--max-steps", "100000"]
    cmd += ["--nproc", "2", "--strategy", "fsdp"]
    for item in settings:
        cmd += ["--set", item]
    # its own process group, which gets the SIGINT, as a terminal's Ctrl-C would send it
    process = subprocess.Popen(
        cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        deadline = time.monotonic() + 120
        while not (run / "checkpoints" / "latest").exists():  # the first periodic checkpoint
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "no checkpoint within two minutes"
            time.sleep(0.2)
        os.killpg(process.pid, signal.SIGINT)
        _, err = process.communicate(timeout=90)
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
    assert process.returncode != 0, err
    state = read_trainer_state(run)
    assert state["step"] >= 2 and state["step"] % 2 == 0  # a periodic one
    core = load_core(run)  # complete and verified
    assert core.step == state["step"]
