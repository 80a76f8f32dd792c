"""An export loads and runs where truthgpt is not installed: `trust_remote_code=True` only.

One tiny trained run per distance kind is exported here; a separate venv with torch and
transformers but no truthgpt (tests/venvs.py, cached) then loads each folder offline and
checks what this process computed with truthgpt: the logits (within 1e-5), greedy
`generate()` with and without the cache past the window, and `pipeline("text-generation")`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers", reason="transformers is not installed (pip install '.[hf]')")

from truthgpt.cli import main
from truthgpt.config import TruthGPTOptimizationCoreConfig
from truthgpt.data import build_tokenizer
from truthgpt.nn.attention import default_lambda
from truthgpt.nn.attention.kinds import builtin_names
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training.checkpoint import CheckpointManager
from truthgpt.training.core import TruthGPTOptimizationCore
from venvs import venv_python

# one worker's group: the exports and a venv built once (conftest.py)
pytestmark = pytest.mark.slow(70)
TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
PROMPT = "Before we"
WINDOW = 24
NEW_TOKENS = 3 * WINDOW  # slides the window three times
PACKAGES = ("torch==2.13.0", "transformers==5.24.0")
# The tokenizer of each kind's run: every kind runs, every tokenizer is exported.
TOKENIZERS = {"sql2": "bpe:300", "lp": "gpt2"}
# Each export: the kinds, and the options whose code the export must carry too.
CASES: dict[str, tuple[str, dict]] = {kind: (kind, {}) for kind in builtin_names()} | {
    "l1-qk-norm": ("l1", {"qk_norm": "rms", "qk_norm_gain": True}),
    "dot-qk-norm": ("dot", {"qk_norm": "layer"}),
    "l2-rope": ("l2", {"position_embedding": "rope", "partial_rotary_factor": 0.5}),
    "l1-alibi": ("l1", {"position_embedding": "alibi"}),
    "l1-none": ("l1", {"position_embedding": "none"}),
}

REMOTE = r"""
import importlib.util, json, sys
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, pipeline

assert importlib.util.find_spec("truthgpt") is None, "truthgpt is importable here"
torch.set_num_threads(1)  # tiny models: a second thread only adds waiting
root, kinds = sys.argv[1], sys.argv[2].split(",")
results = {}
for kind in kinds:
    folder = f"{root}/{kind}/hf"
    expected = torch.load(f"{root}/{kind}/expected.pt")
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    # Without the flag transformers asks whether to trust config.json's code (input() at a
    # terminal, here none) and then reads the tokenizer without it.
    plain = AutoTokenizer.from_pretrained(folder)
    assert plain("a")["input_ids"] == tokenizer("a")["input_ids"]
    vocab = expected["logits"].shape[-1]
    with torch.no_grad():
        logits = model(input_ids=expected["ids"]).logits
    prompt = tokenizer(expected["prompt"], return_tensors="pt")
    generated = {}
    for use_cache in (True, False):
        out = model.generate(
            **prompt, max_new_tokens=expected["new_tokens"], do_sample=False, use_cache=use_cache
        )
        generated[str(use_cache)] = out[0].tolist()
    text = pipeline("text-generation", model=folder, trust_remote_code=True)(
        expected["prompt"], max_new_tokens=expected["new_tokens"], do_sample=False
    )[0]["generated_text"]
    # Two rows of different lengths, left-padded, as batched generation passes them.
    rows = [expected["ids"][0, :9], expected["ids"][1, :4]]
    width = max(len(r) for r in rows)
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - len(r):], mask[i, width - len(r):] = r, 1
    padded_diff, padded_same = 0.0, True
    with torch.no_grad():
        batch = model(input_ids=ids, attention_mask=mask).logits
        for i, r in enumerate(rows):
            alone = model(input_ids=r[None]).logits[0]
            padded_diff = max(padded_diff, (batch[i, width - len(r):] - alone).abs().max().item())
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, do_sample=False,
                         pad_token_id=0)
    for i, r in enumerate(rows):
        alone = model.generate(input_ids=r[None], max_new_tokens=5, do_sample=False)
        padded_same &= out[i, width - len(r):].tolist() == alone[0].tolist()
    results[kind] = {
        "padded_max_logit_diff": padded_diff,
        "padded_generate_same": padded_same,
        "module": type(model).__module__,
        "max_logit_diff": (logits[..., :vocab] - expected["logits"]).abs().max().item(),
        "prompt_ids": prompt["input_ids"][0].tolist(),
        "generated": generated,
        "pipeline_text": text,
        "eos_token": tokenizer.eos_token,
        "eos_token_id": tokenizer.eos_token_id,
    }
with open(f"{root}/results.json", "w") as f:
    json.dump(results, f)
"""


def trained_run(run_dir: Path, kind: str, spec: str, **options: object) -> TruthGPTModel:
    """A run of a few training steps, its weights spread out first so that greedy decoding
    wanders instead of repeating one token. λ is the registry's for 16-wide heads (not scaled
    up for the narrow width): with the spread-out weights that keeps float32 rounding < 1e-5."""
    tokenizer = build_tokenizer(spec, TEXT * 4)
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=WINDOW,
        block_size=WINDOW,
        batch_size=2,
        distance_type=kind,
        lambda_param=default_lambda(kind, 16, p=3.0 if kind == "lp" else None),
        device="cpu",
        peak_flops=1e12,
        **options,
    )
    torch.manual_seed(1)
    core = TruthGPTOptimizationCore(config, tokenizer=tokenizer)
    with torch.no_grad():
        for param in core.model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.2)
    ids = torch.tensor(tokenizer.encode(TEXT * 2))
    for step in range(3):
        x = torch.stack([ids[step : step + WINDOW], ids[step + 1 : step + 1 + WINDOW]])
        core.train_step({"input_ids": x})
    CheckpointManager(run_dir).save(core.checkpoint_state())
    return TruthGPTModel.from_pretrained(run_dir)


@pytest.fixture(scope="module")
def exports(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, dict]]:
    """(root, what truthgpt computed per kind): ROOT/KIND/hf is each kind's export through
    the CLI, ROOT/KIND/expected.pt the logits and the settings the other venv reads."""
    root = tmp_path_factory.mktemp("remote")
    ours: dict[str, dict] = {}
    for kind, (distance, options) in CASES.items():
        spec = TOKENIZERS.get(kind, "char")
        model = trained_run(root / kind / "run", distance, spec, **options)
        out = root / kind / "hf"
        assert main(["export-hf", "--run", str(root / kind / "run"), "--out", str(out)]) == 0
        prompt = build_tokenizer(spec, TEXT * 4).encode(PROMPT)
        ids = torch.randint(
            0, model.config.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(0)
        )
        with torch.no_grad():
            logits = model(ids).logits
        generated = model.generate(torch.tensor([prompt]), NEW_TOKENS, do_sample=False)
        torch.save(
            {"ids": ids, "logits": logits, "prompt": PROMPT, "new_tokens": NEW_TOKENS},
            root / kind / "expected.pt",
        )
        ours[kind] = {"prompt_ids": prompt, "generated": generated[0].tolist(), "spec": spec}
    return root, ours


def run_without_truthgpt(python: Path, script: str, root: Path, *args: str) -> None:
    """Run `script` in `python` as a user would: offline, no PYTHONPATH, no source tree."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "HF_"))}
    env |= {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "HF_HOME": str(root / "hf-home")}
    result = subprocess.run(
        [str(python), "-I", "-c", script, str(root), *args],
        capture_output=True,
        text=True,
        env=env,
        cwd=root,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-4000:]


@pytest.fixture(scope="module")
def remote(exports) -> dict[str, tuple[dict, dict]]:
    """Each kind's (truthgpt's, the venv without truthgpt's) results."""
    python = venv_python(PACKAGES)
    root, ours = exports
    run_without_truthgpt(python, REMOTE, root, ",".join(ours))
    theirs = json.loads((root / "results.json").read_text())
    return {kind: (ours[kind], theirs[kind]) for kind in ours}


def test_every_builtin_kind_is_covered() -> None:
    assert set(builtin_names()) == {"dot", "cosine", "l1", "l2", "sql2", "chebyshev", "lp"}


@pytest.mark.parametrize("kind", CASES)
def test_remote_code_loads_without_truthgpt(remote, kind: str) -> None:
    _, theirs = remote[kind]
    assert theirs["module"].endswith("modeling_truthgpt")
    assert not theirs["module"].startswith("truthgpt")


@pytest.mark.parametrize("kind", CASES)
def test_remote_logits_match_truthgpt(remote, kind: str) -> None:
    _, theirs = remote[kind]
    assert theirs["max_logit_diff"] <= 1e-5


@pytest.mark.parametrize("kind", CASES)
def test_remote_left_padded_batch_equals_each_row_alone(remote, kind: str) -> None:
    """Padding is masked and not counted as a position in the exported code too: each row of
    a left-padded batch gets the logits and the greedy continuation it gets alone."""
    _, theirs = remote[kind]
    assert theirs["padded_max_logit_diff"] < 1e-5
    assert theirs["padded_generate_same"]


@pytest.mark.parametrize("kind", CASES)
def test_remote_generate_slides_the_window_like_truthgpt(remote, kind: str) -> None:
    """Greedy `generate()` past `max_position_embeddings`, with and without the cache, gives
    the tokens `truthgpt generate` gives."""
    ours, theirs = remote[kind]
    assert theirs["prompt_ids"] == ours["prompt_ids"]
    assert len(ours["generated"]) == len(ours["prompt_ids"]) + NEW_TOKENS > WINDOW
    assert theirs["generated"]["True"] == ours["generated"]
    assert theirs["generated"]["False"] == ours["generated"]


@pytest.mark.parametrize("kind", CASES)
def test_remote_pipeline_and_end_of_text(remote, kind: str) -> None:
    ours, theirs = remote[kind]
    tokenizer = build_tokenizer(ours["spec"], TEXT * 4)
    assert theirs["pipeline_text"] == tokenizer.decode(ours["generated"])
    assert theirs["eos_token"] == "<|endoftext|>"
    expected_id = 50256 if ours["spec"] == "gpt2" else tokenizer.vocab_size
    assert theirs["eos_token_id"] == expected_id


# --------------------------------------------------------------------------------- lm-eval

LM_EVAL = r"""
import json, math, sys
import torch
import lm_eval
from lm_eval.tasks import TaskManager

torch.set_num_threads(1)
root, kinds = sys.argv[1], sys.argv[2].split(",")
results = {}
for kind in kinds:
    tasks = TaskManager(include_path=f"{root}/lm-eval")
    out = lm_eval.simple_evaluate(
        model="hf",
        model_args=f"pretrained={root}/{kind}/hf,trust_remote_code=True",
        tasks=["truthgpt_text"],
        task_manager=tasks,
        device="cpu",
        batch_size=1,
    )
    results[kind] = out["results"]["truthgpt_text"]
with open(f"{root}/lm-eval-results.json", "w") as f:
    json.dump(results, f)
"""

# A perplexity task on local text (lm-eval's own rolling log-likelihood), nothing downloaded.
LM_EVAL_TASK = """task: truthgpt_text
dataset_path: json
dataset_kwargs:
  data_files:
    test: {docs}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: "{{{{text}}}}"
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.mark.slow(80)  # its own group: the exports and a venv with lm-eval
def test_lm_eval_scores_an_export(exports) -> None:
    """lm-eval's `simple_evaluate` runs on a char and a BPE export (it needs their
    end-of-text token: every rolling window starts with it), where truthgpt is absent."""
    python = venv_python((*PACKAGES, "lm-eval==0.4.13", "accelerate==1.15.0"))
    root, _ = exports
    (root / "lm-eval").mkdir(exist_ok=True)
    docs = root / "lm-eval" / "docs.jsonl"
    lines = [line for line in TEXT.splitlines() if line]
    docs.write_text("".join(json.dumps({"text": t + "\n"}) + "\n" for t in lines))
    (root / "lm-eval" / "truthgpt_text.yaml").write_text(LM_EVAL_TASK.format(docs=docs))
    kinds = ("l1", "sql2")
    assert {TOKENIZERS.get(k, "char") for k in kinds} == {"char", "bpe:300"}
    run_without_truthgpt(python, LM_EVAL, root, ",".join(kinds))
    results = json.loads((root / "lm-eval-results.json").read_text())
    for kind in kinds:
        assert results[kind]["sample_len"] == len(lines)
        assert 0 < results[kind]["bits_per_byte,none"] < 64, results[kind]


# ------------------------------------------------------------------- the generated files


def test_generated_files_import_only_torch_and_transformers(tmp_path: Path) -> None:
    """Every name the files use is defined or imported (ruff's pyflakes rules), and what they
    import is the standard library, torch, transformers (the glue only) and each other."""
    from truthgpt.workflows import hf, hf_remote

    hf_remote.write_remote_code(tmp_path, hf)
    core = set(sys.stdlib_module_names) | {"torch"}
    for name in (hf_remote.CONFIG_FILE, hf_remote.MODELING_FILE, *hf_remote.CORE_FILES):
        imported = set()
        for node in ast.walk(ast.parse((tmp_path / name).read_text())):
            if isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                imported.add(str(node.module).split(".")[0])
            elif isinstance(node, ast.ImportFrom):  # relative: a file of the folder
                assert node.level == 1 and (tmp_path / f"{node.module}.py").is_file(), name
        allowed = core | ({"transformers"} if name.endswith("_truthgpt.py") else set())
        assert imported <= allowed, (name, imported - allowed)
    if importlib.util.find_spec("ruff") is None:
        pytest.skip("ruff is not installed (pip install '.[dev]')")
    lint = subprocess.run(
        [sys.executable, "-m", "ruff", "check", "--isolated", "--select", "F,E9", str(tmp_path)],
        capture_output=True,
        text=True,
    )
    assert lint.returncode == 0, lint.stdout


def test_the_export_carries_the_core_byte_for_byte(exports) -> None:
    """The exported model is the library's own code: every file of truthgpt.core, unchanged
    (and nothing of the fast kernels)."""
    from truthgpt.workflows import hf_remote

    root, ours = exports
    assert {"model.py", "module.py", "functional.py", "kinds.py", "config.py"} <= set(
        hf_remote.CORE_FILES
    )
    for kind in ours:
        folder = root / kind / "hf"
        for name in hf_remote.CORE_FILES:
            assert (folder / name).read_bytes() == (hf_remote.CORE / name).read_bytes(), name
        assert not (folder / "kernels.py").exists() and not (folder / "native.py").exists()


def test_a_missing_definition_fails_the_export_not_the_load() -> None:
    from truthgpt.workflows import hf
    from truthgpt.workflows.hf_remote import copy_definition

    with pytest.raises(LookupError, match="_no_such_glue"):
        copy_definition(hf, "_no_such_glue")
    wrapper = copy_definition(hf, "TruthGPTForCausalLM")
    assert wrapper.startswith("class TruthGPTForCausalLM(") and "def forward(" in wrapper


def test_a_registered_kind_exports_for_truthgpt_only(tmp_path: Path) -> None:
    """A kind added with `register_distance` lives in the user's code, not in the copy: the
    folder has no remote code and loads after `import truthgpt.hf` with the kind registered."""
    from transformers import AutoModelForCausalLM

    import truthgpt.hf  # noqa: F401
    from truthgpt.nn.attention import kinds, register_distance

    register_distance(
        "test_remote_l1sq", lambda q, k: torch.cdist(q, k, p=1.0) ** 2, default_lambda=0.1
    )
    try:
        model = trained_run(tmp_path / "run", "test_remote_l1sq", "char")
        out = tmp_path / "hf"
        assert main(["export-hf", "--run", str(tmp_path / "run"), "--out", str(out)]) == 0
        assert not (out / "modeling_truthgpt.py").exists()
        assert "auto_map" not in json.loads((out / "config.json").read_text())
        loaded = AutoModelForCausalLM.from_pretrained(out)
        ids = torch.tensor([[1, 2, 3]])
        with torch.no_grad():
            assert torch.equal(loaded(ids).logits[..., :-1], model(ids).logits)
    finally:
        kinds.unregister("test_remote_l1sq")
