"""Atomic file writes: write a temporary file next to the target, then rename over it.

A crash or Ctrl-C mid-write leaves the old file (or none), never a half-written one.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from typing import Any, Callable


def atomic_write(path: str, write: Callable[[io.BufferedWriter], None]) -> None:
    """Call ``write(f)`` on a temporary file in the target's folder, then rename it to ``path``."""
    folder = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix="-" + os.path.basename(path) + ".part", dir=folder)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    text = json.dumps(obj, indent=indent, ensure_ascii=False)
    atomic_write_bytes(path, text.encode("utf-8"))
