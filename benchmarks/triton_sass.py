"""The Triton attention kernels' machine code for an H100/H200 (sm_90a), measured on a CPU.

    python benchmarks/triton_sass.py                       # every kind, dtype and D; T = 4096
    python benchmarks/triton_sass.py --kinds l1 --dtypes bf16 --dims 64 --json rows.json

No GPU is needed: each kernel is compiled from the very launch the host code makes (the host
runs on CPU tensors; the launch is recorded instead of run) with the runtime's own
specialisation (pointers and integers divisible by 16 marked so), for sm_90a, by triton and the
ptxas it bundles; the SASS comes from the nvdisasm it bundles. The meter finds the loops (a
branch back to an earlier label), takes as the tile loop each outermost loop that holds the
kernel's work, and counts the instructions one iteration of it executes: its own body plus,
for a loop nested inside it, D / UNROLL times that loop's body (a nested loop is a coordinate
loop, each iteration UNROLL coordinates: `_triton_jit.UNROLL`, 1 where the module has none).
Divided by the (i, j, d) triples one thread handles per iteration (BLOCK_M·BLOCK_N·D over the
program's threads), that is the instructions per triple; where a kernel has several tile
loops (causal: the diagonal tiles apart), the largest. A static count: every instruction of a
loop's body counts once per iteration, whether a branch skips it or not.

Also per kernel: registers per thread and spilled bytes (ptxas -v), shared memory per program,
and occupancy (resident warps over the SM's 64, from registers, shared memory and warps).
Writes benchmarks/results/triton_sass.md and, with --json FILE, a list of rows
{"kind", "pass", "dtype", "D", "instructions_per_triple", "registers", "spill_bytes",
"shared_bytes", "occupancy", ...}.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import types
from collections import Counter
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
KINDS = ("l1", "l2", "chebyshev", "lp")
DTYPES = ("bf16", "fp16", "fp32", "fp64")
DIMS = (64, 128, 256)
ARCH = 90
P = 3.0  # lp's exponent

# The SM of sm_90 (H100, H200): what bounds the resident warps.
SM_REGISTERS = 65536
SM_WARPS = 64
SM_PROGRAMS = 32
SM_SHARED = 228 * 1024
SHARED_RESERVED = 1024  # per program, by the driver
REGISTER_UNIT = 256  # registers are given to a warp in multiples of this

# Instruction classes, by opcode (the part before the first dot), in the order reported.
CLASSES = {
    "fp32": {"FADD", "FMUL", "FFMA", "FMNMX", "FSEL", "FSETP", "FSET", "FCHK", "MUFU", "FSWZADD"},
    "fp16x2": {"HADD2", "HMUL2", "HFMA2", "HMNMX2", "HSETP2", "HSET2"},
    "fp64": {"DADD", "DMUL", "DFMA", "DSETP", "DMNMX"},
    "mma": {"HMMA", "HGMMA", "DMMA", "IMMA", "WARPGROUP", "BMMA"},
    "conversion": {"F2F", "F2FP", "I2F", "F2I", "I2FP", "F2IP", "FRND"},
    "load": {"LDG", "LDS", "LD", "LDL", "LDSM", "LDC", "LDGSTS", "ULDC", "UBLKCP", "UTMALDG"},
    "store": {"STG", "STS", "ST", "STL", "STSM"},
    "shuffle": {"SHFL"},
    "barrier": {"BAR", "MEMBAR", "SYNCS", "ARRIVES", "DEPBAR"},
    "atomic": {"ATOM", "ATOMG", "ATOMS", "RED", "REDG", "REDUX"},
    "control": {"BRA", "BSSY", "BSYNC", "WARPSYNC", "EXIT", "CALL", "RET", "YIELD", "JMP", "BRX"},
}
CLASS_OF = {op: name for name, ops in CLASSES.items() for op in ops}
CLASS_NAMES = (*CLASSES, "alu")  # alu: integer, logic, moves, predicates, uniform datapath


class Instruction:
    """One SASS instruction: its address, opcode (e.g. "LDG.E.U16"), text, branch label."""

    def __init__(self, address: int, opcode: str, text: str, target: str | None):
        self.address, self.opcode, self.text, self.target = address, opcode, text, target

    @property
    def base(self) -> str:
        return self.opcode.split(".")[0]

    @property
    def kind(self) -> str:
        if self.opcode.startswith("HADD2.F32"):  # fp16 -> fp32
            return "conversion"
        return CLASS_OF.get(self.base, "alu")


_LINE = re.compile(r"/\*([0-9a-f]{4,})\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)(.*?);")
_LABEL = re.compile(r"^(\.L_\w+):")
_TARGET = re.compile(r"`\((\.L_\w+)\)")


def parse_sass(text: str) -> tuple[list[Instruction], dict[str, int]]:
    """The instructions of one function's SASS (nvdisasm -c) and where each label points (the
    index of the instruction after it). NOPs (padding) are left out."""
    instructions: list[Instruction] = []
    labels: dict[str, int] = {}
    for line in text.splitlines():
        label = _LABEL.match(line.strip())
        if label:
            labels[label.group(1)] = len(instructions)
            continue
        m = _LINE.search(line)
        if not m or m.group(2) == "NOP":
            continue
        target = _TARGET.search(m.group(3))
        instructions.append(
            Instruction(int(m.group(1), 16), m.group(2), line.strip(), target and target.group(1))
        )
    return instructions, labels


class Loop:
    """A loop's body: instructions start to end (the branch back), inclusive; its nested
    loops."""

    def __init__(self, start: int, end: int):
        self.start, self.end = start, end
        self.children: list[Loop] = []

    def __len__(self) -> int:
        return self.end - self.start + 1

    def contains(self, other: Loop) -> bool:
        return self.start <= other.start and other.end <= self.end and other is not self


def find_loops(instructions: list[Instruction], labels: dict[str, int]) -> list[Loop]:
    """The outermost loops, each with its nested loops: a loop is a branch to a label at or
    before it; branches back to the same label make one loop."""
    ends: dict[int, int] = {}
    for i, ins in enumerate(instructions):
        # a branch to itself is the trap after the kernel's end, not a loop
        if ins.base == "BRA" and ins.target in labels and labels[ins.target] < i:
            start = labels[ins.target]
            ends[start] = max(ends.get(start, i), i)
    loops = sorted((Loop(s, e) for s, e in ends.items()), key=lambda lp: (lp.start, -lp.end))
    roots: list[Loop] = []
    for loop in loops:
        parents = [p for p in loops if p.contains(loop)]
        if parents:
            min(parents, key=len).children.append(loop)
        else:
            roots.append(loop)
    return roots


def _executed(loop: Loop, instructions: list[Instruction], trips: int) -> Counter:
    """Instructions by class one iteration of `loop` executes: its body, with each nested loop
    counted `trips` times instead of once."""
    counts = Counter(ins.kind for ins in instructions[loop.start : loop.end + 1])
    for child in loop.children:
        once = Counter(ins.kind for ins in instructions[child.start : child.end + 1])
        inner = _executed(child, instructions, trips)
        for name in set(once) | set(inner):
            counts[name] += trips * inner[name] - once[name]
    return counts


def tile_loops(roots: list[Loop]) -> list[Loop]:
    """The loops over tiles: the outermost ones (a kernel's prologue and epilogue hold no
    loop of their own)."""
    return roots


def coordinate_loop_sync(sass: str) -> int:
    """Shuffles and barriers inside loops nested in a tile loop (the coordinate loops), as
    written (not times their trips)."""
    instructions, labels = parse_sass(sass)
    total = 0
    for root in tile_loops(find_loops(instructions, labels)):
        for child in root.children:
            body = instructions[child.start : child.end + 1]
            total += sum(ins.kind in ("shuffle", "barrier") for ins in body)
    return total


def loop_counts(sass: str, D: int, unroll: int = 1) -> list[Counter]:
    """Per tile loop, the instructions by class one iteration executes; its nested loops run
    D / unroll times."""
    instructions, labels = parse_sass(sass)
    loops = tile_loops(find_loops(instructions, labels))
    return [_executed(loop, instructions, max(1, D // unroll)) for loop in loops]


def occupancy(registers: int, shared_bytes: int, num_warps: int) -> float:
    """Resident warps over the SM's maximum, as the hardware allots them."""
    per_warp = -(-max(registers, 1) * 32 // REGISTER_UNIT) * REGISTER_UNIT
    by_registers = (SM_REGISTERS // per_warp) // num_warps
    by_shared = SM_SHARED // (shared_bytes + SHARED_RESERVED) if shared_bytes else SM_PROGRAMS
    by_warps = SM_WARPS // num_warps
    programs = min(by_registers, by_shared, by_warps, SM_PROGRAMS)
    return programs * num_warps / SM_WARPS


# --------------------------------------------------------------------------------------------
# compiling the launches the host makes


def _tools():
    from triton.backends.nvidia.compiler import get_ptxas

    return Path(get_ptxas(ARCH).path).parent


def capture(
    kind: str,
    dtype_name: str,
    D: int,
    T: int,
    causal: bool = True,
    masked: bool = False,
    dropout_p: float = 0.0,
) -> list[tuple]:
    """(kernel, grid, args, meta) of every kernel launch of one forward and backward of
    `triton_attention` at (B=1, H=1, T, D), made by the host code on CPU tensors and recorded
    instead of run. The host code is the runtime's: the kernels get its tiles, flags and
    layouts. masked: with a boolean mask (B, 1, T, T)."""
    import torch

    from truthgpt.nn.attention import triton_kernels as tk

    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(dtype_name)
    dtype = dtype or {"fp32": torch.float32, "fp64": torch.float64}[dtype_name]
    real = tk._load()[0]
    launches: list[tuple] = []

    class Recorder:
        def __init__(self, fn):
            self.fn = fn

        def __getitem__(self, grid):
            return lambda *args, **meta: launches.append((self.fn, grid, args, meta))

    names = [n for n in dir(real) if not n.startswith("__")]
    proxy = types.SimpleNamespace(**{n: getattr(real, n) for n in names})
    for name in names:
        if name.endswith("_kernel"):
            setattr(proxy, name, Recorder(getattr(real, name)))
    saved = tk._load, tk.check
    tk._load, tk.check = (lambda: (proxy, None)), (lambda *a, **k: None)
    try:
        g = torch.Generator().manual_seed(0)
        q, k, v = (torch.randn(1, 1, T, D, generator=g).to(dtype).requires_grad_() for _ in "qkv")
        scale = torch.ones(1, requires_grad=True)
        p = P if kind == "lp" else None
        mask = torch.rand(1, 1, T, T, generator=g) > 0.2 if masked else None
        out = tk.triton_attention(q, k, v, kind, scale, causal, mask, dropout_p, p=p, seed=1)
        out.backward(torch.ones_like(out))
    finally:
        tk._load, tk.check = saved
    return launches


def _unwrap(fn, meta: dict) -> tuple:
    """The JIT function and the launch's meta-parameters; for an autotuned kernel, every
    config's."""
    if hasattr(fn, "configs") and hasattr(fn, "fn"):
        return [(fn.fn, {**meta, **c.all_kwargs()}) for c in fn.configs]
    return [(fn, meta)]


def compile_sm90(fn, args: tuple, meta: dict) -> dict:
    """Compile one launch for sm_90a as the runtime would; SASS and ptxas' report."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource, make_backend
    from triton.runtime.jit import create_function_from_signature

    target = GPUTarget("cuda", ARCH, 32)
    backend = make_backend(target)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    kwargs = dict(meta)
    kwargs.setdefault("debug", False)
    bound, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(
        backend, kwargs, bound, specialization, options
    )
    log = io.StringIO()
    knobs.nvidia.dump_ptxas_log = True
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(fn, signature, constexprs, attrs), target=target, options=options.__dict__
            )
    finally:
        knobs.nvidia.dump_ptxas_log = False
    report = log.getvalue()
    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(compiled.asm["cubin"])
        sass = subprocess.run(
            [str(_tools() / "nvdisasm"), "-c", str(cubin)],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    registers = re.search(r"Used (\d+) registers", report)
    spills = re.search(r"(\d+) bytes spill stores", report)
    return {
        "sass": sass,
        "registers": int(registers.group(1)) if registers else -1,
        "spill_bytes": int(spills.group(1)) if spills else -1,
        "shared_bytes": int(compiled.metadata.shared),
        "num_warps": int(compiled.metadata.num_warps),
    }


def _unroll() -> int:
    """Coordinates per iteration of the kernels' coordinate loops."""
    from truthgpt.nn.attention import _triton_jit

    return int(getattr(getattr(_triton_jit, "UNROLL", 1), "value", 1))


def tile_loop_counts(result: dict, meta: dict, D: int) -> tuple[list[Counter], float]:
    """The instruction counts of each tile loop's iteration (`loop_counts`) and the (i, j, d)
    triples one thread handles in an iteration: BLOCK_M·BLOCK_N·D over the program's
    threads."""
    triples = meta["BLOCK_M"] * meta["BLOCK_N"] * D / (32 * result["num_warps"])
    return loop_counts(result["sass"], D, _unroll()), triples


# The pass each kernel belongs to, by name; kernels of one pass that each handle every
# (i, j, d) triple once (the split backward) add up to the pass.
PHASES = {
    "forward_kernel": "forward",
    "backward_kernel": "backward",
    "backward_dkdv_kernel": "backward dk,dv",
    "backward_dq_kernel": "backward dq",
}


def total_row(parts: list[dict]) -> dict:
    """The split backward as one pass: instructions per triple and per class summed over its
    kernels (each visits every triple once), spills and sync summed, the largest registers
    and shared memory, the lowest occupancy."""
    row = dict(parts[0], kernel="+".join(p["kernel"] for p in parts))
    row["pass"] = "backward (sum)"
    row["instructions_per_triple"] = sum(p["instructions_per_triple"] for p in parts)
    row["per_triple"] = {c: sum(p["per_triple"][c] for p in parts) for c in CLASS_NAMES}
    for key in ("spill_bytes", "coordinate_loop_sync"):
        row[key] = sum(p[key] for p in parts)
    for key in ("registers", "shared_bytes"):
        row[key] = max(p[key] for p in parts)
    row["occupancy"] = min(p["occupancy"] for p in parts)
    row.pop("per_tile_iteration", None)
    return row


def measure(kind: str, dtype_name: str, D: int, T: int) -> list[dict]:
    """One row per kernel (and per autotune config) of one forward + backward, and for a
    backward split into kernels, their sum."""
    rows = []
    for fn, _grid, args, meta in capture(kind, dtype_name, D, T):
        for jit, cfg in _unwrap(fn, meta):
            name = jit.__name__
            phase = PHASES.get(name)
            if phase is None:
                continue
            result = compile_sm90(jit, args, cfg)
            counts, per_iteration = tile_loop_counts(result, cfg, D)
            row = {
                "kind": kind,
                "pass": phase,
                "dtype": dtype_name,
                "D": D,
                "T": T,
                "kernel": name,
                "tile": [cfg["BLOCK_M"], cfg["BLOCK_N"]],
                "num_warps": result["num_warps"],
                "registers": result["registers"],
                "spill_bytes": result["spill_bytes"],
                "shared_bytes": result["shared_bytes"],
                "occupancy": occupancy(
                    result["registers"], result["shared_bytes"], result["num_warps"]
                ),
                "tile_loops": len(counts),
                "coordinate_loop_sync": coordinate_loop_sync(result["sass"]),
            }
            if counts:
                worst = max(counts, key=lambda c: sum(c.values()))
                row["instructions_per_triple"] = sum(worst.values()) / per_iteration
                row["per_triple"] = {c: worst[c] / per_iteration for c in CLASS_NAMES}
                row["per_tile_iteration"] = {c: worst[c] for c in CLASS_NAMES}
            else:
                row["instructions_per_triple"] = None
            rows.append(row)
    split = [r for r in rows if r["pass"] in ("backward dk,dv", "backward dq")]
    if len(split) == 2 and all(r["instructions_per_triple"] for r in split):
        rows.append(total_row(split))
    return rows


# --------------------------------------------------------------------------------------------
# report


def markdown(rows: list[dict], command: str, versions: str, seconds: float) -> str:
    lines = [
        "# The Triton kernels' machine code on sm_90a (H100, H200), measured without a GPU",
        "",
        f"Command: `{command}` ({versions}; {seconds:.0f} s). Causal, T as given, B = H = 1 "
        "(the machine code does not depend on them). Instructions per (i, j, d) triple: one "
        "iteration of the kernel's tile loop (nested coordinate loops counted D times) over "
        "the triples a thread handles in it; by class, the same per triple. Sync in d-loop: "
        "shuffles and barriers written inside the coordinate loops. Occupancy: resident "
        "warps / 64. Spill B: bytes of registers spilled (ptxas), smem B: shared memory per "
        "program.",
        "",
        "| kind | pass | dtype | D | instr/triple | fp32 | fp16x2 | fp64 | alu | conv | load "
        "| shfl | bar | atomic | sync in d-loop | regs | spill B | smem B | occupancy "
        "| tile, warps |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
        "---:|---:|---|",
    ]
    for r in rows:
        per = r.get("per_triple") or {}
        cells = [
            r["kind"],
            r["pass"],
            r["dtype"],
            str(r["D"]),
            _fmt(r["instructions_per_triple"]),
            *(_fmt(per.get(c)) for c in ("fp32", "fp16x2", "fp64", "alu", "conversion", "load")),
            *(_fmt(per.get(c), 3) for c in ("shuffle", "barrier", "atomic")),
            str(r["coordinate_loop_sync"]),
            str(r["registers"]),
            str(r["spill_bytes"]),
            str(r["shared_bytes"]),
            f"{r['occupancy']:.3f}",
            "" if "+" in r["kernel"] else f"{r['tile'][0]}×{r['tile'][1]}, {r['num_warps']}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _fmt(x, digits: int = 2) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _revision() -> str:
    """The source tree's commit, and whether it had changes not committed."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--", "src", "benchmarks"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + (" with changes" if dirty else "")


def _job(case: tuple) -> list[dict]:
    return measure(*case)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kinds", nargs="+", default=list(KINDS), choices=KINDS)
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=DTYPES)
    parser.add_argument("--dims", nargs="+", type=int, default=list(DIMS))
    parser.add_argument("--T", type=int, default=4096, help="sequence length")
    parser.add_argument("--jobs", type=int, default=2, help="processes compiling at once")
    parser.add_argument("--json", type=Path, help="also write the rows to this file")
    parser.add_argument("--out", type=Path, default=RESULTS / "triton_sass.md")
    args = parser.parse_args(argv)
    begin = time.perf_counter()
    cases = [(k, t, d, args.T) for k in args.kinds for t in args.dtypes for d in args.dims]
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        rows = [row for rows in pool.map(_job, cases) for row in rows]
    import torch
    import triton

    versions = f"triton {triton.__version__}, torch {torch.__version__}, source {_revision()}"
    command = "python benchmarks/triton_sass.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = markdown(rows, command.strip(), versions, time.perf_counter() - begin)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1) + "\n")
    print(text)


if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the kernels must be compiled ones
    os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="triton_sass_"))
    main()
