"""`truthgpt train`: train a model on prepared data, or resume a run."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from truthgpt.config import PRESETS


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train",
        help="train a model on a prepared data folder (or resume a run)",
        description="Train a distance-attention GPT. Config precedence: preset < --config < "
        "--set < the explicit flags.",
    )
    p.add_argument("--data", help="prepared data folder (from `truthgpt prepare`)")
    p.add_argument("--out", help="run folder: checkpoints, metrics.jsonl, tb/, plots")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR")
    p.add_argument("--preset", choices=sorted(PRESETS), help="named starting config")
    p.add_argument("--config", metavar="FILE", help="config fields from a .toml or .json file")
    p.add_argument(
        "--set", metavar="KEY=VALUE", action="append", default=[], help="set any config field"
    )
    p.add_argument("--distance", help="distance_type: dot, cosine, l1, l2, sql2, chebyshev, lp")
    p.add_argument("--max-steps", type=int, help="train up to this many optimiser steps")
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--precision", help="fp32, bf16 or fp16 (fp16: CUDA only)")
    p.add_argument("--checkpoint-every", type=int, help="steps between checkpoints")
    p.add_argument("--seed", type=int, help="random seed (init, batches, dropout)")
    p.set_defaults(func=run)


def _flag_overrides(args: argparse.Namespace) -> dict:
    flags = {
        "distance_type": args.distance,
        "max_steps": args.max_steps,
        "device": args.device,
        "precision": args.precision,
        "checkpoint_every": args.checkpoint_every,
        "seed": args.seed,
    }
    return {k: v for k, v in flags.items() if v is not None}


def run(args: argparse.Namespace) -> int:
    from truthgpt.checkpoint import load_core
    from truthgpt.data import load_prepared
    from truthgpt.training import TruthGPTOptimizationCore, build_config, parse_overrides, train

    if args.resume:
        run_dir = Path(args.resume)
        info = _read_run_info(run_dir)
        train_overrides = {
            k: v
            for k, v in _flag_overrides(args).items()
            if k in ("max_steps", "device", "precision", "checkpoint_every")
        }
        core = load_core(run_dir, **train_overrides)
        data = load_prepared(args.data or info["data"])
        print(f"resuming {run_dir} at step {core.step} → {core.train_config.max_steps}")
    else:
        if not args.data or not args.out:
            raise ValueError("train: --data and --out are required (or --resume RUN_DIR)")
        data = load_prepared(args.data)
        overrides = parse_overrides(args.set) | _flag_overrides(args)
        config = build_config(
            vocab_size=data.tokenizer.vocab_size,
            preset_name=args.preset,
            config_file=args.config,
            overrides=overrides,
        )
        run_dir = Path(args.out)
        _check_new_run_dir(run_dir)
        core = TruthGPTOptimizationCore(
            config,
            tokenizer=data.tokenizer,
            chars_per_token=data.val.num_chars / len(data.val),
        )
        run_dir.mkdir(parents=True, exist_ok=True)
        info = {"data": str(Path(args.data).resolve()), "preset": args.preset}
        (run_dir / "run.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        print("config:")
        print(config.to_json())
        n = core.raw_model.num_parameters()
        print(f"model: {n:,} parameters ({n * 4 / 2**20:.1f} MB in fp32) on {core.device}")

    report = train(core, data, run_dir)
    final = report.get("final_eval") or {}
    print(
        f"done: step {core.step}, val loss {final.get('loss', float('nan')):.4f}"
        + (f", {final['bits_per_char']:.3f} bits/char" if "bits_per_char" in final else "")
        + f", {report['avg_tokens_per_s'] or 0:,.0f} tok/s; run folder {run_dir}"
    )
    return 0


def _check_new_run_dir(run_dir: Path) -> None:
    if run_dir.exists() and any(run_dir.iterdir()):
        raise FileExistsError(
            f"--out: {run_dir} is not empty; choose a new folder or continue it with "
            f"--resume {run_dir}"
        )


def _read_run_info(run_dir: Path) -> dict:
    path = run_dir / "run.json"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: {path} not found; is {run_dir} a truthgpt run folder?")
    return json.loads(path.read_text(encoding="utf-8"))
