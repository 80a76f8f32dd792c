"""Analysis of trained models: attention patterns on real text, and λ tuning.

patterns  `attention_statistics` (pure, over a weights tensor) and `analyze_attention`
plots     heat maps of a sample passage and attended distance per head (PNG)
report    the statistics as a plain or rich table
tuning    `tune_lambda`: fit only the per-head λ, keep them only if validation loss improves
"""

from truthgpt.analysis.patterns import (
    DEFINITIONS,
    analyze_attention,
    attention_statistics,
    layer_weights,
    summarize_heads,
    token_labels,
)
from truthgpt.analysis.plots import plot_attended_distance, plot_attention_heatmaps
from truthgpt.analysis.report import format_table, rich_table
from truthgpt.analysis.tuning import tune_lambda

__all__ = [
    "DEFINITIONS",
    "analyze_attention",
    "attention_statistics",
    "format_table",
    "layer_weights",
    "plot_attended_distance",
    "plot_attention_heatmaps",
    "rich_table",
    "summarize_heads",
    "token_labels",
    "tune_lambda",
]
