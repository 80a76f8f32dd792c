"""`truthgpt train` / `eval` end to end on a small user corpus: run folder, monitoring, resume."""

from __future__ import annotations

import json
import math

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
