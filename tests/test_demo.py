"""`truthgpt demo` in miniature: every workflow runs and the report holds this run's figures."""

from __future__ import annotations

import json
import math
import time

import pytest

from truthgpt.cli import main
from truthgpt.io.folders import read_marker, write_marker
from truthgpt.workflows.explorer import read_explorer_data

# The demo sizes its work (the sample's length too) to its time budget: alone on the cores.
pytestmark = pytest.mark.serial


def test_demo_runs_every_workflow(tmp_path, capsys):
    out = tmp_path / "report"
    assert main(["demo", "--steps", "4", "--minutes", "0.5", "--out", str(out)]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 4
    assert set(metrics["runs"]) == {"l1", "dot"}
    for run in metrics["runs"].values():
        final = run["final_eval"]
        assert run["steps"] == 4
        # One character is one token: bits per char is the loss in nats over ln 2.
        assert final["bits_per_char"] == pytest.approx(final["loss"] / math.log(2), rel=1e-12)
    assert metrics["persistence"]["logits_identical"] is True
    assert (
        metrics["persistence"]["weights_bytes"] > 4 * metrics["runs"]["l1"]["num_parameters"] * 0.9
    )
    tuning = metrics["lambda_tuning"]
    better = "tuned" if tuning["val_loss_tuned"] < tuning["val_loss_before"] else "original"
    assert tuning["kept"] == better
    assert tuning["val_loss_after"] == min(tuning["val_loss_tuned"], tuning["val_loss_before"])
    assert metrics["sample"]["text"].startswith("Romeo:\n")
    # The sample takes what is left of the budget: 50 to 400 new characters (one per token).
    assert 50 <= len(metrics["sample"]["text"]) - len("Romeo:\n") <= 400
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


def test_demo_keeps_to_its_budget_and_replaces_an_earlier_report(tmp_path, capsys):
    """`--minutes 0.5`: the whole demo within 30 s ± 30 s (the larger of 20 % and 30 s), into
    a folder holding an earlier demo report, which it replaces."""
    out = tmp_path / "report"
    out.mkdir()
    (out / "report.md").write_text("an earlier report")
    write_marker(out, "demo report")
    start = time.perf_counter()
    assert main(["demo", "--minutes", "0.5", "--out", str(out)]) == 0
    seconds = time.perf_counter() - start
    assert seconds <= 0.5 * 60 + max(0.2 * 0.5 * 60, 30), seconds
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["budget_s"] == 30 and metrics["total_time_s"] <= seconds
    assert metrics["runs"]["l1"]["steps"] == metrics["steps"] >= 1
    assert (out / "report.md").read_text().startswith("# truthgpt demo report")
    assert read_marker(out)[0] == "demo report"
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


def test_demo_refuses_a_budget_below_its_smallest(tmp_path, capsys):
    assert main(["demo", "--minutes", "0.4", "--out", str(tmp_path / "r")]) == 2
    assert "--minutes: at least 0.5" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()
