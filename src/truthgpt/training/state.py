"""`TrainState`: the counters a run carries from step to step and from checkpoint to resume.

Checkpoints store `state_dict()` as trainer_state.json and restore it with
`TrainState.from_state_dict`, which checks every field, so a new counter is one line here
with a default (older checkpoints, which lack it, load with that default).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from truthgpt.io.jsonio import is_int, is_number
from truthgpt.io.manifest import CheckpointError

# Counters above this are not counts of anything a run did (2^53: exact as a JSON number).
MAX_COUNT = 2**53


@dataclass
class TrainState:
    step: int = 0  # optimiser updates applied so far; also the data position (batches are a
    # function of seed, rank and step)
    tokens_seen: int = 0
    best_val_loss: float | None = None
    bad_steps_total: int = 0  # steps skipped for a non-finite loss or gradient
    bad_steps_in_a_row: int = 0
    chars_per_token: float | None = None  # of the validation text, for bits per character
    eval_history: list[dict[str, float]] = field(default_factory=list)

    def state_dict(self) -> dict[str, Any]:
        # sampler_position: written for readers of format 1, which expect it.
        return {**dataclasses.asdict(self), "sampler_position": self.step}

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], path: Path) -> TrainState:
        """The state in `saved` (trainer_state.json at `path`), every field checked."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in saved:
                continue  # written before the field existed: keep its default
            value = saved[f.name]
            if f.type == "int":
                ok = is_int(value) and 0 <= value <= MAX_COUNT
                want = f"an integer in [0, {MAX_COUNT}]"
            elif f.type == "float | None":
                ok = value is None or (is_number(value) and math.isfinite(value))
                want = "a finite number or null"
            else:
                ok = isinstance(value, list) and all(isinstance(v, dict) for v in value)
                want = "a list of objects"
            if not ok:
                raise CheckpointError(f"{path}: '{f.name}' must be {want}, got {value!r}")
            values[f.name] = value
        state = cls(**values)
        if state.chars_per_token is not None and not state.chars_per_token > 0:
            raise CheckpointError(
                f"{path}: 'chars_per_token' must be positive, got {state.chars_per_token!r}"
            )
        if state.bad_steps_in_a_row > state.bad_steps_total:
            raise CheckpointError(
                f"{path}: 'bad_steps_in_a_row' ({state.bad_steps_in_a_row}) exceeds "
                f"'bad_steps_total' ({state.bad_steps_total})"
            )
        return state
