"""Finding images, their captions and their sizes on disk -- fast and with clear errors.

* images: files of a folder (not recursive) with a supported extension, sorted by path;
* repeat folders: ``<N>_<class tokens>`` sub-folders of ``--train_data_dir`` /
  ``--reg_data_dir``;
* captions: ``<image stem><caption_extension>`` (face-crop names fall back to the stem
  without its last four ``_`` parts);
* sizes: from the file header (PNG and JPEG parsed here, others via ``imagesize``),
  from latent-cache file names (``<stem>_<W>x<H>_<arch>.npz``) or from metadata;
* ``metadata_cache.json`` (``cache_info``) and fine-tuning metadata (JSON / JSONL).

Everything here uses ``os.scandir`` once per folder and answers "does this caption
exist" from that listing, so no per-image ``stat`` calls are made.
"""

from __future__ import annotations

import json
import logging
import os
import re
import struct
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Optional

from library.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = [
    "image_extensions",
    "is_image_name",
    "FolderListing",
    "scan_folder",
    "parse_repeat_folder_name",
    "repeat_subsets_from_folder",
    "find_caption_file",
    "read_caption_file",
    "probe_image",
    "sizes_from_cache_names",
    "read_metadata_cache",
    "write_metadata_cache",
    "read_metadata_file",
    "METADATA_CACHE_NAME",
]

METADATA_CACHE_NAME = "metadata_cache.json"
_BASE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@lru_cache(maxsize=1)
def image_extensions() -> frozenset[str]:
    """Lower-case image extensions (``.avif`` / ``.jxl`` when a decoder is installed)."""
    exts = set(_BASE_EXTENSIONS)
    import importlib.util

    if importlib.util.find_spec("pillow_avif") is not None:
        exts.add(".avif")
    else:
        try:
            from PIL import features

            if features.check("avif"):
                exts.add(".avif")
        except Exception:  # pragma: no cover - depends on the Pillow build
            pass
    if importlib.util.find_spec("pillow_jxl") is not None or importlib.util.find_spec("jxlpy") is not None:
        exts.add(".jxl")
    return frozenset(exts)


def is_image_name(name: str) -> bool:
    """True for a file name with a supported image extension (case-insensitive)."""
    dot = name.rfind(".")
    return dot > 0 and name[dot:].lower() in image_extensions()


@dataclass
class FolderListing:
    """One ``os.scandir`` of a folder: its image paths (sorted) and all file names."""

    folder: str
    images: list[str]
    names: frozenset[str]
    subfolders: list[str] = field(default_factory=list)


def scan_folder(folder: str, what: str = "image folder") -> FolderListing:
    """List a folder once. A missing folder is a UserInputError naming ``what``."""
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {folder}") from None
    except NotADirectoryError:
        raise UserInputError(f"{what} is not a folder: {folder}") from None
    except PermissionError:
        raise UserInputError(f"{what} cannot be read (permission denied): {folder}") from None
    images, names, subfolders = [], [], []
    for e in entries:
        name = e.name
        try:
            is_dir = e.is_dir()
        except OSError:
            is_dir = False
        if is_dir:
            subfolders.append(e.path)
            continue
        names.append(name)
        if is_image_name(name):
            images.append(os.path.join(folder, name))
    images.sort()
    subfolders.sort()
    return FolderListing(folder, images, frozenset(names), subfolders)


# ---- repeat folders -------------------------------------------------------------------

def parse_repeat_folder_name(name: str) -> Optional[tuple[int, str]]:
    """``"10_sks dog"`` -> ``(10, "sks dog")``; ``"5"`` -> ``(5, "")``; no number -> None."""
    head, sep, rest = name.partition("_")
    try:
        repeats = int(head)
    except ValueError:
        return None
    return repeats, (rest if sep else "")


def repeat_subsets_from_folder(parent: str, is_reg: bool, option: str) -> list[dict]:
    """Subset tables for every ``<N>_<name>`` sub-folder of ``parent``.

    Sub-folders without a repeat count, or with N < 1, are skipped with a warning. A
    parent with images but no usable sub-folder is an error explaining the layout.
    """
    listing = scan_folder(parent, f"{option} folder")
    subsets: list[dict] = []
    skipped: list[str] = []
    for sub in listing.subfolders:
        name = os.path.basename(sub)
        if name.startswith("."):
            continue
        parsed = parse_repeat_folder_name(name)
        if parsed is None:
            skipped.append(name)
            logger.warning(
                "%s: skipping folder '%s': its name must start with a repeat count, e.g. '10_%s'",
                option, sub, name,
            )
            continue
        repeats, class_tokens = parsed
        if repeats < 1:
            logger.warning("%s: skipping folder '%s': repeat count %d is below 1", option, sub, repeats)
            continue
        subsets.append(
            {
                "image_dir": sub,
                "num_repeats": repeats,
                "class_tokens": class_tokens,
                "is_reg": is_reg,
                "_where": f"{option} folder '{name}'",
            }
        )
    if not subsets:
        hint = ""
        if listing.images:
            hint = (
                f"; it holds {len(listing.images)} image(s) directly -- move them into a sub-folder "
                f"named '<repeats>_<class tokens>', e.g. {os.path.join(parent, '10_sks dog')}"
            )
        elif skipped:
            hint = f"; folders without a repeat count were skipped: {', '.join(skipped[:5])}"
        raise UserInputError(f"{option} {parent}: no '<repeats>_<name>' image sub-folders found{hint}")
    return subsets


# ---- captions -------------------------------------------------------------------------

def find_caption_file(image_path: str, caption_extension: str, names: Optional[frozenset[str]] = None) -> Optional[str]:
    """The caption file of an image, or None.

    ``names`` (the folder's file names from :func:`scan_folder`) avoids a ``stat`` per
    image. Face-crop images named ``<stem>_<cx>_<cy>_<w>_<h>`` fall back to ``<stem>``.
    """
    folder, base = os.path.split(image_path)
    stem = os.path.splitext(base)[0]

    def exists(name: str) -> bool:
        if names is not None:
            return name in names
        return os.path.isfile(os.path.join(folder, name))

    candidate = stem + caption_extension
    if exists(candidate):
        return os.path.join(folder, candidate)
    parts = stem.split("_")
    if len(parts) >= 5:
        candidate = "_".join(parts[:-4]) + caption_extension
        if exists(candidate):
            return os.path.join(folder, candidate)
    return None


def read_caption_file(path: str, enable_wildcard: bool = False) -> str:
    """Read a UTF-8 caption file: its first line, or all non-empty lines with wildcards."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UserInputError(f"cannot read caption file {path}: {e.strerror or e}") from None
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise UserInputError(
            f"caption file {path} is not UTF-8 text (invalid byte at offset {e.start}); save it as UTF-8"
        ) from None
    if enable_wildcard:
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        caption = "\n".join(lines)
    else:
        caption = next((line.strip() for line in text.splitlines() if line.strip()), "")
    if not caption:
        raise UserInputError(
            f"caption file {path} is empty; write a caption or delete the file to use the class tokens"
        )
    return caption


# ---- image sizes ----------------------------------------------------------------------

_PNG_SIG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _jpeg_size(f) -> Optional[tuple[int, int]]:
    """Walk JPEG markers up to the first start-of-frame and read its size."""
    f.seek(2)
    while True:
        b = f.read(1)
        while b and b != b"\xff":
            b = f.read(1)
        while b == b"\xff":
            b = f.read(1)
        if not b:
            return None
        marker = b[0]
        if marker in _JPEG_SOF:
            seg = f.read(7)
            if len(seg) < 7:
                return None
            h, w = struct.unpack(">HH", seg[3:7])
            return w, h
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
            continue
        if marker in (0xD9, 0xDA):
            return None
        raw = f.read(2)
        if len(raw) < 2:
            return None
        f.seek(struct.unpack(">H", raw)[0] - 2, os.SEEK_CUR)


def _pil_check(path: str) -> tuple[int, int]:
    """Fully decode an image with Pillow; a broken file is a UserInputError naming it."""
    from PIL import Image

    try:
        with Image.open(path) as im:
            im.load()
            return im.size
    except Exception as e:  # Pillow raises many types for broken files
        raise UserInputError(f"image {path} is corrupt or truncated ({e})") from None


def probe_image(path: str, check_complete: bool = True) -> tuple[int, int]:
    """Return ``(width, height)`` from the file header.

    With ``check_complete`` a PNG must end in an IEND chunk and a JPEG in an EOI marker;
    a file that does not is fully decoded once, and only if that fails is it reported
    (so valid files with trailing data are accepted).
    """
    try:
        with open(path, "rb") as f:
            head = f.read(512)
            size = None
            complete = True
            if head.startswith(_PNG_SIG) and head[12:16] == b"IHDR":
                size = struct.unpack(">II", head[16:24])
                if check_complete:
                    f.seek(-12, os.SEEK_END)
                    complete = f.read(12)[4:8] == b"IEND"
            elif head[:2] == b"\xff\xd8":
                size = _jpeg_size(f)
                if check_complete:
                    f.seek(-2, os.SEEK_END)
                    complete = f.read(2) == b"\xff\xd9"
    except OSError as e:
        raise UserInputError(f"cannot read image {path}: {e.strerror or e}") from None
    if size is None:
        import imagesize

        try:
            w, h = imagesize.get(path)
        except Exception:
            w, h = -1, -1
        if w > 0 and h > 0:
            return int(w), int(h)
        return _pil_check(path)
    if not complete:
        return _pil_check(path)
    if size[0] <= 0 or size[1] <= 0:
        raise UserInputError(f"image {path} has an invalid size {size[0]}x{size[1]}")
    return int(size[0]), int(size[1])


_CACHE_NAME = re.compile(r"^(?P<stem>.+)_(?P<w>\d{4,})x(?P<h>\d{4,})_[A-Za-z0-9]+\.npz$")


def sizes_from_cache_names(names: frozenset[str] | list[str]) -> dict[str, tuple[int, int]]:
    """``{stem: (W, H)}`` recovered from latent-cache names ``<stem>_<W>x<H>_<arch>.npz``."""
    sizes: dict[str, tuple[int, int]] = {}
    for name in names:
        if not name.endswith(".npz"):
            continue
        m = _CACHE_NAME.match(name)
        if m:
            sizes[m.group("stem")] = (int(m.group("w")), int(m.group("h")))
    return sizes


# ---- JSON files -----------------------------------------------------------------------

def _load_json(path: str, what: str):
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise UserInputError(f"{what} not found: {path}") from None
    except OSError as e:
        raise UserInputError(f"cannot read {what} {path}: {e.strerror or e}") from None
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as e:
        raise UserInputError(f"{what} {path} is not UTF-8 (invalid byte at offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise UserInputError(f"{what} {path}: invalid JSON at line {e.lineno}, column {e.colno}: {e.msg}") from None


def read_metadata_cache(image_dir: str) -> Optional[dict[str, dict]]:
    """The ``metadata_cache.json`` of a folder, keyed by absolute image path; None if absent."""
    path = os.path.join(image_dir, METADATA_CACHE_NAME)
    if not os.path.isfile(path):
        return None
    data = _load_json(path, "image info cache")
    if not isinstance(data, dict):
        raise UserInputError(f"image info cache {path}: expected a JSON object; delete the file to rebuild it")
    out: dict[str, dict] = {}
    for key, entry in data.items():
        if not isinstance(entry, dict) or "resolution" not in entry:
            raise UserInputError(
                f"image info cache {path}: entry '{key}' lacks 'resolution'; delete the file to rebuild it"
            )
        full = key if os.path.isabs(key) else os.path.join(image_dir, key)
        out[full] = entry
    return out


def write_metadata_cache(image_dir: str, entries: dict[str, dict]) -> None:
    from library.io.atomic import atomic_write_json

    atomic_write_json(os.path.join(image_dir, METADATA_CACHE_NAME), entries, indent=2)


def read_metadata_file(path: str) -> dict[str, dict]:
    """Fine-tuning metadata: a JSON object keyed by image, or JSONL with ``image_path``."""
    if path.lower().endswith(".jsonl"):
        out: dict[str, dict] = {}
        try:
            with open(path, "r", encoding="utf-8-sig") as f:
                lines = f.readlines()
        except FileNotFoundError:
            raise UserInputError(f"metadata file not found: {path}") from None
        except (OSError, UnicodeDecodeError) as e:
            raise UserInputError(f"cannot read metadata file {path}: {e}") from None
        for lineno, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise UserInputError(f"metadata file {path}: invalid JSON on line {lineno}: {e.msg}") from None
            if not isinstance(obj, dict) or not isinstance(obj.get("image_path"), str):
                raise UserInputError(f"metadata file {path}: line {lineno} needs an 'image_path' string")
            out[obj["image_path"]] = obj
        return out
    data = _load_json(path, "metadata file")
    if not isinstance(data, dict):
        raise UserInputError(f"metadata file {path}: expected a JSON object keyed by image path")
    for key, entry in data.items():
        if not isinstance(entry, dict):
            raise UserInputError(f"metadata file {path}: entry '{key}' must be an object")
    return data
