"""Where each kind attends: entropy and attended distance per layer, from `truthgpt analyze`.

    python benchmarks/attention_profile.py --compare DIR [DIR ...] [--kinds l1,dot]
        [--samples 100] [--out benchmarks/results/attention_profile]

For every `truthgpt compare --out` folder DIR and kind it has, runs `truthgpt analyze` on
each seed's run (DIR/runs/KIND-seedS, into DIR/analysis/KIND-seedS) and draws, per layer,
the attention entropy and the mean attended distance (tokens back), mean over heads and
seeds, each head a dot. Dashed lines are uniform attention over the visible keys, what a
model that learned nothing shows (the original design's demo: entropy 2.74). Writes OUT.png,
OUT.md and OUT.json.
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"


def analyse(run: Path, data: str, out: Path, samples: int) -> dict:
    if not (out / "analysis.json").exists():
        command = [sys.executable, "-m", "truthgpt", "analyze", "--run", str(run), "--data", data]
        subprocess.run(
            [*command, "--out", str(out), "--samples", str(samples), "--force"],
            check=True,
            stdout=subprocess.DEVNULL,
        )
    return json.loads((out / "analysis.json").read_text())


def uniform(block_size: int) -> tuple[float, float]:
    """Entropy and attended distance of uniform causal attention, mean over the rows."""
    rows = range(block_size)
    return (
        statistics.fmean(math.log(i + 1) for i in rows),
        statistics.fmean(i / 2 for i in rows),
    )


def profile(folder: Path, kind: str, samples: int) -> dict | None:
    """The kind's per-layer statistics over its seeds in `folder`; None if it has no runs."""
    runs = sorted((folder / "runs").glob(f"{kind}-seed*"))
    if not runs:
        return None
    data = json.loads((folder / "results.json").read_text())["data"]  # compare's prepared data
    analyses = [analyse(run, data, folder / "analysis" / run.name, samples) for run in runs]
    layers = len(analyses[0]["layers"])
    out: dict = {"runs": [str(r) for r in runs], "block_size": analyses[0]["block_size"]}
    for stat in ("entropy", "entropy_normalized", "distance_mean", "top1", "self_weight"):
        if stat not in analyses[0]["layers"][0]["heads"][0]:
            continue
        out[stat] = [
            statistics.fmean(a["layers"][i]["mean"][stat] for a in analyses) for i in range(layers)
        ]
        out[stat + "_heads"] = [
            [h[stat] for a in analyses for h in a["layers"][i]["heads"]] for i in range(layers)
        ]
    out["lambda_heads"] = [
        [h["lambda"] for a in analyses for h in a["layers"][i]["heads"]] for i in range(layers)
    ]
    return out


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    folders = list(results)
    fig = Figure(figsize=(4.6 * len(folders), 6.4), layout="constrained")
    axes = fig.subplots(2, len(folders), squeeze=False)
    for col, folder in enumerate(folders):
        for row, (stat, label) in enumerate(
            (("entropy", "entropy (nats)"), ("distance_mean", "attended distance (tokens)"))
        ):
            ax = axes[row][col]
            block = None
            for kind, r in results[folder].items():
                x = range(len(r[stat]))
                (line,) = ax.plot(x, r[stat], marker="o", label=kind)
                for i, heads in enumerate(r[stat + "_heads"]):
                    ax.scatter([i] * len(heads), heads, s=9, alpha=0.35, color=line.get_color())
                block = r["block_size"]
            ax.axhline(uniform(block)[row], ls="--", color="grey", label="uniform")
            ax.set_xlabel("layer")
            ax.set_ylabel(label)
            ax.set_xticks(range(len(r[stat])))
            if row == 0:
                ax.set_title(folder, fontsize=9)
            ax.legend(fontsize=8)
    fig.savefig(path, dpi=110)


def table(results: dict) -> str:
    lines = []
    for folder, kinds in results.items():
        block = next(iter(kinds.values()))["block_size"]
        ent, dist = uniform(block)
        lines += [
            f"**{folder}** (windows of {block} tokens; uniform attention: entropy {ent:.2f}, "
            f"distance {dist:.1f})",
            "",
            "| kind | layer | entropy | normalised entropy | attended distance | λ (heads) |",
            "|---|---|---|---|---|---|",
        ]
        for kind, r in kinds.items():
            for i, e in enumerate(r["entropy"]):
                lam = r["lambda_heads"][i]
                lines.append(
                    f"| {kind} | {i} | {e:.2f} | {r['entropy_normalized'][i]:.2f} | "
                    f"{r['distance_mean'][i]:.1f} | {min(lam):.3g} – {max(lam):.3g} |"
                )
        lines.append("")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--compare", type=Path, nargs="+", required=True)
    parser.add_argument("--kinds", default="l1,dot")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=RESULTS / "attention_profile")
    args = parser.parse_args()
    results = {}
    for folder in args.compare:
        found = {kind: profile(folder, kind, args.samples) for kind in args.kinds.split(",")}
        results[folder.name] = {kind: r for kind, r in found.items() if r is not None}
        if not results[folder.name]:
            raise SystemExit(f"--compare: {folder} has no runs of {args.kinds}")
    args.out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    args.out.with_suffix(".md").write_text(table(results))
    plot(results, args.out.with_suffix(".png"))
    print(table(results))


if __name__ == "__main__":
    main()
