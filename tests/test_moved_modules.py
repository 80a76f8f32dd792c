"""Release 0.1's module paths still import, forward to the new ones, and warn once, naming
the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import warnings

import pytest

MOVED = {
    "truthgpt.attention": ("truthgpt.nn.attention", ["distance_attention", "DistanceAttention"]),
    "truthgpt.model": ("truthgpt.nn.model", ["TruthGPTModel", "CausalLMOutput", "Block"]),
    "truthgpt.generation": ("truthgpt.nn.generation", ["generate", "filter_logits"]),
    "truthgpt.checkpoint": ("truthgpt.training.checkpoint", ["CheckpointManager"]),
}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_an_old_path_warns_naming_the_new_one_and_forwards(old: str) -> None:
    new, names = MOVED[old]
    sys.modules.pop(old, None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        exec(compile(f"import {old}", __file__, "exec"))  # an import statement in this file
    shim = sys.modules[old]
    moved = [w for w in caught if issubclass(w.category, DeprecationWarning)]
    assert len(moved) == 1 and old in str(moved[0].message)
    assert new.split(" ")[0] in str(moved[0].message)
    assert moved[0].filename == __file__  # points at the importing line, not the shim
    target = importlib.import_module(new)
    for name in names:
        assert getattr(shim, name) is getattr(target, name), name


def test_old_submodules_are_the_new_modules() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        from truthgpt.attention.functional import distance_attention

        from truthgpt.attention import functional, native
    import truthgpt.nn.attention.functional as new_functional
    import truthgpt.nn.attention.native as new_native

    assert functional is new_functional and native is new_native
    assert distance_attention is new_functional.distance_attention


def test_a_0_1_script_runs_unchanged(tmp_path) -> None:
    """What release 0.1's README showed: build a model, save and load it with the 0.1
    checkpoint functions, sample, and call the attention function, in a fresh process."""
    script = """
import torch, warnings
warnings.simplefilter("error")
warnings.simplefilter("default", DeprecationWarning)
from truthgpt.attention import distance_attention, DISTANCE_KINDS
from truthgpt.model import TruthGPTModel
from truthgpt.generation import generate
from truthgpt.checkpoint import save_pretrained, load_pretrained
from truthgpt import TruthGPTConfig
model = TruthGPTModel(TruthGPTConfig(vocab_size=11, hidden_size=16, num_hidden_layers=1,
                                     num_attention_heads=2, max_position_embeddings=16))
import sys
folder = save_pretrained(model, sys.argv[1])
again = load_pretrained(folder)
ids = torch.tensor([[1, 2, 3]])
assert torch.equal(model(ids).logits, again(ids).logits)
out = generate(again, ids, 4, do_sample=False)
assert out.shape == (1, 7)
q = torch.randn(1, 2, 5, 4)
assert distance_attention(q, q, q, "l1", 0.5).shape == (1, 2, 5, 4)
assert "l1" in DISTANCE_KINDS and "dot" in DISTANCE_KINDS
print("ok")
"""
    argv = [sys.executable, "-c", script, str(tmp_path / "model")]
    done = subprocess.run(argv, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "ok"
    for old in ("truthgpt.attention", "truthgpt.model", "truthgpt.generation"):
        assert f"{old} moved to" in done.stderr


def test_the_version_is_declared_once_per_file_and_agrees() -> None:
    import tomllib
    from pathlib import Path

    import truthgpt

    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    declared = tomllib.loads(pyproject.read_text())["project"]["version"]
    assert declared == truthgpt.__version__ == "0.2.0"
    changelog = pyproject.parent / "CHANGELOG.md"
    assert f"## [{declared}]" in changelog.read_text(), "CHANGELOG.md names this release"


def test_tune_lambda_moved_to_the_trainers_layer() -> None:
    """λ tuning drives a trainer, so it lives in truthgpt.training; release 0.1's
    `truthgpt.analysis.tune_lambda` still works, with a warning naming the new path."""
    import truthgpt.analysis
    from truthgpt.training import tune_lambda

    with pytest.warns(DeprecationWarning, match="truthgpt.training.tune_lambda"):
        old = truthgpt.analysis.tune_lambda
    assert old is tune_lambda
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        truthgpt.analysis.nothing  # noqa: B018
