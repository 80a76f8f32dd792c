"""The path `truthgpt.nn.attention.kernel_codes` of `truthgpt.core.kernel_codes`:
one module object under both names, so what is set through either is seen through both."""

import sys

from truthgpt.core import kernel_codes as _core

sys.modules[__name__] = _core
