"""Compile the Triton attention kernels for an H100/H200 (sm_90a) on a machine without a GPU.

    python tests/triton_aot.py '[["bf16", "l1", true, true, 0.1, 64], ...]'

Each case is (dtype, kind, causal, with a mask, dropout p, D). The kernels are compiled as
the runtime would compile them: from the launches the host code makes (recorded by
benchmarks/triton_sass.py's `capture`, at B=H=1, T=256), with the runtime's specialisation
(arguments divisible by 16 marked so), down to machine code by the ptxas bundled with triton;
one JSON line per kernel gives its registers, spilled bytes, the shuffles and barriers in
its coordinate loops and its instructions per (i, j, d) triple as benchmarks/triton_sass.py
counts them. The interpreter checks the
math; this catches what only the compiler rejects (types, layouts, tl.dot shapes) and
register spills.

    python tests/triton_aot.py meter

compiles a kernel whose loop is known by construction (`chain_kernel`: CHAIN dependent fp32
additions per iteration, written as PTX with explicit rounding, which ptxas may not merge, a
compare and a branch back) and prints what benchmarks/triton_sass.py counts in it, so that
the meter can fail.

Run by tests/test_attention_triton.py in a fresh process without TRITON_INTERPRET (the
kernels must be defined as compiled ones).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import torch
import triton
import triton.language as tl

CHAIN = 7  # the additions in chain_kernel's PTX
T = 256


def _meter():
    """benchmarks/triton_sass.py, imported from its path."""
    if "triton_sass" in sys.modules:
        return sys.modules["triton_sass"]
    path = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_sass.py"
    spec = importlib.util.spec_from_file_location("triton_sass", path)
    module = sys.modules["triton_sass"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check(
    dtype_name: str, kind: str, causal: bool, masked: bool, dropout_p: float, D: int = 64
) -> list[dict]:
    meter = _meter()
    rows = []
    for fn, _grid, args, meta in meter.capture(kind, dtype_name, D, T, causal, masked, dropout_p):
        if not fn.__name__.startswith(("forward", "backward")):
            continue
        result = meter.compile_sm90(fn, args, meta)
        counts, triples = meter.tile_loop_counts(result, meta, D)
        per_triple = max(sum(c.values()) for c in counts) / triples if counts else None
        rows.append(
            dict(kernel=fn.__name__.removesuffix("_kernel"), dtype=dtype_name, kind=kind, D=D)
            | dict(causal=causal, masked=masked, dropout_p=dropout_p)
            | {k: result[k] for k in ("registers", "spill_bytes", "shared_bytes")}
            | {"coordinate_loop_sync": meter.coordinate_loop_sync(result["sass"])}
            | {"instructions_per_triple": per_triple}
        )
    return rows


@triton.jit
def chain_kernel(X, limit):
    """CHAIN dependent fp32 additions per iteration on one value, while it is below `limit`
    (a loop without a trip count: ptxas unrolls counted loops)."""
    x = tl.load(X)
    while x < limit:
        x = tl.inline_asm_elementwise(
            "add.rn.f32 $0, $1, 0f3F800000;" + " add.rn.f32 $0, $0, 0f3F800000;" * 6,
            "=r,r",
            [x],
            dtype=tl.float32,
            is_pure=True,
            pack=1,
        )
    tl.store(X, x)


def meter() -> dict:
    """What the meter counts in `chain_kernel`'s loop (one warp, one value)."""
    sass_meter = _meter()
    x = torch.zeros(16)
    result = sass_meter.compile_sm90(chain_kernel, (x, 1000.0), dict(num_warps=1))
    counts = sass_meter.loop_counts(result["sass"], D=1)
    return {"loops": [dict(c) for c in counts], "registers": result["registers"]}


def main() -> None:
    if sys.argv[1] == "meter":
        print(json.dumps(meter()))
        return
    for case in json.loads(sys.argv[1]):
        for row in check(*case):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
