"""`truthgpt train` / `eval` end to end on a small user corpus: run folder, monitoring, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from truthgpt.cli import main

TINY = [
    "--set",
    "hidden_size=32",
    "--set",
    "num_hidden_layers=1",
    "--set",
    "num_attention_heads=2",
    "--set",
    "block_size=16",
    "--set",
    "batch_size=4",
    "--set",
    "eval_interval=3",
    "--set",
    "eval_batches=2",
    "--set",
    "warmup_steps=1",
    "--set",
    "log_interval=1",
]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    text = root / "text.txt"
    text.write_text("Now is the winter of our discontent\nMade glorious summer.\n" * 40)
    out = root / "data"
    assert main(["prepare", "--corpus", str(text), "--tokenizer", "char", "--out", str(out)]) == 0
    return out


def test_train_eval_resume(tmp_path, data_dir, capsys):
    run = tmp_path / "run"
    args = [
        "train",
        "--data",
        str(data_dir),
        "--out",
        str(run),
        "--distance",
        "l1",
        "--max-steps",
        "6",
        "--checkpoint-every",
        "3",
        *TINY,
    ]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert '"distance_type": "l1"' in out  # the validated config is echoed
    assert "done: step 6" in out

    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train_rows = [r for r in rows if r["event"] == "train"]
    assert [r["step"] for r in train_rows] == [1, 2, 3, 4, 5, 6]
    assert {"loss", "lr", "grad_norm", "tokens_per_s", "mfu", "memory_mb"} <= set(train_rows[0])
    assert [r["step"] for r in rows if r["event"] == "eval_val"] == [3, 6]
    assert any(p.name.startswith("events.out.tfevents") for p in (run / "tb").iterdir())
    assert (run / "training_curves.png").read_bytes()[:4] == b"\x89PNG"

    assert main(["eval", "--run", str(run), "--max-batches", "2"]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["step"] == 6
    # bits per char = loss / ln 2 × tokens / chars of the val split (char tokenizer: 1)
    assert metrics["bits_per_char"] == pytest.approx(metrics["loss"] / math.log(2), rel=1e-9)
    assert metrics["perplexity"] == pytest.approx(2.718281828 ** metrics["loss"], rel=1e-6)

    # A new run into a non-empty folder is refused; --resume continues it.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--resume", str(run), "--max-steps", "8"]) == 0
    assert "resuming" in capsys.readouterr().out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r["event"] == "train"][-2:] == [7, 8]


def test_train_errors_are_named(tmp_path, data_dir, capsys):
    base = ["train", "--data", str(data_dir), "--out", str(tmp_path / "r")]
    assert main([*base, "--distance", "manhattan-ish"]) == 2
    assert "distance_type" in capsys.readouterr().err
    assert main([*base, "--set", "hidden_size=30", "--set", "num_attention_heads=4"]) == 2
    assert "num_attention_heads" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "r")]) == 2
    assert "missing" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_cli_resume_repeats_the_uninterrupted_run_exactly(tmp_path, data_dir):
    """`train --resume` after a stop at step 5 gives the losses and weights of one run to 8
    (the schedule decays over 8 steps in both, so the stop does not change it). Dropout is on,
    so the restored RNG state matters too."""
    import torch

    from truthgpt.training import load_core

    def train(run, steps, *extra):
        args = ["train", "--data", str(data_dir), "--out", str(run), "--distance", "l1"]
        args += ["--max-steps", str(steps), *TINY, "--set", "lr_decay_steps=8"]
        args += ["--set", "hidden_dropout_prob=0.1", "--set", "attention_probs_dropout_prob=0.1"]
        assert main([*args, *extra]) == 0

    def losses(run):
        rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss"] for r in rows if r["event"] == "train"}

    train(tmp_path / "straight", 8)
    train(tmp_path / "stopped", 5)
    assert main(["train", "--resume", str(tmp_path / "stopped"), "--max-steps", "8"]) == 0
    straight, resumed = losses(tmp_path / "straight"), losses(tmp_path / "stopped")
    assert sorted(resumed) == list(range(1, 9))
    assert [resumed[s] for s in range(6, 9)] == [straight[s] for s in range(6, 9)]
    a = load_core(tmp_path / "straight").model.state_dict()
    b = load_core(tmp_path / "stopped").model.state_dict()
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resume_reads_each_file_of_the_run_once(tmp_path, data_dir, monkeypatch):
    """`train --resume` opens every file the run held for reading once: run.json, the
    pointers, each checkpoint's manifest and config (checked against run.json), and the
    latest checkpoint's state, tokenizer and optimizer. model.safetensors is opened twice:
    its header alone before the model is built (a config asking for a huge model costs a
    comparison), then whole."""
    import builtins
    import collections
    import io
    import os

    run = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out", str(run), "--max-steps", "6"]
    assert main([*args, "--checkpoint-every", "3", *TINY]) == 0
    before = {p for p in run.rglob("*") if p.is_file()}
    reads: collections.Counter[str] = collections.Counter()
    real_os_open, real_open = os.open, builtins.open

    def count(path: object) -> None:
        path = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
        if Path(path) in before:
            reads[os.path.relpath(path, run)] += 1

    def os_open(path, flags, *rest, **kwargs):
        if not flags & (os.O_WRONLY | os.O_RDWR):
            count(path)
        return real_os_open(path, flags, *rest, **kwargs)

    def open_(file, mode="r", *rest, **kwargs):
        if isinstance(file, str | bytes | os.PathLike) and not set(mode) & set("wax+"):
            count(file)
        return real_open(file, mode, *rest, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    assert main(["train", "--resume", str(run), "--max-steps", "7"]) == 0
    monkeypatch.undo()

    latest = "checkpoints/step-0000006/"
    once = ["config.json", "manifest.json", "optimizer.safetensors", "tokenizer.json"]
    assert dict(reads) == {
        "run.json": 1,
        "metrics.jsonl": 1,
        "checkpoints/latest": 1,
        "checkpoints/best": 1,
        # The older checkpoint: checked to hold the config run.json records.
        "checkpoints/step-0000003/manifest.json": 1,
        "checkpoints/step-0000003/config.json": 1,
        **{latest + name: 1 for name in [*once, "trainer_state.json"]},
        latest + "model.safetensors": 2,
    }


def test_the_library_starts_and_resumes_runs_as_the_command_does(tmp_path, data_dir):
    """`run_training` is the command without its parsing: the same run, the same lines."""
    from truthgpt.training.run import RunOptions, run_training

    lines: list[str] = []
    settings = [s for s in TINY if s != "--set"]
    run = tmp_path / "run"
    new = RunOptions(data=str(data_dir), out=str(run), settings=settings, fields={"max_steps": 3})
    result = run_training(new, say=lines.append)
    assert (result.run_dir, result.step) == (run, 3) and result.report is not None
    assert lines[0] == "config:" and lines[-1].startswith("done: step 3, val loss")
    assert json.loads((run / "run.json").read_text())["config"]["max_steps"] == 3

    lines.clear()
    result = run_training(RunOptions(resume=str(run), fields={"max_steps": 4}), say=lines.append)
    assert result.step == 4 and lines[0].startswith(f"resuming {run} at step 3 → 4")
    lines.clear()
    result = run_training(RunOptions(resume=str(run)), say=lines.append)
    assert (result.step, result.report) == (4, None)
    assert lines == [
        f"{run} is already at step 4 of max_steps=4: nothing to do "
        "(pass --max-steps to train further)"
    ]
    with pytest.raises(ValueError, match="hidden_size cannot change in a running run"):
        run_training(RunOptions(resume=str(run), settings=["hidden_size=64"]))


def test_a_run_writes_its_files_atomically(tmp_path, data_dir, monkeypatch):
    """Every file a run writes, started or resumed, is written under a temporary name and
    renamed into place (io.atomic), but for its logs: metrics.jsonl (appended to), tb/
    (TensorBoard's event files) and the lock file."""
    import builtins
    import io
    import os

    run = tmp_path / "run"
    written: set[str] = set()
    real_os_open, real_open = os.open, builtins.open

    def note(path: object) -> None:
        path = os.path.abspath(os.fsdecode(path))  # type: ignore[arg-type]
        if Path(path).is_relative_to(run):
            written.add(os.path.relpath(path, run))

    def os_open(path, flags, *rest, **kwargs):
        if flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            note(path)
        return real_os_open(path, flags, *rest, **kwargs)

    def open_(file, mode="r", *rest, **kwargs):
        if isinstance(file, str | bytes | os.PathLike) and set(mode) & set("wax+"):
            note(file)
        return real_open(file, mode, *rest, **kwargs)

    monkeypatch.setattr(os, "open", os_open)
    monkeypatch.setattr(builtins, "open", open_)
    monkeypatch.setattr(io, "open", open_)
    args = ["train", "--data", str(data_dir), "--out", str(run), "--max-steps", "3", *TINY]
    assert main(args) == 0
    assert main(["train", "--resume", str(run), "--max-steps", "4"]) == 0
    monkeypatch.undo()

    def in_place(name: str) -> bool:
        parts = Path(name).parts
        return not any(part.startswith(".tmp-") for part in parts) and parts[0] != "tb"

    assert {name for name in written if in_place(name)} == {"metrics.jsonl", ".lock"}
    for name in ("run.json", ".truthgpt.json", "report.json", "training_curves.png"):
        assert (run / name).is_file(), name
    assert any(name.startswith("tb/") for name in written)  # the logs were seen too
