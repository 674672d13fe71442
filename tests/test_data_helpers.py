"""Helpers shared by the tests/test_data_*.py files (tiny image trees, argument namespaces)."""

from __future__ import annotations

import argparse
import os
from typing import Optional, Sequence

import numpy as np


def make_image(path: str, size=(32, 32), color=None, mode: str = "RGB", seed: int = 0) -> str:
    """Write a small random image (PNG/JPEG/... by extension)."""
    from PIL import Image

    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = np.random.default_rng(seed)
    channels = 4 if mode == "RGBA" else 3
    if color is None:
        arr = rng.integers(0, 256, size=(size[1], size[0], channels), dtype=np.uint8)
    else:
        arr = np.zeros((size[1], size[0], channels), np.uint8)
        arr[...] = color
    Image.fromarray(arr, mode).save(path)
    return path


def write(path: str, text: str) -> str:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
    return path


def make_tree(root: str, spec: dict[str, Sequence], caption_ext: str = ".txt") -> None:
    """``spec = {"train/10_dog": [((w, h), caption or None), ...]}``."""
    for folder, items in spec.items():
        for i, (size, caption) in enumerate(items):
            base = os.path.join(root, folder, f"img{i:02d}")
            make_image(base + ".png", size, seed=i + 7 * len(folder))
            if caption is not None:
                write(base + caption_ext, caption)


def dataset_args(argv: Optional[list[str]] = None, dreambooth: bool = True, masked: bool = True) -> argparse.Namespace:
    """Parse argv with the shared dataset/training/config option groups."""
    from library.args.groups import (
        add_config_arguments,
        add_dataset_arguments,
        add_masked_loss_arguments,
        add_training_arguments,
    )

    p = argparse.ArgumentParser()
    add_dataset_arguments(p, dreambooth, True, True)
    add_training_arguments(p, dreambooth)
    if masked:
        add_masked_loss_arguments(p)
    add_config_arguments(p)
    return p.parse_args(argv or [])
