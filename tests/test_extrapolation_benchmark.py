"""benchmarks/extrapolation.py's evaluation and its work folder (the study itself is long and
runs outside the suite)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest
import torch

from truthgpt.config import TruthGPTConfig
from truthgpt.nn.model import TruthGPTModel

PATH = Path(__file__).parent.parent / "benchmarks" / "extrapolation.py"
spec = importlib.util.spec_from_file_location("benchmark_extrapolation", PATH)
assert spec is not None and spec.loader is not None
study = importlib.util.module_from_spec(spec)
spec.loader.exec_module(study)


def test_a_folder_that_is_not_the_studys_is_refused(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SystemExit, match=r"is not empty and holds no extrapolation\.json"):
        study.work_folder(tmp_path)
    assert (tmp_path / "notes.txt").read_text() == "mine"
    fresh = tmp_path / "new"
    assert study.work_folder(fresh) == {"runs": {}}
    state = {"runs": {"l1-rope-seed0": {"lengths": {}}}}
    (fresh / study.STATE).write_text(json.dumps(state))
    assert study.work_folder(fresh) == state  # continues


def test_loss_per_length_is_the_mean_over_every_position_of_the_windows() -> None:
    torch.manual_seed(0)
    config = TruthGPTConfig(
        vocab_size=11, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
        max_position_embeddings=16, position_embedding="alibi",
    )  # fmt: skip
    model = TruthGPTModel(config).eval()
    tokens = torch.randint(0, 11, (2 * 2049 + 5,), generator=torch.Generator().manual_seed(1))
    rows = study.evaluate_lengths(model, tokens, "alibi")
    assert list(rows) == ["256", "512", "1024", "2048"]
    windows = tokens[: 15 * 257].view(15, 257)  # 4103 tokens: 15 whole windows
    with torch.no_grad():
        logits = model(windows[:, :-1]).logits
    want = torch.nn.functional.cross_entropy(logits.reshape(-1, 11), windows[:, 1:].reshape(-1))
    assert rows["256"]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert rows["256"]["windows"] == 15 and rows["2048"]["windows"] == 2
    for row in rows.values():
        assert all(0.0 <= d < 2048 for d in row["attended_distance"])
    assert list(study.evaluate_lengths(model, tokens, "learned")) == ["256"]
