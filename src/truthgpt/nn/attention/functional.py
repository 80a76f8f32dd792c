"""The path `truthgpt.nn.attention.functional` of `truthgpt.core.functional`:
one module object under both names, so what is set through either is seen through both."""

import sys

from truthgpt.core import functional as _core

sys.modules[__name__] = _core
