"""The path `truthgpt.nn.inputs` of `truthgpt.core.inputs`: one module object under both
names, so what is set through either is seen through both."""

import sys

from truthgpt.core import inputs as _core

sys.modules[__name__] = _core
