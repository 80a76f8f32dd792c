"""Hugging Face export: transformers loads the model and tokenizer and agrees with truthgpt."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything here is local files
transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'truthgpt[hf]')"
)

from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer  # noqa: E402

import truthgpt.workflows.hf  # noqa: E402
from truthgpt.cli import main  # noqa: E402
from truthgpt.config import TruthGPTOptimizationCoreConfig  # noqa: E402
from truthgpt.data import build_tokenizer  # noqa: E402
from truthgpt.nn.model import TruthGPTModel  # noqa: E402
from truthgpt.training.checkpoint import CheckpointManager  # noqa: E402
from truthgpt.training.core import TruthGPTOptimizationCore  # noqa: E402
from truthgpt.workflows.hf import TruthGPTForCausalLM, TruthGPTHFConfig, export_hf, hf_tokenizer  # noqa: E402

TEXT = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak.\n"
WINDOW = 32


def make_run(run_dir: Path, tokenizer, distance: str = "l1") -> TruthGPTOptimizationCore:
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=tokenizer.vocab_size,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=WINDOW,
        block_size=WINDOW,
        batch_size=2,
        distance_type=distance,
        device="cpu",
        peak_flops=1e12,
    )
    core = TruthGPTOptimizationCore(config, tokenizer=tokenizer)
    # Large random weights, so greedy decoding wanders instead of repeating one token.
    torch.manual_seed(1)
    with torch.no_grad():
        for param in core.model.parameters():
            if param.dim() >= 2:
                param.normal_(0.0, 0.3)
    CheckpointManager(run_dir).save(core.checkpoint_state())
    return core


@pytest.fixture(scope="module", params=["l1", "dot"])
def exported(request, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(run folder, export folder) for a char-level run, exported through the CLI."""
    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    make_run(root / "run", build_tokenizer("char", TEXT), request.param)
    assert main(["export-hf", "--run", str(root / "run"), "--out", str(root / "hf")]) == 0
    return root / "run", root / "hf"


def test_export_writes_a_transformers_folder(exported) -> None:
    _, out = exported
    names = {p.name for p in out.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"} <= names
    config = AutoConfig.from_pretrained(out)
    assert isinstance(config, TruthGPTHFConfig) and config.model_type == "truthgpt"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert isinstance(model, TruthGPTForCausalLM)
    assert model.model.lm_head.weight is model.model.wte.weight


def test_logits_and_loss_match_truthgpt(exported) -> None:
    run, out = exported
    ours = TruthGPTModel.from_pretrained(run)
    theirs = AutoModelForCausalLM.from_pretrained(out).eval()
    ids = torch.randint(
        0, ours.config.vocab_size, (2, WINDOW), generator=torch.Generator().manual_seed(0)
    )
    with torch.no_grad():
        expected = ours(ids, labels=ids)
        got = theirs(input_ids=ids, labels=ids)
    vocab = ours.config.vocab_size
    assert got.logits.shape[-1] == vocab + 1  # the end-of-text token the export adds
    assert torch.equal(got.logits[..., :vocab], expected.logits)
    # Its row is the mean of the others, so its logit is the mean logit: never the largest.
    assert torch.allclose(got.logits[..., vocab], expected.logits.mean(-1), atol=1e-5)
    assert bool((got.logits[..., vocab] < expected.logits.amax(-1)).all())
    # It takes a little probability from every other token, so the loss grows a little.
    assert 0 < float(got.loss - expected.loss) < 0.05


@pytest.mark.parametrize("use_cache", [True, False])
def test_greedy_generate_matches_truthgpt(exported, use_cache: bool) -> None:
    run, out = exported
    ours = TruthGPTModel.from_pretrained(run)
    theirs = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    prompt = tokenizer("Before we", return_tensors="pt")
    new = WINDOW - prompt["input_ids"].shape[1]
    expected = ours.generate(prompt["input_ids"], max_new_tokens=new, do_sample=False)
    got = theirs.generate(**prompt, max_new_tokens=new, do_sample=False, use_cache=use_cache)
    assert got.tolist() == expected.tolist()
    assert len(set(expected[0, -new:].tolist())) > 3  # a varied continuation, not one token


@pytest.mark.parametrize("use_cache", [True, False])
@pytest.mark.parametrize("prompt", ["Before we", TEXT], ids=["short", "longer-than-window"])
def test_generate_past_the_window_slides_like_truthgpt(exported, prompt: str, use_cache: bool):
    """Past `max_position_embeddings` `generate()` cuts and slides the window as `truthgpt
    generate` does (a long prompt cut to the window, then the newest 3/4 re-encoded)."""
    run, out = exported
    ours = TruthGPTModel.from_pretrained(run)
    theirs = AutoModelForCausalLM.from_pretrained(out)
    ids = AutoTokenizer.from_pretrained(out)(prompt, return_tensors="pt")
    assert (ids["input_ids"].shape[1] > WINDOW) == (prompt == TEXT)
    new = 3 * WINDOW
    expected = ours.generate(ids["input_ids"], max_new_tokens=new, do_sample=False)
    got = theirs.generate(**ids, max_new_tokens=new, do_sample=False, use_cache=use_cache)
    assert got.tolist() == expected.tolist()


def test_char_tokenizer_round_trips(exported) -> None:
    _, out = exported
    ours = build_tokenizer("char", TEXT)
    theirs = AutoTokenizer.from_pretrained(out)
    assert theirs(TEXT)["input_ids"] == ours.encode(TEXT)
    assert theirs.decode(ours.encode(TEXT)) == TEXT
    assert len(theirs) == ours.vocab_size + 1
    assert theirs.eos_token == theirs.bos_token == "<|endoftext|>"
    assert theirs.eos_token_id == ours.vocab_size
    assert theirs.decode([*ours.encode("All:"), ours.vocab_size]) == "All:<|endoftext|>"


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet=sorted(set(TEXT)), max_size=60))
def test_char_tokenizer_any_text(text: str) -> None:
    ours = build_tokenizer("char", TEXT)
    theirs = hf_tokenizer(ours)
    assert theirs(text)["input_ids"] == ours.encode(text)
    assert theirs.decode(ours.encode(text)) == text


def test_char_tokenizer_with_unknown_token(tmp_path: Path) -> None:
    ours = build_tokenizer("char", "abc \n", unk_token="<unk>")
    theirs = hf_tokenizer(ours)
    theirs.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    for text in ("a b\nc", "abz", "zz"):
        assert loaded(text)["input_ids"] == ours.encode(text)
        assert loaded.decode(ours.encode(text)) == ours.decode(ours.encode(text))


SAMPLES = [
    TEXT,
    "  leading spaces, trailing spaces  ",
    "tabs\tand\r\nwindows lines; numbers 12345 and 3.14159",
    "unicode: café, naïve, Ærøskøbing, 東京, emoji 🙂",
    "don't won't it's we're they've I'll I'd",
    "",
]


def test_bpe_tokenizer_export(tmp_path: Path) -> None:
    ours = build_tokenizer("bpe:300", TEXT * 4)
    make_run(tmp_path / "run", ours)
    export_hf(tmp_path / "run", tmp_path / "hf")
    theirs = AutoTokenizer.from_pretrained(tmp_path / "hf")
    for text in SAMPLES:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text


def test_gpt2_tokenizer_export(tmp_path: Path) -> None:
    ours = build_tokenizer("gpt2")
    hf_tokenizer(ours).save_pretrained(tmp_path)
    theirs = AutoTokenizer.from_pretrained(tmp_path)
    assert theirs.eos_token == "<|endoftext|>" and theirs.eos_token_id == 50256
    assert len(theirs) == 50257
    for text in SAMPLES:
        assert theirs(text)["input_ids"] == ours.encode(text), text
        assert theirs.decode(ours.encode(text)) == text


def test_export_of_a_model_only_folder(tmp_path: Path) -> None:
    core = make_run(tmp_path / "run", build_tokenizer("char", TEXT))
    core.raw_model.save_pretrained(tmp_path / "model")
    out = export_hf(tmp_path / "model", tmp_path / "hf")
    assert not (out / "tokenizer.json").exists()
    model = AutoModelForCausalLM.from_pretrained(out)
    ids = torch.tensor([[1, 2, 3]])
    core.model.eval()
    assert torch.equal(model(ids).logits, core.model(ids).logits)


def test_export_of_a_release_0_1_checkpoint(tmp_path: Path) -> None:
    """Old runs stay exportable: release 0.1's char run (tests/data/format1) gets its
    end-of-text token at export and keeps its logits."""
    ckpt = Path(__file__).parent / "data" / "format1" / "ckpt"
    out = export_hf(ckpt, tmp_path / "hf")
    ours = TruthGPTModel.from_pretrained(ckpt)
    theirs = AutoModelForCausalLM.from_pretrained(out)
    assert AutoTokenizer.from_pretrained(out).eos_token_id == ours.config.vocab_size
    ids = torch.tensor([[1, 2, 3, 4]])
    with torch.no_grad():
        assert torch.equal(theirs(ids).logits[..., :-1], ours(ids).logits)


def test_export_refuses_a_folder_with_files(tmp_path: Path, capsys) -> None:
    make_run(tmp_path / "run", build_tokenizer("char", TEXT))
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "keep.txt").write_text("mine")
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf")]) == 2
    assert "not empty" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    # --overwrite replaces only an earlier export: a folder of the user's stays as it was.
    # (The positional form of release 0.1 still works.)
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "hf"), "--overwrite"]) == 2
    assert "not an export folder written by truthgpt" in capsys.readouterr().err
    assert [p.name for p in (tmp_path / "hf").iterdir()] == ["keep.txt"]
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "new")]) == 0
    first = (tmp_path / "new" / "model.safetensors").read_bytes()
    assert main(["export-hf", str(tmp_path / "run"), str(tmp_path / "new"), "--overwrite"]) == 0
    assert (tmp_path / "new" / "model.safetensors").read_bytes() == first
    assert AutoModelForCausalLM.from_pretrained(tmp_path / "new") is not None


def test_export_of_a_missing_run_is_a_clear_error(tmp_path: Path, capsys) -> None:
    assert main(["export-hf", str(tmp_path / "nope"), str(tmp_path / "hf")]) == 2
    assert "nope" in capsys.readouterr().err
    assert not (tmp_path / "hf").exists()


def test_transformers_stays_optional() -> None:
    """Only truthgpt.workflows.hf imports transformers; the library and CLI work without it."""
    code = (
        "import sys, truthgpt, truthgpt.training.checkpoint, truthgpt.nn.model, truthgpt.training, "
        "truthgpt.data, truthgpt.cli\n"
        "truthgpt.cli.build_parser()\n"
        "assert 'transformers' not in sys.modules, 'transformers was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert truthgpt.workflows.hf.TruthGPTHFConfig.model_type == "truthgpt"


def test_sampling_through_transformers_is_seeded_and_cache_safe(exported) -> None:
    """`generate(do_sample=True)` under one seed gives the same tokens with and without the
    cache (so the cached logits are right while sampling), and differs from greedy."""
    _, out = exported
    theirs = AutoModelForCausalLM.from_pretrained(out)
    prompt = AutoTokenizer.from_pretrained(out)("Before we", return_tensors="pt")
    new = WINDOW - prompt["input_ids"].shape[1]
    runs = []
    for use_cache in (True, False, True):
        torch.manual_seed(7)
        runs.append(
            theirs.generate(
                **prompt,
                max_new_tokens=new,
                do_sample=True,
                top_k=5,
                temperature=1.5,
                use_cache=use_cache,
            ).tolist()
        )
    assert runs[0] == runs[1] == runs[2]
    greedy = theirs.generate(**prompt, max_new_tokens=new, do_sample=False).tolist()
    assert runs[0] != greedy


def test_bpe_export_generates_like_truthgpt(tmp_path: Path) -> None:
    ours_tokenizer = build_tokenizer("bpe:300", TEXT * 4)
    make_run(tmp_path / "run", ours_tokenizer)
    export_hf(tmp_path / "run", tmp_path / "hf")
    ours = TruthGPTModel.from_pretrained(tmp_path / "run")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    prompt = AutoTokenizer.from_pretrained(tmp_path / "hf")("Before we", return_tensors="pt")
    assert prompt["input_ids"][0].tolist() == ours_tokenizer.encode("Before we")
    new = WINDOW - prompt["input_ids"].shape[1]
    expected = ours.generate(prompt["input_ids"], max_new_tokens=new, do_sample=False)
    assert theirs.generate(**prompt, max_new_tokens=new, do_sample=False).tolist() == (
        expected.tolist()
    )


def test_left_padded_batch_generates_what_each_row_generates_alone(exported) -> None:
    """transformers' batched generation pads on the left and passes an attention mask; each
    row must continue as it would alone (padding neither attended to nor counted as a
    position)."""
    _, out = exported
    theirs = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = [tokenizer(text, return_tensors="pt")["input_ids"] for text in ("Before we", "hear me")]
    width = max(r.shape[1] for r in rows) + 2
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, r in enumerate(rows):
        ids[i, width - r.shape[1] :], mask[i, width - r.shape[1] :] = r[0], 1
    new = WINDOW - width
    batch = theirs.generate(
        input_ids=ids, attention_mask=mask, max_new_tokens=new, do_sample=False, pad_token_id=0
    )
    for i, r in enumerate(rows):
        alone = theirs.generate(input_ids=r, max_new_tokens=new, do_sample=False)
        assert batch[i, width - r.shape[1] :].tolist() == alone[0].tolist()


def test_every_config_field_round_trips_through_the_hf_config(tmp_path: Path) -> None:
    """TruthGPTHFConfig takes its fields from TruthGPTConfig: a config whose every field
    differs from its default survives from_truthgpt, save_pretrained, from_pretrained and
    to_truthgpt unchanged; the default HF config is the default model config."""
    import dataclasses

    from truthgpt.config import TruthGPTConfig
    from truthgpt.workflows.hf import TruthGPTHFConfig

    config = TruthGPTConfig(
        vocab_size=97,
        hidden_size=48,
        num_hidden_layers=3,
        num_attention_heads=4,
        intermediate_size=100,
        max_position_embeddings=40,
        hidden_dropout_prob=0.1,
        attention_probs_dropout_prob=0.2,
        distance_type="lp",
        lambda_param=0.7,
        use_learnable_lambda=False,
        p_norm=1.5,
        tie_word_embeddings=False,
        layer_norm_eps=1e-6,
        bias=False,
        qk_norm="rms",
        qk_norm_gain=True,
        position_embedding="rope",
        rope_theta=500000.0,
        partial_rotary_factor=0.5,
    )
    defaults = {f.name: f.default for f in dataclasses.fields(TruthGPTConfig)}
    same = [name for name, default in defaults.items() if getattr(config, name) == default]
    assert not same, f"give these fields a value other than the default here: {same}"
    TruthGPTHFConfig.from_truthgpt(config).save_pretrained(tmp_path)
    assert TruthGPTHFConfig.from_pretrained(tmp_path).to_truthgpt() == config
    default = TruthGPTHFConfig().to_truthgpt()
    assert default == TruthGPTConfig(vocab_size=default.vocab_size)
