"""Attention statistics as a table: one row per layer × head, then each layer's mean."""

from __future__ import annotations

import textwrap
from typing import Any

# (heading, key in the statistics, format)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("λ", "lambda", "{:.4g}"),
    ("entropy", "entropy", "{:.3f}"),
    ("norm.ent", "entropy_normalized", "{:.3f}"),
    ("top-1", "top1_weight", "{:.3f}"),
    ("self", "self_weight", "{:.3f}"),
    ("dist", "distance_mean", "{:.2f}"),
    ("dist.sd", "distance_std", "{:.2f}"),
    ("spread", "distance_spread", "{:.2f}"),
)

LEGEND = (
    "entropy in nats; norm.ent = entropy / ln(visible keys), 1 = uniform; top-1 = mean largest "
    "weight of a row; self = weight on the token itself; dist = mean attended distance "
    "Σ w·(i−j) in tokens, dist.sd its std over rows, spread = mean per-row std of i−j"
)


def table_rows(analysis: dict[str, Any]) -> list[list[str]]:
    """The table body as strings: a row per head, then a 'mean' row per layer."""
    rows = []
    for layer in analysis["layers"]:
        for head in layer["heads"]:
            rows.append([str(layer["layer"]), str(head["head"]), *_cells(head)])
        rows.append([str(layer["layer"]), "mean", *_cells(layer["mean"])])
    return rows


def _cells(stats: dict[str, float]) -> list[str]:
    return [fmt.format(stats[key]) for _, key, fmt in COLUMNS]


def format_table(analysis: dict[str, Any]) -> str:
    """Plain-text table with aligned columns, for logs and non-terminal output."""
    header = ["layer", "head", *(name for name, _, _ in COLUMNS)]
    rows = table_rows(analysis)
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    lines = ["  ".join(cell.rjust(w) for cell, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    for row in rows:
        lines.append("  ".join(cell.rjust(w) for cell, w in zip(row, widths, strict=True)))
    return "\n".join([*lines, *textwrap.wrap(LEGEND, width=100)])


def rich_table(analysis: dict[str, Any]) -> Any:
    """The same table as a `rich.table.Table`, layer means in bold."""
    from rich.table import Table

    table = Table(
        title=f"attention on {analysis['num_samples']} × {analysis['block_size']} tokens "
        f"({analysis['source']}, {analysis['model']['distance_type']})",
        caption=LEGEND,
    )
    for name in ("layer", "head", *(name for name, _, _ in COLUMNS)):
        table.add_column(name, justify="right")
    for row in table_rows(analysis):
        is_mean = row[1] == "mean"
        table.add_row(*row, style="bold" if is_mean else None, end_section=is_mean)
    return table
