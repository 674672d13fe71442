"""Model hashes stored in safetensors metadata (spec: formats.md b.1).

* `sshs_model_hash`: SHA-256 of the tensor-data section of a safetensors serialisation
  (everything after the 8-byte length and the JSON header). It does not depend on the
  metadata, so it is the same for the in-memory serialisation and for the final file.
* `sshs_legacy_hash`: first 8 hex digits of the SHA-256 of the 64 KiB starting at 1 MiB of
  the serialisation, header included, so it does depend on the `ss_*` metadata.
* "old webui hash" of a model file (`ss_sd_model_hash`, `ss_vae_hash`): the same 8-hex
  window hash, taken on the file; 'NOFILE' / 'IsADirectory' when the file cannot be read.
* full SHA-256 of a file (`ss_new_sd_model_hash`, `ss_new_vae_hash`).

Files are streamed in 1 MiB chunks. Only `sshs_hashes` needs torch/safetensors, imported
when called.
"""

from __future__ import annotations

import hashlib
import os
import struct
from typing import BinaryIO, Mapping

CHUNK = 1 << 20  # 1 MiB
LEGACY_OFFSET = 0x100000  # 1 MiB
LEGACY_SIZE = 0x10000  # 64 KiB


def ss_only(metadata: Mapping[str, str] | None) -> dict[str, str]:
    """The metadata entries that take part in the sshs_* serialisation (keys 'ss_*')."""
    return {k: v for k, v in (metadata or {}).items() if k.startswith("ss_")}


def _data_section_offset(header8: bytes, total_size: int | None, name: str) -> int:
    if len(header8) < 8:
        raise ValueError(f"{name}: too short to be a safetensors serialisation")
    (n,) = struct.unpack("<Q", header8[:8])
    start = 8 + n
    if total_size is not None and start > total_size:
        raise ValueError(f"{name}: header length {n} does not fit in {total_size} bytes (not safetensors?)")
    return start


def model_hash_of_bytes(buf: bytes | bytearray | memoryview) -> str:
    """sshs_model_hash of an in-memory safetensors serialisation."""
    view = memoryview(buf)
    start = _data_section_offset(bytes(view[:8]), len(view), "buffer")
    h = hashlib.sha256()
    for pos in range(start, len(view), CHUNK):
        h.update(view[pos : pos + CHUNK])
    return h.hexdigest()


def legacy_hash_of_bytes(buf: bytes | bytearray | memoryview) -> str:
    """sshs_legacy_hash of a buffer: 8 hex of SHA-256 of bytes [1 MiB, 1 MiB + 64 KiB).
    A buffer shorter than 1 MiB hashes the empty string."""
    view = memoryview(buf)
    return hashlib.sha256(view[LEGACY_OFFSET : LEGACY_OFFSET + LEGACY_SIZE]).hexdigest()[:8]


def _stream_sha256(f: BinaryIO, h=None):
    h = h or hashlib.sha256()
    while True:
        chunk = f.read(CHUNK)
        if not chunk:
            return h
        h.update(chunk)


def model_hash_of_file(path: str | os.PathLike) -> str:
    """sshs_model_hash of a safetensors file (SHA-256 of its tensor-data section).
    Raises OSError / ValueError for unreadable or non-safetensors files."""
    path = os.fspath(path)
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        start = _data_section_offset(f.read(8), size, path)
        f.seek(start)
        return _stream_sha256(f).hexdigest()


def legacy_hash_of_file(path: str | os.PathLike) -> str:
    """The "old webui hash" of any model file (used for ss_sd_model_hash / ss_vae_hash):
    8 hex of SHA-256 of the 64 KiB at offset 1 MiB; 'NOFILE' if the file cannot be
    opened, 'IsADirectory' for a folder."""
    try:
        with open(os.fspath(path), "rb") as f:
            f.seek(LEGACY_OFFSET)
            return hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
    except IsADirectoryError:
        return "IsADirectory"
    except OSError:
        if os.path.isdir(path):  # some platforms report folders as PermissionError
            return "IsADirectory"
        return "NOFILE"


def full_sha256_of_file(path: str | os.PathLike) -> str:
    """Lowercase hex SHA-256 of the whole file (ss_new_sd_model_hash / ss_new_vae_hash)."""
    with open(os.fspath(path), "rb") as f:
        return _stream_sha256(f).hexdigest()


def sshs_hashes(tensors: Mapping, metadata: Mapping[str, str] | None = None) -> tuple[str, str]:
    """(sshs_model_hash, sshs_legacy_hash) for a state dict about to be saved.

    Computed on `safetensors.torch.save(tensors, <only the ss_* metadata>)`, as the
    reference tools do, so the values match theirs for the same tensors and metadata.
    """
    from safetensors.torch import save

    data = save(dict(tensors), ss_only(metadata))
    return model_hash_of_bytes(data), legacy_hash_of_bytes(data)


def add_sshs_hashes(tensors: Mapping, metadata: dict[str, str]) -> dict[str, str]:
    """Set metadata['sshs_model_hash'] / ['sshs_legacy_hash'] in place; returns metadata."""
    model_hash, legacy_hash = sshs_hashes(tensors, metadata)
    metadata["sshs_model_hash"] = model_hash
    metadata["sshs_legacy_hash"] = legacy_hash
    return metadata
