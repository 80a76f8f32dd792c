"""Distance attention against SDPA dot-product attention: time and peak memory, as ratios.

    python benchmarks/attention.py --threads 2   # B=4, H=8, D=64, T in 64, 256, 1024, 2048
    python benchmarks/attention.py --quick       # T in 64, 256, two repeats (attention.quick.*)
    python benchmarks/attention.py --load        # also with a busy process on one core
    python benchmarks/attention.py --spread      # only the default-λ score spreads
    python benchmarks/attention.py --threads 2 --long    # B=1, H=8, D=64, T in 2048 ... 16384
    python benchmarks/attention.py --threads 2 --decode  # one token against 8192 cached ones

Rows are `kind` (the default backend: native for l1, l2, chebyshev, lp) and `kind@backend`
for the other backends of the blocked kinds (compiled, eager). Each runs `distance_attention`
forward + backward, causal, fp32, with a per-head scale tensor, and forward alone under
no_grad (inference). Time: the rows are interleaved in one process, round after round; the
figure is the median over rounds of (row time / SDPA dot time in the same round). Memory:
each case runs in a fresh subprocess, warmed up, then the kernel's peak resident-set
high-water mark (VmHWM, reset through /proc/self/clear_refs) minus the resident set just before
the measured call; glibc is told to serve every allocation over 64 KiB with mmap
(MALLOC_MMAP_THRESHOLD_) so that freed tensors leave the resident set at once.
Results: benchmarks/results/attention[.threadsN].json and .md.

--long: dot and l1 only, B=1 (B·H = 8), T in 2048, 4096, 8192, 16384; the same interleaved
ratios (at least three rounds each, however slow) and peak memory of forward + backward and
of the forward alone, in benchmarks/results/attention.long.json and .md, with the CPU model
and the load averages.
--decode: one decoding step (Tq = 1) against a cache of 8192 tokens, B=1, H=8, D=64, fp32,
under no_grad: the keys and values are views [:, :, :8192] of (B, H, capacity, D) buffers, as
nn/cache.py's LayerCache passes them; interleaved steps of each kind against dot.
Results: benchmarks/results/attention.decode.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from truthgpt.nn.attention import default_lambda, distance_attention
from truthgpt.nn.attention import kinds as distance_kinds

B, H, D = 4, 8, 64  # --long sets B = 1
P = 3.0  # exponent for kind="lp"
RESULTS = Path(__file__).resolve().parent / "results"


def make_inputs(T: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    q, k, v, grad = (torch.randn(B, H, T, D, generator=g) for _ in range(4))
    return q, k, v, grad


def _split(row: str) -> tuple[str, str | None]:
    kind, _, backend = row.partition("@")
    return kind, backend or None


def fwd_bwd(row: str, q, k, v, grad) -> tuple[float, float]:
    """One forward + backward of a row; returns (forward seconds, backward seconds)."""
    kind, backend = _split(row)
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = torch.full((H,), default_lambda(kind, D, p=P), requires_grad=True)
    t0 = time.perf_counter()
    out = distance_attention(q, k, v, kind, scale, p=P, backend=backend)
    t1 = time.perf_counter()
    out.backward(grad)
    t2 = time.perf_counter()
    return t1 - t0, t2 - t1


def forward_only(row: str, q, k, v, grad) -> float:
    """One forward under no_grad (inference); seconds."""
    kind, backend = _split(row)
    scale = torch.full((H,), default_lambda(kind, D, p=P))
    with torch.no_grad():
        t0 = time.perf_counter()
        distance_attention(q, k, v, kind, scale, p=P, backend=backend)
        return time.perf_counter() - t0


# --------------------------------------------------------------------------------------------
# time


SLOW_S = 5.0  # a case slower than this is repeated once only (it dwarfs the noise anyway)


def time_all(Ts, rows, repeats: int, every_round: bool = False) -> dict:
    """Interleaved rounds; per (T, row): the median over rounds of the ratio to SDPA dot.

    Short sequences get more rounds (repeats · 1024 / T, at most 4x): their runs take
    milliseconds, where one time slice lost to another process is a large error.
    every_round: slow cases too run in every round (--long: the ratio is the point).
    """
    out: dict = {}
    for T in Ts:
        inputs = make_inputs(T)
        rounds = repeats * min(4, max(1, 1024 // T))
        row_kinds = [r for r in rows if not (r == "l1@eager" and T > 1024)]
        slow = set()
        for row in row_kinds:  # warm-up: compile, allocator, caches
            if sum(fwd_bwd(row, *inputs)) >= SLOW_S and not every_round:
                slow.add(row)
            forward_only(row, *inputs)
        train: dict = {row: [] for row in row_kinds}
        infer: dict = {row: [] for row in row_kinds}
        for r in range(rounds):
            for row in row_kinds:
                if r == 0 or row not in slow:
                    train[row].append(sum(fwd_bwd(row, *inputs)))
                    infer[row].append(forward_only(row, *inputs))
        out[T] = {}
        for row in row_kinds:
            n = len(train[row])
            out[T][row] = {
                "median_s": statistics.median(train[row]),
                "forward_median_s": statistics.median(infer[row]),
                "time_ratio": statistics.median(train[row][i] / train["dot"][i] for i in range(n)),
                "forward_ratio": statistics.median(
                    infer[row][i] / infer["dot"][i] for i in range(n)
                ),
                "rounds": n,
            }
        print(
            f"T={T:5d} time/SDPA (fwd+bwd, fwd): "
            + "  ".join(
                f"{r} {out[T][r]['time_ratio']:.2f},{out[T][r]['forward_ratio']:.2f}"
                for r in row_kinds
            ),
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


def memory_case(kind: str, T: int, forward: bool = False) -> int:
    """Peak bytes above the resident set during one forward + backward (or, forward: one
    forward under no_grad), run in a subprocess."""
    inputs = make_inputs(T)
    call = forward_only if forward else fwd_bwd
    first = call(kind, *inputs)
    if (first if forward else sum(first)) < SLOW_S:  # a second warm-up unless slow
        call(kind, *inputs)
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    call(kind, *inputs)
    peak = _status_kib("VmHWM")
    return (peak - before) * 1024


def _case_cmd(*case: str) -> list[str]:
    """Command line re-running this script for one case, with the same torch threads and
    batch size."""
    threads = str(torch.get_num_threads())
    return [sys.executable, __file__, *case, "--threads", threads, "--batch", str(B)]


def memory_all(Ts, kinds, forward: bool = False) -> dict:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536")
    out: dict = {}
    for T in Ts:
        out[T] = {}
        for kind in kinds:
            if kind == "l1@eager":
                continue
            cmd = _case_cmd("--memory-case", kind, str(T), *(["--forward-only"] * forward))
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            out[T][kind] = {"peak_bytes": json.loads(res.stdout.strip().splitlines()[-1])}
        dot = out[T]["dot"]["peak_bytes"]
        for kind in out[T]:
            out[T][kind]["memory_ratio"] = out[T][kind]["peak_bytes"] / dot
        print(
            f"T={T:5d} peak/SDPA ({'forward' if forward else 'fwd+bwd'}): "
            + "  ".join(f"{kd} {v['memory_ratio']:.2f}" for kd, v in out[T].items()),
            flush=True,
        )
    return out


# --------------------------------------------------------------------------------------------
# the first call in a fresh process


def first_call_case(row: str) -> dict:
    """First and a warm L1 forward+backward at T=256, in this (fresh) process."""
    inputs = make_inputs(256)
    first = sum(fwd_bwd(row, *inputs))
    second = min(sum(fwd_bwd(row, *inputs)) for _ in range(3))
    return {"first_call_s": first, "warm_call_s": second, "extra_s": first - second}


def first_call_cost() -> dict:
    """The default backend, and the compiled one with an empty inductor cache, then with its
    disk cache warm: each in a fresh process."""
    result = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, TORCHINDUCTOR_CACHE_DIR=cache)
        for label, row in (
            ("l1", "l1"),
            ("compiled_cold", "l1@compiled"),
            ("compiled_disk_cache", "l1@compiled"),
        ):
            cmd = _case_cmd("--first-call-case", row)
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
            result[label] = json.loads(res.stdout.strip().splitlines()[-1])
    print(
        "first L1 call over a warm one, T=256: "
        + ", ".join(f"{label} +{r['extra_s']:.2f} s" for label, r in result.items()),
        flush=True,
    )
    return result


# --------------------------------------------------------------------------------------------
# under load


def busy_loop() -> None:  # pragma: no cover - runs in a child process
    while True:
        pass


def under_load(T: int, rows, repeats: int) -> dict:
    """The same ratios while another process keeps one core busy."""
    import multiprocessing

    hog = multiprocessing.get_context("spawn").Process(target=busy_loop, daemon=True)
    hog.start()
    try:
        time.sleep(0.5)
        return time_all([T], rows, repeats)[T]
    finally:
        hog.terminate()
        hog.join()


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
        cases = [(kd, P) for kd in distance_kinds.names()] + [("lp", 0.5), ("lp", 1.5), ("lp", 8.0)]
        for kind, p in cases:
            spec = distance_kinds.get(kind)
            s = spec.pairwise(q, k, p)  # the distances; −λ·s are the scores, same spread
            name = f"{kind}(p={p:g})" if spec.takes_p else kind
            row[name] = (default_lambda(kind, D_, p=p) * s).std(dim=1).mean().item()
        table[D_] = row
    return table


# --------------------------------------------------------------------------------------------
# long sequences, and one decoding step against a long cache


LONG_TS = (2048, 4096, 8192, 16384)


def cpu_model() -> str:
    """lscpu's model name (the machine's CPU), or platform's guess without lscpu."""
    try:
        res = subprocess.run(["lscpu"], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or platform.machine()
    for line in res.stdout.splitlines():
        if line.startswith("Model name:"):
            return line.split(":", 1)[1].strip()
    return platform.machine()


def _environment(command: list[str]) -> dict:
    return {
        "command": "python " + " ".join(["benchmarks/attention.py", *command]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu_model": cpu_model(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "load_average_start": os.getloadavg(),
    }


def long_sequences(repeats: int, Ts=LONG_TS) -> dict:
    rows = ["dot", "l1"]
    result = _environment(sys.argv[1:])
    result["shape"] = {"B": B, "H": H, "D": D}
    result["time"] = time_all(Ts, rows, repeats, every_round=True)
    result["memory"] = memory_all(Ts, rows)
    result["memory_forward"] = memory_all(Ts, rows, forward=True)
    result["load_average_end"] = os.getloadavg()
    return result


DECODE_CACHE = 8192


def decode_steps(kinds, rounds: int, steps: int) -> dict:
    """Per kind, the median over rounds of (time of `steps` steps / dot's in the same round).

    The cache is a (B, H, capacity, D) buffer and each step reads the view [:, :, :8192], as
    LayerCache hands it to attention; the query is a new (B, H, 1, D) row every step.
    """
    g = torch.Generator().manual_seed(0)
    capacity = DECODE_CACHE + 256
    k_buf, v_buf = (torch.randn(1, H, capacity, D, generator=g) for _ in range(2))
    k, v = k_buf[:, :, :DECODE_CACHE], v_buf[:, :, :DECODE_CACHE]
    queries = torch.randn(steps, 1, H, 1, D, generator=g)
    scales = {kd: torch.full((H,), default_lambda(kd, D, p=P)) for kd in kinds}

    def run(kind: str) -> float:
        with torch.no_grad():
            t0 = time.perf_counter()
            for q in queries:
                distance_attention(q, k, v, kind, scales[kind], p=P)
            return time.perf_counter() - t0

    for kind in kinds:  # warm-up
        run(kind)
    times: dict = {kd: [] for kd in kinds}
    for _ in range(rounds):
        for kind in kinds:
            times[kind].append(run(kind))
    out = {}
    for kind in kinds:
        ratios = [a / b for a, b in zip(times[kind], times["dot"], strict=True)]
        out[kind] = {
            "step_median_us": statistics.median(times[kind]) / steps * 1e6,
            "ratio": statistics.median(ratios),
            "ratio_quartiles": statistics.quantiles(ratios, n=4),
        }
    print(
        f"decode, cache {DECODE_CACHE}: "
        + "  ".join(
            f"{kd} {r['ratio']:.2f} ({r['step_median_us']:.0f} us)" for kd, r in out.items()
        ),
        flush=True,
    )
    return out


def _load_line(result: dict) -> str:
    return (
        "Load average (1, 5, 15 min) at start: "
        + ", ".join(f"{x:.2f}" for x in result["load_average_start"])
        + "; at end: "
        + ", ".join(f"{x:.2f}" for x in result["load_average_end"])
        + f" ({os.cpu_count()} cores)."
    )


def write_long_markdown(result: dict, path: Path) -> None:
    shape = result["shape"]
    lines = [
        "# Long sequences: L1 (native kernel) against SDPA (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"CPU: {result['cpu_model']} ({result['machine']}), torch {result['torch']}, "
        f"{result['threads']} threads.  ",
        f"Shapes: B={shape['B']}, H={shape['H']}, D={shape['D']}, causal, fp32, per-head "
        "scale. Ratios: medians over interleaved rounds of (l1 time / SDPA dot time in the same "
        "round).  ",
        _load_line(result),
        "",
        "| T | SDPA fwd+bwd (ms) | l1 fwd+bwd / SDPA | SDPA forward (ms) | l1 forward / SDPA "
        "| rounds |",
        "|---|---|---|---|---|---|",
    ]
    for T, row in result["time"].items():
        dot, l1 = row["dot"], row["l1"]
        lines.append(
            f"| {T} | {dot['median_s'] * 1e3:.0f} | {l1['time_ratio']:.2f} | "
            f"{dot['forward_median_s'] * 1e3:.0f} | {l1['forward_ratio']:.2f} | {l1['rounds']} |"
        )
    lines += [
        "",
        "## Peak memory / SDPA (resident set above the inputs; fresh process per case)",
        "",
        "| T | SDPA fwd+bwd (MiB) | l1 fwd+bwd / SDPA | SDPA forward (MiB) | l1 forward / SDPA |",
        "|---|---|---|---|---|",
    ]
    for T, row in result["memory"].items():
        fwd = result["memory_forward"][T]
        lines.append(
            f"| {T} | {row['dot']['peak_bytes'] / 2**20:.0f} | {row['l1']['memory_ratio']:.2f} "
            f"| {fwd['dot']['peak_bytes'] / 2**20:.0f} | {fwd['l1']['memory_ratio']:.2f} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


def write_decode_markdown(result: dict, path: Path) -> None:
    lines = [
        f"# One decoding step against {DECODE_CACHE} cached tokens (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"CPU: {result['cpu_model']} ({result['machine']}), torch {result['torch']}, "
        f"{result['threads']} threads.  ",
        f"B=1, H={H}, D={D}, Tq=1, fp32, no_grad; k and v are views [:, :, :{DECODE_CACHE}] of "
        f"(B, H, capacity, D) buffers. {result['rounds']} interleaved rounds of "
        f"{result['steps']} steps per kind; ratio = median over rounds of (kind / dot).  ",
        _load_line(result),
        "",
        "| kind | step (us, median) | / dot | quartiles of the ratio |",
        "|---|---|---|---|",
    ]
    for kind, r in result["decode"].items():
        q1, _, q3 = r["ratio_quartiles"]
        lines.append(
            f"| {kind} | {r['step_median_us']:.0f} | {r['ratio']:.2f} | {q1:.2f} - {q3:.2f} |"
        )
    lines.append("")
    path.write_text("\n".join(lines))


# --------------------------------------------------------------------------------------------
# report


def _ratio_table(rows_by_T: dict, key: str, ms_key: str) -> list[str]:
    kinds = list(next(iter(rows_by_T.values())).keys())
    lines = ["| T | SDPA dot (ms) | " + " | ".join(kinds) + " |"]
    lines += ["|---|---|" + "---|" * len(kinds)]
    for T, row in rows_by_T.items():
        cells = [f"{row[kd][key]:.2f}" if kd in row else "-" for kd in kinds]
        lines.append(f"| {T} | {row['dot'][ms_key] * 1e3:.1f} | " + " | ".join(cells) + " |")
    return lines


def write_markdown(result: dict, path: Path) -> None:
    lines = [
        "# Attention kernels against SDPA (CPU)",
        "",
        f"Command: `{result['command']}`  ",
        f"Machine: {result['machine']}, torch {result['torch']}, {result['threads']} threads. "
        "Ratios are medians over interleaved rounds of (row time / SDPA dot time in the same "
        f"round); cases over {SLOW_S:g} s run once.  ",
        f"Shapes: B={B}, H={H}, D={D}, causal, fp32, per-head scale.  ",
        "Load average (1, 5, 15 min) at start: "
        + ", ".join(f"{x:.2f}" for x in result["load_average_start"])
        + "; at end: "
        + ", ".join(f"{x:.2f}" for x in result["load_average_end"])
        + f" ({os.cpu_count()} cores).",
        "",
        "## Training: forward + backward / SDPA dot",
        "",
        *_ratio_table(result["time"], "time_ratio", "median_s"),
        "",
        "## Inference: forward under no_grad / SDPA dot",
        "",
        *_ratio_table(result["time"], "forward_ratio", "forward_median_s"),
    ]
    if result.get("load"):
        T, row = next(iter(result["load"].items()))
        lines += [
            "",
            f"## Under load: another process keeps one core busy (T={T})",
            "",
            "| row | fwd+bwd / SDPA | quiet ratio | loaded / quiet |",
            "|---|---|---|---|",
        ]
        for kd, r in row.items():
            quiet = result["time"][T][kd]["time_ratio"]
            lines.append(
                f"| {kd} | {r['time_ratio']:.2f} | {quiet:.2f} | {r['time_ratio'] / quiet:.2f} |"
            )
    if result.get("memory"):
        lines += ["", "## Peak memory during forward + backward / SDPA dot", ""]
        mkinds = list(next(iter(result["memory"].values())).keys())
        lines += ["| T | SDPA dot (MiB) | " + " | ".join(mkinds) + " |"]
        lines += ["|---|---|" + "---|" * len(mkinds)]
        for T, row in result["memory"].items():
            cells = [f"{row[kd]['memory_ratio']:.2f}" for kd in mkinds]
            mib = row["dot"]["peak_bytes"] / 2**20
            lines.append(f"| {T} | {mib:.0f} | " + " | ".join(cells) + " |")
    if result.get("first_call"):
        c = result["first_call"]
        lines += [
            "",
            "## First L1 call in a fresh process, over a warm call (T=256)",
            "",
            f"- default backend (native): +{c['l1']['extra_s']:.2f} s",
            f"- compiled, empty inductor cache: +{c['compiled_cold']['extra_s']:.1f} s",
            f"- compiled, inductor's disk cache warm: +{c['compiled_disk_cache']['extra_s']:.1f} s",
        ]
    lines += [
        "",
        "Paths: dot, cosine and sql2 run `F.scaled_dot_product_attention` (cosine on "
        "normalised q, k; sql2 on q, k augmented by one column); l1, l2, chebyshev and lp "
        f"(p={P:g}) the native C++ kernel; `@compiled` rows the blocked kernel compiled by "
        "inductor, `@eager` the same kernel run eagerly (cdist-based blocks).",
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
    parser.add_argument(
        "--long", action="store_true", help="dot and l1 at B=1, T in 2048 ... 16384"
    )
    parser.add_argument(
        "--decode", action="store_true", help=f"one step against {DECODE_CACHE} cached tokens"
    )
    parser.add_argument(
        "--lengths",
        type=lambda text: tuple(int(t) for t in text.split(",")),
        default=LONG_TS,
        help="--long: these T only (comma-separated)",
    )
    parser.add_argument("--batch", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--forward-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--memory-case", nargs=2, metavar=("KIND", "T"), help=argparse.SUPPRESS)
    parser.add_argument("--first-call-case", metavar="ROW", help=argparse.SUPPRESS)
    parser.add_argument(
        "--load", action="store_true", help="also measure T=1024 with one core kept busy"
    )
    args = parser.parse_args()

    global B
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.batch:
        B = args.batch
    if args.memory_case:
        kind, T = args.memory_case[0], int(args.memory_case[1])
        print(json.dumps(memory_case(kind, T, args.forward_only)))
        return 0
    if args.long or args.decode:
        args.out.mkdir(parents=True, exist_ok=True)
        suffix = f".threads{args.threads}" if args.threads and args.threads != 2 else ""
        if args.long:
            B = 1
            result = long_sequences(repeats=3, Ts=args.lengths)
            name = f"attention.long{suffix}"
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            write_long_markdown(result, args.out / f"{name}.md")
            print(f"wrote {args.out / name}.json and .md")
        if args.decode:
            result = _environment(sys.argv[1:])
            rounds, steps = 40, 20
            result.update(rounds=rounds, steps=steps)
            result["decode"] = decode_steps(["dot", "l1", "l2", "chebyshev"], rounds, steps)
            result["load_average_end"] = os.getloadavg()
            name = f"attention.decode{suffix}"
            (args.out / f"{name}.json").write_text(json.dumps(result, indent=2) + "\n")
            write_decode_markdown(result, args.out / f"{name}.md")
            print(f"wrote {args.out / name}.json and .md")
        return 0
    if args.first_call_case:
        print(json.dumps(first_call_case(args.first_call_case)))
        return 0
    if args.spread:
        for D_, row in spread_table().items():
            print(f"D={D_:4d} " + "  ".join(f"{kd} {s:.2f}" for kd, s in row.items()))
        return 0

    Ts = (64, 256) if args.quick else (64, 256, 1024, 2048)
    repeats = 2 if args.quick else 5
    kinds = list(distance_kinds.names())
    rows = [*kinds, "l1@compiled", "l2@compiled", "chebyshev@compiled", "l1@eager"]
    result = {
        "command": "python " + " ".join(["benchmarks/attention.py", *sys.argv[1:]]),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "shape": {"B": B, "H": H, "D": D, "lp_p": P},
        "load_average_start": os.getloadavg(),
        "first_call": first_call_cost(),
        "time": time_all(Ts, rows, repeats),
        "load": {1024: under_load(1024, ["dot", "l1", "l1@compiled"], repeats)}
        if args.load
        else None,
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
