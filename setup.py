"""Builds the native CPU attention kernel (truthgpt.nn.attention._native) at install time.

The kernel is optional: if it cannot be built (no C++ compiler, an unsupported platform), the
install goes on with a warning and truthgpt falls back to the compiled or eager kernels.
Everything else about the package is in pyproject.toml.
"""

import os
import runpy
import sys
from pathlib import Path

from setuptools import setup
from torch.utils.cpp_extension import BuildExtension, CppExtension


class OptionalBuildExtension(BuildExtension):
    """Builds the kernel if it can; TRUTHGPT_REQUIRE_NATIVE=1 makes a failure fatal."""

    def run(self):
        try:
            super().run()
        except Exception as err:  # any build failure leaves the fallbacks
            if os.environ.get("TRUTHGPT_REQUIRE_NATIVE") == "1":
                raise
            print(
                f"warning: truthgpt's native attention kernel was not built ({err}); "
                "the compiled or eager kernels will be used",
                file=sys.stderr,
            )
            self.extensions = []


CSRC = "src/truthgpt/nn/attention/csrc"
# The kind codes, from the registry's own table (by path: the package is not installed yet),
# as -DTG_KIND_L1=0 ...: csrc/common.h builds its enum from them and stops without them.
CODES_FILE = Path(__file__).resolve().parent / "src/truthgpt/core/kernel_codes.py"
KERNEL_CODES = runpy.run_path(str(CODES_FILE))["KERNEL_CODES"]
KIND_MACROS = [f"-DTG_KIND_{name.upper()}={code}" for name, code in KERNEL_CODES.items()]
native = CppExtension(
    "truthgpt.nn.attention._native",
    # the longest compiles first, so that two jobs end together (GCC 12, -O3: AVX-512 27 s,
    # baseline 24 s, AVX2 19 s, the host code 9 s)
    [
        f"{CSRC}/{name}.cpp"
        for name in ("isa_x86_64_v4", "isa_baseline", "isa_x86_64_v3", "distance_attention")
    ],
    depends=[str(p) for p in sorted(Path(CSRC).glob("*.h"))],
    # -fno-math-errno lets sqrt vectorise; nothing here changes the floating-point
    # environment (no -ffast-math: it would flush subnormals to zero process-wide).
    extra_compile_args=[
        "-O3",
        "-g0",
        "-fopenmp",
        "-fno-math-errno",
        "-Wno-unused-function",
        *KIND_MACROS,
    ],
    extra_link_args=["-fopenmp"],
)

# ninja compiles the four translation units in parallel (MAX_JOBS caps the jobs); without a
# ninja executable torch warns and compiles them one after another.
setup(ext_modules=[native], cmdclass={"build_ext": OptionalBuildExtension})
