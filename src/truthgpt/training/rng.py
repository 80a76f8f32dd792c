"""Every random generator training draws from (Python, NumPy, torch CPU and CUDA), as plain
JSON, so that a resumed run draws what the uninterrupted one would have drawn."""

from __future__ import annotations

import base64
import math
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from truthgpt.io.jsonio import is_int, is_number
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


_MT_WORDS = 624  # words of a Mersenne Twister state (Python's and NumPy's generator)
_WORD = 2**32


def _words(values: Any, count: int, what: str) -> list[int]:
    if not (
        isinstance(values, list)
        and len(values) == count
        and all(is_int(v) and 0 <= v < _WORD for v in values)
    ):
        raise ValueError(f"{what} must be a list of {count} integers in [0, 2^32)")
    return values


def _position(value: Any, what: str) -> int:
    if not (is_int(value) and 0 <= value <= _MT_WORDS):
        raise ValueError(f"{what} must be an integer in [0, {_MT_WORDS}], got {value!r}")
    return value


def _python_state(saved: Any) -> tuple:
    """random.getstate() of version 3: 624 words, the position, the cached gauss (or None).
    Checked here: setstate truncates words past 32 bits and takes any gauss value."""
    if not (isinstance(saved, list) and len(saved) == 3):
        raise ValueError("python: expected [version, state, gauss]")
    version, internal, gauss = saved
    if version != 3 or not is_int(version):
        raise ValueError(f"python: version must be 3, got {version!r}")
    if not isinstance(internal, list) or not internal:
        raise ValueError("python: state must be a list")
    words = _words(internal[:-1], _MT_WORDS, "python: state")
    position = _position(internal[-1], "python: state position")
    if not (gauss is None or (isinstance(gauss, float) and math.isfinite(gauss))):
        raise ValueError(f"python: gauss must be a finite float or null, got {gauss!r}")
    state = (version, (*words, position), gauss)
    random.Random().setstate(state)  # what it checks too, without touching the global one
    return state


def _numpy_state(saved: Any) -> dict[str, Any]:
    """np.random.get_state(legacy=False) of MT19937, rebuilt from checked values only
    (set_state takes a position past the key, a has_gauss of 7, a NaN gauss)."""
    if not isinstance(saved, dict) or saved.get("bit_generator") != "MT19937":
        raise ValueError("numpy: expected the state of an MT19937 generator")
    inner = saved.get("state")
    if not isinstance(inner, dict):
        raise ValueError("numpy: 'state' must be an object")
    has_gauss, gauss = saved.get("has_gauss"), saved.get("gauss")
    if has_gauss not in (0, 1) or not is_int(has_gauss):
        raise ValueError(f"numpy: has_gauss must be 0 or 1, got {has_gauss!r}")
    if not (is_number(gauss) and math.isfinite(gauss)):
        raise ValueError(f"numpy: gauss must be a finite number, got {gauss!r}")
    state = {
        "bit_generator": "MT19937",
        "state": {
            "key": np.array(_words(inner.get("key"), _MT_WORDS, "numpy: key"), dtype=np.uint32),
            "pos": _position(inner.get("pos"), "numpy: pos"),
        },
        "has_gauss": has_gauss,
        "gauss": float(gauss),
    }
    np.random.RandomState().set_state(state)
    return state


def _torch_state(text: Any, current: torch.Tensor, what: str, device: str = "cpu") -> torch.Tensor:
    """A base64 torch generator state, of the size this torch writes, that a fresh generator
    accepts (it refuses e.g. a Mersenne Twister position out of range)."""
    state = _bytes_tensor(text)
    if state.numel() != current.numel():
        raise ValueError(f"{what} has {state.numel()} bytes, expected {current.numel()}")
    torch.Generator(device=device).set_state(state)
    return state


def parse_rng_state(rng: Any, path: Path) -> Callable[[], None]:
    """Check saved states fully, and return the function that installs them: installing can
    then not fail, after the rest of a checkpoint was applied."""
    try:
        if not isinstance(rng, dict):
            raise TypeError(f"expected an object, got {type(rng).__name__}")
        python_state = _python_state(rng.get("python"))
        numpy_state = _numpy_state(rng.get("numpy"))
        cpu = _torch_state(rng.get("torch_cpu"), torch.get_rng_state(), "torch_cpu")
        saved_cuda = rng.get("torch_cuda")
        if not (saved_cuda is None or isinstance(saved_cuda, list)):
            raise TypeError("torch_cuda must be a list or null")
        cuda = []
        if saved_cuda and torch.cuda.is_available():
            count = min(len(saved_cuda), torch.cuda.device_count())
            cuda = [
                _torch_state(s, torch.cuda.get_rng_state(i), f"torch_cuda[{i}]", f"cuda:{i}")
                for i, s in enumerate(saved_cuda[:count])
            ]
        else:
            for s in saved_cuda or []:
                _bytes_tensor(s)
    except (KeyError, TypeError, ValueError, IndexError, OverflowError, RuntimeError) as err:
        raise CheckpointError(f"{path}: 'rng' holds an invalid random state ({err!r})") from None

    def restore() -> None:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.set_rng_state(cpu)
        for index, state in enumerate(cuda):
            torch.cuda.set_rng_state(state, index)

    return restore
