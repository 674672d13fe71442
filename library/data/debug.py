"""``--debug_dataset``: describe what the dataset produces, batch by batch, without training.

Headless (no image windows): prints, for each sample, the image, its bucket, original
size, crop offset, flip, loss weight and the processed caption.
"""

from __future__ import annotations

from typing import Callable, Optional


def debug_dataset(group, epochs: int = 1, max_batches: Optional[int] = None, out: Callable[[str], None] = print) -> None:
    """Print the batches of the first ``epochs`` epochs (at most ``max_batches`` each)."""
    out(f"{len(group)} batches per epoch, {group.num_train_images} training samples, "
        f"{group.num_reg_images} regularisation samples")
    for epoch in range(1, epochs + 1):
        n = len(group) if max_batches is None else min(max_batches, len(group))
        for i in range(n):
            batch = group[(i, epoch, 0)]
            h, w = batch["target_sizes_hw"][0].tolist()
            kind = "latents" if batch["latents"] is not None else "images"
            out(f"epoch {epoch} batch {i + 1}/{len(group)}: {len(batch['captions'])} x {w}x{h} ({kind})")
            for j, key in enumerate(batch["image_keys"]):
                oh, ow = batch["original_sizes_hw"][j].tolist()
                top, left = batch["crop_top_lefts"][j].tolist()
                out(f"  {key}  original {ow}x{oh}  crop (top {top}, left {left})  "
                    f"flip {batch['flippeds'][j]}  loss weight {batch['loss_weights'][j].item():g}")
                out(f"    caption: {batch['captions'][j]!r}")
