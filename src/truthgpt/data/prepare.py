"""Turn a corpus into a prepared data directory: token files, tokenizer and metadata.

    DATA_DIR/train.bin       raw little-endian token ids (uint16, or uint32 for big vocabularies)
    DATA_DIR/val.bin
    DATA_DIR/tokenizer.json  the tokenizer, loadable with `load_tokenizer`
    DATA_DIR/meta.json       what was built from what: tokenizer, dtype, counts, sources

The directory appears complete or not at all: everything is written to a temporary directory
next to it, which is renamed into place at the end.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from truthgpt.data.corpus import check_val_fraction, iter_sources, load_corpus, split_text
from truthgpt.data.tokenization import Tokenizer, build_tokenizer, parse_tokenizer_spec
from truthgpt.io.atomic import write_folder_atomically

DATA_FORMAT = "truthgpt-data"
DATA_FORMAT_VERSION = 1
SPLITS = ("train", "val")
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id: uint16 up to 65,536."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def _check_target(out_dir: Path, force: bool) -> None:
    if out_dir.exists() and not out_dir.is_dir():
        raise FileExistsError(f"output {str(out_dir)!r} exists and is not a directory")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not force:
        raise FileExistsError(
            f"output directory {str(out_dir)!r} is not empty; choose another directory or pass "
            "--force (force=True) to replace it"
        )


def fit_tokenizer(spec: str, text: str, train_text: str, unk_token: str | None) -> Tokenizer:
    """The tokenizer `prepare_data` uses.

    `char` takes the alphabet of the whole corpus, so validation text never meets an unknown
    character (an alphabet learns nothing about the text worth keeping from validation);
    `bpe:N` learns its merges from the training split only.
    """
    if parse_tokenizer_spec(spec)[0] == "char":
        return build_tokenizer(spec, text, unk_token=unk_token)
    return build_tokenizer(spec, train_text, unk_token=unk_token)


def prepare_data(
    sources: Sequence[str | os.PathLike[str]] | str,
    tokenizer_spec: str,
    out_dir: str | os.PathLike[str],
    val_fraction: float = 0.1,
    force: bool = False,
    *,
    unk_token: str | None = None,
) -> dict[str, Any]:
    """Read, split, tokenize and write a corpus to `out_dir`; returns the metadata written.

    `sources` are 'shakespeare' (built in), text files, folders or glob patterns.
    """
    out_dir = Path(out_dir)
    # Everything that can be checked cheaply is checked before any work or any write.
    parse_tokenizer_spec(tokenizer_spec, unk_token)
    check_val_fraction(val_fraction)
    _check_target(out_dir, force)

    corpus = load_corpus(sources)
    train_text, val_text = split_text(corpus.text, val_fraction)
    tokenizer = fit_tokenizer(tokenizer_spec, corpus.text, train_text, unk_token)
    dtype = token_dtype(tokenizer.vocab_size)
    texts = {"train": train_text, "val": val_text}
    ids = {name: tokenizer.encode_to_array(texts[name]) for name in SPLITS}

    meta: dict[str, Any] = {
        "format": DATA_FORMAT,
        "format_version": DATA_FORMAT_VERSION,
        "tokenizer": tokenizer.name,
        "tokenizer_type": tokenizer.kind,
        "vocab_size": tokenizer.vocab_size,
        "dtype": dtype.name,
        "val_fraction": val_fraction,
        "splits": {
            name: {"file": f"{name}.bin", "tokens": len(ids[name]), "chars": len(texts[name])}
            for name in SPLITS
        },
        "total_chars": len(corpus.text),
        "sources": list(iter_sources(corpus)),
    }

    def write(tmp: Path) -> None:
        for name in SPLITS:
            ids[name].astype(dtype).tofile(tmp / f"{name}.bin")
        tokenizer.save(tmp / "tokenizer.json")
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")

    # Checked again just before the rename: something may have appeared while encoding.
    write_folder_atomically(out_dir, write, check=lambda target: _check_target(target, force))
    return meta
