"""`TrainState`: the counters a run carries from step to step and from checkpoint to resume.

Checkpoints store `state_dict()` as trainer_state.json and restore it with
`TrainState.from_state_dict`, which checks every field, so a new counter is one line here
with a default (older checkpoints, which lack it, load with that default).
"""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from truthgpt.config import MAX_COUNT, in_range
from truthgpt.io.jsonio import is_int, is_number
from truthgpt.io.manifest import CheckpointError

# Bounds of the measured fields: a mean cross-entropy past MAX_LOSS, or a token longer than
# MAX_CHARS_PER_TOKEN characters on average, is not something a run measured.
MAX_LOSS = 1e6
MAX_CHARS_PER_TOKEN = 1e6
# What each field must hold: (check, description).
_FIELD_CHECKS: dict[str, tuple[Any, str]] = {
    "int": (lambda v: is_int(v) and 0 <= v <= MAX_COUNT, f"an integer in [0, {MAX_COUNT}]"),
    "best_val_loss": (
        lambda v: v is None or in_range(v, 0, MAX_LOSS),
        f"a number in [0, {MAX_LOSS:g}] or null",
    ),
    "chars_per_token": (
        lambda v: v is None or (in_range(v, 0, MAX_CHARS_PER_TOKEN) and v > 0),
        f"a number in (0, {MAX_CHARS_PER_TOKEN:g}] or null",
    ),
    "eval_history": (lambda v: isinstance(v, list), "a list of objects"),
}


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

    def load(self, other: TrainState) -> None:
        """Take the values of `other` (a checkpoint's, checked by `from_state_dict`) in
        place, so that whoever holds this object sees them (copies: `other` keeps its own)."""
        for f in dataclasses.fields(self):
            setattr(self, f.name, copy.deepcopy(getattr(other, f.name)))

    @classmethod
    def from_state_dict(cls, saved: dict[str, Any], path: Path) -> TrainState:
        """The state in `saved` (trainer_state.json at `path`), every field checked."""
        values: dict[str, Any] = {}
        for f in dataclasses.fields(cls):
            if f.name not in saved:
                continue  # written before the field existed: keep its default
            value = saved[f.name]
            check, want = _FIELD_CHECKS["int" if f.type == "int" else f.name]
            if not check(value):
                raise CheckpointError(f"{path}: '{f.name}' must be {want}, got {value!r}")
            values[f.name] = value
        state = cls(**values)
        if state.bad_steps_in_a_row > state.bad_steps_total:
            raise CheckpointError(
                f"{path}: 'bad_steps_in_a_row' ({state.bad_steps_in_a_row}) exceeds "
                f"'bad_steps_total' ({state.bad_steps_total})"
            )
        if state.bad_steps_total > state.step:  # a skipped update is a step too
            raise CheckpointError(
                f"{path}: 'bad_steps_total' ({state.bad_steps_total}) exceeds 'step' ({state.step})"
            )
        for i, entry in enumerate(state.eval_history):
            _check_eval(entry, state.step, f"{path}: 'eval_history'[{i}]")
        return state


def _check_eval(entry: Any, step: int, where: str) -> None:
    """One recorded evaluation: measurements by name (kept as measured, NaN included), at a
    step of the run so far (the loop reads it back as an int)."""
    if not isinstance(entry, dict):
        raise CheckpointError(f"{where} must be an object, got {entry!r}")
    for key in ("step", "loss"):
        if key not in entry:
            raise CheckpointError(f"{where} has no '{key}'")
    for key, value in entry.items():
        if not is_number(value):
            raise CheckpointError(f"{where} '{key}' must be a number, got {value!r}")
    at = entry["step"]
    if not (in_range(at, 0, step) and at == int(at)):
        raise CheckpointError(f"{where} 'step' must be a whole number in [0, {step}], got {at!r}")
