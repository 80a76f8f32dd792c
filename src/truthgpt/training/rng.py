"""Every random generator training draws from (Python, NumPy, torch CPU and CUDA), as plain
JSON, so that a resumed run draws what the uninterrupted one would have drawn."""

from __future__ import annotations

import base64
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from truthgpt.io.manifest import CheckpointError


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _bytes_tensor(text: Any) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text, validate=True)), dtype=torch.uint8)


def rng_state(device: torch.device) -> dict[str, Any]:
    """The state of every generator, as JSON values."""
    np_state = np.random.get_state(legacy=False)
    np_state["state"]["key"] = np_state["state"]["key"].tolist()
    version, internal, gauss = random.getstate()
    state: dict[str, Any] = {
        "python": [version, list(internal), gauss],
        "numpy": np_state,
        "torch_cpu": _b64(torch.get_rng_state().numpy().tobytes()),
        "torch_cuda": None,
    }
    if device.type == "cuda":
        state["torch_cuda"] = [_b64(s.numpy().tobytes()) for s in torch.cuda.get_rng_state_all()]
    return state


def parse_rng_state(rng: Any, path: Path) -> Callable[[], None]:
    """Check saved states fully, and return the function that installs them."""
    try:
        version, internal, gauss = rng["python"]
        python_state = (version, tuple(internal), gauss)
        random.Random().setstate(python_state)  # validates without touching the global one
        np.random.RandomState().set_state(rng["numpy"])
        cpu = _bytes_tensor(rng["torch_cpu"])
        if cpu.numel() != torch.get_rng_state().numel():
            raise ValueError(f"torch CPU state has {cpu.numel()} bytes")
        cuda = [_bytes_tensor(s) for s in rng.get("torch_cuda") or []]
    except (KeyError, TypeError, ValueError, IndexError, OverflowError) as err:
        raise CheckpointError(f"{path}: 'rng' holds an invalid random state ({err!r})") from None

    def restore() -> None:
        random.setstate(python_state)
        np.random.set_state(rng["numpy"])
        torch.set_rng_state(cpu)
        if cuda and torch.cuda.is_available():
            for index, state in enumerate(cuda[: torch.cuda.device_count()]):
                torch.cuda.set_rng_state(state, index)

    return restore
