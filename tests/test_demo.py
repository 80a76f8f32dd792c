"""`truthgpt demo` in miniature: every workflow runs and the report holds this run's figures."""

from __future__ import annotations

import json

from truthgpt.cli import main
from truthgpt.workflows.explorer import read_explorer_data


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
    better = "tuned" if tuning["val_loss_tuned"] < tuning["val_loss_before"] else "original"
    assert tuning["kept"] == better
    assert tuning["val_loss_after"] == min(tuning["val_loss_tuned"], tuning["val_loss_before"])
    assert metrics["sample"]["text"].startswith("Romeo:\n")
    assert len(metrics["sample"]["text"]) > 300
    report = (out / "report.md").read_text()
    for figure in ("runs/l1/training_curves.png", "attended_distance.png", "attention_layer0.png"):
        assert (out / figure).read_bytes()[:4] == b"\x89PNG"
        assert figure in report
    # The explorer page: l1 and dot side by side on one passage.
    page = (out / "attention.html").read_text(encoding="utf-8")
    assert [m["name"] for m in read_explorer_data(page)["models"]] == ["l1", "dot"]
    assert metrics["explorer_bytes"] == len(page.encode("utf-8")) < 200_000
    assert "[attention.html](attention.html)" in report
    # The report quotes this run's numbers, not canned ones.
    assert f"{metrics['runs']['l1']['final_eval']['loss']:.4f}" in report
    assert str(out / "report.md") in capsys.readouterr().out


def test_plan_training_fits_the_budget_and_drops_a_short_baseline():
    from truthgpt.workflows.demo import MAX_STEPS, plan_training

    per_step = {"l1": 0.0625, "dot": 0.0625}  # 0.125 s per step of both (exact in binary)
    assert plan_training(per_step, 100.0) == (["l1", "dot"], 800)
    assert plan_training(per_step, 25.0) == (["l1", "dot"], 200)  # exactly the minimum
    # 24.9 s gives both only 199 steps: the baseline goes, l1 takes the whole budget
    assert plan_training(per_step, 24.9) == (["l1"], 398)
    assert plan_training(per_step, 1e6) == (["l1", "dot"], MAX_STEPS)
    assert plan_training({"l1": 0.05}, 0.01) == (["l1"], 1)  # at least one step
