"""`truthgpt prepare`: tokenize a corpus into a data directory that training reads."""

from __future__ import annotations

import argparse
import time
from typing import Any


def register(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "prepare",
        help="tokenize a corpus into DATA_DIR (train.bin, val.bin, tokenizer.json, meta.json)",
        description=(
            "Read a corpus, split off the last VAL_FRACTION of it for validation, tokenize both "
            "splits and write them to DATA_DIR. The directory appears complete or not at all."
        ),
    )
    parser.add_argument(
        "--corpus",
        nargs="+",
        required=True,
        metavar="SOURCE",
        help="'shakespeare' (38 plays, built in) or UTF-8 text files, folders or glob patterns",
    )
    parser.add_argument(
        "--tokenizer",
        default="char",
        metavar="SPEC",
        help="char | bpe:N (byte-level BPE with N tokens) | gpt2 (default: char)",
    )
    parser.add_argument("--out", required=True, metavar="DATA_DIR", help="output directory")
    parser.add_argument(
        "--val-fraction",
        type=float,
        default=0.1,
        help="fraction of the text, taken from its end, kept for validation (default: 0.1)",
    )
    parser.add_argument(
        "--unk-token",
        default=None,
        help="char tokenizer only: token that stands for characters outside the alphabet",
    )
    parser.add_argument(
        "--force", action="store_true", help="replace DATA_DIR if it exists and is not empty"
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truthgpt.data import prepare_data

    start = time.perf_counter()
    meta = prepare_data(
        args.corpus,
        args.tokenizer,
        args.out,
        val_fraction=args.val_fraction,
        force=args.force,
        unk_token=args.unk_token,
    )
    seconds = time.perf_counter() - start
    train, val = meta["splits"]["train"], meta["splits"]["val"]
    print(f"prepared {args.out} in {seconds:.1f} s")
    print(f"  tokenizer {meta['tokenizer']}: vocab {meta['vocab_size']:,}, {meta['dtype']}")
    for name, split in (("train", train), ("val", val)):
        print(
            f"  {name:5s} {split['tokens']:>12,} tokens  {split['chars']:>12,} chars  "
            f"({split['tokens'] / split['chars']:.3f} tokens/char)"
        )
    return 0
