"""prepare_data and `truthgpt prepare`: files, metadata, dtypes, atomic writes, the CLI."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from truthgpt.cli import main
from truthgpt.data import load_prepared, prepare_data, shakespeare_text, token_dtype
from truthgpt.data import tokenization as tok_mod

TEXT = "".join(f"Line {i}: to be, or not to be, that is the question.\n" for i in range(400))


@pytest.fixture
def text_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus" / "play.txt"
    path.parent.mkdir()
    path.write_text(TEXT, encoding="utf-8")
    return path


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if p.name.startswith("."))


def test_prepare_char_on_shakespeare(tmp_path: Path) -> None:
    out = tmp_path / "data"
    meta = prepare_data(["shakespeare"], "char", out)
    assert sorted(p.name for p in out.iterdir()) == [
        ".truthgpt.json",  # the marker: a prepared data folder, holding these files
        "meta.json",
        "tokenizer.json",
        "train.bin",
        "val.bin",
    ]
    assert json.loads((out / "meta.json").read_text()) == meta
    text = shakespeare_text()
    n_val = round(len(text) * 0.1)
    assert meta["format"] == "truthgpt-data" and meta["format_version"] == 1
    assert (meta["tokenizer"], meta["dtype"], meta["val_fraction"]) == ("char", "uint16", 0.1)
    assert meta["vocab_size"] == len(set(text))
    assert meta["splits"]["val"] == {"file": "val.bin", "tokens": n_val, "chars": n_val}
    assert meta["splits"]["train"]["chars"] == len(text) - n_val
    assert meta["total_chars"] == len(text)
    (source,) = meta["sources"]
    assert source["name"].startswith("shakespeare") and len(source["sha256"]) == 64
    assert (out / "train.bin").stat().st_size == 2 * (len(text) - n_val)

    data = load_prepared(out)
    assert data.tokenizer.decode(data.val.tokens) == text[-n_val:]
    assert data.tokenizer.decode(data.train.tokens[:1000]) == text[:1000]


def test_prepare_bpe_on_user_text(tmp_path: Path, text_file: Path) -> None:
    meta = prepare_data([str(text_file)], "bpe:300", tmp_path / "bpe", val_fraction=0.2)
    assert meta["tokenizer"] == "bpe:300" and meta["tokenizer_type"] == "bpe"
    assert 256 <= meta["vocab_size"] <= 300
    data = load_prepared(tmp_path / "bpe")
    n_val = round(len(TEXT) * 0.2)
    assert data.val.num_chars == n_val
    assert data.tokenizer.decode(data.val.tokens) == TEXT[-n_val:]
    assert data.tokenizer.decode(data.train.tokens) == TEXT[:-n_val]
    assert len(data.train) < data.train.num_chars, "BPE merges make fewer tokens than chars"


def test_prepare_gpt2_on_user_text(tmp_path: Path, text_file: Path) -> None:
    meta = prepare_data([text_file.parent], "gpt2", tmp_path / "gpt2")
    assert (meta["vocab_size"], meta["dtype"]) == (50257, "uint16")
    data = load_prepared(tmp_path / "gpt2")
    assert data.tokenizer.decode(data.train.tokens) + data.tokenizer.decode(data.val.tokens) == TEXT
    assert data.train.tokens[:2].tolist() == data.tokenizer.encode("Line 0")


def test_dtype_selection(tmp_path: Path) -> None:
    assert token_dtype(256) == np.dtype("<u2")
    assert token_dtype(65536) == np.dtype("<u2")
    assert token_dtype(65537) == np.dtype("<u4")
    # A char vocabulary of 70,001 distinct characters no longer fits in uint16.
    text = "".join(chr(c) for c in range(0x10000, 0x10000 + 70_000)) + "\n"
    path = tmp_path / "wide.txt"
    path.write_text(text, encoding="utf-8")
    meta = prepare_data([str(path)], "char", tmp_path / "wide", val_fraction=0.01)
    assert (meta["vocab_size"], meta["dtype"]) == (70_001, "uint32")
    data = load_prepared(tmp_path / "wide")
    assert data.train.tokens.dtype == np.dtype("<u4")
    assert (tmp_path / "wide" / "val.bin").stat().st_size == 4 * 700
    assert data.tokenizer.decode(data.val.tokens) == text[-700:]
    assert int(data.train.tokens.max()) > 65_535


def test_refuses_to_overwrite_unless_forced(tmp_path: Path, text_file: Path) -> None:
    out = tmp_path / "data"
    out.mkdir()
    (out / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match=r"not empty.*--force"):
        prepare_data([str(text_file)], "char", out)
    assert (out / "keep.txt").read_text() == "precious"
    # --force replaces prepared data only: never a folder holding a file of the user's.
    with pytest.raises(FileExistsError, match=r"not a prepared data folder written by truthgpt"):
        prepare_data([str(text_file)], "char", out, force=True)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    (out / "keep.txt").unlink()
    prepare_data([str(text_file)], "char", out)
    first = (out / "meta.json").read_text()
    prepare_data([str(text_file)], "char", out, force=True, val_fraction=0.2)
    assert (out / "meta.json").read_text() != first
    assert _leftovers(tmp_path) == []


def test_empty_existing_directory_is_fine(tmp_path: Path, text_file: Path) -> None:
    (tmp_path / "empty").mkdir()
    prepare_data([str(text_file)], "char", tmp_path / "empty")
    assert (tmp_path / "empty" / "train.bin").is_file()


def test_nothing_written_on_bad_input(tmp_path: Path, text_file: Path) -> None:
    bad = tmp_path / "corpus" / "bad.txt"
    bad.write_bytes(b"\xff\xfe broken")
    out = tmp_path / "data"
    with pytest.raises(ValueError, match=r"bad\.txt"):
        prepare_data([text_file.parent], "char", out)
    with pytest.raises(ValueError, match="unknown tokenizer"):
        prepare_data([str(text_file)], "words", out)
    with pytest.raises(ValueError, match="val_fraction"):
        prepare_data([str(text_file)], "char", out, val_fraction=1.0)
    with pytest.raises(ValueError, match="char tokenizer only"):
        prepare_data([str(text_file)], "gpt2", out, unk_token="?")
    assert not out.exists() and _leftovers(tmp_path) == []


def test_nothing_partial_when_writing_fails(
    tmp_path: Path, text_file: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    out = tmp_path / "data"
    prepare_data([str(text_file)], "char", out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def broken_save(self: object, path: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(tok_mod.Tokenizer, "save", broken_save)
    with pytest.raises(OSError, match="disk full"):
        prepare_data([str(text_file)], "gpt2", out, force=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before, "old data untouched"
    with pytest.raises(OSError, match="disk full"):
        prepare_data([str(text_file)], "char", tmp_path / "new")
    assert not (tmp_path / "new").exists()
    assert _leftovers(tmp_path) == []


# ---- CLI -------------------------------------------------------------------------------------


def test_cli_prepare(tmp_path: Path, text_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "data"
    argv = ["prepare", "--corpus", str(text_file), "--tokenizer", "char", "--out", str(out)]
    assert main([*argv, "--val-fraction", "0.25"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "meta.json").read_text())
    assert meta["val_fraction"] == 0.25
    assert f"{meta['splits']['train']['tokens']:,} tokens" in printed
    assert f"vocab {meta['vocab_size']}" in printed

    assert main(argv) == 2, "a second run must not overwrite"
    assert "not empty" in capsys.readouterr().err
    assert main([*argv, "--force", "--tokenizer", "gpt2"]) == 0
    assert json.loads((out / "meta.json").read_text())["tokenizer"] == "gpt2"


def test_cli_prepare_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    missing = str(tmp_path / "missing.txt")
    assert main(["prepare", "--corpus", missing, "--out", str(tmp_path / "d")]) == 2
    err = capsys.readouterr().err
    assert "truthgpt prepare: error:" in err and "missing.txt" in err
    assert not (tmp_path / "d").exists()
