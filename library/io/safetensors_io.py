"""Reading and writing .safetensors files.

Reads are memory-mapped and lazy (safetensors >= 0.8 hands out tensors that share the
file's pages, copy-on-write), so a loaded model costs about the file's size in RSS and no
more. The header is validated first, so a truncated or foreign file is reported by name
before any work starts. Writes are atomic (temporary file + rename).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Mapping

from library.errors import UserInputError
from library.io.atomic import atomic_output

# Largest header we accept; real headers are a few MB at most.
_MAX_HEADER_BYTES = 100 * 1024 * 1024

# safetensors dtype names -> element size in bytes (for the truncation check)
_DTYPE_SIZES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "U16": 2, "U32": 4, "U64": 8, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1, "F4": 1,
}


@dataclass(frozen=True)
class TensorInfo:
    dtype: str
    shape: tuple[int, ...]
    start: int  # offset in the data section
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: str
    tensors: dict[str, TensorInfo]
    metadata: dict[str, str]
    data_offset: int  # absolute file offset where the data section starts

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: v.shape for k, v in self.tensors.items()}


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Parse and validate a safetensors header without touching the tensor data.

    Raises UserInputError naming the file when it is missing, not a safetensors file, or
    truncated (a tensor's bytes reach past the end of the file).
    """
    path = str(path)
    if not os.path.exists(path):
        raise UserInputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise UserInputError(f"{path}: is a folder, expected a .safetensors file")
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise UserInputError(f"{path}: too short to be a safetensors file ({size} bytes)")
        (n,) = struct.unpack("<Q", head)
        if n == 0 or n > _MAX_HEADER_BYTES or 8 + n > size:
            raise UserInputError(
                f"{path}: not a valid safetensors file (header length {n} does not fit a file of {size} bytes; truncated or another format?)"
            )
        raw = f.read(n)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserInputError(f"{path}: not a valid safetensors file (unreadable JSON header: {e})") from None
    if not isinstance(header, dict):
        raise UserInputError(f"{path}: not a valid safetensors file (header is not a JSON object)")

    metadata = header.pop("__metadata__", None) or {}
    data_size = size - 8 - n
    tensors: dict[str, TensorInfo] = {}
    for key, info in header.items():
        try:
            dtype, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise UserInputError(f"{path}: not a valid safetensors file (bad header entry for '{key}')") from None
        if end > data_size:
            raise UserInputError(
                f"{path}: truncated safetensors file: tensor '{key}' needs bytes up to {8 + n + end}, file has {size}"
            )
        tensors[key] = TensorInfo(dtype, shape, start, end)
    return SafetensorsHeader(path, tensors, dict(metadata), 8 + n)


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    return read_header(path).metadata


def load_state_dict(
    path: str | os.PathLike,
    keys: Iterable[str] | None = None,
    device: str = "cpu",
    dtype=None,
    mmap: bool = True,
) -> dict:
    """Load tensors from a safetensors file (all, or only `keys`).

    With mmap=True (default) CPU tensors share the file's pages (copy-on-write: writing to
    them never changes the file). mmap=False reads the whole file into memory first, for
    network filesystems where mapping is slow (`--disable_mmap_load_safetensors`).
    `dtype` converts floating-point tensors only.
    """
    header = read_header(path)
    wanted = list(header.tensors) if keys is None else list(keys)
    missing = [k for k in wanted if k not in header.tensors]
    if missing:
        raise UserInputError(f"{path}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")

    if mmap:
        from safetensors import safe_open

        out = {}
        with safe_open(str(path), framework="pt", device=device) as f:
            for k in wanted:
                out[k] = f.get_tensor(k)
    else:
        from safetensors.torch import load as load_bytes

        with open(path, "rb") as f:
            everything = load_bytes(f.read())
        out = {k: everything[k].to(device) for k in wanted}
    if dtype is not None:
        out = {k: (t.to(dtype) if t.is_floating_point() else t) for k, t in out.items()}
    return out


def save_state_dict(tensors: Mapping, path: str | os.PathLike, metadata: Mapping[str, str] | None = None) -> None:
    """Write tensors atomically. Shared or non-contiguous tensors are made contiguous copies."""
    from safetensors.torch import save_file

    clean = {}
    seen_storages: set[int] = set()
    for k, t in tensors.items():
        t = t.detach().cpu()
        ptr = t.untyped_storage().data_ptr()
        # safetensors refuses tensors that share memory (tied weights, views): copy those.
        if not t.is_contiguous() or ptr in seen_storages:
            t = t.contiguous().clone()
        seen_storages.add(t.untyped_storage().data_ptr())
        clean[k] = t
    if metadata is not None:
        bad = [k for k, v in metadata.items() if not isinstance(v, str)]
        if bad:
            raise TypeError(f"safetensors metadata values must be strings: {bad}")
    with atomic_output(path) as tmp:
        save_file(clean, tmp, metadata=dict(metadata) if metadata else None)


def is_safetensors_path(path: str | os.PathLike) -> bool:
    """`.safetensors`, or `.sft` (the extension of the first FLUX.1 releases)."""
    return Path(path).suffix.lower() in (".safetensors", ".sft")
