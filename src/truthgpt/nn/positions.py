"""The path `truthgpt.nn.positions` of `truthgpt.core.positions`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import positions as _core

sys.modules[__name__] = _core
