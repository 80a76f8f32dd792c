"""The flash-style kernels of the kinds with a `MinkowskiKernel`, as attention backends.

Registered in `auto`'s order: the native C++ kernel (CPU tensors), the Triton kernels (CUDA
tensors, when triton is installed), the blocked PyTorch kernel compiled by inductor (any
device); "eager" runs the same blocked kernel without compiling and is taken only by name.
Each wraps its kernel in the one backend signature, `run(q, k, v, call)`; the modules are
read at call time, so a kernel that is not built or not installed costs nothing until used.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from truthgpt.nn.attention import kernels, native, triton_kernels
from truthgpt.nn.attention.functional import (
    AttentionBackend,
    AttentionCall,
    Run,
    register_backend,
    run_plain,
)


def _kernel(function: Callable[[], Callable[..., Tensor]], **options: object) -> Run:
    """The backend signature around a kernel function that takes `distance_attention`'s
    arguments plus a seed (and ALiBi's slopes, when the call has them); `function()` finds it
    at call time (a test may replace it)."""

    def run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        position = {"alibi": call.alibi} if call.alibi is not None else {}
        seed = call.dropout_seed() if call.dropout_p > 0.0 else 0
        return function()(
            q, k, v, call.kind, call.scale, call.causal, call.attn_mask, call.dropout_p,
            p=call.p, seed=seed, **options, **position,
        )  # fmt: skip

    return run


def _blocked(compiled: bool) -> Run:
    kernel = _kernel(lambda: kernels.blocked_attention, compiled=compiled)

    def run(q: Tensor, k: Tensor, v: Tensor, call: AttentionCall) -> Tensor:
        if q.shape[2] == 1:  # one decoding step holds only Tk scores per head: plain is cheap
            return run_plain(q, k, v, call)
        return kernel(q, k, v, call)

    return run


register_backend(
    AttentionBackend(
        "native",
        # the decoding step too: one pass over heads
        _kernel(lambda: native.native_attention),
        ("blocked",),
        supports=lambda q, kind: native.supports(q, kind),
        unavailable=lambda: (
            None
            if native.available()
            else f"the native attention kernel is not available ({native.UNAVAILABLE})"
        ),
        device_type="cpu",
        hint="using the compiled blocked kernel (the first call compiles it, 20-30 s). "
        "Reinstall with a C++ compiler present to build it.",
    )
)
register_backend(
    AttentionBackend(
        "triton",
        _kernel(lambda: triton_kernels.triton_attention),  # decoding too: one launch
        ("blocked",),
        supports=lambda q, kind: triton_kernels.supports(q, kind),
        unavailable=lambda: (
            None
            if triton_kernels.available()
            else f"triton is not installed ({triton_kernels.unavailable_reason()})"
        ),
        device_type="cuda",
        hint="using the compiled blocked kernel, which is far slower on GPUs. "
        f"{triton_kernels.INSTALL_HINT}",
    )
)
register_backend(AttentionBackend("compiled", _blocked(compiled=True), ("blocked",)))
register_backend(AttentionBackend("eager", _blocked(compiled=False), ("blocked",), auto=False))
