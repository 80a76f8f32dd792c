"""Checkpoints round-trip exactly, resume bit-identically and survive interrupted writes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import safetensors.torch
import torch

from truthgpt.config import TruthGPTConfig, TruthGPTOptimizationCoreConfig
from truthgpt.data import build_tokenizer
from truthgpt.io import CheckpointError, resolve_checkpoint
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import checkpoint, load_core
from truthgpt.training.checkpoint import CheckpointManager, read_trainer_state
from truthgpt.training.core import TruthGPTOptimizationCore

VOCAB, BLOCK, BATCH = 50, 16, 4


def tiny_config(**overrides) -> TruthGPTOptimizationCoreConfig:
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=BLOCK,
        block_size=BLOCK,
        batch_size=BATCH,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.1,
        warmup_steps=2,
        max_steps=10,
        device="cpu",
        peak_flops=1e12,  # skip measuring the CPU's peak
    )
    return TruthGPTOptimizationCoreConfig(**(fields | overrides))


def batch(step: int) -> dict[str, torch.Tensor]:
    """Deterministic in the step alone, like the training sampler."""
    g = torch.Generator().manual_seed(10_000 + step)
    return {"input_ids": torch.randint(0, VOCAB, (BATCH, BLOCK), generator=g)}


def trained_core(steps: int = 3, **overrides) -> TruthGPTOptimizationCore:
    core = TruthGPTOptimizationCore(tiny_config(**overrides))
    for step in range(steps):
        core.train_step(batch(step))
    return core


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------- model only


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_round_trips_logits_exactly(tmp_path: Path, tie: bool) -> None:
    torch.manual_seed(0)
    model = TruthGPTModel(
        TruthGPTConfig(
            vocab_size=VOCAB,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            max_position_embeddings=BLOCK,
            distance_type="l2",
            tie_word_embeddings=tie,
        )
    ).eval()
    with torch.no_grad():  # make λ differ per head, so a lost λ would show
        model.blocks[0].attn.log_lambda.copy_(torch.tensor([-1.0, 0.5]))
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == [
        "config.json",
        "manifest.json",
        "model.safetensors",
    ]
    loaded = TruthGPTModel.from_pretrained(tmp_path / "m")
    assert not loaded.training
    assert loaded.config == model.config
    assert (loaded.lm_head.weight is loaded.wte.weight) == tie
    x = batch(0)["input_ids"]
    assert torch.equal(loaded(x).logits, model(x).logits)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The tied matrix is stored once.
    stored = safetensors.torch.load_file(tmp_path / "m" / "model.safetensors")
    assert ("lm_head.weight" in stored) == (not tie)


def test_loading_a_model_leaves_the_global_rng_alone(tmp_path: Path) -> None:
    trained_core(0).raw_model.save_pretrained(tmp_path / "m")
    torch.manual_seed(5)
    expected = torch.rand(3)
    torch.manual_seed(5)
    TruthGPTModel.from_pretrained(tmp_path / "m")
    assert torch.equal(torch.rand(3), expected)


def test_load_pretrained_accepts_checkpoint_checkpoints_and_run_folders(tmp_path: Path) -> None:
    core = trained_core(2)
    path = CheckpointManager(tmp_path / "run").save(core.checkpoint_state())
    x = batch(0)["input_ids"]
    core.model.eval()
    for where in (path, tmp_path / "run" / "checkpoints", tmp_path / "run"):
        assert resolve_checkpoint(where) == path
        assert torch.equal(TruthGPTModel.from_pretrained(where)(x).logits, core.model(x).logits)


def test_resolve_checkpoint_rejects_other_folders(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="nothing-here"):
        resolve_checkpoint(tmp_path / "nothing-here")
    (tmp_path / "plain").mkdir()
    (tmp_path / "plain" / "notes.txt").write_text("hi")
    with pytest.raises(CheckpointError, match="not a checkpoint folder"):
        resolve_checkpoint(tmp_path / "plain")
    (tmp_path / "run" / "checkpoints").mkdir(parents=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        resolve_checkpoint(tmp_path / "run")
    # Weights without a manifest (e.g. a Hugging Face export) are refused clearly.
    (tmp_path / "hf").mkdir()
    safetensors.torch.save_file({"w": torch.zeros(1)}, tmp_path / "hf" / "model.safetensors")
    with pytest.raises(CheckpointError, match=r"manifest\.json: missing"):
        TruthGPTModel.from_pretrained(tmp_path / "hf")


def test_save_pretrained_refuses_to_overwrite_foreign_folder(tmp_path: Path) -> None:
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "thesis.tex").write_text("precious")
    with pytest.raises(FileExistsError, match="not a truthgpt checkpoint"):
        trained_core(0).raw_model.save_pretrained(folder)
    assert sorted(p.name for p in folder.iterdir()) == ["thesis.tex"]
    assert [p.name for p in tmp_path.iterdir()] == ["mine"]  # no temporary left behind


def test_save_pretrained_replaces_an_earlier_save(tmp_path: Path) -> None:
    first, second = trained_core(0), trained_core(2)
    first.raw_model.save_pretrained(tmp_path / "m")
    second.raw_model.save_pretrained(tmp_path / "m")
    loaded = TruthGPTModel.from_pretrained(tmp_path / "m")
    second.model.eval()
    x = batch(1)["input_ids"]
    assert torch.equal(loaded(x).logits, second.model(x).logits)
    assert [p.name for p in tmp_path.iterdir()] == ["m"]


# ------------------------------------------------------------------------- full checkpoints


def test_checkpoint_files_are_json_and_safetensors(tmp_path: Path) -> None:
    core = trained_core(2)
    core.record_eval({"loss": 3.5})
    path = core.save_checkpoint(tmp_path / "c", note="hello")
    names = sorted(p.name for p in path.iterdir())
    assert names == [
        "config.json",
        "manifest.json",
        "model.safetensors",
        "optimizer.safetensors",
        "trainer_state.json",
    ]
    manifest = json.loads((path / "manifest.json").read_text())
    assert sorted(manifest["files"]) == sorted(set(names) - {"manifest.json"})
    for name, entry in manifest["files"].items():
        assert entry["size"] == (path / name).stat().st_size
    config = json.loads((path / "config.json").read_text())
    assert config["format_version"] == 1
    assert (
        TruthGPTOptimizationCoreConfig.from_parts(
            TruthGPTConfig.from_dict(config["model"]), core.train_config.from_dict(config["train"])
        )
        == core.config
    )
    state = json.loads((path / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["sampler_position"] == 2
    assert state["tokens_seen"] == 2 * BATCH * BLOCK
    assert state["best_val_loss"] == 3.5
    assert state["extra"] == {"note": "hello"}
    optimizer = safetensors.torch.load_file(path / "optimizer.safetensors")
    assert "state.0.exp_avg" in optimizer and "state.0.step" in optimizer
    assert not any(p.read_bytes().startswith(b"\x80") for p in path.iterdir())  # no pickle


def test_load_checkpoint_restores_everything(tmp_path: Path) -> None:
    core = trained_core(3)
    core.record_eval({"loss": 2.5})
    core.state.bad_steps_total = 2
    core.state.bad_steps_in_a_row = 1
    path = core.save_checkpoint(tmp_path / "c", epoch=7)
    fresh = TruthGPTOptimizationCore(tiny_config())
    state = fresh.load_checkpoint(path)
    assert state["extra"] == {"epoch": 7}
    assert (fresh.step, fresh.tokens_seen, fresh.best_val_loss) == (3, 3 * BATCH * BLOCK, 2.5)
    assert (fresh.state.bad_steps_total, fresh.state.bad_steps_in_a_row) == (2, 1)
    assert fresh.eval_history == core.eval_history
    for name, tensor in core.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    assert fresh.raw_model.lm_head.weight is fresh.raw_model.wte.weight
    ours, theirs = core.optimizer.state_dict(), fresh.optimizer.state_dict()
    assert ours["param_groups"] == theirs["param_groups"]
    for index, values in ours["state"].items():
        for key, tensor in values.items():
            assert torch.equal(theirs["state"][index][key], tensor), (index, key)
    assert read_trainer_state(path)["extra"] == {"epoch": 7}


def test_load_checkpoint_loads_into_the_objects_it_is_given(tmp_path: Path) -> None:
    """The load mirrors the save: `load_checkpoint` fills the model, optimizer and train
    state it is handed (the same objects, in place) and restores the RNG; the checkpoint's
    files are read into `CheckpointContents` once, whatever asks for them."""
    core = trained_core(3)
    core.record_eval({"loss": 2.5})
    path = core.save_checkpoint(tmp_path / "c", epoch=7)
    fresh = TruthGPTOptimizationCore(tiny_config())
    fresh.setup_optimizer()
    objects = fresh.checkpoint_state()
    state, optimizer = fresh.state, fresh.optimizer
    contents = checkpoint.read_checkpoint(path)
    assert contents.step == 3 and contents.model_config == core.raw_model.config
    saved = checkpoint.load_checkpoint(contents, objects)
    expected_draw = torch.rand(3)
    assert saved["extra"] == {"epoch": 7}
    assert fresh.state is state and fresh.optimizer is optimizer
    assert (state.step, state.best_val_loss, state.eval_history) == (3, 2.5, core.eval_history)
    assert state.eval_history is not contents.resume.state.eval_history  # a copy
    for name, tensor in core.model.state_dict().items():
        assert torch.equal(fresh.model.state_dict()[name], tensor), name
    ours, theirs = core.optimizer.state_dict()["state"], optimizer.state_dict()["state"]
    for index, values in ours.items():
        for key, tensor in values.items():
            assert torch.equal(theirs[index][key], tensor), (index, key)
    # The RNG is where the save left it: loading again draws the same numbers.
    checkpoint.load_checkpoint(contents, objects)
    assert torch.equal(torch.rand(3), expected_draw)


def test_a_bad_checkpoint_leaves_the_given_objects_alone(tmp_path: Path) -> None:
    path = trained_core(2).save_checkpoint(tmp_path / "c")
    data = bytearray((path / "optimizer.safetensors").read_bytes())
    data[len(data) // 2] ^= 0xFF  # read after the weights, which are then not applied
    (path / "optimizer.safetensors").write_bytes(bytes(data))
    fresh = trained_core(1)
    before, before_opt = weights(fresh.model), fresh.optimizer.state_dict()
    step = fresh.state.step
    with pytest.raises(CheckpointError, match=r"optimizer\.safetensors: contents differ"):
        checkpoint.load_checkpoint(checkpoint.read_checkpoint(path), fresh.checkpoint_state())
    assert all(torch.equal(before[k], v) for k, v in fresh.model.state_dict().items())
    assert fresh.state.step == step
    after_opt = fresh.optimizer.state_dict()["state"]
    for index, values in before_opt["state"].items():
        for key, tensor in values.items():
            assert torch.equal(after_opt[index][key], tensor), (index, key)


def test_checkpoint_of_a_core_before_any_step(tmp_path: Path) -> None:
    core = trained_core(0)
    path = core.save_checkpoint(tmp_path / "c")
    assert not (path / "optimizer.safetensors").exists()
    fresh = TruthGPTOptimizationCore(tiny_config())
    fresh.load_checkpoint(path)
    assert fresh.step == 0 and fresh.optimizer is not None


@pytest.mark.parametrize("distance", ["l1", "dot"])
def test_resume_is_bit_identical(tmp_path: Path, distance: str) -> None:
    total, cut = 8, 3
    uninterrupted = trained_core(0, distance_type=distance)
    expected = [uninterrupted.train_step(batch(s))["loss"] for s in range(total)]

    first = trained_core(0, distance_type=distance)
    losses = [first.train_step(batch(s))["loss"] for s in range(cut)]
    CheckpointManager(tmp_path / "run").save(first.checkpoint_state())
    del first
    torch.rand(1000)  # disturb the RNG: the checkpoint must bring back its own state

    resumed = load_core(tmp_path / "run")
    assert resumed.step == cut
    losses += [resumed.train_step(batch(s))["loss"] for s in range(cut, total)]
    assert losses == expected
    for name, tensor in uninterrupted.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[name], tensor), name

    # The comparison is sensitive: with dropout on, a different RNG state changes the losses.
    again = load_core(tmp_path / "run")
    torch.manual_seed(12345)
    other = [again.train_step(batch(s))["loss"] for s in range(cut, total)]
    assert other != expected[cut:]


def test_load_core_overrides_training_fields_only(tmp_path: Path) -> None:
    CheckpointManager(tmp_path / "run").save(trained_core(2).checkpoint_state())
    core = load_core(tmp_path / "run", max_steps=50, device="cpu")
    assert core.train_config.max_steps == 50 and core.step == 2
    with pytest.raises(CheckpointError, match="hidden_size: a model field"):
        load_core(tmp_path / "run", hidden_size=64)
    with pytest.raises(CheckpointError, match="max_stepz: not a training field"):
        load_core(tmp_path / "run", max_stepz=3)
    with pytest.raises(CheckpointError, match="max_steps"):
        load_core(tmp_path / "run", max_steps=-1)


def test_load_core_brings_back_tokenizer_and_chars_per_token(tmp_path: Path) -> None:
    text = "to be, or not to be:\nthat is the question"
    tokenizer = build_tokenizer("char", text)
    core = TruthGPTOptimizationCore(
        tiny_config(vocab_size=tokenizer.vocab_size), tokenizer=tokenizer, chars_per_token=1.0
    )
    CheckpointManager(tmp_path / "run").save(core.checkpoint_state())
    loaded = load_core(tmp_path / "run")
    assert loaded.chars_per_token == 1.0
    assert loaded.tokenizer.encode(text) == tokenizer.encode(text)
    assert loaded.tokenizer.decode(tokenizer.encode(text)) == text


def test_load_core_refuses_a_model_only_folder(tmp_path: Path) -> None:
    trained_core(0).raw_model.save_pretrained(tmp_path / "m")
    with pytest.raises(CheckpointError, match="no training config"):
        load_core(tmp_path / "m")


def test_extra_state_must_be_json(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="extra_state"):
        trained_core(1).save_checkpoint(tmp_path / "c", bad=object())
    assert list(tmp_path.iterdir()) == []


def test_load_checkpoint_rejects_a_different_model(tmp_path: Path) -> None:
    path = trained_core(1).save_checkpoint(tmp_path / "c")
    other = TruthGPTOptimizationCore(tiny_config(distance_type="l2"))
    before = weights(other.model)
    with pytest.raises(CheckpointError, match="distance_type='l1' \\(checkpoint\\) vs 'l2'"):
        other.load_checkpoint(path)
    assert all(torch.equal(before[k], v) for k, v in other.model.state_dict().items())
    assert other.optimizer is None


# ------------------------------------------------------------------------- run folders


def test_manager_keeps_last_n_and_best(tmp_path: Path) -> None:
    core = trained_core(0)
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    assert manager.latest() is None and manager.best() is None
    val_losses = [3.0, 2.0, 2.5, 2.7, None]
    for val_loss in val_losses:
        core.train_step(batch(core.step))
        manager.save(core.checkpoint_state(), val_loss=val_loss)
    folder = tmp_path / "run" / "checkpoints"
    kept = sorted(p.name for p in folder.iterdir())
    assert kept == ["best", "latest", "step-0000002", "step-0000004", "step-0000005"]
    assert manager.latest() == folder / "step-0000005"
    assert manager.best() == folder / "step-0000002"
    assert manager.best_val_loss() == 2.0
    assert (folder / "latest").read_text().strip() == "step-0000005"
    # A new manager (a resumed run) sees the same best.
    manager = CheckpointManager(tmp_path / "run", keep_last=2)
    core.train_step(batch(core.step))
    manager.save(core.checkpoint_state(), val_loss=1.5)
    assert manager.best() == folder / "step-0000006"
    assert not (folder / "step-0000002").exists()


def test_manager_rejects_bad_keep_last(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="keep_last"):
        CheckpointManager(tmp_path, keep_last=0)


def test_leftover_temporary_folder_is_ignored_then_cleaned(tmp_path: Path) -> None:
    core = trained_core(1)
    manager = CheckpointManager(tmp_path / "run")
    good = manager.save(core.checkpoint_state())
    # What a crash in the middle of writing step 2 leaves behind.
    leftover = tmp_path / "run" / "checkpoints" / ".tmp-step-0000002-deadbeef"
    leftover.mkdir()
    (leftover / "model.safetensors").write_bytes(b"half a file")
    assert resolve_checkpoint(tmp_path / "run") == good
    assert load_core(tmp_path / "run").step == 1
    core.train_step(batch(1))
    manager.save(core.checkpoint_state())
    assert not leftover.exists()


def test_crash_during_save_keeps_previous_checkpoint(tmp_path: Path, monkeypatch) -> None:
    core = trained_core(1)
    manager = CheckpointManager(tmp_path / "run")
    good = manager.save(core.checkpoint_state())
    core.train_step(batch(1))

    def crash(*args, **kwargs):
        raise OSError("disk unplugged")

    monkeypatch.setattr(os, "rename", crash)
    with pytest.raises(OSError, match="disk unplugged"):
        manager.save(core.checkpoint_state())
    monkeypatch.undo()
    folder = tmp_path / "run" / "checkpoints"
    assert sorted(p.name for p in folder.iterdir()) == ["latest", good.name]
    assert resolve_checkpoint(tmp_path / "run") == good
    assert load_core(tmp_path / "run").step == 1


def test_missing_latest_pointer_falls_back_to_newest(tmp_path: Path) -> None:
    core = trained_core(1)
    manager = CheckpointManager(tmp_path / "run")
    manager.save(core.checkpoint_state())
    core.train_step(batch(1))
    newest = manager.save(core.checkpoint_state())
    (tmp_path / "run" / "checkpoints" / "latest").unlink()
    assert resolve_checkpoint(tmp_path / "run") == newest
