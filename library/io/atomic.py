"""Write files so that a crash never leaves a half-written output behind.

Everything we write (models, LoRAs, configs, caches) goes to a temporary file in the
target folder first and is moved into place with `os.replace`, which is atomic on the
same filesystem: readers see either the old file or the complete new one.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path
from typing import Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike, suffix: str | None = None) -> Iterator[str]:
    """Yield a temporary path next to `path`; on success it replaces `path`.

    On any exception the temporary file is removed and `path` is left untouched.
    `suffix` keeps the extension for writers that look at it (torch, PIL).
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    if suffix is None:
        suffix = target.suffix
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=f".tmp{suffix}", dir=target.parent)
    os.close(fd)
    # mkstemp creates 0600 files; give the output the permissions a plain open() would.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    try:
        yield tmp
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call `write(f)` with a binary file object; the result replaces `path` atomically."""
    with atomic_output(path) as tmp:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    atomic_write(path, lambda f: f.write(data))


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 2) -> None:
    import json

    atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False))


@contextlib.contextmanager
def atomic_folder(path: str | os.PathLike, prefix: str = ".tmp-") -> Iterator[str]:
    """Yield a temporary folder next to `path`; on success it takes `path`'s place.

    An existing folder at `path` is moved aside first and deleted only after the new one
    is in place; on any exception the temporary folder is removed and `path` is untouched.
    """
    import shutil

    target = Path(path)
    if target.exists() and not target.is_dir():
        from library.errors import UserInputError

        raise UserInputError(f"{target}: exists and is not a folder")
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f"{prefix}{target.name}-", dir=target.parent)
    try:
        yield tmp
        if target.is_dir():
            old = tempfile.mkdtemp(prefix=f".old-{target.name}-", dir=target.parent)
            os.rmdir(old)
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
