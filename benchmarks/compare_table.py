"""One table from several `truthgpt compare` results: every run, its settings, and the means.

    python benchmarks/compare_table.py OUT.md RESULTS_DIR [RESULTS_DIR ...] [--title TEXT]

Each RESULTS_DIR is a `truthgpt compare --out` folder (its results.json); a row is one kind
under one set of `--set` overrides and step budget, pooling the seeds of every folder that
ran it (`compare --first-seed` adds seeds to a study), with mean ± std over its seeds,
perplexity (e^loss), bits per character, tokens/s (and s/step with --tokens-per-step) and the
per-seed losses, so that no run is left out. OUT.json gets the same rows. The tables in
benchmarks/results/scale.md are built with it; the commands behind each folder are there.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from truthgpt.workflows.compare import summarise_seeds


def pooled_rows(folders: list[Path]) -> list[dict]:
    """One row per (preset, kind, settings, steps, eval batches, data), its runs from every
    folder, summarised as `truthgpt compare` summarises a kind's seeds."""
    groups: dict[tuple, dict] = {}
    for folder in folders:
        result = json.loads((folder / "results.json").read_text())
        overrides = ", ".join(f"{k}={v}" for k, v in sorted(result["overrides"].items()))
        for kind, r in result["kinds"].items():
            key = (result["preset"], kind, overrides, result["steps"], result["eval_batches"])
            key += (result["data"],)
            group = groups.setdefault(key, {"sources": [], "runs": []})
            group["sources"].append(folder.name)
            group["runs"] += r["per_seed"]
    rows = []
    for (preset, kind, overrides, steps, _, data), group in groups.items():
        runs = sorted(group["runs"], key=lambda run: run["seed"])
        seeds = [run["seed"] for run in runs]
        if len(set(seeds)) != len(seeds):
            raise SystemExit(f"{kind} ({overrides or 'defaults'}): seed run twice in {group}")
        rows.append(
            {
                "sources": group["sources"],
                "preset": preset,
                "data": data,
                "kind": kind,
                "settings": overrides or "defaults",
                "steps": steps,
                "seeds": seeds,
                "val_loss": [run["val_loss"] for run in runs],
                **summarise_seeds(runs),
            }
        )
    return rows


def table(rows: list[dict], tokens_per_step: int | None) -> str:
    head = "| kind | settings | steps | val loss (mean ± std) | perplexity | bits/char | "
    head += "tokens/s | " + ("s/step | " if tokens_per_step else "")
    head += "final λ | per seed |"
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in sorted(rows, key=lambda r: (r["preset"], r["val_loss_mean"])):
        pairs = zip(r["seeds"], r["val_loss"], strict=True)
        per_seed = ", ".join(f"{seed}: {loss:.4f}" for seed, loss in pairs)
        step = f"{tokens_per_step / r['tokens_per_s']:.3f} | " if tokens_per_step else ""
        mean = r["val_loss_mean"]
        spread = f" ± {r['val_loss_std']:.4f}" if len(r["seeds"]) > 1 else " (1 seed)"
        bpc = r["bits_per_char_mean"]
        lines.append(
            f"| {r['kind']} | {r['settings']} | {r['steps']} | {mean:.4f}{spread} | "
            f"{math.exp(mean):.2f} | {'–' if bpc is None else f'{bpc:.4f}'} | "
            f"{r['tokens_per_s']:,.0f} | {step}{r['lambda_min']:.3g} – {r['lambda_max']:.3g} | "
            f"{per_seed} |"
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
    rows = pooled_rows(args.folders)
    text = (args.title + "\n\n" if args.title else "") + table(rows, args.tokens_per_step)
    args.out.write_text(text)
    args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2) + "\n")
    print(text)


if __name__ == "__main__":
    main()
