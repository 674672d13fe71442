"""FLUX.1 text-to-image sampling (training-math.md §3.4), shared by flux_minimal_inference.py
and, later, sample images during FLUX training.

    taus = flux_schedule(steps, image_seq_len, shift=not schnell)      # 1 -> 0, steps + 1 values
    x = denoise(flux, noise, img_ids, cond, taus, guidance=3.5, cfg_scale=1.0, neg_cond=None)
    image = decode_latents(ae, x, latent_h, latent_w)                  # (B, 3, H, W) in [-1, 1]

Euler steps on the rectified-flow ODE: `x <- x + (tau_{i+1} - tau_i) * v(x, tau_i)`. The
schedule `tau_i = linspace(1, 0, steps + 1)` is shifted for dev models (not schnell) with
`e^mu / (e^mu + (1/tau - 1))`, mu on the line through (256, 0.5) and (4096, 1.15) at the
packed sequence length (library/training/flow_matching.py). True CFG when `cfg_scale != 1`:
`v = v_neg + cfg_scale * (v_pos - v_neg)`, both halves in one batch.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from library.training.flow_matching import exp_time_shift, flux_mu

logger = logging.getLogger(__name__)


@dataclass
class FluxCondition:
    """Encoded prompt(s): CLIP-L pooled (B, 768), T5 states (B, L, 4096), txt ids (B, L, 3),
    T5 attention mask (B, L) or None (only used with --apply_t5_attn_mask)."""

    l_pooled: torch.Tensor
    t5_out: torch.Tensor
    txt_ids: torch.Tensor
    t5_attn_mask: Optional[torch.Tensor] = None

    def to(self, device=None, dtype=None) -> "FluxCondition":
        def mv(t, cast=True):
            if t is None:
                return None
            return t.to(device=device, dtype=dtype if cast else None)

        return FluxCondition(mv(self.l_pooled), mv(self.t5_out), mv(self.txt_ids, cast=False),
                             mv(self.t5_attn_mask, cast=False))


def flux_schedule(steps: int, image_seq_len: int, shift: bool = True) -> list[float]:
    """`steps + 1` noise levels from 1 to 0, resolution-shifted when `shift` (dev)."""
    taus = torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float64)
    if shift:
        inner = exp_time_shift(taus[:-1], flux_mu(image_seq_len))
        taus = torch.cat([inner, taus[-1:]])
    return [float(t) for t in taus]


def _cat(a: Optional[torch.Tensor], b: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    if a is None or b is None:
        return None
    return torch.cat([a, b], dim=0)


@torch.no_grad()
def denoise(flux, img: torch.Tensor, img_ids: torch.Tensor, cond: FluxCondition, timesteps: list[float],
            guidance: float = 3.5, cfg_scale: float = 1.0, neg_cond: Optional[FluxCondition] = None,
            progress: bool = True, callback: Optional[Callable[[int, torch.Tensor], None]] = None) -> torch.Tensor:
    """Run the Euler sampler from packed noise `img` (B, L, 64); returns packed latents."""
    use_cfg = cfg_scale != 1.0 and neg_cond is not None
    b = img.shape[0]
    dtype = img.dtype
    if use_cfg:
        txt = torch.cat([neg_cond.t5_out, cond.t5_out], dim=0)
        vec = torch.cat([neg_cond.l_pooled, cond.l_pooled], dim=0)
        txt_ids = torch.cat([neg_cond.txt_ids, cond.txt_ids], dim=0)
        mask = _cat(neg_cond.t5_attn_mask, cond.t5_attn_mask)
        ids = torch.cat([img_ids, img_ids], dim=0)
    else:
        txt, vec, txt_ids, mask, ids = cond.t5_out, cond.l_pooled, cond.txt_ids, cond.t5_attn_mask, img_ids
    n = ids.shape[0]
    guidance_vec = torch.full((n,), float(guidance), device=img.device, dtype=dtype) if not flux.is_schnell else None
    pairs = list(zip(timesteps[:-1], timesteps[1:]))
    if progress:
        from tqdm import tqdm

        pairs = tqdm(pairs, desc="sampling", unit="step", leave=False)
    for i, (t_curr, t_next) in enumerate(pairs):
        t_vec = torch.full((n,), t_curr, device=img.device, dtype=dtype)
        x_in = torch.cat([img, img], dim=0) if use_cfg else img
        pred = flux(img=x_in, img_ids=ids, txt=txt.to(dtype), txt_ids=txt_ids, timesteps=t_vec,
                    y=vec.to(dtype), guidance=guidance_vec, txt_attention_mask=mask)
        if use_cfg:
            uncond, cond_pred = pred[:b], pred[b:]
            pred = uncond + cfg_scale * (cond_pred - uncond)
        img = img + (t_next - t_curr) * pred
        if callback is not None:
            callback(i, img)
    return img


@torch.no_grad()
def decode_latents(ae, packed: torch.Tensor, latent_height: int, latent_width: int, dtype=None) -> torch.Tensor:
    """Packed model latents -> images (B, 3, H, W) in [-1, 1] (float32)."""
    from library.models.flux.packing import unpack_latents, unscale_latents

    x = unpack_latents(packed.float(), latent_height, latent_width)
    ae_param = next(ae.parameters())
    z = unscale_latents(x).to(device=ae_param.device, dtype=dtype or ae_param.dtype)
    return ae.decode(z).sample.float().clamp(-1.0, 1.0)


def to_pil_images(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounding down like the reference: 127.5 * (x + 1))."""
    import numpy as np
    from PIL import Image

    arr = (127.5 * (images.float().cpu() + 1.0)).permute(0, 2, 3, 1).numpy().astype(np.uint8)
    return [Image.fromarray(a) for a in arr]
