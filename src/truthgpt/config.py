"""The path `truthgpt.config` of `truthgpt.core.config`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import config as _core

sys.modules[__name__] = _core
