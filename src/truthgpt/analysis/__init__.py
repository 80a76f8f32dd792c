"""Analysis of trained models: attention patterns on real text, and λ tuning.

patterns  `attention_statistics` (pure, over a weights tensor) and `analyze_attention`
tuning    `tune_lambda`: fit only the per-head λ, keep them only if validation loss improves

It sits below training because the original API's trainer offers both
(`analyze_attention_patterns`, `optimize_attention_parameters`); the figures and tables
built from its results are in `truthgpt.workflows.plots` and `truthgpt.workflows.report`.
"""

from truthgpt.analysis.patterns import (
    DEFINITIONS,
    analyze_attention,
    attention_statistics,
    layer_weights,
    summarize_heads,
    token_labels,
)
from truthgpt.analysis.tuning import tune_lambda

__all__ = [
    "DEFINITIONS",
    "analyze_attention",
    "attention_statistics",
    "layer_weights",
    "summarize_heads",
    "token_labels",
    "tune_lambda",
]
