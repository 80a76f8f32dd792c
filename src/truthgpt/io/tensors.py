"""Tensor files: what to write (CPU copies, tied tensors once) and whether what was read
fits what is expected (names, shapes, dtypes, finite values) before anything is copied
anywhere. A file's header alone says what it holds (`read_header`), so a loader can refuse a
file that does not fit before it allocates the model the file is meant for."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, NamedTuple

import safetensors.torch
import torch
from torch import Tensor

from truthgpt.io.jsonio import is_int, parse_json
from truthgpt.io.manifest import CheckpointError, FolderReader

_MAX_LISTED = 12  # tensor names listed in one error message
MAX_HEADER_BYTES = 100 * 2**20  # safetensors' own limit on the JSON header
# safetensors' names of the dtypes torch has.
DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "U16": torch.uint16,
    "I32": torch.int32,
    "U32": torch.uint32,
    "I64": torch.int64,
    "U64": torch.uint64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}


class TensorSpec(NamedTuple):
    """What a tensor is, without its data: enough for `check_tensors`."""

    shape: tuple[int, ...]
    dtype: torch.dtype


def read_header(reader: FolderReader, name: str) -> dict[str, TensorSpec]:
    """The tensors a listed safetensors file holds, from its header alone (the first 8 bytes
    give its length): the data is neither read nor allocated. Every entry is checked to
    describe exactly the bytes that follow, as safetensors lays them out. A header that is
    not one, in a file that differs from what was saved, is reported as the corruption."""
    path = reader.path(name)
    size = reader.size(name)
    try:
        with path.open("rb") as f:
            prefix = f.read(8)
            length = int.from_bytes(prefix, "little") if len(prefix) == 8 else 0
            if not 0 < length <= min(size - 8, MAX_HEADER_BYTES):
                raise CheckpointError(
                    f"{path}: not a readable safetensors file (a header of {length} bytes in a "
                    f"file of {size})"
                )
            try:
                header = parse_json(path, f.read(length), CheckpointError, unique_keys=True)
            except CheckpointError as err:
                reason = str(err).removeprefix(f"{path}: ")
                raise CheckpointError(
                    f"{path}: not a readable safetensors file ({reason})"
                ) from None
        return _parse_header(header, size - 8 - length, path)
    except CheckpointError:
        reader.bytes(name)  # raises if the file is not the one saved: corrupt, not crafted
        raise


def _parse_header(header: Any, data_size: int, path: Path) -> dict[str, TensorSpec]:
    def bad(message: str) -> CheckpointError:
        return CheckpointError(f"{path}: not a readable safetensors file ({message})")

    if not isinstance(header, dict):
        raise bad("the header is not a JSON object")
    metadata = header.get("__metadata__", {})
    if not (isinstance(metadata, dict) and all(isinstance(v, str) for v in metadata.values())):
        raise bad("'__metadata__' must map names to strings")
    specs: dict[str, TensorSpec] = {}
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        if not (isinstance(entry, dict) and set(entry) == {"dtype", "shape", "data_offsets"}):
            raise bad(f"entry {name!r} must hold exactly dtype, shape and data_offsets")
        dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
        if not (isinstance(dtype, str) and dtype in DTYPES):
            raise bad(f"{name!r} has an unknown dtype {dtype!r}")
        if not (isinstance(shape, list) and all(is_int(d) and d >= 0 for d in shape)):
            raise bad(f"{name!r} has an invalid shape {shape!r}")
        if not (
            isinstance(offsets, list)
            and len(offsets) == 2
            and all(is_int(o) for o in offsets)
            and 0 <= offsets[0] <= offsets[1] <= data_size
        ):
            raise bad(f"{name!r} has invalid data_offsets {offsets!r}")
        nbytes = math.prod(shape) * DTYPES[dtype].itemsize
        if offsets[1] - offsets[0] != nbytes:
            raise bad(
                f"{name!r} of shape {shape} and dtype {dtype} takes {nbytes} bytes, but its "
                f"data_offsets {offsets} span {offsets[1] - offsets[0]}"
            )
        specs[name] = TensorSpec(tuple(shape), DTYPES[dtype])
        spans.append((offsets[0], offsets[1]))
    end = 0
    for start, stop in sorted(spans):
        if start != end:
            raise bad(f"the tensors' data overlap or leave a gap at byte {end}")
        end = stop
    if end != data_size:
        raise bad(f"the tensors take {end} bytes, but {data_size} follow the header")
    return specs


def check_finite(tensors: dict[str, Tensor], path: Path) -> None:
    """Raise naming the first floating-point tensor that holds a NaN or an infinity: nothing
    a run saves does (a non-finite update is never applied)."""
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise CheckpointError(f"{path}: tensor {name!r} holds non-finite values (NaN or inf)")


def cpu_tensors(tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Detached, contiguous CPU copies: what safetensors can write."""
    return {name: t.detach().to("cpu").contiguous() for name, t in tensors.items()}


def tensor_bytes(tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """A safetensors file's contents."""
    return safetensors.torch.save(cpu_tensors(tensors), {"format": "pt", **(metadata or {})})


def check_tensors(
    expected: dict[str, Tensor] | dict[str, TensorSpec],
    got: dict[str, Tensor] | dict[str, TensorSpec],
    path: Path,
    what: str = "the model",
) -> None:
    """Raise a CheckpointError listing missing, unexpected and mismatched tensors.

    Only names, shapes and dtypes are compared: `expected` and `got` may hold meta tensors
    or `TensorSpec`s."""
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
