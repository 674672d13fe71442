"""Where gen_img.py writes its images, what they are called and what they carry.

File names (the reference's scheme; `P` is the highres-fix pass, "0" for the first-pass
image saved with --highres_fix_save_1st and "1" for the final one, empty without highres
fix):

* default: `im_<YYYYmmddHHMMSS>_<P><index in batch:03d>_<seed>.png`
* `--sequential_file_name`: `im_<P><image number:06d>.png`, numbered from 1 in the order
  the images were requested
* `--use_original_file_name` (img2img): `<init image name without extension>.png`
* a prompt's `--f name`: that name (".png" added when it has no image extension); with
  several images per prompt `<stem>_<k><ext>` for the k-th image (from 0).

No existing file is overwritten (the reference overwrites): when the name is taken, the
first free `<stem>_<n><ext>` (n = 1, 2, ...) is used instead. This matters for two images
with the same seed in one second, a second run with --sequential_file_name or --f names,
and img2img outputs named after the same source image.

Every PNG carries the generation parameters as text chunks: `prompt`, `seed`, `sampler`,
`steps`, `scale`, `negative-prompt`, and when set `negative-scale`, `clip-prompt`,
`raw-prompt` (the prompt line as given, options included); SDXL adds its size and crop
conditioning. A `parameters` chunk in the common "A1111" layout is added as well, so
image viewers and web UIs show the settings.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from dataclasses import dataclass
from typing import Optional

from library.errors import UserInputError

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".webp", ".jpg", ".jpeg")


def check_output_dir(path: str) -> str:
    """Create the output folder and prove it is writable (before any model is loaded)."""
    if not path:
        raise UserInputError("--outdir: empty path")
    if os.path.exists(path) and not os.path.isdir(path):
        raise UserInputError(f"--outdir {path}: exists and is not a folder")
    try:
        os.makedirs(path, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".gen_img_write_test_", dir=path)
        os.close(fd)
        os.remove(probe)
    except OSError as e:
        raise UserInputError(f"--outdir {path}: cannot write there ({e.strerror or e})") from None
    return path


def first_available_filename(folder: str, name: str) -> str:
    """`name` when no such file exists in `folder`, else the first free `<stem>_<n><ext>`."""
    if not os.path.exists(os.path.join(folder, name)):
        return name
    stem, ext = os.path.splitext(name)
    n = 1
    while os.path.exists(os.path.join(folder, f"{stem}_{n}{ext}")):
        n += 1
    return f"{stem}_{n}{ext}"


def with_image_extension(name: str) -> str:
    return name if os.path.splitext(name)[1].lower() in IMAGE_EXTENSIONS else name + ".png"


def numbered_file_name(name: str, k: int) -> str:
    """The k-th image of a prompt whose `--f` name is used for several images."""
    stem, ext = os.path.splitext(name)
    return f"{stem}_{k}{ext}"


def timestamp() -> str:
    return time.strftime("%Y%m%d%H%M%S", time.localtime())


@dataclass
class ImageRecord:
    """What is known about one finished image when it is saved."""

    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    scale: float
    width: int
    height: int
    negative_scale: Optional[float] = None
    clip_prompt: Optional[str] = None
    raw_prompt: Optional[str] = None
    file_name: Optional[str] = None  # the prompt's --f name (already numbered)
    init_image_name: Optional[str] = None  # source file of an img2img init image
    index: int = 0  # image number in request order, from 0
    strength: Optional[float] = None
    extra: Optional[dict] = None  # architecture conditioning (SDXL sizes), written as given


def output_file_name(
    record: ImageRecord,
    *,
    index_in_batch: int,
    ts: str,
    sequential: bool,
    use_original_file_name: bool,
    highres_prefix: str = "",
) -> str:
    """The file name for one image, by the rules in the module docstring (before the
    check for an existing file)."""
    if record.file_name:
        return with_image_extension(record.file_name)
    if use_original_file_name and record.init_image_name:
        return os.path.splitext(os.path.basename(record.init_image_name))[0] + ".png"
    if sequential:
        return f"im_{highres_prefix}{record.index + 1:06d}.png"
    return f"im_{ts}_{highres_prefix}{index_in_batch:03d}_{record.seed}.png"


def png_text(record: ImageRecord, sampler: str) -> dict[str, str]:
    """The text chunks written into each PNG (insertion order is the file order)."""
    info = {
        "prompt": record.prompt,
        "seed": str(record.seed),
        "sampler": sampler,
        "steps": str(record.steps),
        "scale": str(record.scale),
        "negative-prompt": record.negative_prompt or "",
    }
    if record.negative_scale is not None:
        info["negative-scale"] = str(record.negative_scale)
    if record.clip_prompt is not None:
        info["clip-prompt"] = record.clip_prompt
    if record.raw_prompt is not None:
        info["raw-prompt"] = record.raw_prompt
    for key, value in (record.extra or {}).items():
        info[key.replace("_", "-")] = str(value)
    settings = [
        f"Steps: {record.steps}",
        f"Sampler: {sampler}",
        f"CFG scale: {record.scale}",
        f"Seed: {record.seed}",
        f"Size: {record.width}x{record.height}",
    ]
    if record.strength is not None:
        settings.append(f"Denoising strength: {record.strength}")
    info["parameters"] = f"{record.prompt}\nNegative prompt: {record.negative_prompt or ''}\n" + ", ".join(settings)
    return info


def save_image(image, folder: str, name: str, text: dict[str, str]) -> str:
    """Write one image under the first free name; returns its path. PNGs get the text
    chunks; WebP is saved at quality 100."""
    from PIL.PngImagePlugin import PngInfo

    name = first_available_filename(folder, name)
    path = os.path.join(folder, name)
    parent = os.path.dirname(path)
    if parent and not os.path.isdir(parent):
        os.makedirs(parent, exist_ok=True)
    ext = os.path.splitext(name)[1].lower()
    try:
        if ext == ".png":
            info = PngInfo()
            for k, v in text.items():
                info.add_text(k, v)
            image.save(path, pnginfo=info)
        elif ext == ".webp":
            image.save(path, quality=100)
        else:
            image.save(path)
    except OSError as e:
        raise UserInputError(f"cannot write {path} ({e})") from None
    return path
