"""Compile the Triton attention kernels for an H100/H200 (sm_90) on a machine without a GPU.

    python tests/triton_aot.py '[["bf16", "l1", true, true, 0.1], ...]'

Each case is (dtype, kind, causal, with a mask, dropout p). The kernels are compiled from the
very arguments `triton_kernels` launches them with (`forward_launch`, `backward_launch`), at
B=1, H=2, T=64, D=64, down to machine code by the ptxas bundled with triton; one JSON line per
kernel gives its registers and spilled bytes. The interpreter checks the math; this catches
what only the compiler rejects (types, layouts, tl.dot shapes) and register spills.

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
from triton.backends.compiler import GPUTarget
from triton.backends.nvidia.compiler import get_ptxas
from triton.compiler import ASTSource

from truthgpt.nn.attention import _triton_jit, kinds, triton_kernels

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


def main() -> None:
    for case in json.loads(sys.argv[1]):
        for row in check(*case):
            print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
