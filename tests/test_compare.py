"""`truthgpt compare` in miniature: a few steps, two kinds, two seeds, a small user corpus."""

from __future__ import annotations

import json
import math

import pytest

from truthgpt.cli import main
from truthgpt.workflows.compare import compare_kinds

TINY = {
    "hidden_size": 32,
    "num_hidden_layers": 1,
    "num_attention_heads": 2,
    "block_size": 16,
    "max_position_embeddings": 16,
    "batch_size": 4,
    "warmup_steps": 1,
}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("corpus") / "text.txt"
    path.write_text("To be, or not to be, that is the question.\n" * 60, encoding="utf-8")
    return path


def test_compare_writes_table_plot_and_results(tmp_path, corpus):
    result = compare_kinds(
        ["dot", "l1"],
        tmp_path,
        steps=4,
        seeds=2,
        corpus=[str(corpus)],
        eval_batches=2,
        evals=2,
        overrides=TINY,
        log=lambda _: None,
    )
    saved = json.loads((tmp_path / "results.json").read_text())
    assert set(saved["kinds"]) == {"dot", "l1"}
    for kind in ("dot", "l1"):
        r = saved["kinds"][kind]
        losses = [run["val_loss"] for run in r["per_seed"]]
        assert len(losses) == 2 and losses[0] != losses[1]  # seeds really differ
        assert r["val_loss_mean"] == pytest.approx(sum(losses) / 2)
        # A char tokenizer: one token is one character, so bits per char = loss / ln 2.
        assert r["bits_per_char_mean"] == pytest.approx(
            sum(run["val_loss"] for run in r["per_seed"]) / 2 / math.log(2), rel=1e-9
        )
        speeds = [run["tokens_per_s"] for run in r["per_seed"]]
        assert r["tokens_per_s"] == pytest.approx(sum(speeds) / 2, rel=1e-12)
        assert [s for s, _ in r["per_seed"][0]["val_curve"]] == [2, 4]
    assert result["kinds"]["l1"]["val_loss_std"] > 0
    assert (tmp_path / "val_curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = (tmp_path / "results.md").read_text()
    assert "| l1 |" in table and "| dot |" in table


def test_compare_cli_rejects_unknown_kind(tmp_path, capsys):
    assert main(["compare", "--kinds", "dot,manhatten", "--out", str(tmp_path)]) == 2
    assert "manhatten" in capsys.readouterr().err


def test_compare_cli_evals_and_first_seed(tmp_path, corpus, capsys):
    assert main(["compare", "--kinds", "l1", "--evals", "0", "--out", str(tmp_path / "a")]) == 2
    assert "--evals must be positive, got 0" in capsys.readouterr().err
    sets = [f"--set={k}={v}" for k, v in TINY.items()]
    args = ["compare", "--kinds", "l1", "--seeds", "1", "--first-seed", "3", "--steps", "6"]
    args += ["--evals", "3"]
    args += ["--eval-batches", "2", "--corpus", str(corpus), "--out", str(tmp_path / "b")]
    assert main(args + sets) == 0
    saved = json.loads((tmp_path / "b" / "results.json").read_text())
    [run] = saved["kinds"]["l1"]["per_seed"]
    assert [s for s, _ in run["val_curve"]] == [2, 4, 6]
    assert run["seed"] == 3 and (tmp_path / "b" / "runs" / "l1-seed3").is_dir()
    assert main(["compare", "--first-seed", "-1", "--out", str(tmp_path / "c")]) == 2
    assert "--first-seed must be in [0, " in capsys.readouterr().err
