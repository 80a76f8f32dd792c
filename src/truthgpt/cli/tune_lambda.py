"""`truthgpt tune-lambda`: tune only the per-head λ of a run and save the result as a new run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "tune-lambda",
        help="tune each head's λ with everything else frozen; saves a new run",
        description="Optimise log λ of every head (Adam) on training batches, with all other "
        "weights frozen, and keep the tuned λ only if the validation loss improves. The source "
        "run is never modified: the result goes to a new run folder --out.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run or checkpoint folder")
    p.add_argument("--data", metavar="DATA_DIR", help="prepared data (default: the run's)")
    p.add_argument("--out", required=True, metavar="OUT_RUN_DIR", help="new run folder")
    p.add_argument("--epochs", type=int, default=5, help="tuning epochs (default 5)")
    p.add_argument(
        "--lr", type=float, default=None, help="Adam learning rate on log λ (default 0.01)"
    )
    p.add_argument("--steps-per-epoch", type=int, help="batches per epoch (default 50)")
    p.add_argument(
        "--eval-batches", type=int, help="validation batches (default: the run's eval_batches)"
    )
    p.add_argument("--seed", type=int, help="batch seed (default: the run's seed + 10007)")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.set_defaults(func=run)


def _source_run_dir(path: Path) -> Path:
    """The run folder that holds `path` (a run folder or a checkpoint inside one)."""
    path = path.resolve()
    for folder in (path, *path.parents[:3]):
        if (folder / "run.json").is_file() or (folder / "checkpoints").is_dir():
            return folder
    return path


def check_out_dir(out: Path, source: Path) -> None:
    """Refuse an --out that is the source run, lies inside it, or is not a new folder."""
    from truthgpt.io.folders import check_output

    run_dir = _source_run_dir(source)
    resolved = out.resolve()
    if resolved == run_dir or run_dir in resolved.parents or resolved == source.resolve():
        raise FileExistsError(
            f"--out: {out} is (inside) the source run {run_dir}; tuning never overwrites its "
            "source: choose a new folder"
        )
    check_output(out, "run", inputs=[source, run_dir])


def format_lambdas(result: dict[str, Any]) -> str:
    """λ before → after for every head, one line per head, clamped heads marked."""
    clamped = {(c["layer"], c["head"]): c["bound"] for c in result["clamped"]}
    lines = ["layer  head  λ before    λ tuned     λ saved"]
    for layer, (before, tuned, after) in enumerate(
        zip(result["lambda_before"], result["lambda_tuned"], result["lambda_after"], strict=True)
    ):
        for head, (b, t, a) in enumerate(zip(before, tuned, after, strict=True)):
            mark = f"  (clamped at {clamped[(layer, head)]})" if (layer, head) in clamped else ""
            lines.append(f"{layer:5d}  {head:4d}  {b:<10.4g}  {t:<10.4g}  {a:.4g}{mark}")
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from truthgpt.cli.common import data_for_run, find_run_info
    from truthgpt.io import json_safe
    from truthgpt.io.folders import write_owned_folder
    from truthgpt.training import load_core, tune_lambda
    from truthgpt.training.checkpoint import CheckpointManager

    source, out = Path(args.run), Path(args.out)
    if not source.exists():
        raise FileNotFoundError(f"--run: {source} does not exist")
    check_out_dir(out, source)
    core = load_core(source, **({"device": args.device} if args.device else {}))
    data = data_for_run(source, args.data)
    options = {"lr": args.lr} if args.lr is not None else {}
    result = tune_lambda(
        core,
        data,
        num_epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        eval_batches=args.eval_batches,
        seed=args.seed,
        log=print,
        **options,
    )
    info = find_run_info(source) or {}
    result["source"] = str(source.resolve())
    run_info = {
        "data": str(Path(data.data_dir).resolve()),
        "preset": info.get("preset"),
        "tuned_from": str(source.resolve()),
    }

    def write(tmp: Path) -> None:
        CheckpointManager(tmp).save(core.checkpoint_state(), val_loss=result["val_loss_after"])
        (tmp / "run.json").write_text(json.dumps(run_info, indent=2) + "\n", encoding="utf-8")
        (tmp / "tune_lambda.json").write_text(
            json.dumps(json_safe(result), indent=2) + "\n", encoding="utf-8"
        )

    # The whole run folder appears at once, or not at all.
    write_owned_folder(out, "run", write, inputs=[source, _source_run_dir(source), data.data_dir])

    print(format_lambdas(result))
    if result["clamped"]:
        heads = ", ".join(f"L{c['layer']}H{c['head']} ({c['bound']})" for c in result["clamped"])
        print(f"clamped to [{result['lambda_range'][0]}, {result['lambda_range'][1]}]: {heads}")
    print(
        f"val loss {result['val_loss_before']:.4f} → tuned {result['val_loss_tuned']:.4f}; "
        f"kept the {result['kept']} λ"
        + (" (tuning did not improve the validation loss)" if result["kept"] == "original" else "")
        + f"; {result['steps']} steps in {result['time_s']:.1f} s; new run {out}"
    )
    return 0
