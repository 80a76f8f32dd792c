"""Facts about the device a run uses: which one, its peak FLOP/s, and memory in use."""

from __future__ import annotations

import functools
import resource
import time

import torch


def resolve_device(name: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU; asking for CUDA without one is an error."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but no CUDA device is available")
    return torch.device(name)


@functools.cache
def measure_peak_flops(device: torch.device, precision: str = "fp32", size: int = 1024) -> float:
    """Measured matmul FLOP/s: the best of a few square matmuls in the run's precision.

    MFU against a measured peak says how close training gets to what this very machine can do,
    rather than to a datasheet figure that a shared CPU never reaches.
    """
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(precision, torch.float32)
    if device.type == "cpu" and dtype == torch.float16:
        dtype = torch.float32
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    # The fastest of many single matmuls: on a shared machine any one of them may be slowed by
    # other work, and a peak measured too low would report an MFU above 100 %.
    for _ in range(20):
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


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
