"""The path `truthgpt.nn.generation` of `truthgpt.core.generation`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import generation as _core

sys.modules[__name__] = _core
