"""JSON as truthgpt writes and reads it: sorted, strict (no NaN), errors that name the file."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from truthgpt.config import is_int, is_number

__all__ = ["JSONFileError", "is_int", "is_number", "json_bytes", "json_safe", "parse_json"]


class JSONFileError(ValueError):
    """A file that should hold JSON does not."""


def json_bytes(obj: Any) -> bytes:
    """Indented, key-sorted UTF-8 JSON: files diff well and hash the same every time."""
    return (json.dumps(obj, indent=2, sort_keys=True) + "\n").encode("utf-8")


def parse_json(
    path: Path, data: bytes, error: type[ValueError] = JSONFileError, *, unique_keys: bool = False
) -> Any:
    """`data` (read from `path`) as JSON; raises `error` naming the file. Numbers of more
    digits than Python converts, and nesting deeper than its stack, are refused alike.
    `unique_keys`: a key twice in one object is refused too (where the last one silently
    winning would hide what the file holds, as in a safetensors header)."""
    hook = _unique_object if unique_keys else None
    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=hook)
    except _DuplicateKey as err:
        raise error(f"{path}: {err}") from None
    except (ValueError, RecursionError) as err:  # UnicodeDecodeError, JSONDecodeError among them
        raise error(f"{path}: not valid JSON ({err})") from None


class _DuplicateKey(Exception):
    pass


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _DuplicateKey(f"the name {twice!r} appears twice in one object")
    return obj


def json_safe(value: Any) -> Any:
    """Replace NaN/inf by None (strict JSON has neither), recursively."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    return value
