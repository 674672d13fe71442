"""Write smaller copies of every image for one or more target pixel areas.

    python tools/resize_images_to_resolution.py src/ dst/ --max_resolution 512x512,256x256 \\
        --divisible_by 8 --copy_associated_files

For each image and each ``WxH`` in ``--max_resolution``, the image is scaled (keeping its
aspect ratio, never enlarged) so that its area is at most W*H, its sides are cut down to
multiples of ``--divisible_by``, and it is saved as ``<stem>+<WxH><ext>`` in the output
folder (``.png`` with ``--save_as_png``). ``--copy_associated_files`` copies files with
the same stem (captions, ...) under the matching new name. Source files are never
changed; outputs are written atomically.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

logger = logging.getLogger("resize_images_to_resolution")

INTERPOLATION_NAMES = {"area": "area", "cubic": "bicubic", "lanczos4": "lanczos", "nearest": "nearest",
                       "linear": "bilinear", "box": "box"}


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Downscale images to target pixel areas.")
    p.add_argument("src_img_folder", type=str, help="input image folder")
    p.add_argument("dst_img_folder", type=str, help="output folder")
    p.add_argument("--max_resolution", type=str, default="512x512,384x384,256x256,128x128",
                   help="comma-separated WxH target areas")
    p.add_argument("--divisible_by", type=int, default=1, help="make output sides multiples of this")
    p.add_argument("--interpolation", type=str, default=None, choices=list(INTERPOLATION_NAMES),
                   help="resize filter (default: area)")
    p.add_argument("--save_as_png", action="store_true", help="write PNG instead of the original format")
    p.add_argument("--copy_associated_files", action="store_true", help="copy same-stem files (captions) too")
    return p


def parse_targets(text: str) -> list[tuple[str, int]]:
    from library.errors import UserInputError

    out = []
    for part in text.split(","):
        part = part.strip()
        try:
            w, h = (int(v) for v in part.lower().split("x"))
        except ValueError:
            raise UserInputError(f"--max_resolution: {part!r} is not WIDTHxHEIGHT like 512x512") from None
        if w <= 0 or h <= 0:
            raise UserInputError(f"--max_resolution: {part!r} must be positive")
        out.append((f"{w}x{h}", w * h))
    return out


def target_size(w: int, h: int, area: int, divisible_by: int) -> tuple[int, int]:
    """Largest size with the image's aspect ratio and at most ``area`` pixels, never enlarged."""
    scale = min(1.0, math.sqrt(area / (w * h)))
    nw, nh = max(1, int(w * scale)), max(1, int(h * scale))
    d = max(1, divisible_by)
    return max(d, nw - nw % d), max(d, nh - nh % d)


def main(argv=None) -> None:
    import numpy as np
    from PIL import Image

    from library.io.atomic import atomic_write
    from library.data.discovery import scan_folder
    from library.data.image_loading import load_image, resize_image, trim_to_bucket
    from library.errors import UserInputError
    from library.log import setup_logging

    args = setup_parser().parse_args(argv)
    setup_logging(args)
    targets = parse_targets(args.max_resolution)
    listing = scan_folder(args.src_img_folder, "source image folder")
    if os.path.abspath(args.src_img_folder) == os.path.abspath(args.dst_img_folder):
        raise UserInputError("the output folder must differ from the source folder")
    os.makedirs(args.dst_img_folder, exist_ok=True)
    interp = INTERPOLATION_NAMES[args.interpolation] if args.interpolation else None
    written = 0
    for path in listing.images:
        stem, ext = os.path.splitext(os.path.basename(path))
        with Image.open(path) as probe:
            has_alpha = probe.mode in ("RGBA", "LA", "PA") or "transparency" in probe.info
        img = load_image(path, with_alpha=has_alpha)
        h, w = img.shape[:2]
        for label, area in targets:
            tw, th = target_size(w, h, area, args.divisible_by)
            # scale to cover (tw, th) then trim the few pixels lost to divisibility
            scale = max(tw / w, th / h)
            cover = (max(tw, int(w * scale + 0.5)), max(th, int(h * scale + 0.5)))
            out = resize_image(img, cover, interp or ("area" if cover[0] * cover[1] < w * h else "lanczos"))
            out, _ = trim_to_bucket(out, (tw, th))
            out_ext = ".png" if args.save_as_png else ext
            dst = os.path.join(args.dst_img_folder, f"{stem}+{label}{out_ext}")
            pil = Image.fromarray(np.ascontiguousarray(out))
            fmt = Image.registered_extensions().get(out_ext.lower())
            if fmt == "JPEG" and pil.mode == "RGBA":
                pil = pil.convert("RGB")
            options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
            atomic_write(dst, lambda f: pil.save(f, format=fmt, **options))
            written += 1
            if args.copy_associated_files:
                for name in sorted(listing.names):
                    other_stem, other_ext = os.path.splitext(name)
                    if other_stem == stem and name != os.path.basename(path):
                        shutil.copyfile(os.path.join(args.src_img_folder, name),
                                        os.path.join(args.dst_img_folder, f"{stem}+{label}{other_ext}"))
        logger.info("%s: %dx%d done", os.path.basename(path), w, h)
    print(f"wrote {written} image(s) to {args.dst_img_folder}", file=sys.stderr)


if __name__ == "__main__":
    run_main(main)
