"""Distance attention against SDPA dot-product attention: time and peak memory, as ratios.

    python benchmarks/attention.py            # B=4, H=8, D=64, T in 64, 256, 1024, 2048
    python benchmarks/attention.py --quick    # T in 64, 256, two repeats (attention.quick.*)
    python benchmarks/attention.py --spread   # only the default-λ score spreads

Every kind runs `distance_attention` (its fast path) forward + backward, causal, fp32, with a
per-head scale tensor. Time: the kinds are interleaved in one process and each is repeated;
the figure is the minimum over repeats (the machine is shared, the minimum is the least
disturbed run) and the ratio is to SDPA dot measured in the same round. Memory: each case
runs in a fresh subprocess, warmed up, then the kernel's peak resident-set high-water mark
(VmHWM, reset through /proc/self/clear_refs) minus the resident set just before the measured
call; glibc is told to serve every allocation over 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set at once.
Results: benchmarks/results/attention.json and attention.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from truthgpt.attention import DISTANCE_KINDS, default_lambda, distance_attention

B, H, D = 4, 8, 64
P = 3.0  # exponent for kind="lp"
RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return q, k, v, grad


def fwd_bwd(kind: str, q, k, v, grad) -> tuple[float, float]:
    """One forward + backward of a row ('l1-eager': the L1 kernel uncompiled);
    returns (forward seconds, backward seconds)."""
    base = kind.removesuffix("-eager")
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = torch.full((H,), default_lambda(base, D, p=P), requires_grad=True)
    t0 = time.perf_counter()
    out = distance_attention(q, k, v, base, scale, p=P)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


@contextlib.contextmanager
def with_eager(kind: str):
    """TRUTHGPT_COMPILE=0 while running the 'l1-eager' row."""
    old = os.environ.get("TRUTHGPT_COMPILE")
    if kind.endswith("-eager"):
        os.environ["TRUTHGPT_COMPILE"] = "0"
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("TRUTHGPT_COMPILE", None)
        else:
            os.environ["TRUTHGPT_COMPILE"] = old


# --------------------------------------------------------------------------------------------
# time


SLOW_S = 5.0  # a case slower than this is repeated once only (it dwarfs the noise anyway)


def time_all(Ts, kinds, repeats: int) -> dict:
    """Interleaved rounds; per (T, kind): min and median of forward+backward seconds.

    Short sequences get more rounds (repeats · 1024 / T, at most 4x): their runs take
    milliseconds, where one time slice lost to another process is a large error.
    """
    out: dict = {}
    for T in Ts:
        inputs = make_inputs(T)
        rounds = repeats * min(4, max(1, 1024 // T))
        row_kinds = [kd for kd in kinds if not (kd == "l1-eager" and T > 1024)]
        slow = set()
        for kind in row_kinds:  # warm-up: compile, allocator, caches
            with with_eager(kind):
                if sum(fwd_bwd(kind, *inputs)) >= SLOW_S:
                    slow.add(kind)
        samples: dict = {kind: [] for kind in row_kinds}
        for r in range(rounds):
            for kind in row_kinds:
                if r == 0 or kind not in slow:
                    with with_eager(kind):
                        samples[kind].append(fwd_bwd(kind, *inputs))
        out[T] = {}
        for kind, s in samples.items():
            totals = [f + b for f, b in s]
            best = min(range(len(s)), key=lambda i: totals[i])
            out[T][kind] = {
                "min_s": totals[best],
                "median_s": statistics.median(totals),
                "forward_s": s[best][0],
                "backward_s": s[best][1],
                "runs": len(s),
            }
        dot = out[T]["dot"]["min_s"]
        for kind in row_kinds:
            out[T][kind]["time_ratio"] = out[T][kind]["min_s"] / dot
        print(
            f"T={T:5d} time/SDPA: "
            + "  ".join(f"{kd} {out[T][kd]['time_ratio']:.2f}" for kd in row_kinds),
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------------
# memory (one subprocess per case)


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def memory_case(kind: str, T: int) -> int:
    """Peak bytes above the resident set during one forward + backward (run in a subprocess)."""
    inputs = make_inputs(T)
    with with_eager(kind):
        if sum(fwd_bwd(kind, *inputs)) < SLOW_S:  # a second warm-up unless slow
            fwd_bwd(kind, *inputs)
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
        before = _status_kib("VmRSS")
        fwd_bwd(kind, *inputs)
        peak = _status_kib("VmHWM")
    return (peak - before) * 1024


def _case_cmd(*case: str) -> list[str]:
    """Command line re-running this script for one case, with the same torch threads."""
    return [sys.executable, __file__, *case, "--threads", str(torch.get_num_threads())]


def memory_all(Ts, kinds) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out: dict = {}
    for T in Ts:
        out[T] = {}
        for kind in kinds:
            if kind == "l1-eager":
                continue
            cmd = _case_cmd("--memory-case", kind, str(T))
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out[T][kind] = {"peak_bytes": json.loads(res.stdout.strip().splitlines()[-1])}
        dot = out[T]["dot"]["peak_bytes"]
        for kind in out[T]:
            out[T][kind]["memory_ratio"] = out[T][kind]["peak_bytes"] / dot
        print(
            f"T={T:5d} peak/SDPA: "
            + "  ".join(f"{kd} {v['memory_ratio']:.2f}" for kd, v in out[T].items()),
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------------
# cold compile


def compile_case() -> dict:
    """First and second L1 forward+backward at T=256 (run with an empty inductor cache)."""
    inputs = make_inputs(256)
    first = sum(fwd_bwd("l1", *inputs))
    second = min(sum(fwd_bwd("l1", *inputs)) for _ in range(3))
    return {"first_call_s": first, "warm_call_s": second}


def compile_cost() -> dict:
    """Cold: empty inductor cache directory. Warm disk cache: the same directory again."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache, TRUTHGPT_COMPILE="1")
        for label in ("cold", "disk_cache"):
            cmd = _case_cmd("--compile-case")
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            r = json.loads(res.stdout.strip().splitlines()[-1])
            result[label] = {**r, "compile_s": r["first_call_s"] - r["warm_call_s"]}
    print(
        f"L1 kernel compile: cold {result['cold']['compile_s']:.1f} s, "
        f"with inductor's disk cache {result['disk_cache']['compile_s']:.1f} s",
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------
# default λ score spread


def spread_table(dims=(16, 32, 64, 128)) -> dict:
    """Std of one query's scores across keys at the default λ, unit-normal q and k."""
    g = torch.Generator().manual_seed(0)
    table: dict = {}
    for D_ in dims:
        q = torch.randn(256, D_, generator=g, dtype=torch.float64)
        k = torch.randn(2048, D_, generator=g, dtype=torch.float64)
        row = {}
        for kind, p in [(kd, P) for kd in DISTANCE_KINDS] + [("lp", 0.5), ("lp", 1.5), ("lp", 8.0)]:
            if kind == "dot":
                s = q @ k.T
            elif kind == "cosine":
                qn = torch.nn.functional.normalize(q, dim=-1)
                s = qn @ torch.nn.functional.normalize(k, dim=-1).T
            else:
                cp = {"l1": 1.0, "l2": 2.0, "sql2": 2.0, "chebyshev": math.inf}.get(kind, p)
                s = torch.cdist(q, k, p=cp) ** (2 if kind == "sql2" else 1)
            name = f"lp(p={p:g})" if kind == "lp" else kind
            row[name] = (default_lambda(kind, D_, p=p) * s).std(dim=1).mean().item()
        table[D_] = row
    return table


# --------------------------------------------------------------------------------------------
# report


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Attention kernels against SDPA (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads. "
        "The machine is shared: times are the minimum over repeats (one run for cases over "
        f"{SLOW_S:g} s), ratios are to SDPA dot measured in the same rounds.",
        f"Shapes: B={B}, H={H}, D={D}, causal, fp32, forward + backward, per-head scale.  ",
        "Load average (1, 5, 15 min) at start: "
        + ", ".join(f"{x:.1f}" for x in result["load_average_start"])
        + "; at end: "
        + ", ".join(f"{x:.1f}" for x in result["load_average_end"])
        + f" (other processes on the {os.cpu_count()} cores).",
        "",
        "## Time (forward + backward) / SDPA dot",
        "",
    ]
    kinds = list(next(iter(result["time"].values())).keys())
    lines += ["| T | SDPA dot (ms) | " + " | ".join(kinds) + " |"]
    lines += ["|---|---|" + "---|" * len(kinds)]
    for T, row in result["time"].items():
        cells = [f"{row[kd]['time_ratio']:.2f}" if kd in row else "-" for kd in kinds]
        lines.append(f"| {T} | {row['dot']['min_s'] * 1e3:.0f} | " + " | ".join(cells) + " |")
    if result.get("memory"):
        lines += ["", "## Peak memory during forward + backward / SDPA dot", ""]
        mkinds = list(next(iter(result["memory"].values())).keys())
        lines += ["| T | SDPA dot (MiB) | " + " | ".join(mkinds) + " |"]
        lines += ["|---|---|" + "---|" * len(mkinds)]
        for T, row in result["memory"].items():
            cells = [f"{row[kd]['memory_ratio']:.2f}" for kd in mkinds]
            mib = row["dot"]["peak_bytes"] / 2**20
            lines.append(f"| {T} | {mib:.0f} | " + " | ".join(cells) + " |")
    if result.get("compile"):
        c = result["compile"]
        lines += [
            "",
            "## Compiling the L1 kernels (first call minus a warm call, T=256)",
            "",
            f"- empty inductor cache: {c['cold']['compile_s']:.1f} s",
            f"- inductor's disk cache warm: {c['disk_cache']['compile_s']:.1f} s",
        ]
    lines += [
        "",
        "Paths: dot, cosine and sql2 run `F.scaled_dot_product_attention` (cosine on "
        "normalised q, k; sql2 on q, k augmented by one column); l1, l2, chebyshev and lp "
        f"(p={P:g}) the blocked kernel, compiled by inductor; `l1-eager` is that kernel with "
        "TRUTHGPT_COMPILE=0 (cdist-based blocks, the fallback without a C++ compiler).",
        "",
    ]
    path.write_text("\n".join(lines))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T in 64, 256; two repeats")
    parser.add_argument("--spread", action="store_true", help="print the λ spread table only")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    parser.add_argument(
        "--threads", type=int, help="torch threads (default: torch's, here one per core)"
    )
    parser.add_argument("--memory-case", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--compile-case", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.memory_case:
        print(json.dumps(memory_case(args.memory_case[0], int(args.memory_case[1]))))
        return 0
    if args.compile_case:
        print(json.dumps(compile_case()))
        return 0
    if args.spread:
        for D_, row in spread_table().items():
            print(f"D={D_:4d} " + "  ".join(f"{kd} {s:.2f}" for kd, s in row.items()))
        return 0

    Ts = (64, 256) if args.quick else (64, 256, 1024, 2048)
    repeats = 2 if args.quick else 5
    kinds = ["dot", "sql2", "cosine", "l1", "l1-eager", "l2", "chebyshev", "lp"]
    assert set(kinds) - {"l1-eager"} == set(DISTANCE_KINDS)
    result = {
        "command": "python " + " ".join(["benchmarks/attention.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"B": B, "H": H, "D": D, "lp_p": P},
        "load_average_start": os.getloadavg(),
        "compile": compile_cost(),
        "time": time_all(Ts, kinds, repeats),
        "memory": memory_all(Ts, kinds),
        "spread": spread_table(),
    }
    result["load_average_end"] = os.getloadavg()
    args.out.mkdir(parents=True, exist_ok=True)
    name = "attention" + (".quick" if args.quick else "")
    name += f".threads{args.threads}" if args.threads else ""
    (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
    write_markdown(result, args.out / f"{name}.md")
    print(f"wrote {args.out / name}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
