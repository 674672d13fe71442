"""SDXL sampling: the shared denoising loop of sd_sampling with SDXL's conditioning.

`SDXLSampler` is what `create_sampler` builds for an `SDXLArchitecture` (through its
`image_sampler_class`): training previews and gen_img.py use it. Per batch it gives the
U-Net

* `context`: CLIP-L hidden_states[11] and bigG hidden_states[-2], concatenated, with
  prompt weighting applied to each encoder's states (`SDXLArchitecture.encode_weighted`);
* `y`: bigG's pooled vector followed by the size embeddings of (original height, width),
  (crop top, left) and (target height, width) (training-math §2.7).

Sizes (gen_img options or prompt options `--ow/--oh/--nw/--nh/--ct/--cl`): original size
defaults to the image size, crop to (0, 0), the target is the image size. The negative
(and unconditional) rows use `original_width_negative`/`original_height_negative` when
given, else the same original size (as diffusers' `negative_original_size` defaults).
"""

from __future__ import annotations

from typing import Optional

import torch

from library.arch.sdxl import conditioning_vector
from library.inference.sd_sampling import SDSampler


class SDXLSampler(SDSampler):
    """Two text encoders, pooled text and size/crop conditioning; otherwise SDSampler."""

    def __init__(self, arch, text_encoders, vae, unet, tokenizers, *, clip_skip: Optional[int] = None, **options):
        text_encoders, tokenizers = list(text_encoders), list(tokenizers)
        if len(text_encoders) != 2 or len(tokenizers) != 2:
            raise ValueError("SDXLSampler needs two text encoders and two tokenizers")
        super().__init__(arch, text_encoders[0], vae, unet, tokenizers[0], clip_skip=None, **options)
        self.text_encoders = text_encoders
        self.tokenizers = tokenizers

    def encode_text(self, prompts: list[str]):
        """Prompts -> SDXLCondition on the sampler's device, in the U-Net dtype."""
        cond = self.arch.encode_weighted(
            self.text_encoders, self.tokenizers, prompts, self.max_token_length, self.emb_normalize_mode,
            fit_to_longest=True, warn_truncation=True, parse=self.weighted,
        )
        return cond.to(self.device, next(self.unet.parameters()).dtype)

    @staticmethod
    def size_rows(n: int, width: int, height: int, extra: dict):
        """(original_hw, crop_tl, target_hw) tensors (n, 2) for n rows; the first
        `extra["negative_rows"]` rows are negative/unconditional ones."""
        neg = int(extra.get("negative_rows", 0))
        oh, ow = extra.get("original_height") or height, extra.get("original_width") or width
        noh = extra.get("original_height_negative") or oh
        now = extra.get("original_width_negative") or ow
        original = [[noh, now] if i < neg else [oh, ow] for i in range(n)]
        crop = [[extra.get("crop_top") or 0, extra.get("crop_left") or 0]] * n
        target = [[height, width]] * n
        return (torch.tensor(original, dtype=torch.float32), torch.tensor(crop, dtype=torch.float32),
                torch.tensor(target, dtype=torch.float32))

    def encode_conditioning(self, prompts, width, height, extra):
        cond = self.encode_text(prompts)
        original, crop, target = self.size_rows(len(prompts), width, height, extra)
        y = conditioning_vector(cond.pooled.float(), original.to(self.device), crop.to(self.device),
                                target.to(self.device))
        return {"context": cond.context, "y": y.to(cond.context.dtype)}

    def predict(self, x, t, cond):
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x.to(dtype), t, cond["context"], cond["y"])
