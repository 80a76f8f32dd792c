"""`truthgpt generate` end to end on a tiny trained run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from truthgpt.cli import main
from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.data import load_prepared, prepare_data
from truthgpt.data.dataset import RandomBatches
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training.checkpoint import CheckpointManager
from truthgpt.training.core import TruthGPTOptimizationCore

TEXT = "the quick brown fox jumps over the lazy dog.\nto be or not to be, that is the question.\n"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """prepare_data on a small text, a few train steps, one checkpoint."""
    root = tmp_path_factory.mktemp("generate")
    (root / "corpus.txt").write_text(TEXT * 20, encoding="utf-8")
    prepare_data([str(root / "corpus.txt")], "char", root / "data", val_fraction=0.1)
    data = load_prepared(root / "data")
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=data.tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        block_size=16,
        batch_size=4,
        distance_type="l2",
        warmup_steps=1,
        max_steps=5,
        device="cpu",
        peak_flops=1e12,
    )
    core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer)
    core.setup_optimizer()
    batches = RandomBatches(data.train, block_size=16, batch_size=4, seed=0)
    for step in range(5):
        core.train_step(batches.batch(step))
    CheckpointManager(root / "run").save(core.checkpoint_state())
    return root / "run"


def generate_cli(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["generate", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_greedy_prints_prompt_then_the_models_continuation(run_dir: Path, capsys) -> None:
    code, out, err = generate_cli(
        capsys, "--run", str(run_dir), "--prompt", "to be", "--max-new-tokens", "40", "--greedy"
    )
    assert code == 0 and err == ""
    # The same continuation from the library.
    from truthgpt.nn.model import TruthGPTModel
    from truthgpt.training.checkpoint import read_tokenizer

    tokenizer = read_tokenizer(run_dir)
    model = TruthGPTModel.from_pretrained(run_dir)
    ids = model.generate(torch.tensor([tokenizer.encode("to be")]), 40, do_sample=False)
    assert out == "to be" + tokenizer.decode(ids[0, 5:].tolist()) + "\n"
    assert len(out) == len("to be") + 40 + 1  # char tokenizer: one character per token
    # Temperature 0 and --no-cache give the same text.
    same = generate_cli(
        capsys,
        "--run",
        str(run_dir),
        "--prompt",
        "to be",
        "--max-new-tokens",
        "40",
        "--temperature",
        "0",
        "--no-cache",
    )
    assert same == (0, out, "")


def test_seed_reproduces_the_sample(run_dir: Path, capsys) -> None:
    def sample(seed: str, *extra: str) -> str:
        code, out, err = generate_cli(
            capsys,
            "--run",
            str(run_dir),
            "--prompt",
            "the",
            "--max-new-tokens",
            "60",
            "--seed",
            seed,
            "--top-k",
            "10",
            "--top-p",
            "0.95",
            *extra,
        )
        assert code == 0 and err == ""
        return out

    first = sample("7")
    assert first.startswith("the") and len(first) == 3 + 60 + 1
    assert sample("7") == first
    assert sample("7", "--no-cache") == first
    assert sample("8") != first


def test_checkpoint_folder_works_as_run(run_dir: Path, capsys) -> None:
    step_folder = next((run_dir / "checkpoints").glob("step-*"))
    args = ("--prompt", "fox", "--max-new-tokens", "5", "--greedy")
    assert generate_cli(capsys, "--run", str(step_folder), *args) == generate_cli(
        capsys, "--run", str(run_dir), *args
    )


def test_zero_new_tokens_prints_the_prompt(run_dir: Path, capsys) -> None:
    assert generate_cli(
        capsys, "--run", str(run_dir), "--prompt", "dog", "--max-new-tokens", "0"
    ) == (0, "dog\n", "")


def test_unencodable_prompt_is_a_clean_error(run_dir: Path, capsys) -> None:
    code, out, err = generate_cli(capsys, "--run", str(run_dir), "--prompt", "to be €")
    assert code == 2 and out == ""
    assert err.startswith("truthgpt generate: error: --prompt: char tokenizer: character '€'")
    assert "Traceback" not in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--top-p", "1.5"], "--top-p: must be in (0, 1]"),
        (["--top-p", "0"], "--top-p: must be in (0, 1]"),
        (["--temperature", "-0.5"], "--temperature: must be a finite number ≥ 0"),
        (["--top-k", "0"], "--top-k: must be a positive integer"),
        (["--max-new-tokens", "-1"], "--max-new-tokens: must be an integer in [0, 1,000,000]"),
        (["--device", "gpu"], "--device: expected auto, cpu, cuda or cuda:N"),
        (["--prompt", ""], "--prompt: empty"),
    ],
)
def test_bad_values_are_clean_errors(run_dir: Path, capsys, args: list[str], message: str) -> None:
    code, out, err = generate_cli(capsys, "--run", str(run_dir), "--prompt", "a", *args)
    assert code == 2 and out == ""
    assert err.startswith(f"truthgpt generate: error: {message}")


def test_missing_run_and_missing_tokenizer(tmp_path: Path, run_dir: Path, capsys) -> None:
    code, _, err = generate_cli(capsys, "--run", str(tmp_path / "nope"), "--prompt", "a")
    assert code == 2 and "no such checkpoint" in err
    TruthGPTModel.from_pretrained(run_dir).save_pretrained(tmp_path / "bare")
    code, _, err = generate_cli(capsys, "--run", str(tmp_path / "bare"), "--prompt", "a")
    assert code == 2 and "holds no tokenizer.json" in err


def test_a_long_prompt_costs_only_its_last_window(run_dir: Path, capsys, monkeypatch) -> None:
    """A 20,000-character prompt to a model of a 32-token window: the model never sees more
    than the window (each forward, the first included), and the continuation is the one the
    prompt's last 32 characters get alone (one character is one token here)."""
    long_prompt = (TEXT * 250)[:20_000]
    seen: list[int] = []
    forward = TruthGPTModel.forward

    def spy(self, input_ids, *args, **kwargs):
        seen.append(input_ids.shape[1])
        return forward(self, input_ids, *args, **kwargs)

    monkeypatch.setattr(TruthGPTModel, "forward", spy)
    args = ["--run", str(run_dir), "--max-new-tokens", "20", "--greedy"]
    code, out, _ = generate_cli(capsys, *args, "--prompt", long_prompt)
    assert code == 0 and out.startswith(long_prompt)
    assert seen and max(seen) <= 32 and seen[0] == 32
    code, alone, _ = generate_cli(capsys, *args, "--prompt", long_prompt[-32:])
    assert code == 0 and out[len(long_prompt) :] == alone[32:]
