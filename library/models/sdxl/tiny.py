"""Tiny random SDXL models with the real topology, for tests and experiments.

Same structure as SDXL base 1.0: a 3-level U-Net with 2 res blocks per level, attention on
levels 2 and 3 only (transformer depths [0, 2, 3] in tiny form, [0, 2, 10] at full size,
the middle block as deep as the last level), label_emb taking pooled + 6 x 256 size
values; CLIP ViT-L with 12 layers and OpenCLIP bigG with 32 layers, 49408 tokens and 77
positions; a 4-level VAE with scale 0.13025. Heads follow the head_dim-64 rule.
"""

from __future__ import annotations

from library.models.sd.config import heads_for_width
from library.models.sdxl import config as cfgmod


def sdxl_configs(full_size: bool = False, width_divisor: int = 1):
    """(SDXLUNetConfig, vae kwargs, text encoder 1 kwargs, text encoder 2 kwargs).

    `width_divisor` (with `full_size`) divides every width of the released model (U-Net
    levels, VAE levels, both text encoders and their MLPs) and keeps all depths: 2 gives
    the "widths halved" SDXL of the memory benchmarks (attention widths 320/640, 5 and 10
    heads; CLIP-L 384 wide, bigG 640).
    """
    if width_divisor != 1 and not full_size:
        raise ValueError("width_divisor applies to the released (full_size) widths")
    if full_size:
        d = int(width_divisor)
        if d not in (1, 2):
            raise ValueError(f"width_divisor {width_divisor}: use 1 or 2 (group norms need widths divisible by 32)")
        widths, depth = [320 // d, 640 // d, 1280 // d], [0, 2, 10]
        vae_widths = [128 // d, 256 // d, 512 // d, 512 // d]
        w1, i1, w2, i2 = 768 // d, 3072 // d, 1280 // d, 5120 // d
    else:
        widths, depth, vae_widths = [32, 64, 128], [0, 2, 3], [32, 32, 64, 64]
        w1, i1, w2, i2 = 32, 64, 64, 128
    unet = cfgmod.SDXLUNetConfig(
        in_channels=4, out_channels=4, model_channels=widths[0], widths=widths, num_res_blocks=2,
        transformer_depth=depth, transformer_depth_up=list(reversed(depth)), transformer_depth_middle=depth[-1],
        context_dim=w1 + w2, adm_in_channels=w2 + cfgmod.SIZE_SCALARS * cfgmod.SIZE_EMBED_DIM, use_linear_projection=True,
    )
    vae = dict(
        in_channels=3, out_channels=3, latent_channels=4, layers_per_block=2, block_out_channels=vae_widths,
        down_block_types=["DownEncoderBlock2D"] * 4, up_block_types=["UpDecoderBlock2D"] * 4,
        sample_size=1024, scaling_factor=cfgmod.SDXL_LATENT_SCALE,
    )
    te1 = dict(
        vocab_size=49408, max_position_embeddings=77, hidden_size=w1, intermediate_size=i1, num_hidden_layers=12,
        num_attention_heads=heads_for_width(w1), hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=w1,
    )
    te2 = dict(
        vocab_size=49408, max_position_embeddings=77, hidden_size=w2, intermediate_size=i2, num_hidden_layers=32,
        num_attention_heads=heads_for_width(w2), hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=w2,
        bos_token_id=49406, eos_token_id=49407, pad_token_id=0,
    )
    return unet, vae, te1, te2


def make_sdxl_models(seed: int = 0, full_size: bool = False, dtype=None, width_divisor: int = 1):
    """Randomly initialised SDXLModels (deterministic for a seed); see `sdxl_configs`."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from library.models.sd.config import SD_LATENT_SCALE
    from library.models.sd.tiny import _calibrate_vae
    from library.models.sdxl.loading import SDXLModels
    from library.models.sdxl.unet import SDXLUNet

    unet_cfg, vae_cfg, te1_cfg, te2_cfg = sdxl_configs(full_size, width_divisor)
    torch.manual_seed(seed)
    unet = SDXLUNet(unet_cfg)
    vae = AutoencoderKL(**vae_cfg)
    te1 = CLIPTextModel(CLIPTextConfig(**te1_cfg))
    te2 = CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg))
    if not full_size:
        # perturb every tensor so that a mix-up of two same-shaped tensors cannot go unseen
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for model in (unet, vae, te1, te2):
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        # real latent statistics (std ~1 after scaling): calibrated for SD's factor, then
        # rescaled to SDXL's smaller one
        _calibrate_vae(vae, seed)
        ratio = SD_LATENT_SCALE / cfgmod.SDXL_LATENT_SCALE
        c = vae.config.latent_channels
        with torch.no_grad():
            vae.quant_conv.weight[:c] *= ratio
            vae.quant_conv.bias[:c] *= ratio
            vae.post_quant_conv.weight /= ratio
    models = SDXLModels(te1.eval(), te2.eval(), vae.eval(), unet.eval(), "<random>", "random")
    if dtype is not None:
        for m in (unet, vae, te1, te2):
            m.to(dtype)
    return models
