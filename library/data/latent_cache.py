"""Latent caches: ``.npz`` names, validity checks, atomic writes and the caching pipeline.

File layout (formats.md section d.1): ``<image stem>_<W:04d>x<H:04d><suffix>`` next to
the image, where W x H is the original image size and the suffix names the architecture
(``_sd.npz``, ``_sdxl.npz``, ``_flux.npz``, ``_sd3.npz``). Arrays: ``latents{S}``,
``original_size{S}`` ([W, H]), ``crop_ltrb{S}``, optionally ``latents_flipped{S}`` and
``alpha_mask{S}``. ``S`` is ``""`` for single-resolution formats (SD, SDXL) and
``"_<h>x<w>"`` (latent height x width) for multi-resolution formats (FLUX, SD3), whose
files collect one set of keys per bucket size.

Nothing here knows an architecture: a :class:`LatentCacheFormat` says how files are
named and the caller's ``encode(images) -> latents`` callable does the VAE work (with the
architecture's scale/shift already applied where the format wants it).

Validity checks read only the zip central directory at the end of each file (and, for
single-resolution files, the 128-byte array header of ``latents`` to compare the shape
with the bucket), so checking 20,000 files takes well under a second. A file that is not
a readable zip is reported by name and rebuilt.
"""

from __future__ import annotations

import io
import logging
import os
import struct
import threading
import zipfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Sequence

import numpy as np

from library.io.atomic import atomic_write_bytes
from library.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "LatentCacheFormat",
    "LATENT_FORMATS",
    "latent_cache_path",
    "key_suffix",
    "npz_members",
    "npz_array_shape",
    "required_keys",
    "is_latent_cache_valid",
    "load_latent_cache",
    "save_npz",
    "LatentJob",
    "run_latent_caching",
]


@dataclass(frozen=True)
class LatentCacheFormat:
    """How an architecture names its latent cache files."""

    suffix: str  # e.g. "_sd.npz"
    multi_resolution: bool = False  # keys carry "_<h>x<w>" and files merge several sizes
    legacy_stem_npz: bool = False  # an existing "<stem>.npz" is used instead
    downscale: int = 8  # pixels per latent cell


LATENT_FORMATS = {
    "sd": LatentCacheFormat("_sd.npz", multi_resolution=False, legacy_stem_npz=True),
    "sdxl": LatentCacheFormat("_sdxl.npz", multi_resolution=False, legacy_stem_npz=True),
    "flux": LatentCacheFormat("_flux.npz", multi_resolution=True),
    "sd3": LatentCacheFormat("_sd3.npz", multi_resolution=True),
}


def latent_cache_path(
    image_path: str, original_size: tuple[int, int], fmt: LatentCacheFormat, folder_names: Optional[frozenset] = None
) -> str:
    """The cache file of an image (``folder_names`` avoids a stat for the legacy name)."""
    stem = os.path.splitext(image_path)[0]
    if fmt.legacy_stem_npz:
        legacy = stem + ".npz"
        exists = (os.path.basename(legacy) in folder_names) if folder_names is not None else os.path.isfile(legacy)
        if exists:
            return legacy
    return f"{stem}_{original_size[0]:04d}x{original_size[1]:04d}{fmt.suffix}"


def key_suffix(bucket: tuple[int, int], fmt: LatentCacheFormat) -> str:
    if not fmt.multi_resolution:
        return ""
    return f"_{bucket[1] // fmt.downscale}x{bucket[0] // fmt.downscale}"


def required_keys(bucket: tuple[int, int], fmt: LatentCacheFormat, flip_aug: bool, alpha_mask: bool) -> list[str]:
    s = key_suffix(bucket, fmt)
    keys = [f"latents{s}"]
    if flip_aug:
        keys.append(f"latents_flipped{s}")
    if alpha_mask:
        keys.append(f"alpha_mask{s}")
    return keys


# ---- reading zip directories without loading arrays ------------------------------------

_EOCD = b"PK\x05\x06"
_CDIR = b"PK\x01\x02"


def _zip_directory(f, size: int) -> Optional[dict[str, tuple[int, int]]]:
    """``{member name: (local header offset, compression method)}`` or None if unreadable."""
    tail_len = min(size, 4096)
    f.seek(size - tail_len)
    tail = f.read(tail_len)
    pos = tail.rfind(_EOCD)
    if pos < 0 or pos + 22 > len(tail):
        return None
    count, cd_size, cd_offset = struct.unpack("<HII", tail[pos + 10 : pos + 20])
    if cd_offset == 0xFFFFFFFF or count == 0xFFFF:
        return None  # zip64 directory: let zipfile handle it
    eocd_at = size - tail_len + pos
    if cd_offset + cd_size != eocd_at:
        return None
    start_in_tail = cd_offset - (size - tail_len)
    if start_in_tail >= 0:
        cd = tail[start_in_tail : start_in_tail + cd_size]
    else:
        f.seek(cd_offset)
        cd = f.read(cd_size)
    out: dict[str, tuple[int, int]] = {}
    p = 0
    for _ in range(count):
        if cd[p : p + 4] != _CDIR:
            return None
        method = struct.unpack("<H", cd[p + 10 : p + 12])[0]
        name_len, extra_len, comment_len = struct.unpack("<HHH", cd[p + 28 : p + 34])
        offset = struct.unpack("<I", cd[p + 42 : p + 46])[0]
        name = cd[p + 46 : p + 46 + name_len].decode("utf-8", "replace")
        out[name] = (offset, method)
        p += 46 + name_len + extra_len + comment_len
    return out


def _inspect(path: str, shape_key: Optional[str] = None) -> tuple[Optional[set[str]], Optional[tuple[int, ...]]]:
    """One open: (array names or None if unreadable, shape of ``shape_key`` or None)."""
    member = shape_key + ".npy" if shape_key else None
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            directory = _zip_directory(f, size) if size >= 22 else None
            if directory is not None:
                names = {n[:-4] if n.endswith(".npy") else n for n in directory}
                if member is None or member not in directory:
                    return names, None
                offset, method = directory[member]
                if method == 0:
                    f.seek(offset)
                    local = f.read(30)
                    if local[:4] != b"PK\x03\x04":
                        return None, None
                    name_len, extra_len = struct.unpack("<HH", local[26:30])
                    f.seek(offset + 30 + name_len + extra_len)
                    return names, _parse_npy_header(f.read(512))
    except OSError:
        return None, None
    # zip64, compressed members or an unusual layout: ask zipfile
    try:
        with zipfile.ZipFile(path) as z:
            names = {n[:-4] if n.endswith(".npy") else n for n in z.namelist()}
            shape = None
            if member is not None and member in z.namelist():
                with z.open(member) as m:
                    shape = _parse_npy_header(m.read(512))
            return names, shape
    except (zipfile.BadZipFile, OSError, ValueError, EOFError):
        return None, None


def npz_members(path: str) -> Optional[set[str]]:
    """Array names in an ``.npz`` (without ``.npy``); None if missing or not a readable zip."""
    return _inspect(path)[0]


def _parse_npy_header(head: bytes) -> Optional[tuple[int, ...]]:
    if not head.startswith(b"\x93NUMPY"):
        return None
    major = head[6]
    if major == 1:
        hlen = struct.unpack("<H", head[8:10])[0]
        start = 10
    else:
        hlen = struct.unpack("<I", head[8:12])[0]
        start = 12
    text = head[start : start + hlen].decode("latin1")
    i = text.find("'shape':")
    if i < 0:
        return None
    j = text.find("(", i)
    k = text.find(")", j)
    if j < 0 or k < 0:
        return None
    parts = [p.strip() for p in text[j + 1 : k].split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        return None


def npz_array_shape(path: str, key: str) -> Optional[tuple[int, ...]]:
    """Shape of one array in an ``.npz`` read from its header (no data is loaded)."""
    return _inspect(path, key)[1]


def is_latent_cache_valid(
    path: str,
    bucket: tuple[int, int],
    fmt: LatentCacheFormat,
    flip_aug: bool,
    alpha_mask: bool,
    skip_cache_check: bool = False,
    check_shape: bool = True,
) -> bool:
    """True if ``path`` holds everything this sample needs.

    With ``skip_cache_check`` any existing file is accepted. A file that exists but is not
    a readable zip is logged by name (it will be rebuilt).
    """
    if skip_cache_check:
        return os.path.exists(path)
    single = check_shape and not fmt.multi_resolution
    members, shape = _inspect(path, "latents" if single else None)
    if members is None:
        if os.path.exists(path):
            logger.warning("latent cache %s is corrupt or not an .npz file; it will be rebuilt", path)
        return False
    for key in required_keys(bucket, fmt, flip_aug, alpha_mask):
        if key not in members:
            return False
    if single:
        expected = (bucket[1] // fmt.downscale, bucket[0] // fmt.downscale)
        if shape is None or tuple(shape[-2:]) != expected:
            return False
    return True


def load_latent_cache(path: str, bucket: tuple[int, int], fmt: LatentCacheFormat, flipped: bool, alpha: bool) -> dict:
    """Read the arrays one sample needs (``latents`` is the flipped one if ``flipped``)."""
    s = key_suffix(bucket, fmt)
    try:
        with np.load(path) as z:
            out = {"latents": z[f"latents_flipped{s}" if flipped else f"latents{s}"]}
            if alpha:
                mask = z[f"alpha_mask{s}"]
                out["alpha_mask"] = mask[:, ::-1].copy() if flipped else mask
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise UserInputError(
            f"latent cache {path} cannot be read ({e}); delete it and run again to rebuild it"
        ) from None
    return out


def save_npz(path: str, arrays: dict[str, np.ndarray], merge: bool = False) -> None:
    """Write arrays atomically; with ``merge`` keep the other keys of an existing file."""
    if merge and os.path.exists(path):
        try:
            with np.load(path) as z:
                old = {k: z[k] for k in z.files if k not in arrays}
            arrays = {**old, **arrays}
        except (OSError, ValueError, zipfile.BadZipFile):
            logger.warning("replacing unreadable cache file %s", path)
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    atomic_write_bytes(path, buf.getvalue())


# ---- the caching pipeline -----------------------------------------------------------

@dataclass
class LatentJob:
    """One image to encode at one bucket size."""

    image_path: str
    bucket: tuple[int, int]
    resized_size: tuple[int, int]
    original_size: tuple[int, int]
    flip_aug: bool = False
    alpha_mask: bool = False
    interpolation: Optional[str] = None
    npz_path: Optional[str] = None  # None: keep in memory only
    tag: Any = None  # caller's handle (e.g. the dataset entry)
    result: dict = field(default_factory=dict)


def _prepare(job: LatentJob) -> tuple[np.ndarray, Optional[np.ndarray]]:
    from library.data.image_loading import alpha_to_mask, load_image, resize_and_trim

    img = load_image(job.image_path, with_alpha=job.alpha_mask)
    img, _ = resize_and_trim(img, job.bucket, job.resized_size, False, None, job.interpolation)
    mask = None
    if job.alpha_mask:
        mask = alpha_to_mask(img[..., 3]) if img.shape[-1] == 4 else np.ones(img.shape[:2], np.float32)
        img = img[..., :3]
    return img, mask


def _batches(jobs: Sequence[LatentJob], batch_size: int) -> list[list[LatentJob]]:
    groups: dict[tuple, list[LatentJob]] = {}
    for job in jobs:
        groups.setdefault((job.bucket, job.flip_aug, job.alpha_mask), []).append(job)
    out = []
    for key in sorted(groups, key=lambda k: (k[0], k[1], k[2])):
        items = groups[key]
        for i in range(0, len(items), batch_size):
            out.append(items[i : i + batch_size])
    return out


def run_latent_caching(
    jobs: Sequence[LatentJob],
    encode: Callable[[Any], Any],
    fmt: LatentCacheFormat,
    batch_size: int = 1,
    num_workers: int = 2,
    on_result: Optional[Callable[[LatentJob, dict], None]] = None,
    progress: bool = False,
) -> int:
    """Encode ``jobs`` in batches; returns the number of images encoded.

    Image decoding/resizing runs on ``num_workers`` threads ahead of the encoder (0 =
    everything on the calling thread), and ``.npz`` files are written on a background
    thread, so the encoder is rarely idle. For each job the result arrays (numpy:
    ``latents``, maybe ``latents_flipped`` / ``alpha_mask``, ``original_size``,
    ``crop_ltrb``) go to ``on_result(job, arrays)``; jobs with an ``npz_path`` are also
    written to disk (merged with other resolutions for multi-resolution formats).
    """
    import torch

    from library.data.buckets import compute_crop_ltrb

    batches = _batches(jobs, max(1, batch_size))
    if not batches:
        return 0
    # num_workers == 0: decode on the calling thread; otherwise a prefetch thread keeps the
    # next batch decoding (itself fanning out to num_workers threads) while this one encodes
    pool = ThreadPoolExecutor(max_workers=num_workers) if num_workers > 1 else None
    prefetch = ThreadPoolExecutor(max_workers=1) if num_workers > 0 else None
    writer = ThreadPoolExecutor(max_workers=1)
    write_errors: list[BaseException] = []
    lock = threading.Lock()

    def load_batch(batch: list[LatentJob]):
        if pool is None:
            return [_prepare(j) for j in batch]
        return list(pool.map(_prepare, batch))

    def prepared_batches():
        if prefetch is None:
            for batch in batches:
                yield batch, load_batch(batch)
            return
        future = prefetch.submit(load_batch, batches[0])
        for bi, batch in enumerate(batches):
            prepared = future.result()
            if bi + 1 < len(batches):
                future = prefetch.submit(load_batch, batches[bi + 1])
            yield batch, prepared

    def write(job: LatentJob, arrays: dict) -> None:
        try:
            s = key_suffix(job.bucket, fmt)
            save_npz(job.npz_path, {k + s: v for k, v in arrays.items()}, merge=fmt.multi_resolution)
        except BaseException as e:  # reported on the main thread
            with lock:
                write_errors.append(e)

    bar = None
    if progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(jobs), desc="caching latents", unit="img")
        except ImportError:  # pragma: no cover
            bar = None
    done = 0
    try:
        for batch, prepared in prepared_batches():
            imgs = np.stack([p[0] for p in prepared])
            with_flip = batch[0].flip_aug
            if with_flip:
                imgs = np.concatenate([imgs, np.ascontiguousarray(imgs[:, :, ::-1])])
            tensor = torch.from_numpy(imgs).permute(0, 3, 1, 2).float().div_(127.5).sub_(1.0)
            with torch.no_grad():
                latents = encode(tensor)
            latents = latents.detach().to("cpu", torch.float32).numpy()
            n = len(batch)
            for i, job in enumerate(batch):
                lat = latents[i]
                if not np.isfinite(lat).all():
                    raise UserInputError(
                        f"the VAE produced NaN/inf latents for {job.image_path}; try --no_half_vae"
                    )
                arrays = {
                    "latents": lat,
                    "original_size": np.array(job.original_size, dtype=np.int64),
                    "crop_ltrb": np.array(compute_crop_ltrb(job.bucket, job.original_size), dtype=np.int64),
                }
                if with_flip:
                    arrays["latents_flipped"] = latents[n + i]
                if job.alpha_mask:
                    arrays["alpha_mask"] = prepared[i][1]
                if on_result is not None:
                    on_result(job, arrays)
                if job.npz_path:
                    writer.submit(write, job, arrays)
            done += n
            if bar is not None:
                bar.update(n)
            if write_errors:
                raise write_errors[0]
    finally:
        if prefetch is not None:
            prefetch.shutdown(wait=True)
        writer.shutdown(wait=True)
        if pool is not None:
            pool.shutdown(wait=True)
        if bar is not None:
            bar.close()
    if write_errors:
        e = write_errors[0]
        if isinstance(e, OSError):
            raise UserInputError(f"cannot write latent cache: {e}") from None
        raise e
    return done


def check_caches(paths_and_args: Iterable[tuple], skip_cache_check: bool = False) -> list[bool]:
    """Vectorised helper: ``is_latent_cache_valid`` over many ``(path, bucket, fmt, flip, alpha)``."""
    return [is_latent_cache_valid(p, b, f, fl, a, skip_cache_check) for p, b, f, fl, a in paths_and_args]
