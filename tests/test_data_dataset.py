"""Prepared data on disk and the batches drawn from it."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from truthgpt.data import (
    RandomBatches,
    TokenSplit,
    bits_per_char,
    load_prepared,
    prepare_data,
    sequential_batches,
    tokens_per_char,
)

TEXT = "".join(f"{i} the quick brown fox jumps over the lazy dog\n" for i in range(300))


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_data([str(src)], "char", tmp_path / "data")
    return tmp_path / "data"


def counting_split(n: int, name: str = "train") -> TokenSplit:
    """Token i is i (mod 2**16), so a window's content tells where it came from."""
    return TokenSplit(name, np.arange(n, dtype=np.uint16), num_chars=n)


# ---- load_prepared ---------------------------------------------------------------------------


def test_load_prepared(data_dir: Path) -> None:
    data = load_prepared(data_dir)
    assert data.data_dir == data_dir
    assert isinstance(data.train.tokens, np.memmap)
    assert len(data.train) + len(data.val) == len(TEXT)
    assert data.val.num_chars == data.meta["splits"]["val"]["chars"]
    assert data.vocab_size == data.tokenizer.vocab_size == len(set(TEXT))
    with pytest.raises(ValueError, match="read-only"):
        data.train.tokens[0] = 1


def test_load_prepared_errors(data_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nowhere.*does not exist"):
        load_prepared(tmp_path / "nowhere")

    train = data_dir / "train.bin"
    train.write_bytes(train.read_bytes()[:-2])
    with pytest.raises(ValueError, match=r"train\.bin.*truncated or corrupt"):
        load_prepared(data_dir)
    train.unlink()
    with pytest.raises(FileNotFoundError, match=r"train\.bin.*missing"):
        load_prepared(data_dir)

    meta = data_dir / "meta.json"
    meta.write_text("{oops")
    with pytest.raises(ValueError, match=r"meta\.json.*not valid JSON"):
        load_prepared(data_dir)
    meta.unlink()
    with pytest.raises(FileNotFoundError, match=r"meta\.json.*missing"):
        load_prepared(data_dir)


def test_missing_tokenizer_json(data_dir: Path) -> None:
    (data_dir / "tokenizer.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"tokenizer\.json"):
        load_prepared(data_dir)


def test_tokenizer_mismatch_is_reported(data_dir: Path) -> None:
    meta_path = data_dir / "meta.json"
    meta = json.loads(meta_path.read_text())
    meta["vocab_size"] += 1
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"does not match meta\.json"):
        load_prepared(data_dir)


# ---- random batches --------------------------------------------------------------------------


def test_random_batches_shape_shift_and_windows() -> None:
    split = counting_split(1000)
    x, y = RandomBatches(split, block_size=16, batch_size=8, seed=0).batch(0)
    assert x.shape == y.shape == (8, 16)
    assert x.dtype == y.dtype == torch.int64
    assert torch.equal(y, x + 1), "targets are the inputs shifted by one token"
    assert torch.equal(x - x[:, :1], torch.arange(16).expand(8, 16)), "rows are contiguous"
    assert int(x.min()) >= 0 and int(y.max()) <= 999


def test_random_batches_are_a_function_of_seed_rank_step() -> None:
    split = counting_split(5000)
    a = RandomBatches(split, 8, 4, seed=1)
    resumed = RandomBatches(split, 8, 4, seed=1)
    for step in (0, 7, 123):
        (x, y), (rx, ry) = a.batch(step), resumed.batch(step)
        assert torch.equal(x, rx) and torch.equal(y, ry)
    assert not torch.equal(a.batch(0)[0], a.batch(1)[0])
    assert not torch.equal(a.batch(3)[0], RandomBatches(split, 8, 4, seed=2).batch(3)[0])
    assert not torch.equal(a.batch(3)[0], RandomBatches(split, 8, 4, seed=1, rank=1).batch(3)[0])
    first = list(itertools.islice(iter(a), 3))
    assert all(torch.equal(first[s][0], a.batch(s)[0]) for s in range(3))


def test_random_batches_reach_both_ends() -> None:
    split = counting_split(12)
    starts = set()
    for step in range(200):
        x, _ = RandomBatches(split, block_size=10, batch_size=4, seed=0).batch(step)
        starts.update(x[:, 0].tolist())
    assert starts == {0, 1}, "windows of 11 tokens fit at offsets 0 and 1 only"


def test_too_short_split() -> None:
    split = counting_split(16, name="val")
    with pytest.raises(ValueError, match=r"val split has 16 tokens.*block_size=16.*17"):
        RandomBatches(split, block_size=16, batch_size=2, seed=0)
    with pytest.raises(ValueError, match=r"val split has 16 tokens"):
        sequential_batches(split, block_size=16, batch_size=2)
    RandomBatches(split, block_size=15, batch_size=2, seed=0).batch(0)


# ---- sequential batches ----------------------------------------------------------------------


def test_sequential_batches_cover_the_split_in_order() -> None:
    split = counting_split(103)
    batches = list(sequential_batches(split, block_size=10, batch_size=4))
    assert [len(x) for x, _ in batches] == [4, 4, 2], "10 windows; the last batch is short"
    x = torch.cat([b[0] for b in batches]).flatten()
    y = torch.cat([b[1] for b in batches]).flatten()
    assert torch.equal(x, torch.arange(100)), "inputs: every token of the whole windows"
    assert torch.equal(y, torch.arange(1, 101)), "targets: each predicted exactly once"
    again = list(sequential_batches(split, block_size=10, batch_size=4))
    assert all(torch.equal(a[0], b[0]) for a, b in zip(batches, again, strict=True))


def test_sequential_batches_max_batches_and_real_data(data_dir: Path) -> None:
    data = load_prepared(data_dir)
    assert len(list(sequential_batches(data.val, 32, 2, max_batches=3))) == 3
    first_x, first_y = next(iter(sequential_batches(data.val, 32, 2)))
    assert data.tokenizer.decode(first_x[0]) == TEXT[-data.val.num_chars :][:32]
    assert torch.equal(first_y[0, :-1], first_x[0, 1:])


# ---- bits per character ----------------------------------------------------------------------


def test_bits_per_char(data_dir: Path) -> None:
    meta = load_prepared(data_dir).meta
    assert tokens_per_char(meta, "val") == 1.0, "char tokenizer: one token per character"
    assert bits_per_char(math.log(2), meta) == pytest.approx(1.0)
    fake = {"splits": {"val": {"tokens": 300, "chars": 1200}}}
    assert bits_per_char(2.0, fake) == pytest.approx(2.0 / math.log(2) * 0.25)


def test_bits_per_char_on_gpt2_tokens_against_meta_json(tmp_path: Path) -> None:
    """GPT-2 tokens hold several characters each, so a formula using chars/token where it
    needs tokens/char gives a different number (with one char per token both agree)."""
    from truthgpt import TruthGPTOptimizationCore, TruthGPTOptimizationCoreConfig

    src = tmp_path / "corpus.txt"
    src.write_text(TEXT, encoding="utf-8")
    prepare_data([str(src)], "gpt2", tmp_path / "data")
    data = load_prepared(tmp_path / "data")
    meta = json.loads((tmp_path / "data" / "meta.json").read_text())
    tokens, chars = meta["splits"]["val"]["tokens"], meta["splits"]["val"]["chars"]
    assert chars / tokens > 2.5, "the test needs several characters per token"
    config = TruthGPTOptimizationCoreConfig(
        vocab_size=data.tokenizer.vocab_size,
        hidden_size=16,
        num_attention_heads=2,
        num_hidden_layers=1,
        block_size=16,
        batch_size=2,
        peak_flops=1e12,
    )
    result = TruthGPTOptimizationCore(config).evaluate(data.val, max_batches=2)
    by_hand = result["loss"] / math.log(2) * tokens / chars
    assert result["bits_per_char"] == pytest.approx(by_hand, rel=1e-12)
    assert bits_per_char(result["loss"], meta) == pytest.approx(by_hand, rel=1e-12)
