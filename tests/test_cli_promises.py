"""What the README promises about the command line and the training loop, each checked once:
Ctrl-C saves a checkpoint, `eval --split train`, `train --config FILE`, every `--help`."""

from __future__ import annotations

import json

import pytest

from test_cli_train import TINY
from truthgpt.cli import COMMANDS, main
from truthgpt.training import load_core


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("promises")
    text = root / "text.txt"
    text.write_text("".join(f"{i}: to be, or not to be, {i * i} questions.\n" for i in range(80)))
    out = root / "data"
    assert main(["prepare", "--corpus", str(text), "--tokenizer", "char", "--out", str(out)]) == 0
    return out


@pytest.mark.parametrize("command", [name.replace("_", "-") for name in COMMANDS])
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: truthgpt {command}")
    assert "--" in out  # it lists options


def test_ctrl_c_saves_a_checkpoint_that_resumes(tmp_path, data_dir, monkeypatch, capsys):
    """An interrupt at step 3 of 10 (checkpoints only every 100 steps) still leaves a
    checkpoint at step 3, and --resume continues from it."""
    from truthgpt.training.core import TruthGPTOptimizationCore

    real_step = TruthGPTOptimizationCore.train_step

    def interrupted(self, batch):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self, batch)

    run = tmp_path / "run"
    args = ["train", "--data", str(data_dir), "--out", str(run), "--max-steps", "10", *TINY]
    monkeypatch.setattr(TruthGPTOptimizationCore, "train_step", interrupted)
    with pytest.raises(KeyboardInterrupt):
        main([*args, "--checkpoint-every", "100"])
    assert "interrupted at step 3; checkpoint saved" in capsys.readouterr().out
    assert load_core(run).step == 3
    monkeypatch.setattr(TruthGPTOptimizationCore, "train_step", real_step)
    assert main(["train", "--resume", str(run)]) == 0
    assert load_core(run).step == 10


def test_eval_on_the_train_split_and_a_config_file(tmp_path, data_dir, capsys):
    config = tmp_path / "small.toml"
    config.write_text(
        "[model]\nhidden_size = 24\nnum_hidden_layers = 1\nnum_attention_heads = 3\n"
        "[train]\nblock_size = 16\nbatch_size = 2\nmax_steps = 2\neval_batches = 1\n"
    )
    run = tmp_path / "run"
    assert main(["train", "--data", str(data_dir), "--out", str(run), "--config", str(config)]) == 0
    capsys.readouterr()
    core = load_core(run)
    assert (core.config.hidden_size, core.config.num_attention_heads) == (24, 3)
    assert (core.config.batch_size, core.step) == (2, 2)
    results = {}
    for split in ("val", "train"):
        assert main(["eval", "--run", str(run), "--split", split, "--max-batches", "2"]) == 0
        results[split] = json.loads(capsys.readouterr().out)
        assert results[split]["split"] == split
    assert results["train"]["loss"] != results["val"]["loss"]  # other text, other loss
