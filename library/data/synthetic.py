"""Small synthetic image sets for the demo and the tests (no downloads).

`make_color_dataset` writes a DreamBooth-style folder `<root>/<repeats>_<name>/` of
images dominated by one colour, with a soft blob of a second colour at a random place
and mild noise, plus a caption file per image.
"""

from __future__ import annotations

import os


def color_image(size: tuple[int, int], color: tuple[int, int, int], accent: tuple[int, int, int], seed: int):
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    w, h = size
    img = np.empty((h, w, 3), np.float32)
    img[:] = color
    cy, cx = rng.uniform(0.25, 0.75) * h, rng.uniform(0.25, 0.75) * w
    r = rng.uniform(0.15, 0.3) * min(w, h)
    yy, xx = np.mgrid[0:h, 0:w]
    blob = np.exp(-(((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r)))[..., None]
    img = img * (1 - blob) + np.asarray(accent, np.float32) * blob
    img += rng.normal(0, 6, img.shape)
    return Image.fromarray(np.clip(img, 0, 255).astype(np.uint8))


def make_color_dataset(root: str, name: str = "sks", count: int = 8, repeats: int = 1,
                       color=(220, 40, 40), accent=(250, 220, 60), size=(64, 64),
                       caption: str | None = None, seed: int = 0, caption_extension: str = ".txt") -> str:
    """Write `count` images into `<root>/<repeats>_<name>/`; returns that folder."""
    folder = os.path.join(root, f"{repeats}_{name}")
    os.makedirs(folder, exist_ok=True)
    for i in range(count):
        color_image(size, color, accent, seed * 1000 + i).save(os.path.join(folder, f"img_{i:03d}.png"))
        with open(os.path.join(folder, f"img_{i:03d}{caption_extension}"), "w") as f:
            f.write(caption if caption is not None else f"a photo of {name}")
    return folder
