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

from truthgpt.data.corpus import (
    check_val_fraction,
    expand_sources,
    iter_sources,
    load_corpus,
    split_text,
)
from truthgpt.data.tokenization import Tokenizer, build_tokenizer, parse_tokenizer_spec
from truthgpt.io.files import read_json_file
from truthgpt.io.folders import check_output, write_owned_folder

DATA_FORMAT = "truthgpt-data"
DATA_FORMAT_VERSION = 1
SPLITS = ("train", "val")
FILES = ("train.bin", "val.bin", "tokenizer.json", "meta.json")


def token_dtype(vocab_size: int) -> np.dtype:
    """The narrowest little-endian unsigned type that holds every id: uint16 up to 65,536."""
    return np.dtype("<u2") if vocab_size <= 1 << 16 else np.dtype("<u4")


def is_prepared_data(folder: Path) -> bool:
    """Whether `folder` holds prepared data of a release before folder markers: its files
    are those `prepare_data` writes, and meta.json says so."""
    try:
        names = {p.name for p in folder.iterdir()}
        meta = read_json_file(folder / "meta.json", what="meta.json")
    except (OSError, ValueError):
        return False
    return names <= set(FILES) and isinstance(meta, dict) and meta.get("format") == DATA_FORMAT


def _source_paths(sources: Sequence[str | os.PathLike[str]]) -> list[Path]:
    """The files the sources name (folders and globs expanded): prepare's inputs."""
    return [item for item in expand_sources(sources) if isinstance(item, Path)]


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
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    target = {
        "kind": "prepared data",
        "replace": force,
        "replace_flag": "--force",
        "inputs": _source_paths(sources),
        "legacy": is_prepared_data,
    }
    check_output(out_dir, **target)  # before any work; again before the rename

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

    write_owned_folder(out_dir, write=write, **target)
    return meta
