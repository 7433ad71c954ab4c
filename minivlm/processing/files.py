"""Reading a checkpoint's files (regular files only, JSON with errors that name the file) and the
limits the environment overrides."""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path
from typing import Any, BinaryIO


def open_regular(path: Path, error: type[Exception] = ValueError) -> BinaryIO:
    """`path` opened for reading in binary, once it is known to be a regular file.

    Opened non-blocking and checked with fstat on the open descriptor: a FIFO by that name would
    block a plain open() until a writer came, and a device (/dev/zero through a symlink) or a
    folder would be read forever or fail obscurely.
    """
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except IsADirectoryError:
        raise error(f"{path}: not a regular file (a folder); expected a file") from None
    except OSError as e:
        raise error(f"{path}: cannot read ({e.strerror})") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = (
            "a folder"
            if stat.S_ISDIR(mode)
            else "a FIFO"
            if stat.S_ISFIFO(mode)
            else "a socket"
            if stat.S_ISSOCK(mode)
            else "a device"
            if stat.S_ISCHR(mode) or stat.S_ISBLK(mode)
            else "not a file"
        )
        raise error(f"{path}: not a regular file ({kind}); expected a file")
    if hasattr(os, "set_blocking"):
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_json(path: Path, error: type[Exception] = ValueError) -> dict[str, Any]:
    """The JSON object in `path`, {} when the file is absent; `error` names the file when it is not
    one (not JSON, not an object, or a FIFO, folder or device by that name)."""
    if not path.exists():
        return {}  # absent, or a dangling symlink (an unfinished download)
    with open_regular(path, error) as f:
        data = f.read()
    try:
        value = json.loads(data.decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise error(f"{path}: not valid JSON ({e})") from None
    except RecursionError:
        raise error(f"{path}: not valid JSON (nested too deeply)") from None
    if not isinstance(value, dict):
        raise error(f"{path}: expected a JSON object at the top level")
    return value


def env_number(name: str, default, kind, error: type[Exception]):
    """A positive number from the environment variable `name` (a limit's override), else `default`;
    `error` names the variable and the default when its value is not one."""
    value = os.environ.get(name, "").strip()
    if not value:
        return default
    try:
        number = kind(value.replace("_", ""))
    except ValueError:
        number = 0
    if not number > 0 or number != number or number == float("inf"):
        what = "a positive whole number" if kind is int else "a positive number"
        raise error(f"{name}={value!r}: expected {what} (default {default})")
    return number
