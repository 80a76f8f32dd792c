"""Checkpoint sizes and save/load times for the `char-small` and `seed` presets.

For each preset it builds the model (char-small with the char vocabulary of the built-in
Shakespeare corpus, seed with GPT-2's 50,257 tokens), takes one `train_step` so AdamW has its
state, saves a full checkpoint and loads it back with `load_core`, best of --repeats runs.
Weights are expected to take 4 bytes per parameter (fp32, the tied embedding stored once);
AdamW's two moments take twice that again. Writes benchmarks/results/checkpoint_size.json
and checkpoint_size.md.

    python benchmarks/checkpoint_size.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from truthgpt.config import TruthGPTOptimizationCoreConfig, preset
from truthgpt.data import build_tokenizer, load_corpus
from truthgpt.data.tokenization import GPT2_VOCAB_SIZE
from truthgpt.nn.model import TruthGPTModel
from truthgpt.training import load_core
from truthgpt.training.core import TruthGPTOptimizationCore

RESULTS = Path(__file__).parent / "results"


def measure(name: str, vocab_size: int, repeats: int, workdir: Path) -> dict[str, Any]:
    config = TruthGPTOptimizationCoreConfig(
        **preset(name), vocab_size=vocab_size, device="cpu", peak_flops=1e12
    )
    core = TruthGPTOptimizationCore(config)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (config.batch_size, config.block_size), generator=g)
    core.train_step({"input_ids": ids})
    params = core.raw_model.num_parameters()

    save_times, load_times, model_load_times = [], [], []
    for i in range(repeats):
        folder = workdir / f"{name}-{i}"
        start = time.perf_counter()
        core.save_checkpoint(folder)
        save_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        loaded = load_core(folder)
        load_times.append(time.perf_counter() - start)
        start = time.perf_counter()
        TruthGPTModel.from_pretrained(folder)
        model_load_times.append(time.perf_counter() - start)
        assert loaded.step == 1
    sizes = {p.name: p.stat().st_size for p in folder.iterdir()}
    for i in range(repeats):
        shutil.rmtree(workdir / f"{name}-{i}")
    return {
        "preset": name,
        "vocab_size": vocab_size,
        "parameters": params,
        "fp32_weight_bytes": 4 * params,
        "model_safetensors_bytes": sizes["model.safetensors"],
        "optimizer_safetensors_bytes": sizes["optimizer.safetensors"],
        "total_bytes": sum(sizes.values()),
        "files": sizes,
        "save_s": min(save_times),
        "load_core_s": min(load_times),
        "load_pretrained_s": min(model_load_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    load_at_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    char_vocab = build_tokenizer("char", load_corpus(["shakespeare"]).text).vocab_size
    with tempfile.TemporaryDirectory(dir=RESULTS.parent) as tmp:
        rows = [
            measure("char-small", char_vocab, args.repeats, Path(tmp)),
            measure("seed", GPT2_VOCAB_SIZE, args.repeats, Path(tmp)),
        ]

    RESULTS.mkdir(exist_ok=True)
    meta = {
        "command": f"python benchmarks/checkpoint_size.py --repeats {args.repeats}",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores",
        "torch": torch.__version__,
        "load_average_at_start": load_at_start,
    }
    (RESULTS / "checkpoint_size.json").write_text(
        json.dumps({**meta, "results": rows}, indent=2) + "\n", encoding="utf-8"
    )

    def mb(n: int) -> str:
        return f"{n / 1e6:,.1f}"

    lines = [
        "# Checkpoint sizes",
        "",
        f"`{meta['command']}` on {meta['machine']} (1-minute load average {load_at_start:.1f} "
        "at the start; times are the best of the repeats and noisy).",
        "A full checkpoint after one `train_step`: fp32 weights (tied embedding stored once),",
        "AdamW's two moments per parameter, config, trainer state (RNG states) and manifest.",
        "*load_core* rebuilds the core and verifies every file's sha256 before loading;",
        "*load_pretrained* reads the model alone. MB = 10^6 bytes.",
        "",
        "| preset | vocab | parameters | 4 × params MB | model.safetensors MB | "
        "optimizer.safetensors MB | folder MB | save s | load_core s | load_pretrained s |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['preset']} | {r['vocab_size']:,} | {r['parameters']:,} | "
            f"{mb(r['fp32_weight_bytes'])} | {mb(r['model_safetensors_bytes'])} | "
            f"{mb(r['optimizer_safetensors_bytes'])} | {mb(r['total_bytes'])} | "
            f"{r['save_s']:.2f} | {r['load_core_s']:.2f} | {r['load_pretrained_s']:.2f} |"
        )
    (RESULTS / "checkpoint_size.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
