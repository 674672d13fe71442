"""Atomic writes for dataset caches (``.npz``, ``metadata_cache.json``).

Built on :func:`library.io.atomic.atomic_output` (temporary file next to the target,
then ``os.replace``), but without the ``fsync``: a cache file lost to a power cut is
simply rebuilt (the validity checks detect it), and skipping 20,000 fsyncs keeps caching
fast.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from library.io.atomic import atomic_output


def atomic_write(path: str, write: Callable) -> None:
    """Call ``write(f)`` on a temporary binary file, then move it to ``path``."""
    with atomic_output(path, suffix=".part") as tmp:
        with open(tmp, "wb") as f:
            write(f)


def atomic_write_bytes(path: str, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj: Any, indent: int = 2) -> None:
    atomic_write_bytes(path, json.dumps(obj, indent=indent, ensure_ascii=False).encode("utf-8"))


__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json"]
