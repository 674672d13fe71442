"""Tensor files read on demand, and safetensors files written one tensor at a time.

`TensorFile` reads a .safetensors tensor with one positioned read into fresh memory when it
is asked for, and keeps nothing: what stays resident is only what the caller keeps. (A
memory map would do the reading lazily too, but every page it touches stays counted in the
process's resident memory until the map is closed, so a tool that walks a 2 GB file module
by module would end up holding 2 GB.) Pickled files (.pt/.ckpt) cannot be read piecemeal and
are loaded whole.

`StreamingSafetensorsWriter` writes a valid .safetensors file whose header (names, dtypes,
shapes) is known in advance, taking the tensors one by one in that order; the file goes to a
temporary name and replaces the target only when complete.

`save_with_sshs` writes tensors with the `sshs_*` hashes (formats.md b.1) without the two
full in-memory serialisations that hashing through `safetensors.torch.save` costs.
"""

from __future__ import annotations

import json
import os
import struct
from typing import Iterable, Mapping

import torch

from library.errors import UserInputError
from library.io.safetensors_io import is_safetensors_path, read_header

ST_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2")):
    if hasattr(torch, _attr):
        ST_DTYPES[_name] = getattr(torch, _attr)
ST_NAMES = {v: k for k, v in ST_DTYPES.items()}


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class TensorFile:
    """Keys, shapes, dtypes and metadata of a tensor file; tensors read when asked for."""

    def __init__(self, path: str | os.PathLike, what: str = "file"):
        self.path = os.fspath(path)
        self.what = what
        if not os.path.exists(self.path):
            raise UserInputError(f"{what} {self.path}: file not found")
        if os.path.isdir(self.path):
            raise UserInputError(f"{what} {self.path}: is a folder, expected a file")
        self._file = None
        self._map = None
        self._sd: dict | None = None
        if is_safetensors_path(self.path):
            header = read_header(self.path)  # validated: truncation / bad JSON are UserInputErrors
            self.metadata = dict(header.metadata)
            self._data_offset = header.data_offset
            self._info = header.tensors
            unknown = sorted({i.dtype for i in self._info.values() if i.dtype not in ST_DTYPES})
            if unknown:
                raise UserInputError(f"{what} {self.path}: tensor dtype(s) {unknown} are not supported")
            self._shapes = {k: tuple(i.shape) for k, i in self._info.items()}
            self._dtypes = {k: ST_DTYPES[i.dtype] for k, i in self._info.items()}
            self._file = open(self.path, "rb")
        else:
            from library.networks.weights_io import load_weights_file

            self.metadata = {}
            self._sd = load_weights_file(self.path)
            self._shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
            self._dtypes = {k: v.dtype for k, v in self._sd.items()}

    # -- queries -------------------------------------------------------------------------
    def keys(self) -> list[str]:
        return list(self._shapes)

    def __contains__(self, key: str) -> bool:
        return key in self._shapes

    def __len__(self) -> int:
        return len(self._shapes)

    def shape(self, key: str) -> tuple[int, ...]:
        return self._shapes[key]

    def dtype(self, key: str) -> torch.dtype:
        return self._dtypes[key]

    def nbytes(self, key: str) -> int:
        n = 1
        for d in self._shapes[key]:
            n *= d
        return n * _itemsize(self._dtypes[key])

    def get(self, key: str) -> torch.Tensor:
        """The tensor, freshly read (CPU, stored dtype). Nothing is cached."""
        if self._sd is not None:
            return self._sd[key]
        info = self._info[key]
        size = info.end - info.start
        shape, dtype = self._shapes[key], self._dtypes[key]
        if size == 0:
            return torch.empty(shape, dtype=dtype)
        buf = torch.empty(size, dtype=torch.uint8)  # not zero-filled: the read writes every byte
        self._file.seek(self._data_offset + info.start)
        got = self._file.readinto(memoryview(buf.numpy()))
        if got != size:
            raise UserInputError(f"{self.what} {self.path}: short read of tensor '{key}' (file changed or truncated?)")
        return buf.view(dtype).reshape(shape)

    def get_as(self, key: str, dtype: torch.dtype) -> torch.Tensor:
        """The tensor converted to `dtype` (floating tensors only), in fresh memory.

        The stored bytes are read through a memory map and the pages are given back to the
        kernel right after the conversion (madvise DONTNEED): no buffer is filled twice and
        the map adds nothing to resident memory. Non-floating tensors come back as stored.
        """
        if self._sd is not None or self._dtypes[key] == dtype or not self._dtypes[key].is_floating_point:
            return self.get(key)
        info = self._info[key]
        if info.end == info.start:
            return torch.empty(self._shapes[key], dtype=dtype)
        if self._map is None:
            import mmap

            self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY)
        start, end = self._data_offset + info.start, self._data_offset + info.end
        stored = torch.frombuffer(self._map, dtype=self._dtypes[key], count=(end - start) // _itemsize(self._dtypes[key]),
                                  offset=start)
        out = stored.reshape(self._shapes[key]).to(dtype)
        del stored
        if hasattr(self._map, "madvise"):
            import mmap

            page = mmap.PAGESIZE
            first = start // page * page
            self._map.madvise(mmap.MADV_DONTNEED, first, end - first)
        return out

    # -- lifetime ------------------------------------------------------------------------
    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None
        if self._file is not None:
            self._file.close()
            self._file = None
        self._sd = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def __del__(self):  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


class StreamingSafetensorsWriter:
    """Write a .safetensors file tensor by tensor (bounded memory, atomic).

        specs = [(name, dtype, shape), ...]            # the whole layout, in writing order
        with StreamingSafetensorsWriter(path, specs, metadata) as w:
            for name, dtype, shape in specs:
                w.write(name, tensor)                   # in the same order
    """

    def __init__(self, path: str | os.PathLike, specs: Iterable[tuple[str, torch.dtype, tuple]],
                 metadata: Mapping[str, str] | None = None):
        from library.io.atomic import atomic_output

        self.path = os.fspath(path)
        self._specs = [(name, dtype, tuple(int(d) for d in shape)) for name, dtype, shape in specs]
        header: dict = {}
        if metadata:
            bad = [k for k, v in metadata.items() if not isinstance(v, str)]
            if bad:
                raise TypeError(f"safetensors metadata values must be strings: {bad}")
            header["__metadata__"] = dict(metadata)
        offset = 0
        self._sizes = []
        for name, dtype, shape in self._specs:
            if dtype not in ST_NAMES:
                raise ValueError(f"{name}: dtype {dtype} cannot be stored in safetensors")
            n = 1
            for d in shape:
                n *= d
            size = n * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": ST_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
            self._sizes.append(size)
            offset += size
        raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
        raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
        self._header = struct.pack("<Q", len(raw)) + raw
        self._ctx = atomic_output(self.path)
        self._next = 0
        self._f = None

    def __enter__(self):
        tmp = self._ctx.__enter__()
        self._f = open(tmp, "wb")
        self._f.write(self._header)
        return self

    def write(self, name: str, tensor: torch.Tensor) -> None:
        exp_name, dtype, shape = self._specs[self._next]
        if name != exp_name:
            raise ValueError(f"tensors must come in header order: expected '{exp_name}', got '{name}'")
        if tensor.dtype != dtype or tuple(tensor.shape) != shape:
            raise ValueError(f"{name}: expected {dtype} {shape}, got {tensor.dtype} {tuple(tensor.shape)}")
        t = tensor.detach().to("cpu").contiguous()
        if t.numel():
            data = t.reshape(-1).view(torch.uint8).numpy()
            self._f.write(memoryview(data))
        self._next += 1

    def __exit__(self, exc_type, exc, tb):
        if exc_type is None and self._next != len(self._specs):
            exc_type = RuntimeError
            exc = RuntimeError(f"{self.path}: only {self._next} of {len(self._specs)} tensors were written")
        if exc_type is None:
            self._f.flush()
            os.fsync(self._f.fileno())
        self._f.close()
        if exc_type is None:
            self._ctx.__exit__(None, None, None)  # moves the complete file into place
            return False
        self._ctx.__exit__(exc_type, exc, tb)  # removes the temporary file
        raise exc


def _write_header(f, header: dict) -> None:
    raw = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    f.write(struct.pack("<Q", len(raw)))
    f.write(raw)


def save_with_sshs(tensors: Mapping[str, torch.Tensor], path: str | os.PathLike,
                   metadata: Mapping[str, str] | None = None) -> dict[str, str]:
    """Write `tensors` to a .safetensors file with `metadata` plus sshs_model_hash /
    sshs_legacy_hash; atomic. Returns the metadata written.

    The hashes are defined on the serialisation made with only the `ss_*` metadata. That
    serialisation is written to a temporary file by safetensors itself (which streams from the
    tensors' memory), hashed from disk, and the final file is that file's data section under a
    header carrying the full metadata. Memory: the tensors, nothing more.
    """
    import shutil
    import tempfile

    from safetensors.torch import save_file

    from library.io.atomic import atomic_output
    from library.io.hashing import CHUNK, LEGACY_OFFSET, LEGACY_SIZE, ss_only

    path = os.fspath(path)
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    clean = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".sshs-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        save_file(clean, tmp, metadata=ss_only(meta) or None)
        import hashlib

        with open(tmp, "rb") as f:
            head = f.read(8)
            (n,) = struct.unpack("<Q", head)
            header = json.loads(f.read(n))
            f.seek(LEGACY_OFFSET)
            legacy = hashlib.sha256(f.read(LEGACY_SIZE)).hexdigest()[:8]
            f.seek(8 + n)
            h = hashlib.sha256()
            while True:
                chunk = f.read(CHUNK)
                if not chunk:
                    break
                h.update(chunk)
            meta["sshs_model_hash"] = h.hexdigest()
            meta["sshs_legacy_hash"] = legacy
            header["__metadata__"] = meta
            with atomic_output(path) as out_tmp:
                with open(out_tmp, "wb") as out:
                    _write_header(out, header)
                    f.seek(8 + n)
                    shutil.copyfileobj(f, out, CHUNK)
                    out.flush()
                    os.fsync(out.fileno())
    finally:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
    return meta
