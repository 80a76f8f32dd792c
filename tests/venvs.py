"""Separate virtual environments for tests that must run without truthgpt installed.

A venv is built once per (Python, packages, contents of constraints.txt) and kept under
~/.cache/truthgpt-test-venvs/, so only the first run pays for the install (about a minute with
the local torch wheel); new pins give a new venv. It is built in a temporary folder and renamed
into place, so an interrupted build is never reused, under a lock file, so that test processes
running at once (pytest-xdist workers, two checkouts) build it once: the others wait and reuse
it.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CACHE = Path(os.environ.get("TRUTHGPT_TEST_VENVS", Path.home() / ".cache" / "truthgpt-test-venvs"))
CONSTRAINTS = ROOT / "constraints.txt"


def python_for_venvs() -> str:
    """The interpreter new venvs are made with: python3.11 if found, else this one."""
    return shutil.which("python3.11") or sys.executable


def venv_python(packages: tuple[str, ...], *, check_absent: str = "truthgpt") -> Path:
    """The python of a cached venv holding exactly `packages` (pinned) and their dependencies.

    Skips the calling test, with pip's last words, when the packages cannot be installed (no
    package index reachable); fails when `check_absent` is importable there, since the test
    would then prove nothing.
    """
    base = python_for_venvs()
    version = subprocess.run(
        [base, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    pins = hashlib.sha256(CONSTRAINTS.read_bytes() if CONSTRAINTS.exists() else b"").hexdigest()
    name = "py{}-{}-c{}".format(version, "-".join(p.replace("==", "") for p in packages), pins[:12])
    home = CACHE / name
    python = home / "bin" / "python"
    if not (home / ".complete").exists():
        CACHE.mkdir(parents=True, exist_ok=True)
        with open(CACHE / f"{name}.lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file is closed
            if not (home / ".complete").exists():  # built while this process waited?
                _build(base, home, packages)
    # -I: neither PYTHONPATH nor the working folder, as a user's interpreter would start.
    probe = subprocess.run(
        [str(python), "-I", "-c", f"import {check_absent}"], capture_output=True, cwd="/"
    )
    if probe.returncode == 0:
        pytest.fail(f"{home}: {check_absent} is importable there, so the test would prove nothing")
    return python


def _build(base: str, home: Path, packages: tuple[str, ...]) -> None:
    tmp = home.with_name(home.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    subprocess.run([base, "-m", "venv", str(tmp)], check=True, capture_output=True)
    pip = [str(tmp / "bin" / "python"), "-m", "pip", "install", "--quiet"]
    if CONSTRAINTS.exists():
        pip += ["-c", str(CONSTRAINTS)]
    # torch first and alone: it decides which wheel (the CPU one) everything else sees.
    torch = [p for p in packages if p.startswith("torch==")]
    for step in (torch, [p for p in packages if p not in torch]):
        if not step:
            continue
        result = subprocess.run([*pip, *step], capture_output=True, text=True)
        if result.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            tail = (result.stderr or result.stdout).strip().splitlines()[-3:]
            pytest.skip(f"cannot build a venv with {' '.join(step)}: {' | '.join(tail)}")
    (tmp / ".complete").write_text("\n".join(packages) + "\n")
    try:
        tmp.rename(home)
    except OSError:  # another process finished the same venv first
        shutil.rmtree(tmp, ignore_errors=True)
