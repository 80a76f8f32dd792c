"""Facts about the device a run uses: which one, its peak FLOP/s, and memory in use."""

from __future__ import annotations

import functools
import json
import math
import os
import platform
import resource
import time
from pathlib import Path

import torch

from truthgpt.io.atomic import write_file_atomically


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


# CUDA: one product large enough to keep the device busy for milliseconds, timed by events on
# the device (a host timer around a 1024³ product measures mostly launch latency).
CUDA_SIZE = 8192
CPU_SIZE = 1024
ROUNDS = 20


@functools.cache
def measure_peak_flops(
    device: torch.device, precision: str = "fp32", size: int | None = None
) -> float:
    """Peak matmul FLOP/s of this machine in the run's precision, a figure that does not move
    with the load at the moment it is asked for.

    CUDA: the fastest of ROUNDS CUDA_SIZE³ products, timed with CUDA events after a warm-up.
    CPU: the fastest CPU_SIZE³ product ever measured on this machine (per CPU model, threads,
    dtype and torch version), kept in `peak_cache_path()`: a peak measured on a busy machine
    would be low and report an inflated MFU, so a measurement only ever raises the figure.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    if device.type == "cuda":
        return _cuda_peak(device, dtype, size or CUDA_SIZE)
    measured = _cpu_best(dtype, size or CPU_SIZE)
    key = "|".join(
        (_cpu_model(), str(torch.get_num_threads()), str(dtype), torch.__version__, str(size))
    )
    return _remember_peak(key, measured)


def _cuda_peak(device: torch.device, dtype: torch.dtype, size: int) -> float:
    with torch.cuda.device(device):
        a = torch.randn(size, size, device=device, dtype=dtype)
        b = torch.randn(size, size, device=device, dtype=dtype)
        a @ b  # warm-up
        best = float("inf")
        for _ in range(ROUNDS):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            a @ b
            end.record()
            end.synchronize()
            best = min(best, start.elapsed_time(end) / 1e3)
    return 2 * size**3 / best


def _cpu_best(dtype: torch.dtype, size: int) -> float:
    """The fastest of ROUNDS products: on a shared machine any one of them may be slowed."""
    a = torch.randn(size, size, dtype=dtype)
    b = torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(ROUNDS):
        start = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def peak_cache_path() -> Path:
    """Where the CPU peaks are kept: $TRUTHGPT_PEAK_CACHE, else ~/.cache/truthgpt/."""
    if os.environ.get("TRUTHGPT_PEAK_CACHE"):
        return Path(os.environ["TRUTHGPT_PEAK_CACHE"])
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "truthgpt" / "peak_flops.json"


def _remember_peak(key: str, measured: float) -> float:
    """The larger of `measured` and the stored peak for key; stores it. A cache that cannot
    be read or written only costs the memory: the measurement is returned."""
    path = peak_cache_path()
    try:
        stored = json.loads(path.read_text()) if path.is_file() else {}
        if not isinstance(stored, dict):
            stored = {}
    except (OSError, ValueError):
        stored = {}
    previous = stored.get(key)
    if isinstance(previous, (int, float)) and math.isfinite(previous) and previous > measured:
        return float(previous)
    stored[key] = measured
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_file_atomically(path, json.dumps(stored, indent=1).encode("utf-8"))
    except OSError:
        pass
    return measured


def memory_mb(device: torch.device) -> float:
    """Memory in use: CUDA's allocated peak, or the process's resident set on the CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        return resident_pages * resource.getpagesize() / 2**20
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
