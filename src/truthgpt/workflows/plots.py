"""Pictures of attention: heat maps of a sample passage, and attended distance per head.

Figures are drawn with matplotlib's Agg renderer through `Figure` objects directly (no pyplot),
so plotting never touches global backend state or needs a display.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import Tensor


def _figure(width: float, height: float) -> Any:
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), layout="constrained")


def plot_attention_heatmaps(
    weights: Sequence[Tensor],
    tokens: Sequence[str],
    out_dir: str | Path,
    *,
    lambdas: Sequence[Sequence[float]] | None = None,
) -> list[Path]:
    """One PNG per layer (`attention_layer{i}.png`), a grid of its heads' weights.

    `weights` holds one (H, T, T) tensor per layer for a single passage; `tokens` are its T
    decoded tokens, drawn on both axes (rows: queries, columns: keys).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for layer, w in enumerate(weights):
        if w.dim() != 3 or w.shape[-1] != len(tokens) or w.shape[-2] != len(tokens):
            raise ValueError(
                f"weights: layer {layer} should be (heads, {len(tokens)}, {len(tokens)}) for "
                f"{len(tokens)} tokens, got {tuple(w.shape)}"
            )
        heads = w.shape[0]
        cols = min(heads, 4)
        rows = math.ceil(heads / cols)
        size = max(3.5, 0.12 * len(tokens) + 1.0)  # room for one label per token
        fig = _figure(cols * size + 1.0, rows * size + 0.5)
        fig.suptitle(f"layer {layer}: attention weights (row: query, column: key)")
        image = None
        for h in range(heads):
            ax = fig.add_subplot(rows, cols, h + 1)
            image = ax.imshow(w[h].float().cpu().numpy(), cmap="viridis", vmin=0.0, vmax=1.0)
            title = f"head {h}"
            if lambdas is not None:
                title += f"  λ={lambdas[layer][h]:.3g}"
            ax.set_title(title, fontsize=9)
            ticks = range(len(tokens))
            ax.set_xticks(ticks, labels=tokens, fontsize=6, rotation=90)
            ax.set_yticks(ticks, labels=tokens, fontsize=6)
            ax.tick_params(length=0)
        if image is not None:
            fig.colorbar(image, ax=fig.axes, shrink=0.8, label="weight")
        path = out_dir / f"attention_layer{layer}.png"
        fig.savefig(path, dpi=110)
        paths.append(path)
    return paths


def plot_attended_distance(analysis: dict[str, Any], path: str | Path) -> Path:
    """Bars of mean attended distance per head, grouped by layer; whiskers: per-row spread."""
    layers = analysis["layers"]
    heads = max(len(layer["heads"]) for layer in layers)
    width = 0.8 / heads
    fig = _figure(max(6.0, 1.2 * len(layers) * max(1, heads / 4) + 2), 4.0)
    ax = fig.add_subplot(1, 1, 1)
    for h in range(heads):
        xs, means, spreads = [], [], []
        for i, layer in enumerate(layers):
            if h < len(layer["heads"]):
                stats = layer["heads"][h]
                xs.append(i - 0.4 + width * (h + 0.5))
                means.append(stats["distance_mean"])
                spreads.append(stats["distance_spread"])
        ax.bar(xs, means, width=width * 0.9, yerr=spreads, capsize=2, label=f"head {h}")
    ax.set_xticks(range(len(layers)), labels=[f"layer {layer['layer']}" for layer in layers])
    ax.set_ylabel("mean attended distance (tokens)")
    ax.set_title(
        f"mean attended distance Σ w·(i−j) over {analysis['num_samples']} × "
        f"{analysis['block_size']} tokens\nwhiskers: mean per-row spread",
        fontsize=10,
    )
    ax.grid(axis="y", alpha=0.3)
    fig.legend(loc="outside lower center", fontsize=7, ncols=min(heads, 8))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path
