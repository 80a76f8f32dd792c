"""Tensor files: what to write (CPU copies, tied tensors once) and whether what was read
fits what is expected (names, shapes, dtypes) before anything is copied anywhere."""

from __future__ import annotations

from pathlib import Path

import safetensors.torch
from torch import Tensor

from truthgpt.io.manifest import CheckpointError

_MAX_LISTED = 12  # tensor names listed in one error message


def cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: what safetensors can write."""
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's contents."""
    return safetensors.torch.save(cpu_tensors(tensors), {"format": "pt", **(metadata or {})})


def check_tensors(
    expected: dict[str, Tensor], got: dict[str, Tensor], path: Path, what: str = "the model"
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mismatched tensors.

    `expected` may hold meta tensors: only names, shapes and dtypes are compared."""
    problems = []

    def listed(label: str, items: list[str]) -> None:
        if items:
            more = f" … and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
            problems.append(f"{label} ({len(items)}): {', '.join(items[:_MAX_LISTED])}{more}")

    listed("missing", sorted(set(expected) - set(got)))
    listed("unexpected", sorted(set(got) - set(expected)))
    listed(
        "shape mismatch",
        [
            f"{n} {tuple(got[n].shape)} vs {tuple(t.shape)}"
            for n, t in expected.items()
            if n in got and got[n].shape != t.shape
        ],
    )
    listed(
        "dtype mismatch",
        [
            f"{n} {got[n].dtype} vs {t.dtype}"
            for n, t in expected.items()
            if n in got and got[n].shape == t.shape and got[n].dtype != t.dtype
        ],
    )
    if problems:
        raise CheckpointError(
            f"{path}: tensors do not fit {what} (file vs expected) — " + "; ".join(problems)
        )
