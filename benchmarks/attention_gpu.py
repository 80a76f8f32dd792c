"""The Triton attention kernels on one GPU: correctness, speed, memory, GPT-2-small training.

All in one process, in under ~8 minutes (benchmarks/gpu_check.sh runs it in one call):

    python benchmarks/attention_gpu.py            # T in 1024, 4096
    python benchmarks/attention_gpu.py --quick    # T = 1024 only, fewer rounds
    python benchmarks/attention_gpu.py --out DIR  # results to DIR (default: $OUT, else
                                                  # benchmarks/results)

0. The environment: device, capability, driver, CUDA, torch, triton.
1. Correctness: every blocked kind (l1, l2, chebyshev, lp) with the Triton kernels against a
   naive float64 formula computed on the device (output and the gradients of q, k, v, λ):
   float64 inputs (causal, Tq < Tk with a mask, a row with no key), and bf16 inputs; then
   bf16 at the timed length (T=4096, D=64, two heads) against torch.cdist in float64.
   Memory handed out by torch's allocator is first filled with NaN (poisoned), so an output
   a kernel does not write shows up.
2. Attention: B=4, H=16, D=64, causal, bf16, forward + backward, each kind with a per-head λ
   against `F.scaled_dot_product_attention` restricted to its flash backend; interleaved
   rounds, the median of (kind time / SDPA time in the same round); peak memory above the
   inputs (torch.cuda.max_memory_allocated) as a ratio to SDPA's.
3. Training: GPT-2 small (12 layers, 12 heads, 768 wide, T=1024, GPT-2's vocabulary), bf16
   autocast, `TruthGPTOptimizationCore.train_step` on random tokens, l1 against dot.

Each part records its error instead of stopping the run, so that one failure does not cost
the others. Each result is appended to DIR/attention_gpu.jsonl as soon as it is measured (a
timeout loses nothing measured); at the end DIR/attention_gpu.json and .md, with the targets
(L1 forward + backward ≤ 5× SDPA flash at T=4096, memory ≤ 1.1×, GPT-2-small training
tokens/s of l1 ≥ 0.6× dot) marked met or not.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch
import torch.nn.functional as F

from truthgpt.nn.attention import default_lambda, distance_attention, triton_kernels

RESULTS = Path(__file__).resolve().parent / "results"
B, H, D = 4, 16, 64
P = 3.0  # exponent for kind="lp"
KINDS = ("l1", "l2", "chebyshev", "lp")
BUDGET_S = 300.0  # parts still to run are skipped past this, and said to be
TARGETS = {"l1_time_ratio_T4096": 5.0, "l1_memory_ratio_T4096": 1.1, "train_l1_over_dot": 0.6}
_SINK: list[Path] = []  # the jsonl file results are appended to
DEVICE = "cuda"
# GPT-2 small; the sequence length is block_size.
GPT2 = dict(
    vocab_size=50257,
    hidden_size=768,
    num_hidden_layers=12,
    num_attention_heads=12,
    max_position_embeddings=1024,
    block_size=1024,
)


# --------------------------------------------------------------------------------------------
# 1. correctness against float64


def _reference(q, k, v, kind: str, scale, causal: bool, mask=None):
    """Naive float64 attention on the device: the (…, Tq, Tk, D) broadcast of q − k.

    Chebyshev takes torch.cdist instead (the kinds' definition): where rounded inputs tie
    two coordinates at the max, it gives each the whole gradient, as the kernels do; amax
    would split it.
    """
    q, k, v = q.double(), k.double(), v.double()
    x = (q[..., :, None, :] - k[..., None, :, :]).abs()
    dist = {
        "l1": lambda: x.sum(-1),
        "l2": lambda: x.square().sum(-1).sqrt(),
        "chebyshev": lambda: torch.cdist(q, k, p=math.inf),
        "lp": lambda: x.pow(P).sum(-1).pow(1 / P),
    }[kind]()
    scores = -scale.double().view(1, -1, 1, 1) * dist
    Tq, Tk = q.shape[2], k.shape[2]
    if causal:
        i = torch.arange(Tq, device=q.device)[:, None]
        j = torch.arange(Tk, device=q.device)[None, :]
        scores = scores.masked_fill(j > i + Tk - Tq, -math.inf)
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf)
    dead = torch.isneginf(scores).all(-1, keepdim=True)
    return torch.softmax(scores.masked_fill(dead, 0.0), -1).masked_fill(dead, 0.0) @ v


def _errors(kind: str, dtype: torch.dtype, Tq: int, Tk: int, causal: bool, masked: bool):
    """Largest |kernel − reference| of the output and of each gradient, relative to the
    reference's largest magnitude."""
    g = torch.Generator(device=DEVICE).manual_seed(Tq)
    leaves = [torch.randn(2, 3, T, D, device=DEVICE, generator=g) for T in (Tq, Tk, Tk)]
    leaves = [t.to(dtype).requires_grad_() for t in leaves]
    wide = [t.detach().double().requires_grad_() for t in leaves]
    wide_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    scale = torch.tensor([0.3, 0.6, 1.2], device=DEVICE, dtype=wide_dtype, requires_grad=True)
    mask = None
    if masked:
        mask = torch.rand(2, 1, Tq, Tk, device=DEVICE, generator=g) > 0.3
        mask[0, 0, 5] = False  # a row with no key
    out = distance_attention(
        *leaves, kind, scale, causal=causal, attn_mask=mask, p=P, backend="triton"
    )
    ref = _reference(*wide, kind, scale, causal, mask)
    grad = torch.randn(out.shape, device=DEVICE, generator=g).to(dtype)
    got = torch.autograd.grad(out, (*leaves, scale), grad)
    want = torch.autograd.grad(ref, (*wide, scale), grad.double())
    names = ("out", "dq", "dk", "dv", "dλ")
    pairs = zip(names, (out, *got), (ref, *want), strict=True)
    return {n: ((a.double() - b).abs().max() / b.abs().max()).item() for n, a, b in pairs}


def record(part: str, row: dict) -> None:
    """Print a result and append it to the jsonl file at once."""
    line = json.dumps({"part": part, **row}, default=str)
    print(line, flush=True)
    for path in _SINK:
        with open(path, "a") as f:
            f.write(line + "\n")


def poison() -> None:
    """Fill memory the caching allocator will hand out again with NaN."""
    free = torch.cuda.mem_get_info()[0]
    n = int(min(free * 0.5, 8 * 2**30)) // 4
    if n > 0:
        block = torch.full((n,), float("nan"), device=DEVICE)
        del block


def environment() -> dict:
    import triton

    props = torch.cuda.get_device_properties(0)
    return {
        "gpu": torch.cuda.get_device_name(),
        "capability": f"sm_{props.major}{props.minor}",
        "sms": props.multi_processor_count,
        "memory_gib": props.total_memory / 2**30,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
    }


def timed_shape_errors(kind: str, T: int = 4096) -> dict:
    """bf16 at the timed length and width, two heads, against torch.cdist in float64:
    the output and every gradient, after poisoning the allocator."""
    g = torch.Generator(device=DEVICE).manual_seed(T)
    leaves = [
        torch.randn(1, 2, T, D, device=DEVICE, generator=g).to(torch.bfloat16).requires_grad_()
        for _ in range(3)
    ]
    wide = [t.detach().double().requires_grad_() for t in leaves]
    scale = torch.full((2,), default_lambda(kind, D, p=P), device=DEVICE, requires_grad=True)
    poison()
    out = distance_attention(*leaves, kind, scale, causal=True, p=P, backend="triton")
    norm = {"l1": 1.0, "l2": 2.0, "chebyshev": math.inf, "lp": P}[kind]
    dist = torch.cdist(wide[0], wide[1], p=norm)
    scores = -scale.double().view(1, -1, 1, 1) * dist
    causal = torch.ones(T, T, dtype=torch.bool, device=DEVICE).tril()
    ref = torch.softmax(scores.masked_fill(~causal, -math.inf), -1) @ wide[2]
    grad = torch.randn(out.shape, device=DEVICE, generator=g).to(torch.bfloat16)
    poison()
    got = torch.autograd.grad(out, (*leaves, scale), grad)
    want = torch.autograd.grad(ref, (*wide, scale), grad.double())
    names = ("out", "dq", "dk", "dv", "dλ")
    pairs = zip(names, (out, *got), (ref, *want), strict=True)
    errors = {n: ((a.double() - b).abs().max() / b.abs().max()).item() for n, a, b in pairs}
    errors["finite"] = all(bool(torch.isfinite(t).all()) for t in (out, *got))
    return errors


def correctness(deadline: float) -> list[dict]:
    rows = []
    for kind in KINDS:
        if time.perf_counter() > deadline:
            rows.append({"kind": kind, "skipped": "time budget spent"})
            continue
        for dtype, Tq, Tk, causal, masked in (
            (torch.float64, 150, 150, True, False),
            (torch.float64, 70, 200, False, True),
            (torch.bfloat16, 150, 150, True, False),
        ):
            row = dict(kind=kind, dtype=str(dtype).removeprefix("torch."), Tq=Tq, Tk=Tk)
            row |= dict(causal=causal, masked=masked)
            try:
                poison()
                row["max_relative_error"] = _errors(kind, dtype, Tq, Tk, causal, masked)
            except Exception as err:  # recorded: the run goes on
                row["error"] = f"{type(err).__name__}: {err}"
                traceback.print_exc()
            record("correctness", row)
            rows.append(row)
    for kind in KINDS:
        row = dict(kind=kind, dtype="bfloat16", Tq=4096, Tk=4096, causal=True, masked=False)
        try:
            row["max_relative_error"] = timed_shape_errors(kind)
        except Exception as err:
            row["error"] = f"{type(err).__name__}: {err}"
            traceback.print_exc()
        record("correctness", row)
        rows.append(row)
        torch.cuda.empty_cache()
    return rows


# --------------------------------------------------------------------------------------------
# 2. attention against SDPA flash


def _sdpa_flash(q, k, v):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True)


def _run(row: str, q, k, v, grad) -> tuple[float, float, int]:
    """One forward + backward: (forward ms, total ms, peak bytes above what was allocated)."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    scale = None
    if row != "sdpa":
        scale = torch.full((H,), default_lambda(row, D, p=P), device=DEVICE, requires_grad=True)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    start, middle, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    if row == "sdpa":
        out = _sdpa_flash(q, k, v)
    else:
        out = distance_attention(q, k, v, row, scale, p=P, backend="triton")
    middle.record()
    out.backward(grad)
    end.record()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    return start.elapsed_time(middle), start.elapsed_time(end), peak


def attention(Ts: list[int], rounds: int, deadline: float) -> dict:
    out: dict = {}
    rows = ["sdpa", *KINDS]
    for T in Ts:
        if time.perf_counter() > deadline:
            out[T] = {"skipped": "time budget spent"}
            continue
        g = torch.Generator(device=DEVICE).manual_seed(T)
        q, k, v, grad = (
            torch.randn(B, H, T, D, device=DEVICE, generator=g, dtype=torch.bfloat16)
            for _ in range(4)
        )
        times: dict = {row: [] for row in rows}
        forward: dict = {row: [] for row in rows}
        peaks: dict = {}
        try:
            for row in rows:  # warm-up: compilation, allocator
                peaks[row] = _run(row, q, k, v, grad)[2]
            for _ in range(rounds):
                for row in rows:
                    fwd_ms, total_ms, _ = _run(row, q, k, v, grad)
                    forward[row].append(fwd_ms)
                    times[row].append(total_ms)
        except Exception as err:
            traceback.print_exc()
            out[T] = {"error": f"{type(err).__name__}: {err}"}
            continue
        n = min(len(times[row]) for row in rows)
        out[T] = {
            row: {
                "median_ms": statistics.median(times[row]),
                "forward_median_ms": statistics.median(forward[row]),
                "time_ratio": statistics.median(times[row][i] / times["sdpa"][i] for i in range(n)),
                "forward_ratio": statistics.median(
                    forward[row][i] / forward["sdpa"][i] for i in range(n)
                ),
                "peak_bytes": peaks[row],
                "memory_ratio": peaks[row] / peaks["sdpa"],
                "rounds": n,
            }
            for row in rows
        }
        summary = "  ".join(f"{r} {out[T][r]['time_ratio']:.2f}" for r in KINDS)
        print(f"T={T:5d} time/SDPA flash (fwd+bwd): {summary}", flush=True)
        record("attention", {"T": T, **out[T]})
        del q, k, v, grad
        torch.cuda.empty_cache()
    return out


# --------------------------------------------------------------------------------------------
# 3. GPT-2-small training


def training(kinds: list[str], steps: int, rounds: int, batch_size: int, deadline: float) -> dict:
    from truthgpt.config import TruthGPTOptimizationCoreConfig
    from truthgpt.training import TruthGPTOptimizationCore

    fields = dict(GPT2, batch_size=batch_size, precision="bf16", device=DEVICE, seed=0)
    T, vocab = GPT2["block_size"], GPT2["vocab_size"]
    g = torch.Generator().manual_seed(0)
    data = [torch.randint(0, vocab, (batch_size, T), generator=g) for _ in range(steps)]
    result: dict = {}
    cores = {}
    for kind in kinds:
        try:
            config = TruthGPTOptimizationCoreConfig(distance_type=kind, **fields)
            core = TruthGPTOptimizationCore(config)
            for x in data[:3]:  # warm-up: compilation, allocator
                core.train_step({"input_ids": x, "labels": x})
            cores[kind] = core
        except Exception as err:
            traceback.print_exc()
            result[kind] = {"error": f"{type(err).__name__}: {err}"}
    seconds: dict = {kind: [] for kind in cores}
    peak: dict = dict.fromkeys(cores, 0)
    for _ in range(rounds):
        if time.perf_counter() > deadline:
            break
        for kind, core in cores.items():
            torch.cuda.reset_peak_memory_stats()
            start = time.perf_counter()
            for x in data:
                core.train_step({"input_ids": x, "labels": x})
            seconds[kind].append(time.perf_counter() - start)
            peak[kind] = max(peak[kind], torch.cuda.max_memory_allocated())
    for kind, core in cores.items():
        if not seconds[kind]:
            result[kind] = {"skipped": "time budget spent"}
            continue
        tokens_per_s = steps * batch_size * T / statistics.median(seconds[kind])
        result[kind] = {
            "tokens_per_s": tokens_per_s,
            "mfu": core.mfu(tokens_per_s, T),
            "peak_memory_mb": peak[kind] / 2**20,  # both models are held meanwhile
            "rounds": len(seconds[kind]),
        }
        record("training", {"kind": kind, **result[kind]})
    if "dot" in result and "tokens_per_s" in result["dot"]:
        for row in result.values():
            if "tokens_per_s" in row:
                row["ratio_to_dot"] = row["tokens_per_s"] / result["dot"]["tokens_per_s"]
    return result


# --------------------------------------------------------------------------------------------
# report


def targets(result: dict) -> dict:
    """Each target with its measured value and whether it is met (None: not measured)."""
    l1 = result.get("attention", {}).get(4096, {}).get("l1", {})
    train = result.get("training", {}).get("l1", {})
    measured = {
        "l1_time_ratio_T4096": l1.get("time_ratio"),
        "l1_memory_ratio_T4096": l1.get("memory_ratio"),
        "train_l1_over_dot": train.get("ratio_to_dot"),
    }
    out = {}
    for name, bound in TARGETS.items():
        value = measured[name]
        higher_is_better = name.startswith("train")
        met = None if value is None else (value >= bound if higher_is_better else value <= bound)
        out[name] = {"bound": bound, "measured": value, "met": met}
    return out


def _target_row(name: str, t: dict) -> str:
    value = "" if t["measured"] is None else f"{t['measured']:.3f}"
    met = "not measured" if t["met"] is None else ("yes" if t["met"] else "no")
    return f"| {name} | {t['bound']} | {value} | {met} |"


def _markdown(result: dict) -> str:
    lines = [
        f"# Distance attention with the Triton kernels on {result['gpu']}",
        "",
        f"torch {result['torch']}, triton {result['triton']}, CUDA {result['cuda']}; "
        f"{result['seconds']:.0f} s in all. Command: `{result['command']}`.",
        "",
        "## Targets",
        "",
        "| target | bound | measured | met |",
        "|---|---:|---:|---|",
        *(_target_row(name, t) for name, t in result["targets"].items()),
        "",
        "## Correctness on the device (max |kernel − float64 reference| / max |reference|)",
        "",
        "| kind | inputs | Tq, Tk | causal | mask | out | dq | dk | dv | dλ |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["correctness"]:
        if "skipped" in row:
            lines.append(f"| {row['kind']} | {row['skipped']} | | | | | | | | |")
            continue
        head = (
            f"| {row['kind']} | {row['dtype']} | {row['Tq']}, {row['Tk']} | {row['causal']} "
            f"| {row['masked']} |"
        )
        if "error" in row:
            lines.append(f"{head} {row['error'][:120]} | | | | |")
        else:
            errors = dict(row["max_relative_error"])
            finite = errors.pop("finite", True)
            cells = "".join(f" {e:.1e} |" for e in errors.values())
            lines.append(head + cells + ("" if finite else " not finite |"))
    lines += [
        "",
        f"## Attention, B={B}, H={H}, D={D}, causal, bf16, forward + backward, per-head λ",
        "",
        "Ratios to `F.scaled_dot_product_attention` (flash backend) in the same round; "
        "memory: peak allocated above the inputs.",
        "",
        "| T | kind | time ratio | forward ratio | ms (fwd+bwd) | memory ratio |",
        "|---:|---|---:|---:|---:|---:|",
    ]
    for T, rows in result["attention"].items():
        if "error" in rows or "skipped" in rows:
            lines.append(f"| {T} | {rows.get('error') or rows['skipped']} | | | | |")
            continue
        for row, r in rows.items():
            lines.append(
                f"| {T} | {row} | {r['time_ratio']:.2f} | {r['forward_ratio']:.2f} "
                f"| {r['median_ms']:.2f} | {r['memory_ratio']:.2f} |"
            )
    lines += [
        "",
        "## Training GPT-2 small (12 × 768, 12 heads, T=1024), bf16 autocast",
        "",
        f"Batch {result['train_batch_size']}, median of rounds of {result['train_steps']} steps.",
        "",
        "| kind | tokens/s | ratio to dot | MFU (of the measured matmul peak) | peak memory |",
        "|---|---:|---:|---:|---:|",
    ]
    for kind, r in result["training"].items():
        if "tokens_per_s" not in r:
            lines.append(f"| {kind} | {r.get('error') or r.get('skipped')} | | | |")
        else:
            ratio = f"{r['ratio_to_dot']:.2f}" if "ratio_to_dot" in r else ""
            lines.append(
                f"| {kind} | {r['tokens_per_s']:,.0f} | {ratio} | {r['mfu']:.1%} "
                f"| {r['peak_memory_mb']:,.0f} MiB |"
            )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="T = 1024 only, fewer rounds")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per length")
    parser.add_argument("--train-steps", type=int, default=10)
    parser.add_argument("--train-batch-size", type=int, default=8)
    parser.add_argument(
        "--out",
        type=Path,
        default=Path(os.environ["OUT"]) if os.environ.get("OUT") else RESULTS,
        help="folder for the results (default: $OUT, else benchmarks/results)",
    )
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.exit("attention_gpu.py needs a CUDA GPU (torch.cuda.is_available() is False)")
    if not triton_kernels.available():
        sys.exit(f"attention_gpu.py needs triton: {triton_kernels.unavailable_reason()}")
    begin = time.perf_counter()
    deadline = begin + BUDGET_S
    Ts = [1024] if args.quick else [1024, 4096]
    rounds = 2 if args.quick else args.rounds
    args.out.mkdir(parents=True, exist_ok=True)
    _SINK.append(args.out / "attention_gpu.jsonl")
    result: dict = {
        **environment(),
        "command": "python " + " ".join(["benchmarks/attention_gpu.py", *sys.argv[1:]]),
        "train_steps": args.train_steps,
        "train_batch_size": args.train_batch_size,
    }
    record("environment", result)
    print(f"[{result['gpu']}] correctness", flush=True)
    result["correctness"] = correctness(begin + BUDGET_S / 2)
    print("attention", flush=True)
    result["attention"] = attention(Ts, rounds, deadline)
    print("training", flush=True)
    result["training"] = training(
        ["dot", "l1"], args.train_steps, 1 if args.quick else 2, args.train_batch_size, deadline
    )
    result["seconds"] = time.perf_counter() - begin
    result["targets"] = targets(result)
    record("targets", result["targets"])
    (args.out / "attention_gpu.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / "attention_gpu.md").write_text(_markdown(result))
    print(f"wrote {args.out / 'attention_gpu.md'} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
