"""Loading refuses what no run writes, with a CheckpointError naming the file and the field:
sizes past the configs' limits, a config whose shapes the weights do not have (found before
the model is allocated), hyper-parameters, counters and random states out of range, and
non-finite weights or moments. The seeded fuzzer (test_checkpoint_fuzz.py) covers the rest.

The checkpoint is test_checkpoint_corrupt's (two steps of a one-layer model, vocabulary 40).
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from test_checkpoint_corrupt import (
    edit_json,
    make_core,
    resign,
    train,
)
from truthgpt import config as limits
from truthgpt.io import CheckpointError
from truthgpt.nn import model as model_module
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return train(make_core(), 2).save_checkpoint(tmp_path_factory.mktemp("good") / "ckpt")


@pytest.fixture
def ckpt(saved: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(saved, tmp_path / "ckpt"))


@pytest.fixture
def target():
    return train(make_core(seed=7), 1)


def both_refuse(folder: Path, *patterns: str) -> None:
    """Both load paths raise a CheckpointError matching every pattern."""
    for load in (TruthGPTModel.from_pretrained, load_core):
        with pytest.raises(CheckpointError) as info:
            load(folder)
        for pattern in patterns:
            assert pattern in str(info.value), (load, str(info.value))


# ------------------------------------------------------------------------------ shapes


@pytest.mark.parametrize(
    ("field", "value"),
    [("num_hidden_layers", 2**63), ("vocab_size", 2**63), ("intermediate_size", 2**63)],
)
def test_an_oversized_config_is_refused_naming_the_field(ckpt: Path, field: str, value) -> None:
    edit_json(ckpt / "config.json", lambda c: c["model"].update({field: value}))
    both_refuse(ckpt, "config.json: invalid model config", field)


@pytest.mark.parametrize(
    ("field", "value", "problem"),
    [
        ("num_hidden_layers", limits.MAX_LAYERS, "missing (13299): blocks.1.attn"),
        ("vocab_size", limits.MAX_VOCAB_SIZE, "wte.weight (40, 16) vs (16777216, 16)"),
        ("hidden_size", limits.MAX_HIDDEN_SIZE, "shape mismatch"),
        ("max_position_embeddings", limits.MAX_POSITIONS, "wpe.weight (8, 16) vs (1048576, 16)"),
    ],
)
def test_a_config_the_weights_do_not_fit_is_refused_before_allocating(
    ckpt: Path, monkeypatch: pytest.MonkeyPatch, field: str, value: int, problem: str
) -> None:
    """The shapes come from the file's header and a model on the meta device: no model of
    the config's size is ever built."""
    built = []
    init = TruthGPTModel.__init__

    def spy(self, config):  # type: ignore[no-untyped-def]
        init(self, config)
        built.append(self.wte.weight.device.type)

    monkeypatch.setattr(model_module.TruthGPTModel, "__init__", spy)
    edit_json(ckpt / "config.json", lambda c: c["model"].update({field: value}))
    for load in (TruthGPTModel.from_pretrained, load_core):
        with pytest.raises(CheckpointError, match=r"model\.safetensors: tensors do not fit") as e:
            load(ckpt)
        assert problem in str(e.value)
    assert set(built) == {"meta"}


def test_a_safetensors_header_longer_than_its_file(ckpt: Path) -> None:
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes((2**63).to_bytes(8, "little") + data[8:])
    resign(ckpt)
    both_refuse(ckpt, "model.safetensors: not a readable safetensors file (a header of")
