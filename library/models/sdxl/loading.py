"""Load SDXL models: single files (.safetensors / .ckpt) or diffusers folders.

Single file (formats.md §c.2): the U-Net under `model.diffusion_model.` loads into our
LDM-named SDXLUNet without renaming; CLIP ViT-L (Hugging Face naming) under
`conditioner.embedders.0.transformer.`; OpenCLIP bigG under `conditioner.embedders.1.model.`
is converted to a transformers CLIPTextModelWithProjection (q/k/v split, projection
transposed); the VAE under `first_stage_model.`. As for SD1/2 (library/models/sd/loading.py)
modules are built without weights and take the file's (memory-mapped) tensors directly,
and tensors no model uses are kept for saving, so load -> save is bit-exact.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from library.errors import UserInputError
from library.models import clip_naming
from library.models.dtypes import dtype_from_precision as _dtype_of
from library.models.sd.key_maps import vae_module_pairs
from library.models.sd.loading import _assign, _build_empty, _check_shapes, _load_ldm_part, _TensorSource
from library.models.sd.openclip import openclip_keys_used, openclip_to_hf
from library.models.sdxl import config as cfgmod

logger = logging.getLogger(__name__)


@dataclass
class SDXLModels:
    text_encoder1: object  # transformers CLIPTextModel (CLIP ViT-L)
    text_encoder2: object  # transformers CLIPTextModelWithProjection (OpenCLIP bigG)
    vae: object  # diffusers AutoencoderKL (scaling_factor 0.13025)
    unet: object  # SDXLUNet (LDM module names)
    source_path: str
    source_format: str  # "ldm", "diffusers" or "random"
    unused_tensors: dict = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0

    @property
    def text_encoders(self) -> list:
        return [self.text_encoder1, self.text_encoder2]

    @property
    def unet_config(self) -> cfgmod.SDXLUNetConfig:
        return self.unet.config


def load_unet(src: _TensorSource, config: cfgmod.SDXLUNetConfig, dtype):
    from library.models.sdxl.unet import SDXLUNet

    unet = _build_empty(lambda: SDXLUNet(config))
    keys = list(unet.state_dict().keys())
    missing = [k for k in keys if cfgmod.UNET_PREFIX + k not in src.shapes]
    if missing:
        raise UserInputError(f"{src.path}: SDXL U-Net is missing {len(missing)} tensors, e.g. '{cfgmod.UNET_PREFIX + missing[0]}'")
    sd = {k: src.get(cfgmod.UNET_PREFIX + k, dtype) for k in keys}
    _check_shapes(unet, sd, "U-Net", src.path)
    _assign(unet, sd, dtype, "U-Net", src.path)
    return unet


def load_text_encoder1(src: _TensorSource, te_cfg: dict, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    te = _build_empty(lambda: CLIPTextModel(CLIPTextConfig(**te_cfg)))
    prefix = cfgmod.CLIP_L_PREFIX
    wanted = clip_naming.canonical_keys(te)
    missing = [k for k in wanted if prefix + k not in src.shapes]
    if missing:
        raise UserInputError(f"{src.path}: first text encoder (CLIP ViT-L) is missing '{prefix + missing[0]}'")
    sd = clip_naming.to_model_keys(te, {k: src.get(prefix + k, dtype) for k in wanted})
    _check_shapes(te, sd, "text encoder 1", src.path)
    _assign(te, sd, dtype, "text encoder 1", src.path)
    return te


def load_text_encoder2(src: _TensorSource, te_cfg: dict, dtype):
    from transformers import CLIPTextConfig, CLIPTextModelWithProjection

    te = _build_empty(lambda: CLIPTextModelWithProjection(CLIPTextConfig(**te_cfg)))
    prefix = cfgmod.BIGG_PREFIX
    layers = te_cfg["num_hidden_layers"]
    missing = [k for k in openclip_keys_used(layers, with_projection=True) if prefix + k not in src.shapes]
    if missing:
        raise UserInputError(f"{src.path}: second text encoder (OpenCLIP bigG) is missing '{prefix + missing[0]}'")
    sd = openclip_to_hf(lambda k: src.get(prefix + k, dtype), layers, with_projection=True)
    sd = clip_naming.to_model_keys(te, sd)
    _check_shapes(te, sd, "text encoder 2", src.path)
    _assign(te, sd, dtype, "text encoder 2", src.path)
    return te


def load_sdxl_models(path: str, vae_path: str | None = None, dtype=None, mmap: bool = True, vae_dtype=None) -> SDXLModels:
    """Text encoders, VAE and U-Net of an SDXL model from a single file or a diffusers folder.

    `dtype` None keeps the stored precision (no copy). `mmap=False` is
    `--disable_mmap_load_safetensors`: the file is read into memory at once.
    """
    dtype = _dtype_of(dtype)
    vae_dtype = dtype if vae_dtype is None else _dtype_of(vae_dtype)
    if not path:
        raise UserInputError("--pretrained_model_name_or_path is required (an SDXL .safetensors/.ckpt file or a diffusers folder)")
    if not os.path.exists(path):
        raise UserInputError(f"--pretrained_model_name_or_path {path}: file or folder not found")
    if os.path.isdir(path):
        models = load_sdxl_diffusers(path, dtype, vae_dtype)
    else:
        src = _TensorSource(path, mmap)
        config = cfgmod.infer_sdxl_config(src.shapes, path)
        if not config.has_vae and vae_path is None:
            raise UserInputError(f"{path}: checkpoint has no VAE ('{cfgmod.VAE_PREFIX}' keys); pass one with --vae")
        unet = load_unet(src, config.unet, dtype)
        te1 = load_text_encoder1(src, config.text_encoder1, dtype)
        te2 = load_text_encoder2(src, config.text_encoder2, dtype)
        vae = None
        if config.has_vae:
            from diffusers import AutoencoderKL

            vae = _build_empty(lambda: AutoencoderKL(**config.vae))
            _load_ldm_part(src, vae, vae_module_pairs(config.vae), cfgmod.VAE_PREFIX, vae_dtype, "VAE")
        models = SDXLModels(te1.eval(), te2.eval(), vae.eval() if vae is not None else None, unet.eval(), path, "ldm",
                            src.unused(), src.epoch, src.global_step)
        src.close()
        logger.info(
            "loaded SDXL checkpoint %s: U-Net widths %s, transformer depths %s (middle %d); text encoders %d x %d and "
            "%d x %d layers; %d unused tensors kept",
            path, config.unet.widths, config.unet.transformer_depth, config.unet.transformer_depth_middle,
            config.text_encoder1["num_hidden_layers"], config.text_encoder1["hidden_size"],
            config.text_encoder2["num_hidden_layers"], config.text_encoder2["hidden_size"], len(models.unused_tensors),
        )
    if vae_path is not None:
        from library.models.sd.loading import load_vae

        models.vae = load_vae(vae_path, vae_dtype, mmap)
    return models


def load_sdxl_diffusers(path: str, dtype=None, vae_dtype=None) -> SDXLModels:
    """A diffusers StableDiffusionXLPipeline folder; the U-Net is renamed to our LDM tree."""
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    from library.models.sdxl.key_maps import diffusers_to_ours
    from library.models.sdxl.unet import SDXLUNet

    dtype = _dtype_of(dtype)
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2"):
        if not os.path.exists(os.path.join(path, sub, "config.json")):
            if sub == "text_encoder_2" and os.path.exists(os.path.join(path, "text_encoder", "config.json")):
                raise UserInputError(f"{path}: diffusers folder has one text encoder: an SD1.x/2.x model, not SDXL")
            raise UserInputError(f"{path}: not a diffusers SDXL folder (missing {sub}/config.json)")
    d_unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    if d_unet.config.addition_embed_type != "text_time":
        raise UserInputError(f"{path}: the U-Net has no size/pooled-text embedding (addition_embed_type 'text_time'); not SDXL")
    cfg = cfgmod.SDXLUNetConfig.from_diffusers_config(dict(d_unet.config))
    unet = _build_empty(lambda: SDXLUNet(cfg))
    _assign(unet, diffusers_to_ours(d_unet.state_dict(), cfg), None, "U-Net", path)
    del d_unet
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype if vae_dtype is None else _dtype_of(vae_dtype))
    te1 = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
    te2 = CLIPTextModelWithProjection.from_pretrained(path, subfolder="text_encoder_2", torch_dtype=dtype)
    logger.info("loaded diffusers SDXL folder %s (U-Net widths %s)", path, cfg.widths)
    return SDXLModels(te1.eval(), te2.eval(), vae.eval(), unet.eval(), path, "diffusers")
