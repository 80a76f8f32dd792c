"""Reading files that may come from a damaged or hostile file system.

A path that should hold a small file may instead be a FIFO (an open would wait forever), a
link to /dev/zero (a read would never end), a folder, or a file of gigabytes. Every file
truthgpt reads on its own initiative goes through `read_regular_file`: it is opened without
waiting, must be a regular file, and is read only up to a limit that the caller sets before
anything is read. JSON and TOML are bounded again after parsing (`check_depth`), so that
code walking a parsed value never meets nesting it cannot handle.
"""

from __future__ import annotations

import os
import stat
import tomllib
from pathlib import Path
from typing import Any

from truthgpt.io.jsonio import JSONFileError, parse_json

KiB, MiB = 2**10, 2**20
POINTER_LIMIT = 4 * KiB  # `latest`, `best`: a folder name
CONFIG_LIMIT = 1 * MiB  # config.json, run.json, meta.json, manifest.json, --config files
STATE_LIMIT = 64 * MiB  # trainer_state.json: random states and the evaluation history
TOKENIZER_LIMIT = 64 * MiB  # tokenizer.json (a byte-level BPE of 50k tokens is ~3 MB)
METRICS_LIMIT = 256 * MiB  # metrics.jsonl, read again on resume: a row is ~300 bytes
MAX_DEPTH = 64  # nesting of a JSON or TOML value; what truthgpt writes nests ≤ 6 deep


class UnreadableFile(ValueError):
    """A path that should hold a file truthgpt reads is not a regular file, or too large."""


def named(err: OSError, path: str | Path) -> OSError:
    """`err` with `path` as its file name when it names none (a failed write() names no
    file, so "No space left on device" alone would not say where)."""
    if err.filename is not None or err.errno is None:
        return err
    return type(err)(err.errno, err.strerror, str(path))


def describe(mode: int) -> str:
    """What a file system entry is, in words, from its st_mode."""
    for test, words in (
        (stat.S_ISDIR, "a folder"),
        (stat.S_ISFIFO, "a FIFO (named pipe)"),
        (stat.S_ISCHR, "a character device"),
        (stat.S_ISBLK, "a block device"),
        (stat.S_ISSOCK, "a socket"),
        (stat.S_ISLNK, "a symbolic link"),
    ):
        if test(mode):
            return words
    return "not a regular file"


def not_regular_reason(path: Path) -> str | None:
    """Why `path` is not a regular file that can be read ('is a FIFO …'), or None if it is.
    Links are followed; a missing path or a link loop is reported as such."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "does not exist" if not os.path.islink(path) else "is a link to nothing"
    except OSError as err:  # a link loop, a name too long, no permission
        return err.strerror or str(err)
    return None if stat.S_ISREG(mode) else f"is {describe(mode)}, not a regular file"


def read_regular_file(
    path: str | Path,
    limit: int,
    *,
    what: str = "file",
    error: type[ValueError] = UnreadableFile,
) -> bytes:
    """The bytes of `path`, which must be a regular file of at most `limit` bytes.

    Opened with O_NONBLOCK, so a FIFO is refused rather than waited on; the type and size
    are checked on the open file, so a path swapped after the check changes nothing. Raises
    `error` naming the path (FileNotFoundError and other OSErrors pass through).
    """
    path = Path(path)
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            raise error(f"{path}: is {describe(info.st_mode)}, not a regular file")
        if info.st_size > limit:
            raise error(f"{path}: {info.st_size:,} bytes, more than a {what} may hold ({limit:,})")
        chunks, size = [], 0
        while size <= limit:  # the file may grow while it is read: never past limit + 1
            chunk = os.read(fd, min(limit + 1 - size, 1 * MiB))
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        if size > limit:
            raise error(f"{path}: grew past {limit:,} bytes while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)


def depth(value: Any) -> int:
    """How deeply lists and dicts nest in `value` (a scalar: 0), without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, level = stack.pop()
        children = item.values() if isinstance(item, dict) else item
        if isinstance(item, dict | list):
            deepest = max(deepest, level)
            stack.extend((child, level + 1) for child in children if isinstance(child, dict | list))
    return deepest


def check_depth(value: Any, path: Path, error: type[ValueError], limit: int = MAX_DEPTH) -> Any:
    """`value`, unless it nests deeper than `limit` (then `error` naming the file)."""
    if depth(value) > limit:
        raise error(f"{path}: nested more than {limit} levels deep; no truthgpt file is")
    return value


def read_json_file(
    path: str | Path,
    limit: int = CONFIG_LIMIT,
    *,
    what: str = "JSON file",
    error: type[ValueError] = JSONFileError,
) -> Any:
    """A JSON file read with `read_regular_file`'s bounds, its nesting bounded too."""
    path = Path(path)
    data = read_regular_file(path, limit, what=what, error=error)
    return check_depth(parse_json(path, data, error), path, error)


def read_toml_file(
    path: str | Path,
    limit: int = CONFIG_LIMIT,
    *,
    error: type[ValueError] = JSONFileError,
) -> dict[str, Any]:
    """A TOML file read with `read_regular_file`'s bounds, its nesting bounded too."""
    path = Path(path)
    data = read_regular_file(path, limit, what="TOML file", error=error)
    try:
        value = tomllib.loads(data.decode("utf-8"))
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise error(f"{path}: not valid TOML ({err})") from None
    except RecursionError:  # tomllib parses nested arrays and tables recursively
        raise error(
            f"{path}: nested more than {MAX_DEPTH} levels deep; no truthgpt file is"
        ) from None
    return check_depth(value, path, error)
