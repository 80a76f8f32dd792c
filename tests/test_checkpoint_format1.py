"""A checkpoint written by truthgpt 0.1.0 (format 1) keeps loading and resuming exactly.

tests/data/format1/ckpt was written by that release (tests/data/format1/make_format1.py),
with the logits of the loaded model and the losses of the two steps after a resume, as
that release computed them, in expected.json.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core
from truthgpt.training.checkpoint import read_trainer_state

DATA = Path(__file__).parent / "data" / "format1"
EXPECTED = json.loads((DATA / "expected.json").read_text())


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return Path(shutil.copytree(DATA / "ckpt", tmp_path / "ckpt"))


def test_format1_model_loads_with_the_same_logits(ckpt: Path) -> None:
    model = TruthGPTModel.from_pretrained(ckpt)
    x = torch.tensor(EXPECTED["input_ids"])
    logits = model(x).logits[0, :, :4]
    assert torch.allclose(logits, torch.tensor(EXPECTED["logits"]), atol=1e-6)


def test_format1_run_resumes_with_the_same_losses(ckpt: Path) -> None:
    core = load_core(ckpt)
    assert core.step == EXPECTED["step"]
    assert core.best_val_loss == 2.75 and core.chars_per_token == 1.0
    assert core.tokenizer is not None and core.optimizer is not None
    text = "to be or not to be, that is the question"
    ids = torch.tensor([core.tokenizer.encode(text)[:16]])
    losses = []
    for i in (3, 4):
        x = ids[:, i : i + 9].repeat(2, 1)
        losses.append(core.train_step({"input_ids": x, "labels": x})["loss"])
    # Same weights, AdamW moments, schedule position and RNG state: the same numbers.
    assert losses == pytest.approx(EXPECTED["next_losses"], rel=1e-6)


def test_format1_trainer_state_reads(ckpt: Path) -> None:
    state = read_trainer_state(ckpt)
    assert state["step"] == 3 and state["extra"] == {"note": "format 1"}
