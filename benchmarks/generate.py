"""Decoding speed with and without the KV cache, for dot and L1 attention.

The model has the `char-small` preset's shape (4 layers, 4 heads, hidden 128, vocab 80 like
the built-in corpus's characters) with max_position_embeddings=1024, so a 16-token prompt
plus 512 new tokens fits without the window sliding. Weights are random: speed does not
depend on them. Each configuration generates greedily (so the cached and cache-less runs must
produce the same tokens, which is checked), best of --repeats runs, cached and cache-less runs
alternating in this one process. Also reported: the time of one cached decode step at the
end of the context, split into attention and the rest. Writes benchmarks/results/generate.json
and generate.md.

    python benchmarks/generate.py [--new-tokens 512] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from truthgpt.config import TruthGPTConfig, preset
from truthgpt.nn.model import TruthGPTModel

RESULTS = Path(__file__).parent / "results"
PROMPT_TOKENS = 16
VOCAB = 80


def build_model(kind: str) -> TruthGPTModel:
    shape = preset("char-small")
    config = TruthGPTConfig(
        vocab_size=VOCAB,
        hidden_size=shape["hidden_size"],
        num_hidden_layers=shape["num_hidden_layers"],
        num_attention_heads=shape["num_attention_heads"],
        max_position_embeddings=1024,
        distance_type=kind,
    )
    torch.manual_seed(0)
    return TruthGPTModel(config).eval()


def timed(fn: Any) -> tuple[float, float, Any]:
    """Wall and CPU seconds of one call, and its result."""
    wall, cpu = time.perf_counter(), time.process_time()
    result = fn()
    return time.perf_counter() - wall, time.process_time() - cpu, result


@torch.no_grad()
def decode_step_split(model: TruthGPTModel, context: int, repeats: int = 50) -> dict[str, float]:
    """Milliseconds of one cached step with `context` cached tokens: total and attention only."""
    ids = torch.randint(0, VOCAB, (1, context + 1), generator=torch.Generator().manual_seed(1))
    past = model(ids[:, :context], use_cache=True).past_key_values
    attn_seconds = [0.0]

    def start(module: Any, args: Any, kwargs: Any) -> None:
        module._t0 = time.perf_counter()

    def stop(module: Any, args: Any, kwargs: Any, output: Any) -> None:
        attn_seconds[0] += time.perf_counter() - module._t0

    hooks = []
    for block in model.blocks:
        hooks.append(block.attn.register_forward_pre_hook(start, with_kwargs=True))
        hooks.append(block.attn.register_forward_hook(stop, with_kwargs=True))
    best_total, best_attn = float("inf"), 0.0
    for _ in range(repeats):
        attn_seconds[0] = 0.0
        t0 = time.perf_counter()
        model(ids[:, context:], past_key_values=past, use_cache=True)
        total = time.perf_counter() - t0
        if total < best_total:
            best_total, best_attn = total, attn_seconds[0]
    for hook in hooks:
        hook.remove()
    return {"step_ms": best_total * 1e3, "attention_ms": best_attn * 1e3}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--new-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: on a shared 2-core machine a second thread mostly waits)",
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    load_at_start = os.getloadavg()[0]  # the machine is shared: say how busy it was
    prompt = torch.randint(0, VOCAB, (1, PROMPT_TOKENS), generator=torch.Generator().manual_seed(0))
    rows = []
    for kind in ("dot", "l1"):
        model = build_model(kind)
        model.generate(prompt, 8, do_sample=False)  # warm up (compiles L1 kernels once)
        model.generate(prompt, 8, do_sample=False, use_cache=False)
        best = {True: (float("inf"), 0.0, None), False: (float("inf"), 0.0, None)}
        for _ in range(args.repeats):
            for use_cache in (True, False):
                run = timed(
                    lambda model=model, use_cache=use_cache: model.generate(
                        prompt, args.new_tokens, do_sample=False, use_cache=use_cache
                    )
                )
                if run[0] < best[use_cache][0]:
                    best[use_cache] = run
        (cache_s, cache_cpu, cache_ids), (plain_s, plain_cpu, plain_ids) = best[True], best[False]
        split = decode_step_split(model, PROMPT_TOKENS + args.new_tokens - 1)
        rows.append(
            {
                "distance_type": kind,
                "parameters": model.num_parameters(),
                "new_tokens": args.new_tokens,
                "cache_seconds": round(cache_s, 3),
                "cache_cpu_seconds": round(cache_cpu, 3),
                "cache_tokens_per_second": round(args.new_tokens / cache_s, 1),
                "no_cache_seconds": round(plain_s, 3),
                "no_cache_cpu_seconds": round(plain_cpu, 3),
                "no_cache_tokens_per_second": round(args.new_tokens / plain_s, 1),
                "speedup": round(plain_s / cache_s, 2),
                "cpu_speedup": round(plain_cpu / cache_cpu, 2),
                "same_tokens": bool(torch.equal(cache_ids, plain_ids)),
                "last_step_ms": round(split["step_ms"], 3),
                "last_step_attention_ms": round(split["attention_ms"], 3),
            }
        )
        print(rows[-1], flush=True)

    shape = preset("char-small")
    result = {
        "benchmark": "greedy decoding of new tokens after a 16-token prompt, KV cache vs none",
        "command": f"python benchmarks/generate.py --new-tokens {args.new_tokens} "
        f"--repeats {args.repeats} --threads {args.threads}",
        "model": {
            "hidden_size": shape["hidden_size"],
            "num_hidden_layers": shape["num_hidden_layers"],
            "num_attention_heads": shape["num_attention_heads"],
            "vocab_size": VOCAB,
            "max_position_embeddings": 1024,
            "prompt_tokens": PROMPT_TOKENS,
        },
        "machine": {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cpu_count": os.cpu_count(),
            "torch_threads": torch.get_num_threads(),
            "load_average_1min_at_start": round(load_at_start, 2),
        },
        "rows": rows,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "generate.json").write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")

    m = result["model"]
    lines = [
        "# Generation speed: KV cache vs recomputing the context",
        "",
        f"`{result['command']}` on {os.cpu_count()} shared CPU cores, {args.threads} torch "
        f"thread(s) (1-minute load average {load_at_start:.1f} at the start, so timings are "
        "noisy; the ratios are what to read).",
        f"Model: the `char-small` shape ({m['num_hidden_layers']} layers, "
        f"{m['num_attention_heads']} heads, hidden {m['hidden_size']}, vocab {VOCAB}) with "
        f"max_position_embeddings=1024; a {PROMPT_TOKENS}-token prompt and "
        f"{args.new_tokens} new tokens, greedy, so no window slide happens. Best of "
        f"{args.repeats} runs each, alternating. *same tokens*: the cached and cache-less runs "
        "produced identical outputs. *last step*: one cached decode step with "
        f"{PROMPT_TOKENS + args.new_tokens - 1} cached tokens, and the part of it spent in the "
        "attention layers (projections included).",
        "",
        "| distance | params | cache tok/s | no-cache tok/s | speedup (wall) | speedup (cpu) "
        "| same tokens | last step ms | of which attention ms |",
        "|---|---:|---:|---:|---:|---:|---|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['distance_type']} | {r['parameters']:,} | {r['cache_tokens_per_second']:.0f} "
            f"| {r['no_cache_tokens_per_second']:.1f} | {r['speedup']:.1f}x "
            f"| {r['cpu_speedup']:.1f}x | {'yes' if r['same_tokens'] else 'no'} "
            f"| {r['last_step_ms']:.2f} | {r['last_step_attention_ms']:.2f} |"
        )
    (RESULTS / "generate.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print((RESULTS / "generate.md").read_text())


if __name__ == "__main__":
    main()
