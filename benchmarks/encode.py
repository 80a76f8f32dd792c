"""How fast `truthgpt prepare` encodes the built-in Shakespeare corpus, per tokenizer.

For each tokenizer it times the bulk path prepare uses (`encode_to_array` on the train and
val splits) against a plain one-call `encode` of the same text (for char: a per-character
dict lookup), best of --repeats runs each, in this one process, plus one full `prepare_data`
run. Writes benchmarks/results/encode.json and encode.md.

    python benchmarks/encode.py [--bpe-size 4096] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from truthgpt.data import load_corpus, prepare_data, shakespeare_text, split_text
from truthgpt.data.prepare import fit_tokenizer

RESULTS = Path(__file__).parent / "results"


def best_of(repeats: int, fn: Callable[[], Any]) -> tuple[float, float, Any]:
    """Wall and CPU seconds (all threads) of the fastest of `repeats` calls, and its result.

    CPU time says how much work was done even when other processes slow the wall clock.
    """
    best: tuple[float, float, Any] = (float("inf"), 0.0, None)
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        result = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        if wall < best[0]:
            best = (wall, cpu, result)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bpe-size", type=int, default=4096)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    text = load_corpus(["shakespeare"]).text
    train_text, val_text = split_text(text, 0.1)
    rows = []
    for spec in ("char", f"bpe:{args.bpe_size}", "gpt2"):
        fit_s, _, tok = best_of(1, lambda spec=spec: fit_tokenizer(spec, text, train_text, None))

        def bulk(tok: Any = tok) -> np.ndarray:
            return np.concatenate([tok.encode_to_array(train_text), tok.encode_to_array(val_text)])

        if spec == "char":

            def plain(tok: Any = tok) -> list[int]:
                return [tok.stoi[c] for c in train_text] + [tok.stoi[c] for c in val_text]
        else:

            def plain(tok: Any = tok) -> list[int]:
                return tok.encode(train_text) + tok.encode(val_text)

        bulk_s, bulk_cpu, ids = best_of(args.repeats, bulk)
        plain_s, plain_cpu, plain_ids = best_of(args.repeats, plain)
        assert ids.tolist() == plain_ids, f"{spec}: bulk and plain encodings differ"
        assert tok.decode(ids) == text, f"{spec}: the encoding does not decode back"
        shakespeare_text.cache_clear()  # prepare reads and cleans the plays afresh
        with tempfile.TemporaryDirectory() as tmp:
            start = time.perf_counter()
            prepare_data(["shakespeare"], spec, Path(tmp) / "data")
            prepare_s = time.perf_counter() - start
        rows.append(
            {
                "tokenizer": spec,
                "vocab_size": tok.vocab_size,
                "chars": len(text),
                "tokens": len(ids),
                "fit_seconds": round(fit_s, 3),
                "encode_seconds": round(bulk_s, 3),
                "encode_cpu_seconds": round(bulk_cpu, 3),
                "chars_per_second": round(len(text) / bulk_s),
                "plain_encode_seconds": round(plain_s, 3),
                "plain_encode_cpu_seconds": round(plain_cpu, 3),
                "speedup": round(plain_s / bulk_s, 2),
                "prepare_seconds": round(prepare_s, 3),
            }
        )
        print(rows[-1], flush=True)

    import tiktoken
    import tokenizers

    result = {
        "benchmark": "encode the built-in shakespeare corpus (train + val splits)",
        "command": f"python benchmarks/encode.py --bpe-size {args.bpe_size} "
        f"--repeats {args.repeats}",
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "load_average_1min_at_start": round(load_at_start, 2),
            "tokenizers": tokenizers.__version__,
            "tiktoken": tiktoken.__version__,
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "encode.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    lines = [
        "# Encoding the built-in corpus",
        "",
        f"`{result['command']}` on {os.cpu_count()} shared CPU cores (1-minute load average "
        f"{load_at_start:.1f} at the start, so timings are noisy).",
        "Best of the repeats. *bulk* is the path `truthgpt prepare` uses (`encode_to_array`: a",
        "numpy lookup for char, batched encoding of line-aligned chunks for the BPEs); *plain*",
        "is one `encode` call per split (char: a per-character dict lookup); both give the same",
        "ids. *cpu* is the CPU time of the same run, all threads (the BPEs encode in parallel).",
        "*fit* is building the tokenizer (BPE: training on the train split); *prepare* is a",
        "whole `prepare_data` run (read, clean, fit, encode, write).",
        "",
        "| tokenizer | vocab | chars | tokens | bulk s | bulk cpu s | chars/s | plain s "
        "| plain cpu s | speedup | fit s | prepare s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['tokenizer']} | {r['vocab_size']:,} | {r['chars']:,} | {r['tokens']:,} "
            f"| {r['encode_seconds']:.2f} | {r['encode_cpu_seconds']:.2f} "
            f"| {r['chars_per_second']:,} | {r['plain_encode_seconds']:.2f} "
            f"| {r['plain_encode_cpu_seconds']:.2f} | {r['speedup']:.1f}x | {r['fit_seconds']:.2f} "
            f"| {r['prepare_seconds']:.2f} |"
        )
    (RESULTS / "encode.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print((RESULTS / "encode.md").read_text())


if __name__ == "__main__":
    main()
