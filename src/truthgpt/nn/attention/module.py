"""The path `truthgpt.nn.attention.module` of `truthgpt.core.module`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import module as _core

sys.modules[__name__] = _core
