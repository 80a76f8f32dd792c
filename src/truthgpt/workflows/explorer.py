"""`attention.html`: one self-contained page to explore attention on a sample passage.

The page shows the passage as tokens; hovering (or clicking, to pin) a token shows what it
attends to in the chosen layer and head, as colour over the text and as a heat map, next to
small charts of every head's λ, entropy and attended distance. Several models given together
(the demo's l1 and dot) share one passage and one selection, side by side.

Everything is inlined (script, style, data) and the page forbids itself any network access
(Content-Security-Policy `default-src 'none'`), so it opens anywhere, offline, at once. The
script and style live beside this module (`explorer.js`, `explorer.css`) to stay readable.

Weights are embedded per head as the lower triangle of its (T, T) matrix (row i holds keys
0..i; the rest is causally masked), as little-endian uint16 units of 1/65535 in base64: 2.7
bytes a weight instead of ~8 as decimals, exact to 8e-6. `decode_weights` reads them back.
"""

from __future__ import annotations

import base64
import html
import json
from collections.abc import Mapping, Sequence
from importlib import resources
from typing import Any

import numpy as np

from truthgpt.io import json_safe

SCALE = 65535  # a weight w is stored as round(w · SCALE) in a uint16
DATA_ID = "explorer-data"  # id of the <script type="application/json"> holding the data
# The page may run its own inline script and style and nothing else: no request leaves it.
CSP = "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; img-src data:"


def _asset(name: str) -> str:
    return resources.files("truthgpt.workflows").joinpath(name).read_text(encoding="utf-8")


def _as_array(weights: Any) -> np.ndarray:
    """A (H, T, T) float64 array from a tensor or array."""
    if hasattr(weights, "detach"):  # a torch tensor, on any device
        weights = weights.detach().float().cpu().numpy()
    return np.asarray(weights, dtype=np.float64)


def encode_weights(matrix: np.ndarray) -> str:
    """The lower triangle of one head's (T, T) weights, row by row, as base64 uint16."""
    rows, cols = np.tril_indices(matrix.shape[0])
    units = np.rint(np.clip(matrix[rows, cols], 0.0, 1.0) * SCALE).astype("<u2")
    return base64.b64encode(units.tobytes()).decode("ascii")


def decode_weights(text: str, T: int) -> np.ndarray:
    """The (T, T) matrix `encode_weights` stored (zeros above the diagonal)."""
    units = np.frombuffer(base64.b64decode(text), dtype="<u2")
    if len(units) != T * (T + 1) // 2:
        raise ValueError(f"weights: {len(units)} values, expected {T * (T + 1) // 2} for T={T}")
    matrix = np.zeros((T, T))
    matrix[np.tril_indices(T)] = units / SCALE
    return matrix


def _model_entry(name: str, analysis: Mapping[str, Any], weights: Sequence[Any]) -> dict[str, Any]:
    layers = analysis["layers"]
    T = len(analysis["sample"]["token_ids"])
    if len(weights) != len(layers):
        raise ValueError(
            f"weights: {name} has {len(layers)} layers in its analysis but {len(weights)} "
            "weight tensors"
        )
    encoded = []
    for layer, w in zip(layers, weights, strict=True):
        w = _as_array(w)
        heads = len(layer["heads"])
        if w.shape != (heads, T, T):
            raise ValueError(
                f"weights: {name} layer {layer['layer']} should be ({heads}, {T}, {T}) for "
                f"{heads} heads and {T} tokens, got {w.shape}"
            )
        encoded.append([encode_weights(w[h]) for h in range(heads)])
    model = analysis.get("model", {})
    return {
        "name": name,
        "distance_type": model.get("distance_type"),
        "num_parameters": model.get("num_parameters"),
        "step": analysis.get("step"),
        "run": analysis.get("run"),
        "source": analysis.get("source"),
        "num_samples": analysis.get("num_samples"),
        "block_size": analysis.get("block_size"),
        "layers": [{"heads": layer["heads"], "mean": layer.get("mean")} for layer in layers],
        "weights": encoded,
    }


def explorer_data(
    analyses: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, Sequence[Any]],
    *,
    title: str = "truthgpt attention explorer",
) -> dict[str, Any]:
    """The page's data: the shared passage, and per model its head statistics and weights.

    `analyses` maps a model's name to its `analyze_attention` result; `weights` maps the same
    names to one (H, T, T) tensor per layer for the result's sample passage.
    """
    if not analyses:
        raise ValueError("analyses: need at least one model")
    if set(analyses) != set(weights):
        raise ValueError(
            f"weights: models {sorted(weights)} do not match the analyses {sorted(analyses)}"
        )
    first = next(iter(analyses.values()))["sample"]
    for name, analysis in analyses.items():
        if analysis["sample"]["token_ids"] != first["token_ids"]:
            raise ValueError(
                f"analyses: {name} was sampled on another passage; models shown side by side "
                "need the same sample (same data, num_samples and block_size)"
            )
    ids = first["token_ids"]
    return json_safe(
        {
            "title": title,
            "scale": SCALE,
            "token_ids": ids,
            "pieces": first.get("pieces", first["tokens"]),
            "labels": first["tokens"],
            "definitions": _definitions(analyses),
            "models": [_model_entry(n, a, weights[n]) for n, a in analyses.items()],
        }
    )


def _definitions(analyses: Mapping[str, Mapping[str, Any]]) -> dict[str, str]:
    """The statistics' definitions (the same in every analysis), for the charts' tooltips."""
    definitions = next(iter(analyses.values())).get("definitions", {})
    keys = ("lambda", "entropy", "entropy_normalized", "top1_weight", "distance_mean")
    return {k: definitions[k] for k in keys if k in definitions}


def _script_json(value: Any) -> str:
    """JSON safe inside <script>: no '<', '>' or '&' can close the element or open a comment."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    for char, escape in (("<", "\\u003c"), (">", "\\u003e"), ("&", "\\u0026")):
        text = text.replace(char, escape)
    # U+2028/2029 are valid in JSON strings but were line ends to old JavaScript parsers.
    return text.replace("\u2028", "\\u2028").replace("\u2029", "\\u2029")


def explorer_html(
    analyses: Mapping[str, Mapping[str, Any]],
    weights: Mapping[str, Sequence[Any]],
    *,
    title: str = "truthgpt attention explorer",
) -> str:
    """The whole page as one string; see `explorer_data` for the arguments."""
    data = explorer_data(analyses, weights, title=title)
    kinds = ", ".join(str(m["distance_type"] or m["name"]) for m in data["models"])
    return f"""<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="{CSP}">
<meta name="viewport" content="width=device-width, initial-scale=1">
<link rel="icon" href="data:,">
<title>{html.escape(title)} ({html.escape(kinds)})</title>
<style>
{_asset("explorer.css")}</style>
</head>
<body>
<noscript>This page draws everything with JavaScript; please enable it.</noscript>
<script type="application/json" id="{DATA_ID}">{_script_json(data)}</script>
<script>
{_asset("explorer.js")}</script>
</body>
</html>
"""


def read_explorer_data(page: str) -> dict[str, Any]:
    """The data embedded in a page `explorer_html` wrote (for tests and other tools)."""
    start_tag = f'<script type="application/json" id="{DATA_ID}">'
    start = page.index(start_tag) + len(start_tag)
    return json.loads(page[start : page.index("</script>", start)])
