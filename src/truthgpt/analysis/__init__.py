"""Analysis of trained models: attention patterns on real text.

patterns  `attention_statistics` (pure, over a weights tensor) and `analyze_attention`

It sits below training because the original API's trainer offers it
(`analyze_attention_patterns`); the figures and tables built from its results are in
`truthgpt.workflows.plots` and `truthgpt.workflows.report`. λ tuning, which drives a
trainer, lives with the trainer: `truthgpt.training.tune_lambda`.
"""

from typing import Any

from truthgpt.analysis.patterns import (
    DEFINITIONS,
    analyze_attention,
    attention_statistics,
    layer_weights,
    summarize_heads,
    token_labels,
)


def __getattr__(name: str) -> Any:
    """`truthgpt.analysis.tune_lambda`, release 0.1's path: forwarded with a warning."""
    if name != "tune_lambda":
        raise AttributeError(f"module 'truthgpt.analysis' has no attribute {name!r}")
    from truthgpt._moved import warn_moved
    from truthgpt.training.tuning import tune_lambda

    warn_moved("truthgpt.analysis.tune_lambda", "truthgpt.training.tune_lambda")
    return tune_lambda


__all__ = [
    "DEFINITIONS",
    "analyze_attention",
    "attention_statistics",
    "layer_weights",
    "summarize_heads",
    "token_labels",
]
