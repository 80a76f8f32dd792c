"""The original design's performance report: averages and totals over a trainer's steps."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from truthgpt.training.core import TruthGPTOptimizationCore


def performance_report(core: TruthGPTOptimizationCore) -> dict[str, Any]:
    """Averages and totals over every `train_step` so far, plus model facts."""
    model = core.raw_model
    n_params = model.num_parameters()
    ran = [m for m in core.history if not m["skipped"]]
    # The first steps include one-off costs (allocation, kernel compilation).
    steady = ran[1:] if len(ran) > 1 else ran

    def mean(key: str, rows: list[dict[str, float]]) -> float | None:
        values = [r[key] for r in rows if math.isfinite(r[key])]
        return sum(values) / len(values) if values else None

    return {
        "distance_type": core.config.distance_type,
        "num_parameters": n_params,
        "model_size_mb": sum(
            p.numel() * p.element_size() for p in {id(p): p for p in model.parameters()}.values()
        )
        / 2**20,
        "init_time_s": core.init_time_s,
        "steps": core.step,
        "skipped_steps": core.state.bad_steps_total,
        "tokens_seen": core.tokens_seen,
        "total_train_time_s": sum(m["step_time_s"] for m in core.history),
        "avg_step_time_s": mean("step_time_s", steady),
        "avg_tokens_per_s": mean("tokens_per_s", steady),
        "avg_mfu": mean("mfu", steady),
        "avg_memory_mb": mean("memory_mb", core.history),
        "peak_memory_mb": max((m["memory_mb"] for m in core.history), default=None),
        "first_loss": ran[0]["loss"] if ran else None,
        "last_loss": ran[-1]["loss"] if ran else None,
        "avg_loss_last_50": mean("loss", ran[-50:]),
        "best_val_loss": core.best_val_loss,
        "last_eval": core.eval_history[-1] if core.eval_history else None,
        "device": str(core.device),
        "precision": core.config.precision,
    }
