"""Release 0.1's module paths, kept as shims that forward to where the code lives now.

Importing one warns once, naming the new path, so that scripts written for 0.1 keep running
while they are updated; the shims go in the release after next.
"""

from __future__ import annotations

import warnings


def warn_moved(old: str, new: str) -> None:
    """The DeprecationWarning of a shim, pointing at the line that imported it."""
    warnings.warn(
        f"{old} moved to {new} in truthgpt 0.2.0; import from {new} instead "
        "(the old path goes in a later release)",
        DeprecationWarning,
        stacklevel=3,  # past this function and the shim's module body: the importing line
    )
