"""Denoising loss on fixed (noise, timestep) pairs: a quick, honest measure of learning.

On tiny random models generated images cannot show what a LoRA learned (the random VAE
is noisy and the random U-Net is no denoiser), but the denoising loss on fixed pairs
drops clearly for the training images and much less for other images.
"""

from __future__ import annotations


def fixed_pair_loss(arch, unet, text_encoder, tokenizer, latents, captions, seed: int = 0,
                    timesteps=(100, 300, 500, 700, 900), clip_skip=None) -> float:
    """Mean ε/v-prediction MSE over `latents` (already scaled) at fixed timesteps and noise."""
    import torch

    from library.training.noise import DDPMTables, add_noise, v_target

    tables = DDPMTables.create()
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        ids = arch.tokenize(tokenizer, list(captions))
        context = arch.encode_tokens(text_encoder, ids, tokenizer, clip_skip)
        total, n = 0.0, 0
        for t in timesteps:
            noise = torch.randn(latents.shape, generator=g)
            ts = torch.full((latents.shape[0],), int(t), dtype=torch.long)
            noisy = add_noise(latents, noise, ts, tables.alphas_cumprod)
            target = v_target(latents, noise, ts, tables.alphas_cumprod) if arch.v_parameterization else noise
            pred = unet(noisy, ts, context).sample
            total += float(torch.nn.functional.mse_loss(pred, target)) * latents.shape[0]
            n += latents.shape[0]
    return total / n


def encode_images(vae, folder_or_paths, size: int, scale: float):
    """Scaled latents (mean of the VAE posterior) of the PNG/JPEG images in a folder."""
    import os

    import numpy as np
    import torch
    from PIL import Image

    paths = folder_or_paths
    if isinstance(folder_or_paths, str):
        paths = sorted(os.path.join(folder_or_paths, f) for f in os.listdir(folder_or_paths)
                       if f.lower().endswith((".png", ".jpg", ".jpeg", ".webp")))
    images = [np.asarray(Image.open(p).convert("RGB").resize((size, size)), np.float32) / 127.5 - 1 for p in paths]
    x = torch.from_numpy(np.stack(images)).permute(0, 3, 1, 2)
    with torch.no_grad():
        return vae.encode(x).latent_dist.mean * scale
