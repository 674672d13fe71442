"""Shared pieces of the finetune/ metadata scripts: image listing, keys, JSON in/out.

Metadata (formats.md section g) is a JSON object keyed by image. The merge scripts key
by file stem unless ``--full_path`` is given; the fine-tuning dataset resolves both.
"""

from __future__ import annotations

import logging
import os
from typing import Optional

from library.data import discovery
from library.io.atomic import atomic_write_json
from library.errors import UserInputError

logger = logging.getLogger(__name__)

__all__ = ["list_images", "image_key", "load_metadata", "save_metadata", "read_text_file", "merge_text_files"]


def list_images(folder: str, recursive: bool = False) -> list[str]:
    """Image paths under ``folder`` (sorted; sub-folders too with ``recursive``)."""
    listing = discovery.scan_folder(folder, "image folder")
    images = list(listing.images)
    if recursive:
        for sub in listing.subfolders:
            images += list_images(sub, True)
    return sorted(images)


def image_key(path: str, full_path: bool) -> str:
    return os.path.abspath(path) if full_path else os.path.splitext(os.path.basename(path))[0]


def load_metadata(in_json: Optional[str], out_json: str) -> dict:
    """Start from ``--in_json``, else an existing ``out_json``, else empty."""
    source = in_json or (out_json if os.path.isfile(out_json) else None)
    if source is None:
        return {}
    if in_json and not os.path.isfile(in_json):
        raise UserInputError(f"--in_json {in_json}: file not found")
    logger.info("starting from metadata %s", source)
    return discovery.read_metadata_file(source)


def save_metadata(path: str, metadata: dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserInputError(f"cannot write {path}: folder {folder} does not exist")
    atomic_write_json(path, metadata, indent=2)
    logger.info("wrote %d entries to %s", len(metadata), path)


def read_text_file(path: str) -> str:
    """First non-empty line of a UTF-8 caption/tag file, stripped ('' if none)."""
    try:
        with open(path, "r", encoding="utf-8-sig") as f:
            for line in f:
                if line.strip():
                    return line.strip()
    except UnicodeDecodeError as e:
        raise UserInputError(f"{path} is not UTF-8 text (invalid byte at offset {e.start})") from None
    except OSError as e:
        raise UserInputError(f"cannot read {path}: {e.strerror or e}") from None
    return ""


def merge_text_files(args, field: str, default_ext: str) -> None:
    """Shared by the caption and tag mergers: read ``<image><ext>`` into ``metadata[key][field]``."""
    if args.recursive and not args.full_path:
        raise UserInputError("--recursive needs --full_path (file stems in sub-folders may collide)")
    ext = getattr(args, "caption_extention", None) or args.caption_extension or default_ext
    if not ext.startswith("."):
        ext = "." + ext
    images = list_images(args.train_data_dir, args.recursive)
    logger.info("found %d images in %s", len(images), args.train_data_dir)
    metadata = load_metadata(args.in_json, args.out_json)
    missing = []
    seen: dict[str, str] = {}
    for path in images:
        key = image_key(path, args.full_path)
        if key in seen:
            raise UserInputError(
                f"{path} and {seen[key]} share the key '{key}'; use --full_path or rename one of them"
            )
        seen[key] = path
        text_file = os.path.splitext(path)[0] + ext
        if not os.path.isfile(text_file):
            missing.append(path)
            continue
        value = read_text_file(text_file)
        metadata.setdefault(key, {})[field] = value
        if args.debug:
            print(f"{key}: {value}")
    if missing:
        logger.warning("%d image(s) have no %s file, e.g. %s", len(missing), ext, ", ".join(missing[:3]))
    save_metadata(args.out_json, metadata)
