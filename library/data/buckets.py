"""Aspect-ratio buckets: which size each image is trained at, and how batches are cut.

Three modes (dataset-config.md section 6):

* ``enable_bucket`` with upscaling: a fixed list of buckets of about the area of
  ``resolution``; each image goes to the bucket with the closest aspect ratio and is
  scaled to cover it, the overflow is trimmed;
* ``bucket_no_upscale``: the bucket is derived from the image itself (shrunk to the
  target area if larger, never enlarged), rounded down to ``bucket_reso_steps``;
* no bucketing: one bucket equal to ``resolution``.

Batches: every repeat of an image is one entry in its bucket; each bucket is cut into
batches of ``batch_size``. Every epoch the contents of each bucket and the list of
batches are shuffled with ``random.Random(seed + epoch)`` -- a pure function of
(seed, epoch), so every DataLoader worker computes the same batches on its own.
"""

from __future__ import annotations

import logging
import math
import random
from typing import Hashable, Optional, Sequence

from library.errors import UserInputError

logger = logging.getLogger(__name__)

Size = tuple[int, int]  # (width, height)

__all__ = [
    "round_bucket_limits",
    "make_bucket_resolutions",
    "compute_crop_ltrb",
    "BucketManager",
]


def round_bucket_limits(min_reso: int, max_reso: int, steps: int, where: str = "") -> tuple[int, int]:
    """Round ``min_bucket_reso`` down and ``max_bucket_reso`` up to multiples of ``steps``.

    A warning says what changed (``where`` names the dataset in that message).
    """
    if steps <= 0:
        raise UserInputError(f"{where}bucket_reso_steps must be a positive integer, got {steps}")
    new_min = max((min_reso // steps) * steps, steps)
    new_max = max(-(-max_reso // steps) * steps, new_min)
    if new_min != min_reso:
        logger.warning(
            "%smin_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
            where, min_reso, steps, new_min,
        )
    if new_max != max_reso:
        logger.warning(
            "%smax_bucket_reso %d is not a multiple of bucket_reso_steps %d; using %d",
            where, max_reso, steps, new_max,
        )
    return new_min, new_max


def make_bucket_resolutions(resolution: Size, min_reso: int, max_reso: int, steps: int) -> list[Size]:
    """The bucket list for an area of ``resolution[0] * resolution[1]`` (sorted, unique)."""
    area = resolution[0] * resolution[1]
    side = int(math.sqrt(area) // steps) * steps
    resos = {(side, side)}
    w = min_reso
    while w <= max_reso:
        h = min(max_reso, ((area // w) // steps) * steps)
        if h >= min_reso:
            resos.add((w, h))
            resos.add((h, w))
        w += steps
    return sorted(resos)


def compute_crop_ltrb(bucket: Size, original: Size) -> tuple[int, int, int, int]:
    """The part of the bucket the resized image covers, centre-crop geometry.

    Independent of the actual trim (random crops included), as SDXL's size/crop
    conditioning and the cache files expect.
    """
    bw, bh = bucket
    w, h = original
    if bw / bh > w / h:
        rw, rh = bh * w / h, bh
    else:
        rw, rh = bw, bw * h / w
    left = (bw - rw) // 2
    top = (bh - rh) // 2
    return int(left), int(top), int(left + rw), int(top + rh)


class BucketManager:
    """Assigns images to buckets and cuts the buckets into per-epoch batches."""

    def __init__(
        self,
        resolution: Size,
        enable_bucket: bool = False,
        min_reso: int = 256,
        max_reso: int = 1024,
        steps: int = 64,
        no_upscale: bool = False,
        where: str = "",
    ):
        self.resolution = (int(resolution[0]), int(resolution[1]))
        self.enable_bucket = enable_bucket
        self.no_upscale = enable_bucket and no_upscale
        self.steps = steps
        self.max_area = self.resolution[0] * self.resolution[1]
        self.where = where
        self.predefined: list[Size] = []
        if not enable_bucket:
            self.predefined = [self.resolution]
        elif not self.no_upscale:
            min_reso, max_reso = round_bucket_limits(min_reso, max_reso, steps, where)
            if min(self.resolution) < min_reso:
                raise UserInputError(
                    f"{where}resolution {self.resolution[0]}x{self.resolution[1]} is smaller than "
                    f"min_bucket_reso {min_reso}; lower min_bucket_reso or raise the resolution"
                )
            if max(self.resolution) > max_reso:
                raise UserInputError(
                    f"{where}resolution {self.resolution[0]}x{self.resolution[1]} is larger than "
                    f"max_bucket_reso {max_reso}; raise max_bucket_reso or lower the resolution"
                )
            self.predefined = make_bucket_resolutions(self.resolution, min_reso, max_reso, steps)
        self.min_reso, self.max_reso = min_reso, max_reso
        self._predefined_set = set(self.predefined)
        self._predefined_ars = [w / h for w, h in self.predefined]
        self._select_cache: dict[Size, tuple[Size, Size, float]] = {}
        # bucket resolution -> list of item keys (one per repeat)
        self.buckets: dict[Size, list[Hashable]] = {}
        self._epoch_cache: tuple[Optional[tuple], list] = (None, [])
        self.mean_ar_error = 0.0  # mean |bucket aspect - image aspect| over images (set by the dataset)

    # ---- assignment -----------------------------------------------------------------
    def select(self, width: int, height: int) -> tuple[Size, Size, float]:
        """Return ``(bucket (w, h), resized size (w, h), aspect-ratio error)`` for an image."""
        key = (width, height)
        hit = self._select_cache.get(key)
        if hit is None:
            hit = self._select_uncached(width, height)
            self._select_cache[key] = hit
        return hit

    def _round(self, x: float) -> int:
        return (int(x + 0.5) // self.steps) * self.steps

    def _select_uncached(self, width: int, height: int) -> tuple[Size, Size, float]:
        if width <= 0 or height <= 0:
            raise ValueError(f"invalid image size {width}x{height}")
        ar = width / height
        if not self.enable_bucket:
            bucket = self.resolution
            return bucket, self._cover(width, height, bucket), abs(bucket[0] / bucket[1] - ar)
        if self.no_upscale:
            if width * height > self.max_area:
                rw = math.sqrt(self.max_area * ar)
                rh = self.max_area / rw
                bw = self._round(rw)
                bh1 = self._round(bw / ar)
                bh = self._round(rh)
                bw2 = self._round(bh * ar)
                err1 = abs(bw / bh1 - ar) if bh1 > 0 else math.inf
                err2 = abs(bw2 / bh - ar) if bh > 0 else math.inf
                if err1 < err2:
                    resized = (bw, int(bw / ar + 0.5))
                else:
                    resized = (int(bh * ar + 0.5), bh)
            else:
                resized = (width, height)
            bucket = (resized[0] // self.steps * self.steps, resized[1] // self.steps * self.steps)
            if bucket[0] == 0 or bucket[1] == 0:
                raise ValueError(
                    f"image of {width}x{height} is smaller than bucket_reso_steps ({self.steps}) on one side"
                )
            return bucket, resized, abs(bucket[0] / bucket[1] - ar)
        if (width, height) in self._predefined_set:
            return (width, height), (width, height), 0.0
        best = 0
        best_err = math.inf
        for i, bar in enumerate(self._predefined_ars):
            err = abs(bar - ar)
            if err < best_err:
                best, best_err = i, err
        bucket = self.predefined[best]
        return bucket, self._cover(width, height, bucket), best_err

    @staticmethod
    def _cover(width: int, height: int, bucket: Size) -> Size:
        """Size that covers ``bucket`` keeping the aspect ratio (then trimmed)."""
        if (width, height) == bucket:
            return bucket
        if width / height > bucket[0] / bucket[1]:
            scale = bucket[1] / height
        else:
            scale = bucket[0] / width
        return int(width * scale + 0.5), int(height * scale + 0.5)

    # ---- registration and batches ---------------------------------------------------
    def add(self, bucket: Size, item: Hashable, repeats: int = 1) -> None:
        self.buckets.setdefault(bucket, []).extend([item] * repeats)
        self._epoch_cache = (None, [])

    def clear(self) -> None:
        self.buckets.clear()
        self._epoch_cache = (None, [])

    def sorted_buckets(self) -> list[tuple[Size, list[Hashable]]]:
        return sorted(self.buckets.items())

    def num_batches(self, batch_size: int) -> int:
        return sum(-(-len(items) // batch_size) for items in self.buckets.values())

    def epoch_batches(self, batch_size: int, seed: int, epoch: int, shuffle: bool = True) -> list[tuple[Size, list]]:
        """The batches of one epoch as ``[(bucket, [items...]), ...]`` (memoised per epoch)."""
        key = (batch_size, seed, epoch, shuffle)
        if self._epoch_cache[0] == key:
            return self._epoch_cache[1]
        rng = random.Random(seed + epoch)
        batches: list[tuple[Size, list]] = []
        for bucket, items in self.sorted_buckets():
            items = list(items)
            if shuffle:
                rng.shuffle(items)
            for i in range(0, len(items), batch_size):
                batches.append((bucket, items[i : i + batch_size]))
        if shuffle:
            rng.shuffle(batches)
        self._epoch_cache = (key, batches)
        return batches

    def table(self) -> str:
        """A human-readable table of the buckets in use and their entry counts."""
        lines = [f"{self.where}buckets ({'no upscale' if self.no_upscale else 'fixed' if self.enable_bucket else 'single'}):"]
        total = 0
        for (w, h), items in self.sorted_buckets():
            lines.append(f"  {w:>5} x {h:<5} {len(items):>7} entries")
            total += len(items)
        lines.append(f"  total {total} entries in {len(self.buckets)} buckets")
        return "\n".join(lines)


def bucket_for_sizes(manager: BucketManager, sizes: Sequence[Size]) -> list[Size]:
    """Convenience: the bucket of each size (used by tools)."""
    return [manager.select(w, h)[0] for w, h in sizes]
