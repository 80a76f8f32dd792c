"""Checks of what users feed the model, made where the values are on the host."""

from __future__ import annotations

from torch import Tensor


def check_token_ids(input_ids: Tensor, vocab_size: int, name: str = "input_ids") -> None:
    """Raise, naming the first bad id, unless every id is in [0, vocab_size). Reads the
    tensor's values: call it on host tensors, where that costs no device round trip."""
    low, high = int(input_ids.min()), int(input_ids.max())
    if low < 0 or high >= vocab_size:
        bad = low if low < 0 else high
        raise ValueError(f"{name}: token id {bad} is outside the vocabulary [0, {vocab_size})")
