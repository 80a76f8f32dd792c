"""Reading prepared data: memory-mapped token splits and the batches training draws from them.

Random training batches are a pure function of (seed, rank, step), so a resumed run draws
exactly the batches it would have drawn without stopping, and each data-parallel rank draws
its own. Evaluation walks a split in order with `sequential_batches`.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from truthgpt.data.prepare import DATA_FORMAT, DATA_FORMAT_VERSION, SPLITS
from truthgpt.data.tokenization import Tokenizer, load_tokenizer
from truthgpt.io.files import CONFIG_LIMIT, not_regular_reason, read_json_file


@dataclass(frozen=True)
class TokenSplit:
    """One split's token ids (a read-only memmap for prepared data) and its character count."""

    name: str
    tokens: np.ndarray
    num_chars: int

    def __len__(self) -> int:
        return len(self.tokens)

    @property
    def tokens_per_char(self) -> float:
        return len(self.tokens) / self.num_chars


@dataclass(frozen=True)
class PreparedData:
    """A prepared data directory, loaded: both splits, the tokenizer and the metadata."""

    train: TokenSplit
    val: TokenSplit
    tokenizer: Tokenizer
    meta: dict[str, Any]
    data_dir: Path

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    def split(self, name: str) -> TokenSplit:
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return self.train if name == "train" else self.val


def _read_meta(path: Path) -> dict[str, Any]:
    if not os.path.lexists(path):
        raise FileNotFoundError(
            f"{str(path)!r} is missing: is this a directory made by `truthgpt prepare`?"
        )
    meta = read_json_file(path, CONFIG_LIMIT, what="meta.json", error=ValueError)
    if not isinstance(meta, dict) or meta.get("format") != DATA_FORMAT:
        raise ValueError(f"{str(path)!r} does not describe truthgpt prepared data")
    if meta.get("format_version") != DATA_FORMAT_VERSION:
        raise ValueError(
            f"{str(path)!r} has format_version {meta.get('format_version')!r}; this version of "
            f"truthgpt reads {DATA_FORMAT_VERSION}: prepare the data again"
        )
    return meta


def _open_split(data_dir: Path, name: str, meta: dict[str, Any], dtype: np.dtype) -> TokenSplit:
    try:
        info = meta["splits"][name]
        tokens, chars, filename = int(info["tokens"]), int(info["chars"]), str(info["file"])
    except (KeyError, TypeError, ValueError):
        raise ValueError(f"meta.json in {str(data_dir)!r} lacks a valid '{name}' split") from None
    path = data_dir / filename
    reason = not_regular_reason(path)
    if reason == "does not exist":
        raise FileNotFoundError(f"{str(path)!r} is missing (the {name} split's tokens)")
    if reason is not None:
        raise ValueError(f"{str(path)!r} {reason} (the {name} split's tokens)")
    expected = tokens * dtype.itemsize
    size = path.stat().st_size
    if size != expected or tokens <= 0 or chars <= 0:
        raise ValueError(
            f"{str(path)!r} holds {size} bytes but meta.json says {tokens} {dtype.name} tokens "
            f"({expected} bytes) from {chars} characters: the file is truncated or corrupt; "
            "prepare the data again"
        )
    return TokenSplit(name, np.memmap(path, dtype=dtype, mode="r", shape=(tokens,)), chars)


def load_prepared(data_dir: str | os.PathLike[str]) -> PreparedData:
    """Open a directory written by `prepare_data`, checking every file against meta.json."""
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"data directory {str(data_dir)!r} does not exist")
    meta = _read_meta(data_dir / "meta.json")
    if meta.get("dtype") not in ("uint16", "uint32"):
        raise ValueError(f"meta.json in {str(data_dir)!r}: dtype must be uint16 or uint32")
    dtype = np.dtype("<u2" if meta["dtype"] == "uint16" else "<u4")
    tokenizer = load_tokenizer(data_dir / "tokenizer.json")
    if tokenizer.vocab_size != meta.get("vocab_size") or tokenizer.name != meta.get("tokenizer"):
        raise ValueError(
            f"tokenizer.json in {str(data_dir)!r} ({tokenizer.name}, vocab {tokenizer.vocab_size}) "
            f"does not match meta.json ({meta.get('tokenizer')}, vocab {meta.get('vocab_size')})"
        )
    train, val = (_open_split(data_dir, name, meta, dtype) for name in SPLITS)
    return PreparedData(train=train, val=val, tokenizer=tokenizer, meta=meta, data_dir=data_dir)


# --------------------------------------------------------------------------------------------
# Batches


def _check_sizes(split: TokenSplit, block_size: int, batch_size: int) -> None:
    if block_size < 1 or batch_size < 1:
        raise ValueError(
            f"block_size and batch_size must be positive, got {block_size} and {batch_size}"
        )
    if len(split) < block_size + 1:
        raise ValueError(
            f"the {split.name} split has {len(split)} tokens, too short for block_size="
            f"{block_size} (a window needs block_size + 1 = {block_size + 1} tokens: inputs and "
            "their next-token targets); use a smaller block_size or more text"
        )


def _to_xy(windows: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T+1) windows -> inputs x = windows[:, :-1] and targets y = windows[:, 1:]."""
    windows = windows.astype(np.int64)
    x = torch.from_numpy(np.ascontiguousarray(windows[:, :-1]))
    y = torch.from_numpy(np.ascontiguousarray(windows[:, 1:]))
    return x, y


class RandomBatches:
    """Batches of random windows: `batch(step)` depends only on (seed, rank, step).

    x and y are int64 (LongTensor) of shape (batch_size, block_size), y = x shifted by one.
    Iterating yields batch(0), batch(1), ... forever.
    """

    def __init__(
        self, split: TokenSplit, block_size: int, batch_size: int, seed: int, rank: int = 0
    ) -> None:
        _check_sizes(split, block_size, batch_size)
        if seed < 0 or rank < 0:
            raise ValueError(f"seed and rank must be non-negative, got seed={seed}, rank={rank}")
        self.split = split
        self.block_size = block_size
        self.batch_size = batch_size
        self.seed = seed
        self.rank = rank
        self._offsets = np.arange(block_size + 1)

    def batch(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
        if step < 0:
            raise ValueError(f"step must be non-negative, got {step}")
        rng = np.random.default_rng([self.seed, self.rank, step])
        starts = rng.integers(0, len(self.split) - self.block_size, size=self.batch_size)
        return _to_xy(self.split.tokens[starts[:, None] + self._offsets])

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        return (self.batch(step) for step in itertools.count())


def sequential_batches(
    split: TokenSplit, block_size: int, batch_size: int, max_batches: int | None = None
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Non-overlapping windows over the split in order, for evaluation.

    Window k covers inputs tokens[k*T : (k+1)*T] and targets one further; there are
    (len(split) - 1) // T windows, so every token but the tail that cannot fill a whole window
    is predicted exactly once (that tail, fewer than T tokens, is dropped). The last batch may
    hold fewer than `batch_size` windows. `max_batches` stops early.
    """
    _check_sizes(split, block_size, batch_size)
    if max_batches is not None and max_batches < 1:
        raise ValueError(f"max_batches must be positive or None, got {max_batches}")
    n_windows = (len(split) - 1) // block_size
    offsets = np.arange(block_size + 1)

    def generate() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for n, first in enumerate(range(0, n_windows, batch_size)):
            if max_batches is not None and n >= max_batches:
                return
            starts = np.arange(first, min(first + batch_size, n_windows)) * block_size
            yield _to_xy(split.tokens[starts[:, None] + offsets])

    return generate()


def tokens_per_char(meta: dict[str, Any], split: str = "val") -> float:
    """Tokens per character of a split, from prepared metadata (for bits per character)."""
    info = meta["splits"][split]
    return int(info["tokens"]) / int(info["chars"])


def bits_per_char(loss_nats: float, meta: dict[str, Any], split: str = "val") -> float:
    """Bits per character from a mean per-token loss in nats: loss / ln 2 * tokens / chars.

    Comparable across tokenizers, unlike per-token loss.
    """
    return loss_nats / math.log(2) * tokens_per_char(meta, split)
