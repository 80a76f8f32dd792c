"""The bounds the fuzzers' child processes run their cases under: a time limit per case
(SIGALRM raises `CaseTimeout`) and a cap on the address space above what the warmed-up
process already maps (RLIMIT_AS), so that a case reading without bound fails instead of
taking the machine's memory."""

from __future__ import annotations

import resource
import signal
from pathlib import Path
from typing import Any

ADDRESS_SPACE_HEADROOM = 3 * 2**30  # above the address space after the warm-up loads


class CaseTimeout(BaseException):
    """Raised in a case that runs past its time limit (a BaseException: nothing catches it)."""


def _timeout(signum: int, frame: Any) -> None:
    raise CaseTimeout


def raise_on_alarm() -> None:
    """`signal.alarm(seconds)` (or `setitimer`) before a case then ends it with CaseTimeout."""
    signal.signal(signal.SIGALRM, _timeout)


def _address_space() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def cap_address_space(headroom: int = ADDRESS_SPACE_HEADROOM) -> None:
    """RLIMIT_AS at the address space mapped now plus `headroom`."""
    hard = resource.getrlimit(resource.RLIMIT_AS)[1]
    resource.setrlimit(resource.RLIMIT_AS, (_address_space() + headroom, hard))
