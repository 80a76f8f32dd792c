"""Length extrapolation: trained at 256 tokens, evaluated at 256 to 2048, per kind × positions.

    python benchmarks/extrapolation.py                       # dot, l1, l2 × learned, rope, alibi
    python benchmarks/extrapolation.py --steps 2000 --seeds 2 --work runs/extrapolation

char-small's model (width 128, 4 layers, 4 heads) and its tokens per step (12 × 64 = 3 × 256),
trained at block 256 on the built-in corpus (char tokens), one run per kind × positions × seed.
Each trained model is then evaluated on the same first `--eval-tokens` tokens of the validation
split cut into windows of 256, 512, 1024 and 2048: the mean next-token loss over every position
of every window (a model that uses the longer context gets a lower loss at longer windows; one
that breaks past its training length gets a higher one). Learned positions have no entries past
256 and are evaluated there only. Per length, the attended distance of each layer — the mean
over heads and queries of Σ_j w_ij·(i − j), from the first window — shows how far back the
model looks.

Results go to --work/extrapolation.json after every run (a later call with the same --work
continues where it stopped) and to benchmarks/results/extrapolation.{json,md} at the end.
Long: about 2–5 minutes per run on two cores at 2000 steps.
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
from typing import Any

import torch

from truthgpt.config import preset
from truthgpt.data import load_prepared, prepare_data
from truthgpt.training import Monitor, TruthGPTOptimizationCore, build_config, train

RESULTS = Path(__file__).resolve().parent / "results"
TRAIN_LENGTH = 256
LENGTHS = (256, 512, 1024, 2048)
STATE = "extrapolation.json"


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", default="dot,l1,l2")
    parser.add_argument("--positions", default="learned,rope,alibi")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--eval-tokens", type=int, default=32768)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--work", default="runs/extrapolation", help="folder for runs and data")
    parser.add_argument("--results", default=str(RESULTS), help="where the tables go")
    args = parser.parse_args(argv)
    for name in ("steps", "seeds", "eval_tokens", "threads"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be positive")
    if args.eval_tokens < max(LENGTHS):
        parser.error(f"--eval-tokens must be at least {max(LENGTHS)}")
    return args


def work_folder(path: Path) -> dict[str, Any]:
    """The study's state: an empty or new folder starts one, a folder holding our state file
    continues it; anything else is refused (it is not ours to write into)."""
    state_file = path / STATE
    if state_file.is_file():
        return json.loads(state_file.read_text())
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        sys.exit(f"extrapolation.py: --work {path} is not empty and holds no {STATE}")
    path.mkdir(parents=True, exist_ok=True)
    state: dict[str, Any] = {"runs": {}}
    state_file.write_text(json.dumps(state) + "\n")  # marks the folder as this study's
    return state


@torch.no_grad()
def evaluate_lengths(model: torch.nn.Module, tokens: torch.Tensor, position: str) -> dict:
    """Mean loss over every position of the windows of each length, and each layer's
    attended distance in the first window."""
    model.eval()
    rows: dict[str, dict[str, Any]] = {}
    for length in LENGTHS if position != "learned" else (TRAIN_LENGTH,):
        windows = tokens.unfold(0, length + 1, length + 1)  # (N, length + 1), no overlap
        total, count = 0.0, 0
        rows_per_batch = max(1, 4096 // length)  # 4096 tokens a forward
        for start in range(0, windows.shape[0], rows_per_batch):
            batch = windows[start : start + rows_per_batch]
            logits = model(batch[:, :-1]).logits.float()
            loss = torch.nn.functional.cross_entropy(
                logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum"
            )
            total += float(loss)
            count += batch[:, 1:].numel()
        attentions = model(windows[:1, :-1], output_attentions=True).attentions
        i = torch.arange(length)
        lag = (i[:, None] - i[None, :]).clamp(min=0).float()  # (T, T): how far back key j is
        distance = [float((w[0] * lag).sum(-1).mean()) for w in attentions]
        rows[str(length)] = {
            "loss": total / count,
            "windows": int(windows.shape[0]),
            "attended_distance": distance,
        }
    return rows


def train_one(data: Any, work: Path, kind: str, position: str, seed: int, steps: int) -> dict:
    fields = preset("char-small") | {
        "distance_type": kind,
        "position_embedding": position,
        "block_size": TRAIN_LENGTH,
        "max_position_embeddings": TRAIN_LENGTH,
        "batch_size": 3,  # char-small's 12 × 64 tokens per step
        "seed": seed,
        "max_steps": steps,
        "eval_interval": steps,
        "eval_batches": 50,
        "checkpoint_every": steps,
        "log_interval": max(1, steps // 5),
    }
    config = build_config(vocab_size=data.tokenizer.vocab_size, overrides=fields)
    core = TruthGPTOptimizationCore(config, tokenizer=data.tokenizer)
    run_dir = work / "runs" / f"{kind}-{position}-seed{seed}"
    start = time.perf_counter()
    with Monitor(run_dir, steps, log_interval=max(1, steps // 5), tensorboard=False) as monitor:
        report = train(core, data, run_dir, monitor=monitor)
    return {
        "train_val_loss": report["final_eval"]["loss"],
        "tokens_per_s": report["avg_tokens_per_s"],
        "wall_time_s": time.perf_counter() - start,
        "model": core.raw_model,
    }


def summarise(state: dict[str, Any], kinds: list[str], positions: list[str]) -> dict[str, Any]:
    table: dict[str, Any] = {}
    for kind in kinds:
        for position in positions:
            prefix = f"{kind}-{position}-"
            runs = [r for name, r in state["runs"].items() if name.startswith(prefix)]
            if not runs:
                continue
            row: dict[str, Any] = {"seeds": len(runs)}
            for length in LENGTHS:
                key = str(length)
                cells = [r["lengths"][key] for r in runs if key in r["lengths"]]
                if not cells:
                    continue
                values = [cell["loss"] for cell in cells]
                layers = zip(*(cell["attended_distance"] for cell in cells), strict=True)
                row[key] = {
                    "loss": statistics.mean(values),
                    "spread": (max(values) - min(values)) / 2,
                    "attended_distance": [statistics.mean(layer) for layer in layers],
                }
            table[f"{kind}/{position}"] = row
    return table


def markdown(result: dict[str, Any]) -> str:
    lines = [
        "# Length extrapolation (trained at 256 tokens)",
        "",
        f"`{result['command']}`",
        "",
        f"char-small model, block {TRAIN_LENGTH}, batch 3, {result['steps']} steps, "
        f"{result['seeds']} seed(s), built-in corpus (char). Validation loss (nats/char) over "
        f"the first {result['eval_tokens']} validation tokens in windows of each length; "
        "± half the spread over seeds. CPU: "
        f"{result['cpu']}, load average {result['load_before']} → {result['load_after']}.",
        "",
        "| kind / positions | "
        + " | ".join(f"loss @ {n}" for n in LENGTHS)
        + f" | @ {LENGTHS[-1]} − @ {TRAIN_LENGTH} |",
        "|---|" + "---:|" * (len(LENGTHS) + 1),
    ]
    for name, row in result["table"].items():
        cells = []
        for n in LENGTHS:
            cell = row.get(str(n))
            if cell is None:
                cells.append("—")
            elif row["seeds"] > 1:
                cells.append(f"{cell['loss']:.4f} ± {cell['spread']:.4f}")
            else:
                cells.append(f"{cell['loss']:.4f}")
        first, last = row.get(str(TRAIN_LENGTH)), row.get(str(LENGTHS[-1]))
        change = f"{last['loss'] - first['loss']:+.4f}" if first and last else "—"
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {change} |")
    lines += [
        "",
        "Attended distance per layer (mean over heads and queries of Σ_j w_ij·(i − j), first "
        "window), in tokens:",
        "",
        "| kind / positions | length | " + " | ".join(f"layer {i}" for i in range(4)) + " |",
        "|---|---:|" + "---:|" * 4,
    ]
    for name, row in result["table"].items():
        for n in LENGTHS:
            cell = row.get(str(n))
            if cell is not None:
                layers = " | ".join(f"{d:.1f}" for d in cell["attended_distance"])
                lines.append(f"| {name} | {n} | {layers} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    kinds, positions = args.kinds.split(","), args.positions.split(",")
    work = Path(args.work)
    state = work_folder(work)
    load_before = os.getloadavg()[0]
    data_dir = work / "data"
    if not (data_dir / "meta.json").is_file():
        prepare_data(["shakespeare"], "char", data_dir)
    data = load_prepared(data_dir)
    tokens = torch.as_tensor(data.val.tokens[: args.eval_tokens].astype("int64"))
    for position in positions:
        for kind in kinds:
            for seed in range(args.seeds):
                key = f"{kind}-{position}-seed{seed}"
                if key in state["runs"]:
                    continue
                print(f"== {key}: {args.steps} steps", flush=True)
                run = train_one(data, work, kind, position, seed, args.steps)
                run["lengths"] = evaluate_lengths(run.pop("model"), tokens, position)
                state["runs"][key] = run
                (work / STATE).write_text(json.dumps(state, indent=2) + "\n")
                print(json.dumps({key: run["lengths"]}, indent=None)[:400], flush=True)
    result = {
        "command": "python benchmarks/extrapolation.py "
        + " ".join(sys.argv[1:] if argv is None else argv),
        "steps": args.steps,
        "seeds": args.seeds,
        "eval_tokens": args.eval_tokens,
        "cpu": cpu_name(),
        "load_before": round(load_before, 2),
        "load_after": round(os.getloadavg()[0], 2),
        "table": summarise(state, kinds, positions),
        "runs": state["runs"],
    }
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "extrapolation.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "extrapolation.md").write_text(markdown(result))
    print(markdown(result))


if __name__ == "__main__":
    main()
