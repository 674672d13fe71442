"""Tiny random FLUX.1 model sets (transformer, AE, CLIP-L, T5) for tests and experiments.

The topology is FLUX.1's: head dim 128 (hidden = 128 x heads), RoPE axes (16, 56, 56),
double blocks followed by twice as many single blocks, a 4-level AE with 16 latent
channels and no quant convs, a 12-layer CLIP-L with 49408 tokens and 77 positions, a gated-
GELU T5 encoder with 32128 tokens whose head count is its relative-attention-bias width.
Only widths and depths are small. `full_size=True` gives the released widths (hidden 3072,
CLIP-L 768, T5 4096 / 64 heads / d_ff 10240, AE 128-512) with the given depths: a
"compact" model of real width for benchmarks (T5 then has 2 layers).
"""

from __future__ import annotations

from dataclasses import dataclass

from library.models.flux import config as cfgmod
from library.models.sd.config import heads_for_width

VARIANTS = ("flux-dev", "flux-schnell")

FILE_NAMES = {
    "flux-dev": "flux1-dev.safetensors",
    "flux-schnell": "flux1-schnell.safetensors",
    "ae": "ae.safetensors",
    "clip_l": "clip_l.safetensors",
    "t5xxl": "t5xxl.safetensors",
}


@dataclass
class FluxModelSet:
    flux: object  # library.models.flux.model.Flux
    ae: object  # diffusers AutoencoderKL
    clip_l: object  # transformers CLIPTextModel
    t5xxl: object  # transformers T5EncoderModel


def flux_configs(variant: str, full_size: bool = False, depth: int | None = None, depth_single: int | None = None):
    """(FluxConfig, AE kwargs, CLIP-L kwargs, T5 kwargs)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown FLUX variant {variant!r}; expected one of {VARIANTS}")
    if full_size:
        heads, clip_w, clip_inter = 24, 768, 3072
        t5 = dict(d_model=4096, num_heads=64, d_kv=64, d_ff=10240, num_layers=2)
        ae_widths = [128, 256, 512, 512]
        depth = 2 if depth is None else depth
        depth_single = 4 if depth_single is None else depth_single
    else:
        heads, clip_w, clip_inter = 2, 32, 64
        t5 = dict(d_model=64, num_heads=2, d_kv=32, d_ff=128, num_layers=4)
        ae_widths = [32, 32, 64, 64]
        depth = 2 if depth is None else depth
        depth_single = 4 if depth_single is None else depth_single
    flux = cfgmod.FluxConfig(
        vec_in_dim=clip_w, context_in_dim=t5["d_model"], hidden_size=cfgmod.HEAD_DIM * heads, num_heads=heads,
        depth=depth, depth_single_blocks=depth_single, guidance_embed=variant == "flux-dev",
    )
    ae = dict(
        in_channels=3, out_channels=3, latent_channels=cfgmod.AE_LATENT_CHANNELS, layers_per_block=2,
        block_out_channels=ae_widths, down_block_types=["DownEncoderBlock2D"] * 4,
        up_block_types=["UpDecoderBlock2D"] * 4, use_quant_conv=False, use_post_quant_conv=False,
        scaling_factor=cfgmod.AE_SCALE, shift_factor=cfgmod.AE_SHIFT, sample_size=1024, force_upcast=True,
        mid_block_add_attention=True,
    )
    clip = dict(
        vocab_size=49408, max_position_embeddings=77, hidden_size=clip_w, intermediate_size=clip_inter,
        num_hidden_layers=12, num_attention_heads=heads_for_width(clip_w), hidden_act="quick_gelu",
        layer_norm_eps=1e-5, projection_dim=clip_w,
    )
    t5cfg = dict(
        vocab_size=32128, relative_attention_num_buckets=32, relative_attention_max_distance=128,
        feed_forward_proj="gated-gelu", dropout_rate=0.0, layer_norm_epsilon=1e-6, is_encoder_decoder=False,
        use_cache=False, tie_word_embeddings=False, **t5,
    )
    return flux, ae, clip, t5cfg


def make_flux_models(variant: str = "flux-dev", seed: int = 0, full_size: bool = False,
                     depth: int | None = None, depth_single: int | None = None) -> FluxModelSet:
    """A random FluxModelSet, deterministic for a seed (float32)."""
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    from library.models.flux.model import Flux

    fcfg, ae_cfg, clip_cfg, t5_cfg = flux_configs(variant, full_size, depth, depth_single)
    torch.manual_seed(seed)
    flux = Flux(fcfg)
    ae = AutoencoderKL(**ae_cfg)
    clip = CLIPTextModel(CLIPTextConfig(**clip_cfg))
    t5 = T5EncoderModel(T5Config(**t5_cfg))
    if not full_size:
        # perturb every tensor so that a mix-up of two same-shaped tensors cannot go unseen
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            for model in (flux, ae, clip, t5):
                for p in model.parameters():
                    p.add_(torch.randn(p.shape, generator=g) * 0.02)
        calibrate_ae(ae, seed)
    return FluxModelSet(flux.eval(), ae.eval(), clip.eval(), t5.eval())


def calibrate_ae(ae, seed: int = 0) -> None:
    """Give a random AE the latent statistics of a real one (scaled latents with std ~1).

    A random encoder's latents are tiny; they would vanish under the training noise. The
    mean rows of `encoder.conv_out` are scaled up and `decoder.conv_in` scaled down by the
    same factor, so decoding an encoded image is unchanged.
    """
    import torch

    g = torch.Generator().manual_seed(seed + 2)
    colours = torch.rand(8, 3, 1, 1, generator=g) * 2 - 1
    images = (colours + 0.2 * torch.randn(8, 3, 64, 64, generator=g)).clamp(-1, 1)
    c = ae.config.latent_channels
    with torch.no_grad():
        z = ae.encode(images).latent_dist.mean
        factor = float(1.0 / (z.std() * cfgmod.AE_SCALE))
        ae.encoder.conv_out.weight[:c] *= factor
        ae.encoder.conv_out.bias[:c] *= factor
        ae.decoder.conv_in.weight /= factor


def save_flux_model_set(models: FluxModelSet, folder: str, variant: str, dtype=None, t5_dtype=None) -> dict:
    """Write the four files into `folder`; returns {'flux'|'ae'|'clip_l'|'t5xxl': path}."""
    import os

    from library.models.flux.loading import save_ae, save_flux_transformer
    from library.models.flux.text_encoders import save_clip_l, save_t5xxl

    os.makedirs(folder, exist_ok=True)
    paths = {
        "flux": os.path.join(folder, FILE_NAMES[variant]),
        "ae": os.path.join(folder, FILE_NAMES["ae"]),
        "clip_l": os.path.join(folder, FILE_NAMES["clip_l"]),
        "t5xxl": os.path.join(folder, FILE_NAMES["t5xxl"]),
    }
    save_flux_transformer(models.flux, paths["flux"], dtype=dtype)
    save_ae(models.ae, paths["ae"], dtype=None if dtype is not None and _is_fp8(dtype) else dtype)
    save_clip_l(models.clip_l, paths["clip_l"], dtype=None if dtype is not None and _is_fp8(dtype) else dtype)
    save_t5xxl(models.t5xxl, paths["t5xxl"], dtype=t5_dtype if t5_dtype is not None else
               (None if dtype is not None and _is_fp8(dtype) else dtype))
    return paths


def _is_fp8(dtype) -> bool:
    from library.models.flux.loading import is_fp8

    return is_fp8(dtype)
