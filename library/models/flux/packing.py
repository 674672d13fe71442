"""Packed latents and position ids of FLUX.1 (training-math.md §3.1).

    packed = pack_latents(x0)                 # (B, 16, 2h, 2w) -> (B, h*w, 64)
    x0 = unpack_latents(packed, 2h, 2w)       # inverse (latent height/width, not packed)
    img_ids = prepare_img_ids(B, h, w)        # (B, h*w, 3): [0, row, column]
    txt_ids = prepare_txt_ids(B, Lt)          # (B, Lt, 3) zeros

Token (i, j) holds the channels in the order (c, di, dj): index c*4 + di*2 + dj for latent
pixel (2i+di, 2j+dj). Latents here are already AE-scaled: 0.3611 * (z - 0.1159).
"""

from __future__ import annotations

import math

import torch

from library.models.flux.config import AE_SCALE, AE_SHIFT


def pack_latents(x: torch.Tensor) -> torch.Tensor:
    b, c, hh, ww = x.shape
    if hh % 2 or ww % 2:
        raise ValueError(f"latent height/width must be even to pack 2x2 patches, got {hh}x{ww}")
    h, w = hh // 2, ww // 2
    return x.reshape(b, c, h, 2, w, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w, c * 4)


def unpack_latents(x: torch.Tensor, latent_height: int, latent_width: int) -> torch.Tensor:
    b, n, cc = x.shape
    h, w = latent_height // 2, latent_width // 2
    if h * w != n or cc % 4:
        raise ValueError(f"cannot unpack {tuple(x.shape)} into a {latent_height}x{latent_width} latent")
    c = cc // 4
    return x.reshape(b, h, w, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, 2 * h, 2 * w)


def prepare_img_ids(batch_size: int, packed_height: int, packed_width: int, device=None,
                    dtype=torch.float32) -> torch.Tensor:
    ids = torch.zeros(packed_height, packed_width, 3, dtype=dtype, device=device)
    ids[..., 1] = torch.arange(packed_height, dtype=dtype, device=device)[:, None]
    ids[..., 2] = torch.arange(packed_width, dtype=dtype, device=device)[None, :]
    return ids.reshape(1, packed_height * packed_width, 3).repeat(batch_size, 1, 1)


def prepare_txt_ids(batch_size: int, length: int, device=None, dtype=torch.float32) -> torch.Tensor:
    return torch.zeros(batch_size, length, 3, dtype=dtype, device=device)


def packed_size(image_height: int, image_width: int) -> tuple[int, int]:
    """Packed (token grid) height and width of an image size: ceil(size / 16)."""
    return math.ceil(image_height / 16), math.ceil(image_width / 16)


def scale_latents(z: torch.Tensor) -> torch.Tensor:
    """Raw AE latent -> model latent: 0.3611 * (z - 0.1159)."""
    return (z - AE_SHIFT) * AE_SCALE


def unscale_latents(x: torch.Tensor) -> torch.Tensor:
    """Model latent -> raw AE latent for decoding."""
    return x / AE_SCALE + AE_SHIFT
