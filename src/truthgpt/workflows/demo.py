"""`truthgpt demo`: every workflow of the original design, for real, on Shakespeare.

Prepare the built-in corpus, train a distance-attention model (and a dot-product baseline for
the same steps), evaluate, analyse attention, tune λ, save and reload (checking the logits are
identical), generate a passage, and write `report.md` with every figure measured in this run.
The number of steps is chosen from a short timing run so the whole demo fits the time budget.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from truthgpt.config import preset
from truthgpt.data import load_prepared, prepare_data
from truthgpt.io import json_safe
from truthgpt.io.folders import check_output, write_owned_folder
from truthgpt.training import TruthGPTOptimizationCore, build_config, train

MAX_STEPS = 2000  # nanoGPT's char-level Shakespeare budget; the demo never trains longer
MIN_MINUTES = 0.5  # below this the demo cannot train, analyse and tune in its budget
PROMPT = "Romeo:\n"
# Shares of the time left once the steps are timed; the rest goes to saving, reloading,
# sampling, plots and the report. Each phase sizes itself from the measured step times.
TRAIN_SHARE = 0.55  # training, with its evaluations
EVAL_SHARE = 0.15  # of the training share: the evaluations along the way and the final one
ANALYSIS_SHARE = 0.10
TUNING_SHARE = 0.12
REST_SHARE = 1 - TRAIN_SHARE - ANALYSIS_SHARE - TUNING_SHARE
RUN_OVERHEAD_S = 1.5  # a run's own fixed cost: monitor, checkpoint, curves plot
FULL = {"analysis_samples": 100, "tune_steps": 120, "eval_batches": 200}  # the 5-minute sizes


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


MIN_BASELINE_STEPS = 200  # a baseline trained for fewer steps says nothing


def plan_steps(
    seconds_per_step: dict[str, float], budget_s: float, max_steps: int = MAX_STEPS
) -> int:
    """Steps each model can train so that all of them together fit `budget_s`."""
    per_step = sum(seconds_per_step.values())
    return max(1, min(max_steps, int(budget_s / per_step)))


def plan_training(
    seconds_per_step: dict[str, float], budget_s: float, max_steps: int = MAX_STEPS
) -> tuple[list[str], int]:
    """(kinds to train, steps each): every kind if each gets MIN_BASELINE_STEPS within the
    budget, else only the first (the demo's own distance) with the whole budget."""
    kinds = list(seconds_per_step)
    steps = plan_steps(seconds_per_step, budget_s, max_steps)
    if len(kinds) > 1 and steps < MIN_BASELINE_STEPS:
        kinds = kinds[:1]
        steps = plan_steps({kinds[0]: seconds_per_step[kinds[0]]}, budget_s, max_steps)
    return kinds, steps


def fit(seconds: float, unit_s: float, low: int, high: int) -> int:
    """How many units of `unit_s` seconds fit in `seconds`, within [low, high]."""
    return max(low, min(high, int(seconds / max(unit_s, 1e-9))))


class Timer:
    """Seconds used and left of the demo's budget."""

    def __init__(self, budget_s: float) -> None:
        self.start = time.perf_counter()
        self.budget_s = budget_s

    def used(self) -> float:
        return time.perf_counter() - self.start

    def left(self) -> float:
        return max(0.0, self.budget_s - self.used())


def time_steps(config: Any, data: Any, n: int = 4, warmup: int = 2) -> tuple[float, float]:
    """(seconds per training step, seconds per evaluation batch) of `config` on `data`,
    after warm-up steps."""
    from truthgpt.data import RandomBatches

    core = TruthGPTOptimizationCore(config)
    batches = RandomBatches(data.train, config.block_size, config.batch_size, seed=config.seed)
    for i in range(warmup):
        core.train_step(batches.batch(i))
    start = time.perf_counter()
    for i in range(warmup, warmup + n):
        core.train_step(batches.batch(i))
    step_s = (time.perf_counter() - start) / n
    start = time.perf_counter()
    core.evaluate(data.val, max_batches=n)
    return step_s, (time.perf_counter() - start) / n


def run_demo(
    out_dir: str | Path = "demo-report",
    *,
    minutes: float = 5.0,
    distance: str = "l1",
    compare: str | None = "dot",
    steps: int | None = None,
    seed: int = 1337,
    prompt: str = PROMPT,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the whole demo into `out_dir`; returns the metrics written to `metrics.json`.

    Every phase sizes itself to keep the whole run within `minutes`. `out_dir` must be new,
    empty or an earlier demo report (then replaced once the new one is complete)."""
    if isinstance(minutes, bool) or not isinstance(minutes, int | float) or not minutes >= 0:
        raise ValueError(f"--minutes: must be a number of minutes, got {minutes!r}")
    if minutes < MIN_MINUTES:
        raise ValueError(
            f"--minutes: at least {MIN_MINUTES} (the smallest budget in which the demo trains, "
            f"analyses, tunes and samples), got {minutes!r}"
        )
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise ValueError(f"--steps: must be in [1, {MAX_STEPS}], got {steps!r}")
    timer = Timer(minutes * 60)
    target = {"kind": "demo report", "replace": True}
    check_output(out_dir, **target)  # before any work; again before the rename
    metrics: dict[str, Any] = {}

    def write(tmp: Path) -> None:
        metrics.update(_demo(tmp, timer, distance, compare, steps, seed, prompt, log))

    out = write_owned_folder(out_dir, write=write, **target)
    log(f"== report: {out / 'report.md'} ({metrics['total_time_s']:.0f} s)")
    return metrics


def _demo(
    out: Path,
    timer: Timer,
    distance: str,
    compare: str | None,
    steps: int | None,
    seed: int,
    prompt: str,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Every phase of the demo, written into `out` (a temporary folder)."""
    from truthgpt.analysis import (
        analyze_attention,
        layer_weights,
        tune_lambda,
    )
    from truthgpt.nn.model import TruthGPTModel
    from truthgpt.workflows.explorer import explorer_html
    from truthgpt.workflows.plots import plot_attended_distance, plot_attention_heatmaps
    from truthgpt.workflows.report import format_table

    metrics: dict[str, Any] = {"distance_type": distance, "compare": compare, "seed": seed}
    metrics["budget_s"] = timer.budget_s

    # 1. Data: the built-in corpus, character-level.
    log("== 1. data: built-in Shakespeare corpus, char tokenizer")
    start = time.perf_counter()
    meta = prepare_data(["shakespeare"], "char", out / "data")
    data = load_prepared(out / "data")
    metrics["data"] = {
        "prepare_time_s": time.perf_counter() - start,
        "train_tokens": len(data.train),
        "val_tokens": len(data.val),
        "vocab_size": meta["vocab_size"],
    }
    log(
        f"   {len(data.train):,} train / {len(data.val):,} val characters, "
        f"vocab {meta['vocab_size']}"
    )

    def config_for(kind: str, max_steps: int, eval_batches: int = 1) -> Any:
        fields = preset("char-small") | {"distance_type": kind, "seed": seed, "device": "cpu"}
        # Four evaluations along the way (only the final one for very short runs).
        evals = 4 if max_steps >= 40 else 1
        fields |= {"max_steps": max_steps, "eval_interval": max_steps // evals}
        fields |= {"checkpoint_every": max_steps, "log_interval": max(1, max_steps // 20)}
        fields |= {"eval_batches": eval_batches}
        return build_config(vocab_size=data.tokenizer.vocab_size, overrides=fields)

    # 2. How long a step takes, and from it the size of every phase.
    kinds = [distance] + ([compare] if compare and compare != distance else [])
    log("== 2. timing a few steps to fit the time budget")
    timing = {k: time_steps(config_for(k, MAX_STEPS), data) for k in kinds}
    per_step = {k: t[0] for k, t in timing.items()}
    per_eval = {k: t[1] for k, t in timing.items()}
    left = timer.left()
    train_s = left * TRAIN_SHARE
    evals = 5  # four along the way and the final one, at most
    eval_batches = fit(
        train_s * EVAL_SHARE / evals, sum(per_eval.values()), 4, FULL["eval_batches"]
    )
    train_s -= evals * eval_batches * sum(per_eval.values()) + RUN_OVERHEAD_S * len(kinds)
    if steps is None:
        kinds, steps = plan_training(per_step, train_s)
    metrics["timing_s_per_step"] = per_step
    metrics["timing_s_per_eval_batch"] = per_eval
    log(
        "   "
        + ", ".join(f"{k}: {1000 * s:.1f} ms/step" for k, s in per_step.items())
        + f" → {steps} steps each for {', '.join(kinds)}, {eval_batches} validation batches"
    )
    metrics["steps"] = steps

    # 3. Train (and evaluate periodically), one model per kind.
    runs: dict[str, dict[str, Any]] = {}
    cores: dict[str, TruthGPTOptimizationCore] = {}
    for kind in kinds:
        log(f"== 3. training {kind} (char-small, {steps} steps)")
        config = config_for(kind, steps, eval_batches)
        core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer)
        report = train(core, data, out / "runs" / kind)
        runs[kind] = json_safe(report)
        cores[kind] = core
    metrics["runs"] = runs
    core = cores[distance]
    model = core.raw_model

    # 4. Attention patterns on validation text; a few windows first, to time one.
    log("== 4. attention analysis on validation text")
    start = time.perf_counter()
    analysis_s = timer.left() * ANALYSIS_SHARE / (ANALYSIS_SHARE + TUNING_SHARE + REST_SHARE)
    analyze_attention(model, data, num_samples=4, block_size=64)
    per_sample = (time.perf_counter() - start) / 4
    samples = fit(analysis_s - 4 * per_sample, per_sample * len(cores), 4, FULL["analysis_samples"])
    analyses, sample_weights = {}, {}
    for kind, c in cores.items():
        analyses[kind] = analyze_attention(c.raw_model, data, num_samples=samples, block_size=64)
        sample = torch.tensor([analyses[kind]["sample"]["token_ids"]])  # the same for every kind
        sample_weights[kind] = [w[0] for w in layer_weights(c.raw_model, sample)]
    analysis = analyses[distance]
    weights = sample_weights[distance]
    heatmaps = plot_attention_heatmaps(
        weights, analysis["sample"]["tokens"], out, lambdas=model.lambdas().tolist()
    )
    plot_attended_distance(analysis, out / "attended_distance.png")
    (out / "analysis.json").write_text(json.dumps(json_safe(analyses), indent=2) + "\n")
    page = explorer_html(analyses, sample_weights, title="truthgpt demo: attention")
    (out / "attention.html").write_text(page, encoding="utf-8")
    metrics["explorer_bytes"] = len(page.encode("utf-8"))
    metrics["analysis_time_s"] = time.perf_counter() - start
    log(format_table(analysis))

    # 5. λ optimisation: only the per-head λ move.
    log("== 5. λ optimisation (all other weights frozen)")
    tuning_s = timer.left() * TUNING_SHARE / (TUNING_SHARE + REST_SHARE)
    tune_eval = fit(tuning_s * 0.3 / 2, per_eval[distance], 4, FULL["eval_batches"])
    tune_steps = fit(tuning_s * 0.7, per_step[distance], 3, FULL["tune_steps"])
    tuning = tune_lambda(
        core,
        data,
        num_epochs=3,
        steps_per_epoch=max(1, tune_steps // 3),
        eval_batches=tune_eval,
        log=log,
    )
    metrics["lambda_tuning"] = json_safe(tuning)

    # 6. Save, reload from disk, and check the reloaded model computes the same logits.
    log("== 6. save and reload")
    start = time.perf_counter()
    checkpoint = core.save_checkpoint(out / "checkpoint")
    save_s = time.perf_counter() - start
    start = time.perf_counter()
    reloaded = TruthGPTModel.from_pretrained(checkpoint)
    load_s = time.perf_counter() - start
    x, _ = next(iter(_val_batches(data, core)))
    model.eval()
    with torch.no_grad():
        identical = torch.equal(model(x).logits, reloaded(x).logits)
    if not identical:
        raise RuntimeError("the reloaded model's logits differ from the saved model's")
    metrics["persistence"] = {
        "save_time_s": save_s,
        "load_time_s": load_s,
        "checkpoint_bytes": _dir_size(checkpoint),
        "weights_bytes": (checkpoint / "model.safetensors").stat().st_size,
        "logits_identical": identical,
    }

    # 7. Generate a passage.
    log("== 7. sample")
    ids = torch.tensor([data.tokenizer.encode(prompt)])
    options = {"temperature": 0.8, "top_k": 40, "seed": seed}
    start = time.perf_counter()
    reloaded.generate(ids, max_new_tokens=16, **options)  # to time a token
    new_tokens = fit(timer.left() * 0.3, (time.perf_counter() - start) / 16, 50, 400)
    start = time.perf_counter()
    generated = reloaded.generate(ids, max_new_tokens=new_tokens, **options)
    gen_s = time.perf_counter() - start
    text = data.tokenizer.decode(generated[0].tolist())
    metrics["sample"] = {"prompt": prompt, "text": text, "tokens_per_s": new_tokens / gen_s}
    log(text)

    metrics["total_time_s"] = timer.used()
    (out / "metrics.json").write_text(json.dumps(json_safe(metrics), indent=2) + "\n")
    write_report(out / "report.md", metrics, analyses, heatmaps)
    return metrics


def _val_batches(data: Any, core: TruthGPTOptimizationCore) -> Any:
    from truthgpt.data import sequential_batches

    return sequential_batches(data.val, core.train_config.block_size, 4, max_batches=1)


def _eval_tokens(metrics: dict[str, Any]) -> int:
    return int(next(iter(metrics["runs"].values()))["final_eval"]["tokens"])


def _val_share(metrics: dict[str, Any]) -> float:
    data = metrics["data"]
    return data["val_tokens"] / (data["train_tokens"] + data["val_tokens"])


def _fmt(value: Any, spec: str = ".4f") -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    return format(value, spec)


def write_report(
    path: Path, metrics: dict[str, Any], analyses: dict[str, Any], heatmaps: list[Path]
) -> None:
    """`report.md`: tables of every workflow's figures, the plots and the sample."""
    runs = metrics["runs"]
    kinds = list(runs)
    lines = [
        "# truthgpt demo report",
        "",
        f"Character-level Shakespeare (built-in corpus: {metrics['data']['train_tokens']:,} "
        f"training and {metrics['data']['val_tokens']:,} validation characters), `char-small` "
        f"model, {metrics['steps']} steps, seed {metrics['seed']}. Every figure below was "
        "measured in this run.",
        "",
        "## Training and evaluation",
        "",
        "| | " + " | ".join(f"`{k}`" for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]

    def row(label: str, getter: Callable[[dict], Any], spec: str = ".4f") -> None:
        lines.append(
            f"| {label} | " + " | ".join(_fmt(getter(runs[k]), spec) for k in kinds) + " |"
        )

    row("parameters", lambda r: r["num_parameters"], ",d")
    row("model size (MB, fp32)", lambda r: r["model_size_mb"], ".2f")
    row("initialisation time (s)", lambda r: r["init_time_s"], ".3f")
    row("average step time (ms)", lambda r: 1000 * (r["avg_step_time_s"] or math.nan), ".1f")
    row("tokens/s", lambda r: r["avg_tokens_per_s"], ",.0f")
    row("MFU (of measured matmul peak)", lambda r: r["avg_mfu"], ".1%")
    row("average memory (MB, process RSS)", lambda r: r["avg_memory_mb"], ",.0f")
    row("first training loss", lambda r: r["first_loss"])
    row("training loss (mean of last 50 steps)", lambda r: r["avg_loss_last_50"])
    row("validation loss (nats/char)", lambda r: r["final_eval"]["loss"])
    row("validation perplexity", lambda r: r["final_eval"]["perplexity"], ".3f")
    row("validation bits per char", lambda r: r["final_eval"].get("bits_per_char"), ".3f")
    vocab = metrics["data"]["vocab_size"]
    lines += [
        "",
        f"For scale: a model that learned nothing scores ln {vocab} = {math.log(vocab):.2f} "
        f"nats/char. Validation loss is measured on {_eval_tokens(metrics):,} tokens of the last "
        f"{_val_share(metrics):.0%} of the text, the same for every model.",
        "",
        *[f"![training curves {k}](runs/{k}/training_curves.png)" for k in kinds],
        "",
        "## Attention patterns (validation text)",
        "",
        "| layer | " + " | ".join(f"`{k}` entropy / norm. / top-1 / dist" for k in kinds) + " |",
        "|---|" + "---|" * len(kinds),
    ]
    first = analyses[kinds[0]]
    shown = " and ".join(f"`{k}`" for k in kinds) + (" side by side" if len(kinds) > 1 else "")
    for i in range(len(first["layers"])):
        cells = []
        for k in kinds:
            m = analyses[k]["layers"][i]["mean"]
            cells.append(
                f"{m['entropy']:.2f} / {m['entropy_normalized']:.2f} / {m['top1_weight']:.2f} / "
                f"{m['distance_mean']:.1f}"
            )
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Entropy in nats; norm. = entropy / ln(visible keys), 1 = uniform; top-1 = largest "
        "weight of a row, averaged; dist = mean attended distance Σ w·(i−j) in tokens. Per-head "
        "figures are in `analysis.json`.",
        "",
        f"**[attention.html](attention.html)** ({metrics['explorer_bytes'] / 1000:.0f} kB, opens "
        f"offline in any browser): a validation passage under {shown}; hover a token to see "
        "what it attends to in the chosen layer and head, as colour over the text and as a heat "
        "map, with every head's λ, entropy and attended distance as small charts.",
        "",
        *[f"![{p.stem}]({p.name})" for p in heatmaps],
        "",
        "![attended distance](attended_distance.png)",
        "",
        "## λ optimisation",
        "",
    ]
    tuning = metrics["lambda_tuning"]
    lines += [
        f"Validation loss {_fmt(tuning['val_loss_before'])} → {_fmt(tuning['val_loss_after'])} "
        f"after {tuning['steps']} steps on λ alone ({_fmt(tuning['time_s'], '.1f')} s); kept: "
        f"{tuning['kept']}; heads clamped: {len(tuning['clamped'])}.",
        "",
        "| layer | λ before | λ after |",
        "|---|---|---|",
    ]
    for i, (before, after) in enumerate(
        zip(tuning["lambda_before"], tuning["lambda_after"], strict=True)
    ):
        lines.append(
            f"| {i} | {', '.join(f'{v:.3f}' for v in before)} | "
            f"{', '.join(f'{v:.3f}' for v in after)} |"
        )
    p = metrics["persistence"]
    lines += [
        "",
        "## Save and load",
        "",
        "Checkpoint (safetensors + JSON, with optimiser state): "
        f"{p['checkpoint_bytes'] / 2**20:.2f} MB, of which weights "
        f"{p['weights_bytes'] / 2**20:.2f} MB. Save {p['save_time_s']:.3f} s, "
        f"load {p['load_time_s']:.3f} s. Reloaded logits identical to the saved model's: "
        f"{'yes' if p['logits_identical'] else 'NO'}.",
        "",
        "## Sample",
        "",
        f"Prompt {metrics['sample']['prompt']!r}, temperature 0.8, top-k 40, "
        f"{metrics['sample']['tokens_per_s']:.0f} tokens/s with the KV cache:",
        "",
        "```",
        metrics["sample"]["text"],
        "```",
        "",
        f"Total demo time: {metrics['total_time_s']:.0f} s.",
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
