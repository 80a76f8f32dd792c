"""Training throughput and MFU of every distance kind against `dot`, in one process.

    python benchmarks/train.py [--presets char-small,seed] [--kinds dot,l1,...] [--steps 30]
                               [--threads N] [--precision fp32|bf16]

Each kind trains its preset on random token batches for a few warm-up steps, then is timed over
`--steps` steps; kinds are measured in interleaved rounds and the median round is kept, so a
burst of load elsewhere on a shared machine hits every kind alike. Ratios to `dot` are the
figures to read. Writes benchmarks/results/train[.threadsN][.bf16].json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

from truthgpt.config import TruthGPTOptimizationCoreConfig, preset
from truthgpt.nn.attention import kinds as distance_kinds
from truthgpt.training import TruthGPTOptimizationCore
from truthgpt.training.hardware import measure_peak_flops

RESULTS = Path(__file__).parent / "results"
# char-small: the built-in corpus's character vocabulary; seed: GPT-2's BPE vocabulary.
VOCAB = {"char-small": 80, "seed": 50257}


def make_core(preset_name: str, kind: str, precision: str = "fp32") -> TruthGPTOptimizationCore:
    fields = preset(preset_name) | {"distance_type": kind, "device": "cpu", "seed": 0}
    fields["precision"] = precision
    config = TruthGPTOptimizationCoreConfig(vocab_size=VOCAB[preset_name], **fields)
    return TruthGPTOptimizationCore(config)


def batches(config: TruthGPTOptimizationCoreConfig, n: int) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    shape = (config.batch_size, config.block_size)
    return [torch.randint(0, config.vocab_size, shape, generator=g) for _ in range(n)]


def measure(
    preset_name: str, kinds: list[str], steps: int, rounds: int, peak: float, precision: str
) -> dict:
    cores = {kind: make_core(preset_name, kind, precision) for kind in kinds}
    data = batches(next(iter(cores.values())).config, steps)
    for core in cores.values():  # warm-up: allocation, kernel compilation
        core._peak_flops = peak
        for x in data[:5]:
            core.train_step({"input_ids": x, "labels": x})
    times: dict[str, list[float]] = {kind: [] for kind in kinds}
    for _ in range(rounds):
        for kind, core in cores.items():
            start = time.perf_counter()
            for x in data:
                core.train_step({"input_ids": x, "labels": x})
            times[kind].append(time.perf_counter() - start)
    rows = {}
    for kind, core in cores.items():
        cfg = core.config
        seconds = statistics.median(times[kind])
        tokens_per_s = steps * cfg.batch_size * cfg.block_size / seconds
        rows[kind] = {
            "tokens_per_s": tokens_per_s,
            "seconds_per_step": seconds / steps,
            "mfu": core.mfu(tokens_per_s, cfg.block_size),
            "num_parameters": core.model.num_parameters(),
        }
    for row in rows.values():
        row["ratio_to_dot"] = row["tokens_per_s"] / rows["dot"]["tokens_per_s"]
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="char-small,seed")
    parser.add_argument("--kinds", default=",".join(distance_kinds.names()))
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--threads", type=int, help="torch threads (default: torch's)")
    parser.add_argument(
        "--precision", default="fp32", choices=("fp32", "bf16"), help="autocast (MFU: fp32 peak)"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kinds = args.kinds.split(",")
    if "dot" not in kinds:
        kinds.insert(0, "dot")
    peak = measure_peak_flops(torch.device("cpu"), "fp32")
    result = {
        "machine": f"{platform.machine()}, {torch.get_num_threads()} threads, torch "
        f"{torch.__version__}",
        "peak_matmul_gflops": peak / 1e9,
        "command": "python " + " ".join(["benchmarks/train.py", *sys.argv[1:]]),
        "load_average_at_start": os.getloadavg(),
        "steps": args.steps,
        "rounds": args.rounds,
        "presets": {},
    }
    for name in args.presets.split(","):
        print(f"[{name}]", flush=True)
        rows = measure(name, kinds, args.steps, args.rounds, peak, args.precision)
        result["presets"][name] = rows
        for kind, row in rows.items():
            print(
                f"  {kind:10s} {row['tokens_per_s']:9,.0f} tok/s  ×{row['ratio_to_dot']:.2f} dot"
                f"  MFU {row['mfu']:.1%}",
                flush=True,
            )
    result["load_average_at_end"] = os.getloadavg()
    RESULTS.mkdir(exist_ok=True)
    out_name = "train" + (f".threads{args.threads}" if args.threads else "")
    out_name += "" if args.precision == "fp32" else f".{args.precision}"
    (RESULTS / f"{out_name}.json").write_text(json.dumps(result, indent=2) + "\n")
    load = ", ".join(f"{x:.2f}" for x in result["load_average_at_start"])
    load_end = ", ".join(f"{x:.2f}" for x in result["load_average_at_end"])
    lines = [
        f"Training throughput ({result['machine']}; measured matmul peak "
        f"{result['peak_matmul_gflops']:.0f} GFLOP/s; {args.precision}; median of "
        f"{args.rounds} rounds of {args.steps} steps; load average (1, 5, 15 min) {load} at "
        f"the start, {load_end} at the end: on a busy machine read the ratios, not the speeds). "
        f"Command: `{result['command']}`.",
        "",
        "| preset | kind | tokens/s | s/step | ratio to dot | MFU |",
        "|---|---|---|---|---|---|",
    ]
    for name, rows in result["presets"].items():
        for kind, row in rows.items():
            lines.append(
                f"| {name} | {kind} | {row['tokens_per_s']:,.0f} | {row['seconds_per_step']:.3f} "
                f"| {row['ratio_to_dot']:.2f} "
                f"| {row['mfu']:.1%} |"
            )
    (RESULTS / f"{out_name}.md").write_text("\n".join(lines) + "\n")
    print(f"wrote {RESULTS / out_name}.md")


if __name__ == "__main__":
    main()
