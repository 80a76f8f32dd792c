"""How the checkpoint fuzzer (`test_checkpoint_fuzz.py`) damages a copy of a checkpoint.

`cases(rng, good)` lists (label, damage) pairs drawn from `rng` alone; a damage edits a copy
in place and returns the JSON path it edited (or None), so that the error can be checked to
name the field.
"""

from __future__ import annotations

import base64
import copy
import hashlib
import json
import math
import random
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

MANIFEST = "manifest.json"
FILES = [
    "config.json",
    "model.safetensors",
    "optimizer.safetensors",
    "trainer_state.json",
    "tokenizer.json",
    MANIFEST,
]
SAFETENSORS = ["model.safetensors", "optimizer.safetensors"]
JSON_FILES = ["config.json", "trainer_state.json", "tokenizer.json"]
# Values no field accepts (except where `bad_values` says otherwise).
BAD_VALUES: list[Any] = [2**63, -(2**63), 2**64, 10**400, 1e300, -1, -1.5, math.nan, math.inf]
BAD_VALUES += [-math.inf, "x", "", [], {}, [1, 2, 3], None, True, False]
NULLABLE = {"lambda_param", "p_norm", "intermediate_size", "lr_decay_steps", "eval_batches"}
NULLABLE |= {"peak_flops", "best_val_loss", "chars_per_token", "scaler", "torch_cuda"}
NULLABLE |= {"unk_token", "foreach", "fused"}
NOT_JSON = [
    ("nothing", b""),
    ("not JSON", b"{model: 1"),
    ("a list", b"[]"),
    ("null", b"null"),
    ("a 5000-digit number", b"1" * 5000),
    ("nesting 100000 deep", b"[" * 100000 + b"]" * 100000),
    ("invalid UTF-8", b'{"a": "\xff\xfe"}'),
    ("a byte-order mark", b'\xef\xbb\xbf{"format": "truthgpt-checkpoint"}'),
]
# An outside audit's findings, always among the cases. The sizes within the configs' limits
# must be refused by the weights' shapes before the model they describe is allocated.
AUDIT: list[tuple[str, tuple, Any]] = [
    ("config.json", ("model", "num_hidden_layers"), 2**63),
    ("config.json", ("model", "vocab_size"), 2**63),
    ("config.json", ("model", "num_hidden_layers"), 1024),
    ("config.json", ("model", "vocab_size"), 2**24),
    ("config.json", ("model", "hidden_size"), 2**16),
    ("config.json", ("model", "intermediate_size"), 2**18),
    ("config.json", ("model", "max_position_embeddings"), 2**20),
    ("trainer_state.json", ("step",), 2**63),
    ("trainer_state.json", ("tokens_seen",), 1e30),
    ("trainer_state.json", ("best_val_loss",), math.nan),
    ("trainer_state.json", ("chars_per_token",), -3),
    ("trainer_state.json", ("chars_per_token",), math.nan),
    ("trainer_state.json", ("chars_per_token",), 0),
    ("trainer_state.json", ("rng", "python", 1, 0), 2**40),
    ("trainer_state.json", ("rng", "numpy", "state", "pos"), 700),
    ("trainer_state.json", ("rng", "numpy", "state", "key"), [1]),
    ("optimizer.safetensors", ("param_groups", 0, "lr"), 1e300),
    ("optimizer.safetensors", ("param_groups", 0, "betas"), [5, -2]),
]

Damage = Callable[[Path], list | None]


def cases(rng: random.Random, good: Path) -> list[tuple[str, Damage]]:
    """Every case; the same `rng` seed gives the same cases."""
    out: list[tuple[str, Damage]] = [("unchanged", lambda folder: None)]
    out += [(f"{name} reformatted", reformat(name)) for name in JSON_FILES]
    out += [(f"{n}: {'.'.join(map(str, p))} = {v!r}", set_field(n, p, v)) for n, p, v in AUDIT]
    sizes = {name: (good / name).stat().st_size for name in FILES}
    for _ in range(40):
        name = rng.choice(FILES)
        cut = rng.randrange(sizes[name])
        out.append((f"{name} truncated at {cut}", raw(name, lambda d, c=cut: d[:c])))
    for _ in range(60):
        name = rng.choice(FILES)
        at, bit = rng.randrange(sizes[name]), rng.randrange(8)
        out.append((f"{name} byte {at} bit {bit} flipped", raw(name, flip(at, bit))))
    for _ in range(10):
        name, extra = rng.choice(FILES), rng.randbytes(rng.randrange(1, 64))
        out.append((f"{name} + {len(extra)} bytes", raw(name, lambda d, e=extra: d + e)))
    out += [(f"{name} deleted", delete(name)) for name in FILES]
    for _ in range(20):
        name = rng.choice(FILES[:-1])
        cut = rng.randrange(sizes[name])
        out.append(
            (f"{name} truncated at {cut}, re-hashed", raw(name, lambda d, c=cut: d[:c], True))
        )
    for name, count in zip(SAFETENSORS, (30, 20), strict=True):
        for _ in range(count):
            at, bit = header_position(rng, good / name), rng.randrange(8)
            label = f"{name} header byte {at} bit {bit} flipped, re-hashed"
            out.append((label, raw(name, flip(at, bit), True)))
    out += [header_edit(rng, good) for _ in range(60)]
    out += [value_edit(rng, good) for _ in range(30)]
    for name, count in zip([*JSON_FILES, "optimizer.safetensors"], (45, 50, 15, 35), strict=True):
        out += [json_edit(rng, good, name) for _ in range(count)]
    out += [json_edit(rng, good, MANIFEST) for _ in range(20)]
    for _ in range(20):
        name, (label, text) = rng.choice(JSON_FILES), rng.choice(NOT_JSON)
        out.append((f"{name} holds {label}, re-hashed", raw(name, lambda d, t=text: t, True)))
    for size in (5056, 5055, 5057, 16, 0):
        value = base64.b64encode(rng.randbytes(size)).decode()
        label = f"trainer_state.json: rng.torch_cpu = {size} random bytes"
        out.append((label, set_field("trainer_state.json", ("rng", "torch_cpu"), value)))
    return out


# ------------------------------------------------------------------------------ whole files


def rehash(folder: Path) -> None:
    """Rewrite the manifest to match the files, so the checks behind it are reached."""
    manifest = json.loads((folder / MANIFEST).read_text())
    for name in manifest["files"]:
        if (folder / name).exists():
            data = (folder / name).read_bytes()
            digest = hashlib.sha256(data).hexdigest()
            manifest["files"][name] = {"size": len(data), "sha256": digest}
    (folder / MANIFEST).write_text(json.dumps(manifest))


def raw(name: str, edit: Callable[[bytes], bytes], rehashed: bool = False) -> Damage:
    def damage(folder: Path) -> None:
        (folder / name).write_bytes(edit((folder / name).read_bytes()))
        if rehashed and name != MANIFEST:
            rehash(folder)

    return damage


def flip(at: int, bit: int) -> Callable[[bytes], bytes]:
    def edit(data: bytes) -> bytes:
        out = bytearray(data)
        out[at] ^= 1 << bit
        return bytes(out)

    return edit


def delete(name: str) -> Damage:
    def damage(folder: Path) -> None:
        (folder / name).unlink()

    return damage


def reformat(name: str) -> Damage:
    """The same JSON, written differently: harmless."""

    def damage(folder: Path) -> None:
        path = folder / name
        path.write_text(json.dumps(json.loads(path.read_text()), indent=5, ensure_ascii=True))
        rehash(folder)

    return damage


# ------------------------------------------------------------------------------ safetensors


def split(data: bytes) -> tuple[dict, bytes]:
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8 : 8 + n]), data[8 + n :]


def join(header: Any, body: bytes) -> bytes:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    return len(text).to_bytes(8, "little") + text + body


def header_position(rng: random.Random, path: Path) -> int:
    """A byte of the size prefix or the header, outside the optimizer's metadata (whose
    numbers a flip can turn into other valid hyper-parameters)."""
    data = path.read_bytes()
    end = 8 + int.from_bytes(data[:8], "little")
    text = data[:end].decode("latin-1")
    key = text.find('"__metadata__":')
    if "optimizer" in path.name and key >= 0:
        start = key + len('"__metadata__":')
        _, stop = json.JSONDecoder().raw_decode(text, start)
        return rng.choice([i for i in range(end) if not start <= i < stop])
    return rng.randrange(end)


HeaderEdit = Callable[[dict, bytes], tuple[Any, bytes]]  # (header, body) -> (header, body)


def safetensors_edit(name: str, edit: HeaderEdit) -> Damage:
    """`edit` applied to a file's header and data; a header of None: the body is the file."""

    def damage(folder: Path) -> None:
        header, body = split((folder / name).read_bytes())
        header, body = edit(header, body)
        (folder / name).write_bytes(body if header is None else join(header, body))
        rehash(folder)

    return damage


def header_edit(rng: random.Random, good: Path) -> tuple[str, Damage]:
    name = rng.choice(SAFETENSORS)
    header, _ = split((good / name).read_bytes())
    tensor = rng.choice(sorted(k for k in header if k != "__metadata__"))
    entry = header[tensor]
    start, end = entry["data_offsets"]
    edits: dict[str, HeaderEdit] = {}
    for shape in ([2**63], [2**40, 2**40], [-1], ["x"], [], [*entry["shape"], 1], [0]):
        edits[f"{tensor} shape {shape}"] = _set(tensor, "shape", shape)
    edits[f"{tensor} shape reversed"] = _set(tensor, "shape", entry["shape"][::-1])
    for dtype in ("F16", "F64", "BF16", "I32", "U32", "BOOL", "XX", 5, None):
        edits[f"{tensor} dtype {dtype}"] = _set(tensor, "dtype", dtype)
    for offsets in ([0, 2**63], [-1, end], [end, start], [start + 4, end + 4], ["a", 1], [0]):
        edits[f"{tensor} data_offsets {offsets}"] = _set(tensor, "data_offsets", offsets)
    edits[f"{tensor} has a key 'foo'"] = _set(tensor, "foo", 1)
    edits[f"{tensor} removed"] = lambda h, b: ({k: v for k, v in h.items() if k != tensor}, b)
    edits[f"{tensor} renamed"] = lambda h, b: (
        {(k + "x" if k == tensor else k): h[k] for k in h},
        b,
    )
    edits["an extra empty tensor"] = lambda h, b: (
        {**h, "extra": {"dtype": "F32", "shape": [0], "data_offsets": [len(b), len(b)]}},
        b,
    )
    for meta in (5, {"format": 5}, "x", None):
        edits[f"__metadata__ {meta}"] = lambda h, b, m=meta: ({**h, "__metadata__": m}, b)
    edits["no __metadata__"] = lambda h, b: ({k: v for k, v in h.items() if k != "__metadata__"}, b)
    for label, text in NOT_JSON:
        edits[f"a header of {label}"] = lambda h, b, t=text: (None, _prefixed(t) + b)
    size = len(join(header, b""))
    for length in (0, 2**63, 2**64 - 1, size - 7, size - 9, 2**27):
        edits[f"header length {length}"] = lambda h, b, n=length: (
            None,
            n.to_bytes(8, "little") + join(h, b)[8:],
        )
    label = rng.choice(sorted(edits))
    return f"{name}: {label}, re-hashed", safetensors_edit(name, edits[label])


def _prefixed(text: bytes) -> bytes:
    return len(text).to_bytes(8, "little") + text


def _set(tensor: str, key: str, value: Any) -> HeaderEdit:
    def edit(header: dict, body: bytes) -> tuple[Any, bytes]:
        header = copy.deepcopy(header)
        header[tensor][key] = value
        return header, body

    return edit


def value_edit(rng: random.Random, good: Path) -> tuple[str, Damage]:
    """One float32 value of a tensor set to one no run saves."""
    name = rng.choice(SAFETENSORS)
    header, _ = split((good / name).read_bytes())
    tensor = rng.choice(sorted(k for k in header if k != "__metadata__"))
    values = [math.nan, math.inf, -math.inf]
    if tensor.endswith("exp_avg_sq"):
        values.append(-1.0)
    if tensor.endswith(".step"):  # the run took 3 steps
        values += [-1.0, 0.5, 4.0, 1e30, 2.0**40]
    value = rng.choice(values)
    start, end = header[tensor]["data_offsets"]
    at = start + 4 * rng.randrange((end - start) // 4)

    def edit(header: dict, body: bytes) -> tuple[Any, bytes]:
        out = bytearray(body)
        struct.pack_into("<f", out, at, value)
        return header, bytes(out)

    return f"{name}: {tensor} byte {at} = {value}, re-hashed", safetensors_edit(name, edit)


# ------------------------------------------------------------------------------ JSON fields


def paths(obj: Any, prefix: tuple = ()) -> list[tuple]:
    """The path of every node below `obj`."""
    items = (
        obj.items() if isinstance(obj, dict) else enumerate(obj) if isinstance(obj, list) else []
    )
    out = []
    for key, value in items:
        out.append((*prefix, key))
        out += paths(value, (*prefix, key))
    return out


def json_edit(rng: random.Random, good: Path, name: str) -> tuple[str, Damage]:
    """A field of a JSON file (for the optimizer, of its metadata) set to a value it must
    refuse, or an unknown key added beside it. Fields are drawn by their path with list
    indices left out, so that the 624 words of a random state count as one field."""
    document = read_json(good, name)
    candidates: dict[str, list[tuple]] = {}
    for path in paths(document):
        if path[0] == "extra" and len(path) > 1:
            continue  # the caller's values: any JSON
        pattern = ".".join("*" if isinstance(k, int) else str(k) for k in path)
        candidates.setdefault(pattern, []).append(path)
    path = rng.choice(candidates[rng.choice(sorted(candidates))])
    added = rng.random() < 0.15 and isinstance(get(document, path[:-1]), dict)
    if added:
        path = (*path[:-1], "fuzz_key")
    value = rng.choice(bad_values(path, None if added else get(document, path)))
    label = f"{name}: {'unknown key ' if added else ''}{'.'.join(map(str, path))} = {value!r}"
    return label[:200], set_field(name, path, value)


def bad_values(path: tuple, original: Any) -> list[Any]:
    """The values of BAD_VALUES that the field at `path` must refuse."""
    if path[0] == "eval_history" and len(path) == 3 and path[2] != "step":
        return ["x", [], {}, None, True]  # measurements: kept as written if numbers
    values = [v for v in BAD_VALUES if not (v is None and path[-1] in NULLABLE)]
    if isinstance(original, bool):
        values = [v for v in values if not isinstance(v, bool)]
    if path == ("eval_history",):
        values = [v for v in values if v != []]  # an empty history: kept as written
    return values


def set_field(name: str, path: tuple, value: Any) -> Damage:
    """The field at `path` of file `name` set to `value`; the manifest re-hashed unless it is
    the edited file."""

    def damage(folder: Path) -> list:
        edited = read_json(folder, name)
        get(edited, path[:-1])[path[-1]] = value
        write_json(folder, name, edited)
        if name != MANIFEST:
            rehash(folder)
        return list(path)

    return damage


def get(obj: Any, path: tuple) -> Any:
    for key in path:
        obj = obj[key]
    return obj


def read_json(folder: Path, name: str) -> Any:
    if name == "optimizer.safetensors":
        header, _ = split((folder / name).read_bytes())
        return json.loads(header["__metadata__"]["truthgpt.optimizer"])
    return json.loads((folder / name).read_text())


def write_json(folder: Path, name: str, document: Any) -> None:
    if name == "optimizer.safetensors":
        header, body = split((folder / name).read_bytes())
        header["__metadata__"]["truthgpt.optimizer"] = json.dumps(document)
        (folder / name).write_bytes(join(header, body))
    else:
        (folder / name).write_text(json.dumps(document))
