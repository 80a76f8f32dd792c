"""Batches as users give them: a Hugging Face dict (`input_ids`, `labels`, optional
`attention_mask`; the model shifts the labels) or an `(x, y)` pair already shifted."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from truthgpt.core.inputs import check_token_ids

Batch = Mapping[str, Tensor] | tuple[Tensor, Tensor] | list[Tensor]


def split_batch(
    batch: Batch, device: torch.device, vocab_size: int | None = None
) -> tuple[Tensor, Tensor, Tensor | None, bool]:
    """(input_ids, labels, attention_mask, labels_already_shifted), checked, on `device`.

    With `vocab_size`, host-side ids bound for an accelerator are range-checked before the
    copy (the model checks CPU inputs itself, and cannot check device ones without a wait)."""
    if isinstance(batch, Mapping):
        if "input_ids" not in batch:
            raise ValueError("batch: a dict batch needs an 'input_ids' tensor")
        input_ids = batch["input_ids"]
        labels = batch.get("labels", input_ids)
        mask = batch.get("attention_mask")
        shifted = False
    elif isinstance(batch, tuple | list) and len(batch) == 2:
        input_ids, labels = batch
        mask, shifted = None, True
    else:
        raise ValueError(
            "batch: expected a dict with 'input_ids' (and 'labels') or an (x, y) tuple, "
            f"got {type(batch).__name__}"
        )
    for name, t in (("input_ids", input_ids), ("labels", labels)):
        if not isinstance(t, Tensor) or t.dim() != 2:
            raise ValueError(f"batch: {name} must be a (batch, length) tensor")
    if labels.shape != input_ids.shape:
        raise ValueError(
            f"batch: labels shape {tuple(labels.shape)} differs from input_ids "
            f"{tuple(input_ids.shape)}"
        )
    if vocab_size is not None and device.type != "cpu" and input_ids.device.type == "cpu":
        check_token_ids(input_ids, vocab_size)
    mask = mask.to(device, non_blocking=True) if mask is not None else None
    return (
        input_ids.to(device, non_blocking=True),
        labels.to(device, non_blocking=True),
        mask,
        shifted,
    )


def micro_batches(batch: Batch | Sequence[Batch], accum: int, device: torch.device) -> list[Batch]:
    """A list of micro-batches as given, or one batch cut into `accum` parts."""
    if isinstance(batch, list) and batch and not isinstance(batch[0], Tensor):
        return batch
    if accum == 1:
        return [batch]  # type: ignore[list-item]
    input_ids, labels, mask, shifted = split_batch(batch, device)  # type: ignore[arg-type]
    if input_ids.size(0) % accum:
        raise ValueError(
            f"batch: batch size {input_ids.size(0)} is not divisible by "
            f"gradient_accumulation_steps={accum}"
        )
    parts: list[Batch] = []
    for ids, lab, m in zip(
        input_ids.chunk(accum),
        labels.chunk(accum),
        mask.chunk(accum) if mask is not None else [None] * accum,
        strict=True,
    ):
        if shifted:
            parts.append((ids, lab))
        else:
            parts.append({"input_ids": ids, "labels": lab, "attention_mask": m})
    return parts


def input_shape(batch: Batch) -> torch.Size:
    """(B, T) of a batch `split_batch` already checked, read without checking it again."""
    return (batch["input_ids"] if isinstance(batch, Mapping) else batch[0]).shape
