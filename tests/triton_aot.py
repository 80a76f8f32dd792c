"""Compile the Triton attention kernels for an H100/H200 (sm_90) on a machine without a GPU.

    python tests/triton_aot.py '[["bf16", "l1", true, true, 0.1], ...]'

Each case is (dtype, kind, causal, with a mask, dropout p). The kernels are compiled from the
very arguments `triton_kernels` launches them with (`forward_launch`, `backward_launch`), at
B=1, H=2, T=64, D=64, down to machine code by the ptxas bundled with triton; one JSON line per
kernel gives its registers and spilled bytes. The interpreter checks the math; this catches
what only the compiler rejects (types, layouts, tl.dot shapes) and register spills.

    python tests/triton_aot.py meter

compiles a kernel whose loop is known by construction (`chain_kernel`: CHAIN dependent fp32
additions per iteration, written as PTX with explicit rounding, which ptxas may not merge, a
compare and a branch back) and prints what benchmarks/triton_sass.py counts in it, so that
the meter can fail.

Run by tests/test_attention_triton.py in a fresh process without TRITON_INTERPRET (the
kernels must be defined as compiled ones).
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from truthgpt.nn.attention import _triton_jit, kinds, triton_kernels

CHAIN = 7  # the additions in chain_kernel's PTX

ARCH = 90
TYPES = {
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
}
DTYPES = {name: dtype for dtype, name in TYPES.items()}


def _signature(fn, args: tuple, meta: dict) -> tuple[dict, dict]:
    """Triton's signature and constexprs for a launch with these arguments."""
    sig, constexprs = {}, {}
    for name, value in zip(fn.arg_names, args, strict=False):
        if isinstance(value, torch.Tensor):
            sig[name] = "*" + TYPES[value.dtype]
        elif isinstance(value, float):
            sig[name] = "fp32"
        else:
            sig[name] = "i32" if -(2**31) <= value < 2**31 else "i64"
    for name in fn.arg_names[len(args) :]:
        sig[name], constexprs[name] = "constexpr", meta[name]
    return sig, constexprs


def _compile(fn, args: tuple, meta: dict) -> dict:
    sig, constexprs = _signature(fn, args, meta)
    options = {name: meta[name] for name in ("num_warps", "enable_fp_fusion")}
    compiled = triton.compile(
        ASTSource(fn, sig, constexprs), target=GPUTarget("cuda", ARCH, 32), options=options
    )
    with tempfile.TemporaryDirectory() as tmp:
        ptx = Path(tmp) / "kernel.ptx"
        ptx.write_text(compiled.asm["ptx"])
        cmd = [get_ptxas(ARCH).path, "-v", f"--gpu-name=sm_{ARCH}a", str(ptx), "-o", f"{ptx}.o"]
        report = subprocess.run(cmd, capture_output=True, text=True, check=True).stderr
    return {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_bytes": int(re.search(r"(\d+) bytes spill stores", report).group(1)),
    }


def check(dtype_name: str, kind: str, causal: bool, masked: bool, dropout_p: float) -> list[dict]:
    dtype = DTYPES[dtype_name]
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    B, H, T, D = 1, 2, 64, 64
    qt, kt = (torch.zeros(B, H, D, T, dtype=dtype) for _ in range(2))
    v, do, dv = (torch.zeros(B, H, T, D, dtype=dtype) for _ in range(3))
    out = torch.zeros(B, H, T, D, dtype=acc)
    lse, delta = torch.zeros(B, H, T, dtype=acc), torch.zeros(B, H, T, dtype=acc)
    dqt, dkt = torch.zeros(B, H, D, T, dtype=acc), torch.zeros(B, H, D, T, dtype=acc)
    scale = torch.ones(H, dtype=acc)
    spec = kinds.get(kind)
    cfg = triton_kernels.KernelConfig(
        code=spec.kernel.native_code,
        p=3.0 if spec.takes_p else 1.0,
        causal=causal,
        bias=torch.zeros(B, 1, T, T, dtype=acc) if masked else None,
        dropout_p=dropout_p,
        seed=2**40 + 1 if dropout_p else 0,
    )
    n_tiles = -(-T // cfg.backward_tile[1])
    dlam = torch.zeros(B * H, n_tiles, dtype=acc)
    forward = triton_kernels.forward_launch(qt, kt, v, scale, out, lse, cfg)
    backward = triton_kernels.backward_launch(
        qt, kt, v, do, lse, delta, scale, dqt, dkt, dv, dlam, cfg
    )
    launches = {
        "forward": (_triton_jit.forward_kernel, forward),
        "backward": (_triton_jit.backward_kernel, backward),
    }
    rows = []
    for name, (fn, (_, args, meta)) in launches.items():
        case = dict(kernel=name, dtype=dtype_name, kind=kind, causal=causal, masked=masked)
        rows.append(case | {"dropout_p": dropout_p} | _compile(fn, args, meta))
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
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "benchmarks" / "triton_sass.py"
    spec = importlib.util.spec_from_file_location("triton_sass", path)
    sass_meter = sys.modules["triton_sass"] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sass_meter)
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
