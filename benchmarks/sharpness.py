"""How sharp each layer's attention scores are, at initialisation and after training.

    python benchmarks/sharpness.py --data DATA_DIR RUN_DIR [RUN_DIR ...] [--windows 16]
        [--initial-lambda λ] [--out FILE.md]

For each run, a freshly initialised model of its config and its trained checkpoint read the
same validation windows of DATA_DIR; per layer, the score spread is the standard deviation of
one query's scores −λ·d(q, k) over the keys it sees (mean over queries with ≥ 8 keys, heads
and windows), and the q/k size is the RMS of the entries of q and k. A dot-product score
grows with the product of |q| and |k|, a distance score only with their size: when training
grows the projections, dot-product attention sharpens faster at a fixed λ.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from truthgpt.data import load_prepared
from truthgpt.nn.attention.functional import pairwise_scores
from truthgpt.nn.model import TruthGPTModel


@torch.no_grad()
def layer_spreads(model: TruthGPTModel, ids: torch.Tensor) -> list[dict[str, float]]:
    """Per layer: score spread and q/k RMS on `ids` (B, T)."""
    inputs: list[torch.Tensor] = []
    hooks = [
        block.ln_1.register_forward_hook(lambda _m, _i, out: inputs.append(out))
        for block in model.blocks
    ]
    model(ids)
    for hook in hooks:
        hook.remove()
    rows = []
    T = ids.shape[1]
    visible = torch.ones(T, T).tril().bool()
    enough = visible.sum(-1) >= 8
    for block, x in zip(model.blocks, inputs, strict=True):
        attn = block.attn
        q, k, _ = (t.double() for t in attn.project(x))
        scores = pairwise_scores(q, k, attn.distance_type, attn.lambda_.double(), attn.p)
        scores = scores.masked_fill(~visible, float("nan"))
        mean = scores.nanmean(-1, keepdim=True)
        var = ((scores - mean) ** 2).nan_to_num().sum(-1) / (visible.sum(-1) - 1).clamp(min=1)
        rows.append(
            {
                "spread": var.sqrt()[..., enough].mean().item(),
                "qk_rms": torch.cat([q, k]).pow(2).mean().sqrt().item(),
            }
        )
    return rows


def windows(data_dir: Path, count: int, block: int) -> torch.Tensor:
    """`count` windows of `block` tokens, evenly spaced over the validation split."""
    val = load_prepared(data_dir).val.tokens
    starts = torch.linspace(0, len(val) - block - 1, count).long().tolist()
    return torch.stack([torch.as_tensor(val[s : s + block].astype("int64")) for s in starts])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", type=Path, nargs="+")
    parser.add_argument("--data", type=Path, required=True, help="the runs' prepared data")
    parser.add_argument("--windows", type=int, default=16)
    parser.add_argument(
        "--initial-lambda",
        type=float,
        help="λ of the fresh models (default: today's default for their config; give the "
        "one a run started at when that default has changed since)",
    )
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    lines = [
        "| run | kind | layer | spread at init | spread trained | q/k RMS at init | trained |",
        "|---|---|---|---|---|---|---|",
    ]
    for run in args.runs:
        trained = TruthGPTModel.from_pretrained(run).eval()
        torch.manual_seed(0)
        fresh = trained.config.to_dict() | {"lambda_param": args.initial_lambda}
        initial = TruthGPTModel(type(trained.config)(**fresh)).eval()
        ids = windows(args.data, args.windows, trained.config.max_position_embeddings)
        before, after = layer_spreads(initial, ids), layer_spreads(trained, ids)
        for i, (b, a) in enumerate(zip(before, after, strict=True)):
            lines.append(
                f"| {run.name} | {trained.config.distance_type} | {i} | {b['spread']:.2f} | "
                f"{a['spread']:.2f} | {b['qk_rms']:.2f} | {a['qk_rms']:.2f} |"
            )
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
