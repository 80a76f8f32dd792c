"""`truthgpt analyze` and `truthgpt tune-lambda` end to end on a tiny trained run."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch

from truthgpt.analysis import layer_weights
from truthgpt.cli import main
from truthgpt.data import load_prepared, prepare_data
from truthgpt.training import TruthGPTOptimizationCore, build_config, load_core, train
from truthgpt.workflows.explorer import decode_weights, read_explorer_data

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(300))
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A prepared data folder and a 5-step run trained on it, as `truthgpt train` leaves them."""
    root = tmp_path_factory.mktemp("cli")
    (root / "play.txt").write_text(TEXT, encoding="utf-8")
    prepare_data([str(root / "play.txt")], "char", root / "data")
    data = load_prepared(root / "data")
    config = build_config(
        vocab_size=data.vocab_size,
        overrides=dict(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            block_size=16,
            batch_size=4,
            max_steps=5,
            warmup_steps=1,
            eval_interval=5,
            eval_batches=2,
            device="cpu",
            peak_flops=1e12,
            distance_type="l2",
        ),
    )
    core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer)
    run = root / "run"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"data": str(root / "data"), "preset": None}))
    train(core, data, run)
    return run


def tree_digest(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_analyze_writes_json_table_and_pngs(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "analysis"
    assert main(["analyze", "--run", str(run_dir), "--out", str(out), "--samples", "6"]) == 0
    printed = capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    assert analysis["num_samples"] == 6 and analysis["block_size"] == 16
    assert analysis["step"] == 5 and analysis["source"] == "val split"
    assert len(analysis["layers"]) == 2 and len(analysis["layers"][0]["heads"]) == 2
    assert len(analysis["sample"]["tokens"]) == 16  # the window is shorter than 48 tokens
    for layer in analysis["layers"]:
        for head in layer["heads"]:
            assert head["entropy_normalized"] <= 1 + 1e-6
            assert head["row_sum_error"] < 1e-5
    # The table: a row per head and a mean row per layer, with the JSON's numbers.
    first = analysis["layers"][0]["heads"][0]
    rows = [line.split() for line in printed.splitlines() if line.split()[:2] == ["0", "0"]]
    assert rows and rows[0][3] == f"{first['entropy']:.3f}"
    assert sum(1 for line in printed.splitlines() if line.split()[1:2] == ["mean"]) == 2
    for name in ("attention_layer0.png", "attention_layer1.png", "attention_distance.png"):
        assert (out / name).read_bytes()[:8] == PNG_SIGNATURE
    assert sorted(p.name for p in out.iterdir()) == [
        ".truthgpt.json",
        "analysis.json",
        "attention.html",
        "attention_distance.png",
        "attention_layer0.png",
        "attention_layer1.png",
    ]


def test_analyze_writes_the_explorer_page(run_dir: Path, tmp_path: Path, capsys) -> None:
    """attention.html holds analysis.json's statistics and the model's weights on the sample."""
    out = tmp_path / "analysis"
    assert main(["analyze", "--run", str(run_dir), "--out", str(out), "--samples", "4"]) == 0
    assert "attention.html" in capsys.readouterr().out
    analysis = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    data = read_explorer_data((out / "attention.html").read_text(encoding="utf-8"))
    assert data["token_ids"] == analysis["sample"]["token_ids"]
    assert data["pieces"] == analysis["sample"]["pieces"]
    assert "".join(data["pieces"]) in TEXT
    (model,) = data["models"]
    assert model["name"] == model["distance_type"] == "l2" and model["step"] == 5
    assert [layer["heads"] for layer in model["layers"]] == [
        layer["heads"] for layer in analysis["layers"]
    ]
    core = load_core(run_dir)
    ids = torch.tensor([analysis["sample"]["token_ids"]])
    for layer, w in enumerate(layer_weights(core.raw_model, ids)):
        for head, text in enumerate(model["weights"][layer]):
            stored = torch.from_numpy(decode_weights(text, ids.shape[1]))
            torch.testing.assert_close(stored, w[0, head].double(), atol=1e-4, rtol=0)


def test_analyze_refuses_a_non_empty_out(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "busy"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    assert main(["analyze", "--run", str(run_dir), "--out", str(out), "--samples", "2"]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    # --force replaces only an earlier analysis, never a folder holding a file of the user's.
    argv = ["analyze", "--run", str(run_dir), "--out", str(out), "--samples", "2", "--force"]
    assert main(argv) == 2
    assert "not an analysis folder written by truthgpt" in capsys.readouterr().err
    assert [p.name for p in out.iterdir()] == ["notes.txt"]
    (out / "notes.txt").unlink()
    assert main(argv) == 0
    first = (out / "analysis.json").read_text()
    argv[argv.index("2")] = "3"
    assert main(argv) == 0  # an earlier analysis: replaced
    assert (out / "analysis.json").read_text() != first


def test_analyze_bad_input(run_dir: Path, tmp_path: Path, capsys) -> None:
    out = tmp_path / "a"
    assert main(["analyze", "--run", str(run_dir), "--out", str(out), "--samples", "0"]) == 2
    assert "num_samples" in capsys.readouterr().err
    assert not out.exists()
    assert main(["analyze", "--run", str(tmp_path / "nope"), "--out", str(out)]) == 2
    assert not out.exists()


def test_tune_lambda_saves_a_new_run(run_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_digest(run_dir)
    out = tmp_path / "tuned"
    argv = ["tune-lambda", "--run", str(run_dir), "--out", str(out), "--epochs", "2"]
    argv += ["--steps-per-epoch", "3", "--eval-batches", "2"]
    assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "val loss" in printed and "λ before" in printed
    assert tree_digest(run_dir) == before  # the source run is untouched

    report = json.loads((out / "tune_lambda.json").read_text(encoding="utf-8"))
    assert report["steps"] == 6 and report["kept"] in ("tuned", "original")
    assert report["val_loss_after"] <= report["val_loss_before"]
    info = json.loads((out / "run.json").read_text(encoding="utf-8"))
    assert Path(info["data"]) == (run_dir.parent / "data").resolve()
    assert info["tuned_from"] == str(run_dir.resolve())

    tuned = load_core(out)
    assert tuned.raw_model.lambdas().tolist() == report["lambda_after"]
    source = load_core(run_dir)
    for (name, p), q in zip(
        tuned.raw_model.named_parameters(), source.raw_model.parameters(), strict=True
    ):
        if not name.endswith("log_lambda"):
            assert torch.equal(p, q), name
    data = load_prepared(info["data"])
    loss = tuned.evaluate(data.val, max_batches=2)["loss"]
    assert loss == pytest.approx(report["val_loss_after"], rel=1e-6)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no temporary leftovers


def test_tune_lambda_never_overwrites(run_dir: Path, tmp_path: Path, capsys) -> None:
    before = tree_digest(run_dir)
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "x").write_text("keep")
    for out in (run_dir, run_dir / "tuned", busy):
        assert main(["tune-lambda", "--run", str(run_dir), "--out", str(out)]) == 2
        err = capsys.readouterr().err
        assert "--out" in err
    assert tree_digest(run_dir) == before
    assert [p.name for p in busy.iterdir()] == ["x"]
    checkpoint = next((run_dir / "checkpoints").glob("step-*"))
    assert main(["tune-lambda", "--run", str(checkpoint), "--out", str(run_dir)]) == 2
    assert "source run" in capsys.readouterr().err
