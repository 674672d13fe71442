"""Pixels: decode, resize to the bucket, trim, flip, colour augmentation, face crops, masks.

Images are handled as ``numpy`` uint8 arrays (H, W, C) until the very end, where
:func:`to_tensor` turns them into float tensors in [-1, 1] (C, H, W). Pillow, OpenCV and
torch are imported on first use only.

Resizing uses ``resize_interpolation`` when set, otherwise OpenCV's area filter when
shrinking and Pillow's LANCZOS when enlarging.
"""

from __future__ import annotations

import os
import random
from typing import Optional

import numpy as np

from library.errors import UserInputError

__all__ = [
    "load_image",
    "resize_image",
    "trim_to_bucket",
    "resize_and_trim",
    "random_window",
    "flip_horizontal",
    "color_augment",
    "parse_face_info",
    "face_crop",
    "alpha_to_mask",
    "to_tensor",
]


def load_image(path: str, with_alpha: bool = False) -> np.ndarray:
    """Decode an image as RGB (or RGBA with ``with_alpha``) uint8 (H, W, C).

    A corrupt or truncated file raises UserInputError naming it.
    """
    from PIL import Image

    try:
        with Image.open(path) as im:
            mode = "RGBA" if with_alpha else "RGB"
            im.load()
            if im.mode != mode:
                im = im.convert(mode)
            return np.asarray(im, dtype=np.uint8).copy()
    except FileNotFoundError:
        raise UserInputError(f"image not found: {path}") from None
    except UserInputError:
        raise
    except Exception as e:  # Pillow raises OSError, SyntaxError, ValueError... for bad files
        raise UserInputError(f"image {path} is corrupt or truncated ({e})") from None


_CV2_FLAGS = {"nearest": "INTER_NEAREST", "bilinear": "INTER_LINEAR", "linear": "INTER_LINEAR",
              "bicubic": "INTER_CUBIC", "cubic": "INTER_CUBIC", "area": "INTER_AREA"}
_PIL_FILTERS = {"lanczos": "LANCZOS", "box": "BOX"}


def resize_image(img: np.ndarray, size: tuple[int, int], interpolation: Optional[str] = None) -> np.ndarray:
    """Resize an (H, W, C) or (H, W) uint8 array to ``size`` = (width, height)."""
    h, w = img.shape[:2]
    if (w, h) == tuple(size):
        return img
    if interpolation is None:
        interpolation = "area" if size[0] * size[1] < w * h else "lanczos"
    if interpolation in _PIL_FILTERS:
        from PIL import Image

        resample = getattr(Image.Resampling, _PIL_FILTERS[interpolation])
        return np.asarray(Image.fromarray(img).resize(tuple(size), resample=resample))
    import cv2

    out = cv2.resize(img, tuple(size), interpolation=getattr(cv2, _CV2_FLAGS[interpolation]))
    return out


def trim_to_bucket(
    img: np.ndarray, bucket: tuple[int, int], random_crop: bool = False, rng: Optional[random.Random] = None
) -> tuple[np.ndarray, tuple[int, int]]:
    """Cut the overflow of a resized image down to the bucket; returns (image, (x0, y0))."""
    h, w = img.shape[:2]
    bw, bh = bucket
    if w < bw or h < bh:
        raise ValueError(f"image of {w}x{h} does not cover the bucket {bw}x{bh}")
    ex, ey = w - bw, h - bh
    if random_crop and rng is not None:
        x0 = rng.randint(0, ex) if ex else 0
        y0 = rng.randint(0, ey) if ey else 0
    else:
        x0, y0 = ex // 2, ey // 2
    if ex or ey:
        img = img[y0 : y0 + bh, x0 : x0 + bw]
    return img, (x0, y0)


def resize_and_trim(
    img: np.ndarray,
    bucket: tuple[int, int],
    resized_size: tuple[int, int],
    random_crop: bool = False,
    rng: Optional[random.Random] = None,
    interpolation: Optional[str] = None,
) -> tuple[np.ndarray, tuple[int, int]]:
    """Resize to ``resized_size`` (covering the bucket) and trim to the bucket."""
    img = resize_image(img, resized_size, interpolation)
    return trim_to_bucket(img, bucket, random_crop, rng)


def random_window(img: np.ndarray, size: tuple[int, int], rng: random.Random) -> np.ndarray:
    """A random ``size`` window of an image at its own scale (image must be large enough)."""
    h, w = img.shape[:2]
    x0 = rng.randint(0, w - size[0])
    y0 = rng.randint(0, h - size[1])
    return img[y0 : y0 + size[1], x0 : x0 + size[0]]


def flip_horizontal(img: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(img[:, ::-1])


def color_augment(img: np.ndarray, rng: random.Random) -> np.ndarray:
    """With probability 0.33: a hue shift (+-8 OpenCV hue units) or a gamma in [0.95, 1.05]."""
    if rng.random() >= 0.33:
        return img
    if rng.random() < 0.5:
        import cv2

        shift = rng.uniform(-8, 8)
        hsv = cv2.cvtColor(np.ascontiguousarray(img[..., :3]), cv2.COLOR_RGB2HSV).astype(np.float32)
        hsv[..., 0] = np.mod(hsv[..., 0] + shift, 180)
        rgb = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB)
    else:
        gamma = rng.uniform(0.95, 1.05)
        table = np.clip(255.0 * (np.arange(256) / 255.0) ** gamma + 0.5, 0, 255).astype(np.uint8)
        rgb = table[img[..., :3]]
    if img.shape[-1] == 4:
        return np.concatenate([rgb, img[..., 3:]], axis=-1)
    return rgb


def parse_face_info(path: str) -> Optional[tuple[int, int, int, int]]:
    """``name_<cx>_<cy>_<w>_<h>.png`` -> (cx, cy, w, h); None when the name has no face info."""
    parts = os.path.splitext(os.path.basename(path))[0].split("_")
    if len(parts) < 5:
        return None
    try:
        cx, cy, fw, fh = (int(p) for p in parts[-4:])
    except ValueError:
        return None
    if fw <= 0 or fh <= 0:
        return None
    return cx, cy, fw, fh


def face_crop(
    img: np.ndarray,
    face: tuple[int, int, int, int],
    face_range: tuple[float, float],
    resolution: tuple[int, int],
    random_crop: bool,
    rng: random.Random,
    interpolation: Optional[str] = None,
) -> np.ndarray:
    """Scale so the face takes 1/hi .. 1/lo of the short side of ``resolution``, crop around it."""
    cx, cy, fw, fh = face
    h, w = img.shape[:2]
    rw, rh = resolution
    lo, hi = face_range
    face_size = max(fw, fh)
    target = min(rw, rh) * rng.uniform(1.0 / hi, 1.0 / lo)
    scale = min(1.0, target / face_size)
    scale = max(scale, rw / w, rh / h)  # the crop must still fill the resolution
    nw, nh = max(rw, int(w * scale + 0.5)), max(rh, int(h * scale + 0.5))
    if (nw, nh) != (w, h):
        img = resize_image(img, (nw, nh), interpolation)
        cx, cy, fw, fh = cx * nw / w, cy * nh / h, fw * nw / w, fh * nh / h

    def axis(center: float, face_len: float, full: int, out: int) -> int:
        lo_ = max(0.0, center + face_len / 2 - out)  # window must contain the whole face ...
        hi_ = min(full - out, center - face_len / 2)
        if lo_ > hi_:  # ... unless it cannot; then centre on the face
            lo_ = hi_ = min(max(center - out / 2, 0), full - out)
        if random_crop:
            return int(rng.uniform(lo_, hi_))
        middle = min(max(center - out / 2, lo_), hi_)
        jitter = (hi_ - lo_) / 8
        return int(min(max(middle + rng.uniform(-jitter, jitter), lo_), hi_))

    x0 = axis(cx, fw, nw, rw)
    y0 = axis(cy, fh, nh, rh)
    return img[y0 : y0 + rh, x0 : x0 + rw]


def alpha_to_mask(alpha: np.ndarray) -> np.ndarray:
    """uint8 alpha (H, W) -> float32 loss mask in [0, 1]."""
    return alpha.astype(np.float32) / 255.0


def to_tensor(img: np.ndarray):
    """uint8 (H, W, C) -> float32 torch tensor (C, H, W) in [-1, 1]."""
    import torch

    t = torch.from_numpy(np.ascontiguousarray(img)).permute(2, 0, 1).float()
    return t.div_(127.5).sub_(1.0)


def crop_top_left(crop_ltrb: tuple[int, int, int, int], target_width: int, flipped: bool) -> tuple[int, int]:
    """SDXL ``crop_top_left`` = (top, left); a flipped sample mirrors the left edge."""
    left, top, right, _ = crop_ltrb
    if flipped:
        left = target_width - right
    return top, left
