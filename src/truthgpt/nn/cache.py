"""The path `truthgpt.nn.cache` of `truthgpt.core.cache`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import cache as _core

sys.modules[__name__] = _core
