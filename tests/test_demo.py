"""`truthgpt demo` in miniature: every workflow runs and the report holds this run's figures."""

from __future__ import annotations

import json

from truthgpt.cli import main


def test_demo_runs_every_workflow(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--steps", "4", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert set(metrics["runs"]) == {"l1", "dot"}
    for run in metrics["runs"].values():
        assert run["steps"] == 4 and run["final_eval"]["bits_per_char"] > 0
    assert metrics["persistence"]["logits_identical"] is True
    assert (
        metrics["persistence"]["weights_bytes"] > 4 * metrics["runs"]["l1"]["num_parameters"] * 0.9
    )
    tuning = metrics["lambda_tuning"]
    assert tuning["val_loss_after"] <= tuning["val_loss_before"]
    assert metrics["sample"]["text"].startswith("Romeo:\n")
    assert len(metrics["sample"]["text"]) > 300
    report = (out / "report.md").read_text()
    for figure in ("training_l1.png", "attended_distance.png", "attention_layer0.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
        assert figure in report
    # The report quotes this run's numbers, not canned ones.
    assert f"{metrics['runs']['l1']['final_eval']['loss']:.4f}" in report
    assert str(out / "report.md") in capsys.readouterr().out
