"""One table from several `truthgpt compare` results: every run, its settings, and the means.

    python benchmarks/compare_table.py OUT.md RESULTS_DIR [RESULTS_DIR ...] [--title TEXT]

Each RESULTS_DIR is a `truthgpt compare --out` folder (its results.json); a row is one kind
under one set of `--set` overrides, with mean ± std over its seeds, perplexity (e^loss),
bits per character, tokens/s and seconds per step, and the per-seed losses, so that no run
is left out. OUT.json gets the same rows. The study in benchmarks/results/scale.md is built
with it; the commands that made each folder are listed there.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from pathlib import Path


def rows_of(folder: Path) -> list[dict]:
    result = json.loads((folder / "results.json").read_text())
    overrides = ", ".join(f"{k}={v}" for k, v in sorted(result["overrides"].items()))
    rows = []
    for kind, r in result["kinds"].items():
        runs = r["per_seed"]
        losses = [run["val_loss"] for run in runs]
        tokens = [run["tokens_per_s"] for run in runs]
        rows.append(
            {
                "source": folder.name,
                "preset": result["preset"],
                "kind": kind,
                "settings": overrides or "defaults",
                "steps": result["steps"],
                "seeds": [run["seed"] for run in runs],
                "val_loss": losses,
                "mean": statistics.fmean(losses),
                "std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
                "bits_per_char": statistics.fmean(run["bits_per_char"] for run in runs),
                "tokens_per_s": statistics.fmean(tokens),
                "lambda": (r["lambda_min"], r["lambda_max"]),
            }
        )
    return rows


def table(rows: list[dict], tokens_per_step: int | None) -> str:
    head = "| kind | settings | steps | val loss (mean ± std) | perplexity | bits/char | "
    head += "tokens/s | " + ("s/step | " if tokens_per_step else "")
    head += "final λ | per seed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["preset"], r["mean"])):
        pairs = zip(r["seeds"], r["val_loss"], strict=True)
        per_seed = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in pairs)
        step = f"{tokens_per_step / r['tokens_per_s']:.3f} | " if tokens_per_step else ""
        lines.append(
            f"| {r['kind']} | {r['settings']} | {r['steps']} | {r['mean']:.4f} ± {r['std']:.4f} | "
            f"{math.exp(r['mean']):.2f} | {r['bits_per_char']:.4f} | {r['tokens_per_s']:,.0f} | "
            f"{step}{r['lambda'][0]:.3g} – {r['lambda'][1]:.3g} | {per_seed} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, help="the Markdown table to write (and OUT.json)")
    parser.add_argument("folders", type=Path, nargs="+", help="`truthgpt compare --out` folders")
    parser.add_argument("--title", default="", help="a line above the table")
    parser.add_argument(
        "--tokens-per-step", type=int, help="batch_size × block_size: adds a s/step column"
    )
    args = parser.parse_args()
    rows = [row for folder in args.folders for row in rows_of(folder)]
    text = (args.title + "\n\n" if args.title else "") + table(rows, args.tokens_per_step)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
