"""Tiny random SD1.x/2.x models with the real topology, for tests and the demo.

Same structure as the released models (4 U-Net levels with 2 resnets each and attention
on the first three, 4-level VAE, 12-layer CLIP / 24-layer OpenCLIP with 49408 tokens and
77 positions), only narrower. `full_size=True` gives the released widths (random weights),
used by the loading benchmark.
"""

from __future__ import annotations

from library.models.sd import config as cfgmod

VARIANTS = ("sd1", "sd2", "sd2-v")


def sd_configs(variant: str, full_size: bool = False) -> tuple[dict, dict, dict]:
    """(unet, vae, text_encoder) configs for diffusers / transformers constructors."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown SD variant {variant!r}; expected one of {VARIANTS}")
    v2 = variant != "sd1"
    if full_size:
        unet_widths, vae_widths = [320, 640, 1280, 1280], [128, 256, 512, 512]
        te_width, te_inter = (1024, 4096) if v2 else (768, 3072)
    else:
        unet_widths, vae_widths = [32, 64, 128, 128], [32, 32, 64, 64]
        te_width, te_inter = 32, 64
    te_layers = 23 if v2 else 12  # SD2 files store 24 OpenCLIP layers; the model uses 23
    unet = dict(
        sample_size=96 if variant == "sd2-v" and full_size else 64,
        in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=unet_widths,
        down_block_types=["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"],
        up_block_types=["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=te_width,
        attention_head_dim=[cfgmod.heads_for_width(w) for w in unet_widths] if v2 else 8,
        use_linear_projection=v2,
        transformer_layers_per_block=1,
    )
    if variant == "sd2-v":
        unet["upcast_attention"] = True
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2,
        block_out_channels=vae_widths,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=512, scaling_factor=cfgmod.SD_LATENT_SCALE,
    )
    te = dict(
        vocab_size=49408, max_position_embeddings=77, hidden_size=te_width, intermediate_size=te_inter,
        num_hidden_layers=te_layers, num_attention_heads=cfgmod.heads_for_width(te_width),
        hidden_act="gelu" if v2 else "quick_gelu", layer_norm_eps=1e-5, projection_dim=te_width,
    )
    return unet, vae, te


def make_sd_models(variant: str, seed: int = 0, full_size: bool = False, dtype=None):
    """Randomly initialised SDModels of the given variant (deterministic for a seed)."""
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from library.models.sd.loading import SDModels

    unet_cfg, vae_cfg, te_cfg = sd_configs(variant, full_size)
    torch.manual_seed(seed)
    unet = UNet2DConditionModel(**unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    te = CLIPTextModel(CLIPTextConfig(**te_cfg))
    if not full_size:
        # Default inits leave many biases and norm scales at exactly 0/1; perturb every
        # tensor so a mapping mistake between two same-shaped tensors cannot go unseen.
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for model in (unet, vae, te):
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        _calibrate_vae(vae, seed)
    models = SDModels(te.eval(), vae.eval(), unet.eval(), variant != "sd1", "<random>", "random")
    if dtype is not None:
        for m in (unet, vae, te):
            m.to(dtype)
    return models


def _calibrate_vae(vae, seed: int) -> None:
    """Give the random VAE the latent statistics of a real one.

    A random encoder's latents are tiny (std ~0.05), so after the SD scale factor they
    vanish under the training noise and nothing image-specific can be learned. Scale the
    latent-mean rows of quant_conv so scaled latents of typical images have std ~1, and
    undo it in post_quant_conv so decoding is unchanged.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    colours = torch.rand(8, 3, 1, 1, generator=g) * 2 - 1
    images = (colours + 0.2 * torch.randn(8, 3, 64, 64, generator=g)).clamp(-1, 1)
    with torch.no_grad():
        z = vae.encode(images).latent_dist.mean
        factor = float(1.0 / (z.std() * cfgmod.SD_LATENT_SCALE))
        c = vae.config.latent_channels
        vae.quant_conv.weight[:c] *= factor
        vae.quant_conv.bias[:c] *= factor
        vae.post_quant_conv.weight /= factor
