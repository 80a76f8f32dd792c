"""The code by which the kernels know each Minkowski kind: the one table that the registry
(`kinds.py`), the native kernel's build (`setup.py`) and the Triton kernels read, so that no
kernel can disagree with the registry about which code is which distance.

Standard library only: `setup.py` loads this file by path, before the package is installed.
"""

KERNEL_CODES: dict[str, int] = {"l1": 0, "l2": 1, "chebyshev": 2, "lp": 3}
