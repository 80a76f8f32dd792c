"""Loading refuses what no run writes, with a CheckpointError naming the file and the field:
sizes past the configs' limits, a config whose shapes the weights do not have (found before
the model is allocated), hyper-parameters, counters and random states out of range, and
non-finite weights or moments. The seeded fuzzer (test_checkpoint_fuzz.py) covers the rest.

The checkpoint is test_checkpoint_corrupt's (two steps of a one-layer model, vocabulary 40).
"""

from __future__ import annotations

import base64
import json
import random
import shutil
from pathlib import Path

import pytest
import safetensors.torch
import torch

from test_checkpoint_corrupt import (
    edit_json,
    expect_error,
    make_core,
    optimizer_parts,
    resign,
    save_optimizer,
    train,
)
from truthgpt import config as limits
from truthgpt.io import CheckpointError
from truthgpt.nn import model as model_module
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core
from truthgpt.training.optim_state import _check_scaler


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


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_weights_are_refused(ckpt: Path, value: float) -> None:
    tensors = safetensors.torch.load_file(ckpt / "model.safetensors")
    tensors["ln_f.weight"][3] = value
    safetensors.torch.save_file(tensors, ckpt / "model.safetensors", {"format": "pt"})
    resign(ckpt)
    both_refuse(ckpt, "model.safetensors: tensor 'ln_f.weight' holds non-finite values")


# ------------------------------------------------------------------------------ values


def edit_optimizer(ckpt: Path, edit) -> None:  # type: ignore[no-untyped-def]
    tensors, metadata = optimizer_parts(ckpt)
    meta = json.loads(metadata["truthgpt.optimizer"])
    edit(tensors, meta)
    save_optimizer(ckpt, tensors, {**metadata, "truthgpt.optimizer": json.dumps(meta)})


@pytest.mark.parametrize(
    ("key", "value", "pattern"),
    [
        ("lr", 1e300, r"'lr' must be a number in \[0, 10.0\]"),
        ("lr", 10**400, "'lr' must be"),
        ("lr", -1e-3, "'lr' must be"),
        ("betas", [5, -2], r"'betas' must be two numbers in \[0, 1\)"),
        ("betas", [0.9, 1.0], "'betas' must be"),
        ("eps", 0.0, "'eps' must be"),
        ("weight_decay", -1, "'weight_decay' must be"),
        ("weight_decay", 1e300, "'weight_decay' must be"),
        ("amsgrad", True, "'amsgrad' is True, but the optimizer was built with False"),
        ("maximize", 1, "'maximize' is 1"),
    ],
)
def test_optimizer_hyper_parameters_out_of_range(ckpt, target, key, value, pattern) -> None:
    edit_optimizer(ckpt, lambda t, m: m["param_groups"][1].update({key: value}))
    expect_error(target, ckpt, r"optimizer\.safetensors: param_groups\[1\]: " + pattern)


@pytest.mark.parametrize(
    ("name", "value", "pattern"),
    [
        ("state.0.exp_avg", float("inf"), "'exp_avg' holds non-finite values"),
        ("state.0.exp_avg_sq", float("nan"), "'exp_avg_sq' holds non-finite values"),
        ("state.0.exp_avg_sq", -1.0, "'exp_avg_sq' holds negative values"),
        ("state.0.step", 0.5, r"'step' must be a whole number in \[0, 2\]"),
        ("state.0.step", 3.0, r"'step' must be a whole number in \[0, 2\]"),  # the core's is 2
        ("state.0.step", float("nan"), "'step' must be"),
    ],
)
def test_optimizer_moments_out_of_range(ckpt, target, name: str, value: float, pattern) -> None:
    def edit(tensors, meta) -> None:  # type: ignore[no-untyped-def]
        tensors[name].view(-1)[0] = value

    edit_optimizer(ckpt, edit)
    expect_error(target, ckpt, r"optimizer\.safetensors: parameter 0: " + pattern)


def test_optimizer_state_with_an_unknown_entry(ckpt: Path, target) -> None:
    edit_optimizer(
        ckpt, lambda t, m: t.update({"state.0.foo": torch.zeros_like(t["state.0.exp_avg"])})
    )
    expect_error(target, ckpt, r"parameter 0: state has unknown entries \['foo'\]")


def test_scaler_state_is_checked() -> None:
    good = torch.amp.GradScaler("cpu").state_dict()
    _check_scaler(good, Path("o"))
    _check_scaler(None, Path("o"))
    bad = [("scale", float("nan")), ("scale", -1.0), ("growth_factor", 0.5)]
    bad += [("backoff_factor", 1.5), ("growth_interval", 0), ("_growth_tracker", -1)]
    for key, value in bad:
        with pytest.raises(CheckpointError, match=rf"'scaler' .* an invalid '{key}'"):
            _check_scaler({**good, key: value}, Path("o"))
    with pytest.raises(CheckpointError, match=r"'scaler' .* is malformed"):
        _check_scaler({"scale": 1.0}, Path("o"))


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s.update(step=2**63), "'step' must be an integer in"),
        (lambda s: s.update(tokens_seen=1e30), "'tokens_seen' must be an integer in"),
        (lambda s: s.update(best_val_loss=float("nan")), "'best_val_loss' must be a number in"),
        (lambda s: s.update(best_val_loss=-1.0), "'best_val_loss' must be a number in"),
        (lambda s: s.update(chars_per_token=-3), "'chars_per_token' must be a number in"),
        (lambda s: s.update(chars_per_token=0), "'chars_per_token' must be a number in"),
        (lambda s: s.update(chars_per_token=1e300), "'chars_per_token' must be a number in"),
        (lambda s: s.update(bad_steps_total=3), r"'bad_steps_total' \(3\) exceeds 'step' \(2\)"),
        (lambda s: s.update(eval_history=[{"loss": 1.0}]), r"'eval_history'\[0\] has no 'step'"),
        (
            lambda s: s.update(eval_history=[{"step": 9.0, "loss": 1.0}]),
            r"'eval_history'\[0\] 'step' must be a whole number in \[0, 2\]",
        ),
        (
            lambda s: s.update(eval_history=[{"step": 1.0, "loss": "x"}]),
            r"'eval_history'\[0\] 'loss' must be a number",
        ),
    ],
)
def test_trainer_counters_out_of_range(ckpt: Path, target, edit, pattern: str) -> None:
    edit_json(ckpt / "trainer_state.json", edit)
    expect_error(target, ckpt, r"trainer_state\.json: " + pattern)


def _torch_state(s: dict) -> None:
    s["rng"]["torch_cpu"] = base64.b64encode(random.Random(0).randbytes(5056)).decode()


@pytest.mark.parametrize(
    ("edit", "pattern"),
    [
        (lambda s: s["rng"]["python"][1].__setitem__(0, 2**40), "python: state must be"),
        (lambda s: s["rng"]["python"].__setitem__(2, "x"), "python: gauss must be"),
        (lambda s: s["rng"]["numpy"]["state"].update(pos=700), "numpy: pos must be"),
        (lambda s: s["rng"]["numpy"]["state"].update(pos=-1), "numpy: pos must be"),
        (lambda s: s["rng"]["numpy"].update(has_gauss=2), "numpy: has_gauss must be"),
        (lambda s: s["rng"]["numpy"].update(gauss=float("nan")), "numpy: gauss must be"),
        (_torch_state, "Invalid mt19937 state"),  # once refused only after the weights were in
        (lambda s: s["rng"].update(torch_cuda=5), "torch_cuda must be a list"),
    ],
)
def test_random_states_out_of_range(ckpt: Path, target, edit, pattern: str) -> None:
    edit_json(ckpt / "trainer_state.json", edit)
    expect_error(
        target, ckpt, r"trainer_state\.json: 'rng' holds an invalid random state .*" + pattern
    )


# ------------------------------------------------------------------------------ found by the fuzzer


@pytest.mark.parametrize("missing", ["max_steps", "seed"])
def test_a_training_config_lacking_a_field_is_refused(ckpt: Path, missing: str) -> None:
    edit_json(ckpt / "config.json", lambda c: c["train"].__delitem__(missing))
    with pytest.raises(CheckpointError, match=rf"invalid training config: lacks {missing}"):
        load_core(ckpt)


def test_a_model_config_lacking_a_field_is_refused(ckpt: Path) -> None:
    edit_json(ckpt / "config.json", lambda c: c["model"].__delitem__("distance_type"))
    both_refuse(ckpt, "config.json: invalid model config: lacks distance_type")


@pytest.mark.parametrize("text", [b"[" * 100_000 + b"]" * 100_000, b"1" * 5000])
def test_json_too_deep_or_too_long_is_refused(ckpt: Path, text: bytes) -> None:
    (ckpt / "config.json").write_bytes(text)
    resign(ckpt)
    both_refuse(ckpt, "config.json: not valid JSON")


def test_a_tokenizer_larger_than_the_model_is_refused(tmp_path: Path) -> None:
    from truthgpt.data import build_tokenizer

    tokenizer = build_tokenizer("char", "".join(chr(ord("A") + i) for i in range(41)))
    path = make_core().save_checkpoint(tmp_path / "ckpt")  # vocabulary 40
    tokenizer.save(path / "tokenizer.json")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["tokenizer.json"] = {"size": 0, "sha256": "0" * 64}
    (path / "manifest.json").write_text(json.dumps(manifest))
    resign(path)
    with pytest.raises(CheckpointError, match=r"tokenizer\.json: 'vocab_size' 41 exceeds"):
        load_core(path)
