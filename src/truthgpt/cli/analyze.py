"""`truthgpt analyze`: attention statistics of a trained run on validation text, with plots."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "analyze",
        help="attention statistics per layer and head, heat maps and attended distances",
        description="Run a trained model over evenly spaced validation windows and report, per "
        "layer and head, attention entropy, top-1 share, self weight, attended distance and λ. "
        "Writes analysis.json, attention.html (an offline page to explore the sample passage), "
        "attention_layer{i}.png and attention_distance.png to --out.",
    )
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="run or checkpoint folder")
    p.add_argument("--data", metavar="DATA_DIR", help="prepared data (default: the run's)")
    p.add_argument("--out", required=True, metavar="DIR", help="folder for the JSON and PNGs")
    p.add_argument("--samples", type=int, default=100, help="validation windows (default 100)")
    p.add_argument("--block-size", type=int, help="window length (default: the run's block_size)")
    p.add_argument(
        "--sample-tokens", type=int, default=48, help="tokens shown in the heat maps (default 48)"
    )
    p.add_argument("--device", help="auto, cpu, cuda or cuda:N")
    p.add_argument("--force", action="store_true", help="replace an earlier analysis in --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from truthgpt.analysis import analyze_attention, layer_weights
    from truthgpt.cli.common import data_for_run
    from truthgpt.io import json_safe
    from truthgpt.io.folders import check_output, write_owned_folder
    from truthgpt.training import load_core
    from truthgpt.workflows.explorer import explorer_html
    from truthgpt.workflows.plots import plot_attended_distance, plot_attention_heatmaps
    from truthgpt.workflows.report import format_table, rich_table

    out = Path(args.out)
    inputs = [args.run] + ([args.data] if args.data else [])
    target = {"kind": "analysis", "replace": args.force, "replace_flag": "--force"}
    check_output(out, inputs=inputs, **target)  # before any work; again before the rename

    core = load_core(args.run, **({"device": args.device} if args.device else {}))
    data = data_for_run(args.run, args.data)
    model = core.raw_model
    analysis = analyze_attention(
        model,
        data,
        num_samples=args.samples,
        block_size=args.block_size or core.train_config.block_size,
        tokenizer=core.tokenizer or data.tokenizer,
        sample_tokens=args.sample_tokens,
    )
    analysis["run"] = str(args.run)
    analysis["step"] = core.step
    sample = analysis["sample"]
    import torch

    weights = [w[0] for w in layer_weights(model, torch.tensor([sample["token_ids"]]))]

    def write(tmp: Path) -> None:
        (tmp / "analysis.json").write_text(
            json.dumps(json_safe(analysis), indent=2, ensure_ascii=False) + "\n", encoding="utf-8"
        )
        plot_attention_heatmaps(weights, sample["tokens"], tmp, lambdas=model.lambdas().tolist())
        plot_attended_distance(analysis, tmp / "attention_distance.png")
        kind = analysis["model"]["distance_type"]
        page = explorer_html({kind: analysis}, {kind: weights})
        (tmp / "attention.html").write_text(page, encoding="utf-8")

    # Everything is written first, so a failure leaves --out as it was.
    write_owned_folder(out, write=write, inputs=[*inputs, data.data_dir], **target)

    if sys.stdout.isatty():
        from rich.console import Console

        Console().print(rich_table(analysis))
    else:
        print(
            f"attention on {analysis['num_samples']} × {analysis['block_size']} tokens "
            f"({analysis['source']}, {analysis['model']['distance_type']}, step {core.step})"
        )
        print(format_table(analysis))
    print(f"wrote {out / 'analysis.json'}, attention.html and {len(weights) + 1} PNGs to {out}")
    return 0
