"""`truthgpt compare`: every distance kind trained side by side under identical conditions.

Same data, same seeds, same schedule and step budget, same fixed validation batches; only the
distance changes (with its default λ). The answer to "does distance attention learn as well as
dot-product attention?" is then a table of means and spreads over seeds, not an anecdote.
"""

from __future__ import annotations

import json
import math
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from truthgpt.config import MAX_SEED, preset
from truthgpt.data import load_prepared, prepare_data
from truthgpt.io import json_safe
from truthgpt.io.folders import check_output, write_marker
from truthgpt.io.lock import RunLock
from truthgpt.nn.attention import kinds as distance_kinds
from truthgpt.training import Monitor, TruthGPTOptimizationCore, build_config, train

# What a comparison folder holds (its marker lists these).
COMPARISON_ENTRIES = ("data", "runs", "results.json", "results.md", "val_curves.png", ".lock")


def _prepared(out: Path, data_dir: str | Path | None, corpus: Sequence[str] | None) -> Any:
    if data_dir is not None:
        return load_prepared(data_dir)
    prepare_data(list(corpus or ["shakespeare"]), "char", out / "data", force=True)
    return load_prepared(out / "data")


def compare_kinds(
    kinds: Sequence[str],
    out_dir: str | Path,
    *,
    preset_name: str = "char-small",
    steps: int = 2000,
    seeds: int = 2,
    first_seed: int = 0,
    data_dir: str | Path | None = None,
    corpus: Sequence[str] | None = None,
    eval_batches: int = 200,
    evals: int = 10,
    overrides: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train every kind for `steps` with seeds first_seed..first_seed+seeds−1; write
    results.json/.md and a plot. (A later call with another first_seed adds seeds to a study.)

    `kinds` are registered kinds or aliases, each trained once under its own name.
    """
    kinds = _resolve(kinds)
    for name, value in (("--seeds", seeds), ("--steps", steps), ("--evals", evals)):
        if value < 1:
            raise ValueError(f"{name} must be positive, got {value}")
    if not 0 <= first_seed <= MAX_SEED - seeds:
        raise ValueError(f"--first-seed must be in [0, {MAX_SEED - seeds}], got {first_seed}")
    out = Path(out_dir)
    # Its runs, data and results go inside: never mixed into a folder of the user's.
    inputs = [data_dir] if data_dir is not None else [c for c in corpus or [] if Path(c).exists()]
    check_output(out, "comparison", inputs=inputs)
    with RunLock(out):  # one writer at a time
        check_output(out, "comparison", inputs=inputs)  # again, under the lock
        write_marker(out, "comparison", COMPARISON_ENTRIES)
        data = _prepared(out, data_dir, corpus)

        per_kind: dict[str, dict[str, Any]] = {}
        for kind in kinds:
            runs = []
            for seed in range(first_seed, first_seed + seeds):
                fields = preset(preset_name) | (overrides or {})
                fields |= {"distance_type": kind, "seed": seed, "max_steps": steps}
                fields |= {"eval_interval": max(1, steps // evals), "eval_batches": eval_batches}
                fields |= {"checkpoint_every": steps, "log_interval": max(1, steps // 10)}
                config = build_config(vocab_size=data.tokenizer.vocab_size, overrides=fields)
                core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer)
                run_dir = out / "runs" / f"{kind}-seed{seed}"
                log(f"== {kind}, seed {seed}: {steps} steps")
                start = time.perf_counter()
                monitor = Monitor(
                    run_dir, steps, log_interval=max(1, steps // 10), tensorboard=False
                )
                with monitor:
                    report = train(core, data, run_dir, monitor=monitor)
                lambdas = core.raw_model.lambdas()
                final = report["final_eval"]
                runs.append(
                    {
                        "seed": seed,
                        "val_loss": final["loss"],
                        "bits_per_char": final.get("bits_per_char"),
                        "tokens_per_s": report["avg_tokens_per_s"],
                        "wall_time_s": time.perf_counter() - start,
                        "lambda_min": float(lambdas.min()),
                        "lambda_max": float(lambdas.max()),
                        "val_curve": [[int(r["step"]), r["loss"]] for r in core.eval_history],
                    }
                )
            per_kind[kind] = summarise_seeds(runs)
            result = {
                "preset": preset_name,
                "steps": steps,
                "seeds": seeds,
                "first_seed": first_seed,
                "eval_batches": eval_batches,
                "data": str(data.data_dir),
                "overrides": overrides or {},
                "kinds": per_kind,
            }
            # Written after every kind, so a long comparison leaves usable partial results.
            (out / "results.json").write_text(json.dumps(json_safe(result), indent=2) + "\n")
            (out / "results.md").write_text(format_results(result))
            plot_curves(result, out / "val_curves.png")
        log(format_results(result))
        return result


def _resolve(names: Sequence[str]) -> list[str]:
    """The kinds' own names, in order and once each; ValueError listing any unknown ones."""
    resolved, unknown = [], []
    for name in names:
        try:
            resolved.append(distance_kinds.get(name).name)
        except ValueError:
            unknown.append(name)
    if unknown or not names:
        raise ValueError(
            f"--kinds: unknown kind(s) {', '.join(unknown) or '(none given)'}; "
            f"choose from {', '.join(distance_kinds.names())}"
        )
    return list(dict.fromkeys(resolved))


def summarise_seeds(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """One kind's figures over its seeds' runs (the entries of results.json's per_seed)."""
    losses = [r["val_loss"] for r in runs]
    bpcs = [r["bits_per_char"] for r in runs if r["bits_per_char"] is not None]
    return {
        "val_loss_mean": statistics.fmean(losses),
        "val_loss_std": statistics.stdev(losses) if len(losses) > 1 else 0.0,
        "bits_per_char_mean": statistics.fmean(bpcs) if bpcs else None,
        "tokens_per_s": statistics.fmean(r["tokens_per_s"] for r in runs),
        "wall_time_s": statistics.fmean(r["wall_time_s"] for r in runs),
        "lambda_min": min(r["lambda_min"] for r in runs),
        "lambda_max": max(r["lambda_max"] for r in runs),
        "per_seed": runs,
    }


def format_results(result: dict[str, Any]) -> str:
    """The comparison as a Markdown table, best validation loss first."""
    rows = sorted(result["kinds"].items(), key=lambda kv: kv[1]["val_loss_mean"])
    lines = [
        f"{result['preset']}, {result['steps']} steps, {result['seeds']} seed(s), val loss on "
        f"{result['eval_batches']} fixed batches (mean ± std over seeds).",
        "",
        "| kind | val loss | bits/char | tokens/s | wall time (s) | final λ range |",
        "|---|---|---|---|---|---|",
    ]
    for kind, r in rows:
        bpc = r["bits_per_char_mean"]
        lines.append(
            f"| {kind} | {r['val_loss_mean']:.4f} ± {r['val_loss_std']:.4f} | "
            f"{'–' if bpc is None else f'{bpc:.4f}'} | {r['tokens_per_s']:,.0f} | "
            f"{r['wall_time_s']:.0f} | {r['lambda_min']:.3g} – {r['lambda_max']:.3g} |"
        )
    return "\n".join(lines) + "\n"


def plot_curves(result: dict[str, Any], path: Path) -> Path:
    """Validation loss against step, one line per kind (mean over seeds)."""
    from matplotlib.figure import Figure  # a Figure of its own: no pyplot, no global backend

    fig = Figure(figsize=(8, 5))
    ax = fig.subplots()
    for kind, r in result["kinds"].items():
        curves = [dict(run["val_curve"]) for run in r["per_seed"]]
        steps = sorted(set.intersection(*(set(c) for c in curves)))
        mean = [statistics.fmean(c[s] for c in curves) for s in steps]
        ax.plot(steps, mean, "o-", ms=3, label=f"{kind} ({r['val_loss_mean']:.3f})")
    ax.set_xlabel("step")
    ax.set_ylabel("validation loss (nats/token)")
    finals = [r["val_loss_mean"] for r in result["kinds"].values()]
    if finals and all(math.isfinite(f) for f in finals):
        ax.set_ylim(min(finals) - 0.1, min(finals) + 1.2)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
