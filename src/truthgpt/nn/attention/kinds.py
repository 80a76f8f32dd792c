"""The path `truthgpt.nn.attention.kinds` of `truthgpt.core.kinds`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import kinds as _core

sys.modules[__name__] = _core
