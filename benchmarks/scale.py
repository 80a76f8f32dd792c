"""The distance-attention study at two scales: every `truthgpt compare` it ran, and its tables.

    python benchmarks/scale.py --run [NAME ...] [--work runs/scale]   # hours on 2 cores
    python benchmarks/scale.py                                        # tables from stored results

Each entry of STUDY is one `truthgpt compare` (the arguments below, plus --steps and --evals
from its setting); `--run` runs the named ones (all by default) in WORK/NAME and copies its
results.json and results.md to benchmarks/results/scale/NAME/. Then (and without --run) the
tables are rebuilt from the stored folders with compare_table.py, which pools the seeds of a
setting across folders, into benchmarks/results/scale/tables.md. `--run` first prepares the
data when missing: `truthgpt prepare --corpus shakespeare --tokenizer gpt2 --out
WORK/data-gpt2`, and the same with the char tokenizer into WORK/data-char.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))  # run as a script or imported by the tests
from compare_table import pooled_rows, table

RESULTS = Path(__file__).parent / "results" / "scale"

# The original design's model on GPT-2 tokens: bf16 autocast (2× faster on this CPU, the
# same rounding for every kind), 1000 steps, 4 validation passes of the 200 fixed batches.
SEED = ["--preset", "seed", "--data", "{work}/data-gpt2", "--steps", "1000", "--evals", "4"]
SEED += ["--set", "precision=bf16"]
CHAR = ["--preset", "char-small", "--data", "{work}/data-char", "--steps", "2000"]
FORTUNES = ["--preset", "seed", "--data", "{work}/data-fortunes-gpt2", "--steps", "500"]
FORTUNES += ["--evals", "2", "--set", "precision=bf16"]
FORTUNE_FILES = "/usr/share/games/fortunes"

# seed-base and seed-l2-cosine ran before the default λ of l1 and l2 was scaled with the
# width: their l1 and l2 rows are the old defaults (today: --set lambda_param=0.25 for l1,
# 2.0 for l2), and the lambda_param=0.125 / 1.0 rows are today's defaults at width 512.
LABELS = {
    ("seed-base", "l1"): "λ₀ 0.25, the default before width scaling",
    ("seed-l2-cosine", "l2"): "λ₀ 2.0, the default before width scaling",
    ("seed-l1-lambda-0.125-s0", "l1"): "λ₀ 0.125, today's default",
    ("seed-l1-lambda-0.125-s1", "l1"): "λ₀ 0.125, today's default",
    ("seed-l2-lambda-1.0", "l2"): "λ₀ 1.0, today's default",
}


def compare(setting: list[str], kinds: str, seeds: int = 1, first: int = 0, *sets: str):
    """The arguments of one `truthgpt compare`; each of `sets` is a KEY=VALUE for --set."""
    args = [*setting, "--kinds", kinds, "--seeds", str(seeds), "--first-seed", str(first)]
    return args + [a for kv in sets for a in ("--set", kv)]


STUDY: dict[str, list[str]] = {
    "seed-base": compare(SEED, "dot,l1", 2),
    "seed-l2-cosine": compare(SEED, "l2,cosine", 2),
    "seed-l1-lambda-0.125-s0": compare(SEED, "l1", 1, 0, "lambda_param=0.125"),
    "seed-l1-lambda-0.125-s1": compare(SEED, "l1", 1, 1, "lambda_param=0.125"),
    "seed-l2-lambda-1.0": compare(SEED, "l2", 1, 0, "lambda_param=1.0"),
    # Another English text, a new user's first try: Debian's fortunes (apt install fortunes).
    "fortunes-seed-dot": compare(FORTUNES, "dot"),
    "fortunes-seed-l1": compare(FORTUNES, "l1"),
    "fortunes-seed-l1-lambda-0.25": compare(FORTUNES, "l1", 1, 0, "lambda_param=0.25"),
    "char-base-s0": compare(CHAR, "l1,dot"),
    "char-base-s12": compare(CHAR, "l1,dot", 2, 1),
    "char-qk-rms": compare(CHAR, "l1", 1, 0, "qk_norm=rms"),
    "char-qk-rms-gain": compare(CHAR, "l1", 1, 0, "qk_norm=rms", "qk_norm_gain=true"),
    "char-qk-rms-lambda-lr-10": compare(CHAR, "l1", 1, 0, "qk_norm=rms", "lambda_lr_scale=10"),
    "char-lambda-lr-10": compare(CHAR, "l1", 1, 0, "lambda_lr_scale=10"),
    "char-lambda-lr-30": compare(CHAR, "l1", 1, 0, "lambda_lr_scale=30"),
    "char-dot-lambda-lr-10": compare(CHAR, "dot", 1, 0, "lambda_lr_scale=10"),
    "char-heads-8": compare(CHAR, "l1", 1, 0, "num_attention_heads=8"),
    "char-lambda-3x": compare(CHAR, "l1", 1, 0, "lambda_param=0.5303301"),
    "char-lambda-4x": compare(CHAR, "l1", 1, 0, "lambda_param=0.7071068"),
    "char-lambda-4x-s12": compare(CHAR, "l1", 2, 1, "lambda_param=0.7071068"),
}


def run(names: list[str], work: Path) -> None:
    cli = [sys.executable, "-m", "truthgpt"]
    fortunes = [
        str(f)
        for f in sorted(Path(FORTUNE_FILES).glob("*"))
        if f.suffix not in (".dat", ".u8") and f.name != "ascii-art"
    ]
    for corpus, spec, folder in (
        (["shakespeare"], "gpt2", "data-gpt2"),
        (["shakespeare"], "char", "data-char"),
        (fortunes, "gpt2", "data-fortunes-gpt2"),
    ):
        if not (work / folder).exists() and corpus:
            prepare = ["prepare", "--corpus", *corpus, "--tokenizer", spec]
            subprocess.run([*cli, *prepare, "--out", str(work / folder)], check=True)
    for name in names:
        args = [a.format(work=work) for a in STUDY[name]]
        subprocess.run([*cli, "compare", *args, "--out", str(work / name)], check=True)
        (RESULTS / name).mkdir(parents=True, exist_ok=True)
        for file in ("results.json", "results.md"):
            shutil.copy(work / name / file, RESULTS / name / file)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", nargs="*", metavar="NAME", help="run these (default: all)")
    parser.add_argument("--work", type=Path, default=Path("runs/scale"))
    args = parser.parse_args()
    if args.run is not None:
        unknown = set(args.run) - set(STUDY)
        if unknown:
            raise SystemExit(f"--run: unknown {', '.join(sorted(unknown))}; see STUDY")
        run(args.run or list(STUDY), args.work)
    stored = [RESULTS / name for name in STUDY if (RESULTS / name / "results.json").exists()]
    text = []
    rows = pooled_rows(stored)
    for row in rows:
        labels = {LABELS.get((source, row["kind"])) for source in row["sources"]}
        if labels != {None}:
            row["settings"] += " (" + "; ".join(sorted(str(x) for x in labels)) + ")"
    groups = (
        ("seed preset, Shakespeare, GPT-2 tokens", "seed", "data-gpt2", 4 * 64),
        ("seed preset, fortunes, GPT-2 tokens", "seed", "data-fortunes-gpt2", 4 * 64),
        ("char-small, Shakespeare, characters", "char-small", "data-char", 12 * 64),
    )
    for title, preset, data, tokens in groups:
        chosen = [r for r in rows if r["preset"] == preset and Path(r["data"]).name == data]
        text.append(f"**{title}** (val loss in nats per token)\n\n" + table(chosen, tokens))
    (RESULTS / "tables.md").write_text("\n".join(text))
    print("\n".join(text))


if __name__ == "__main__":
    main()
