"""Learning quality of every distance kind on the built-in corpus (long: ~1 h on 2 cores).

    python benchmarks/quality.py [--steps 2000] [--seeds 2] [--kinds dot,l1,...]

Calls `truthgpt compare` with nanoGPT's CPU Shakespeare config (`char-small`) and copies its
results.json / results.md / val_curves.png to benchmarks/results/quality.*.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from truthgpt.workflows.compare import compare_kinds

RESULTS = Path(__file__).parent / "results"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # the kinds of results/quality.md; chebyshev ran on its own (results/quality_chebyshev.md,
    # `truthgpt compare --kinds chebyshev --seeds 2`)
    parser.add_argument("--kinds", default="dot,l1,l2,sql2,cosine")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--work", default="runs/quality", help="folder for the runs")
    args = parser.parse_args()
    compare_kinds(args.kinds.split(","), args.work, steps=args.steps, seeds=args.seeds)
    RESULTS.mkdir(exist_ok=True)
    for name, suffix in (
        ("results.json", ".json"),
        ("results.md", ".md"),
        ("val_curves.png", ".png"),
    ):
        shutil.copy(Path(args.work) / name, RESULTS / f"quality{suffix}")
    print(f"wrote {RESULTS / 'quality.md'}")


if __name__ == "__main__":
    main()
