"""Save SDXL models as a single file (formats.md §c.2) or as a diffusers folder."""

from __future__ import annotations

import json
import logging
import math
import os

from library.errors import UserInputError
from library.models import clip_naming
from library.models.sd.key_maps import map_diffusers_keys_to_ldm, to_ldm_tensor, vae_module_pairs
from library.models.sd.openclip import hf_to_openclip
from library.models.sdxl import config as cfgmod

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")


def build_sdxl_state_dict(models, save_dtype=None) -> dict:
    """The full single-file state dict of `models` (an SDXLModels)."""
    import torch

    out = {cfgmod.UNET_PREFIX + k: v for k, v in models.unet.state_dict().items()}
    for k, v in clip_naming.canonical_state_dict(models.text_encoder1).items():
        out[cfgmod.CLIP_L_PREFIX + k] = v
    te2 = models.text_encoder2
    te2_sd = clip_naming.canonical_state_dict(te2)
    for k, v in hf_to_openclip(te2_sd, te2.config.num_hidden_layers, with_projection=True).items():
        out[cfgmod.BIGG_PREFIX + k] = v
    if cfgmod.BIGG_PREFIX + "logit_scale" not in models.unused_tensors:
        # CLIP's contrastive temperature: never used for generation, present in released files
        out[cfgmod.BIGG_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0))
    if models.vae is not None:
        vsd = models.vae.state_dict()
        for k, m in map_diffusers_keys_to_ldm(vsd.keys(), vae_module_pairs(dict(models.vae.config)), cfgmod.VAE_PREFIX).items():
            out[m.ldm_key] = to_ldm_tensor(vsd[k], m)
    for k, v in models.unused_tensors.items():  # tensors of the source file no model used
        out.setdefault(k, v)
    if save_dtype is not None:
        out = {k: (v.to(save_dtype) if v.is_floating_point() else v) for k, v in out.items()}
    return out


def save_sdxl_checkpoint(models, path: str, save_dtype=None, metadata: dict | None = None, epoch: int = 0, global_step: int = 0) -> None:
    """Write an SDXL single file (.safetensors with metadata, or .ckpt); atomic.

    For .ckpt, the source checkpoint's epoch/global_step are added to the given ones.
    """
    from library.io.checkpoint_io import save_checkpoint

    sd = build_sdxl_state_dict(models, save_dtype)
    save_checkpoint(path, sd, metadata, epoch + models.epoch, global_step + models.global_step)
    logger.info("saved SDXL checkpoint (%d tensors) to %s", len(sd), path)


def scheduler_config(v_parameterization: bool = False) -> dict:
    """The scheduler the SDXL base pipeline ships with (same betas as training-math §2.1)."""
    return {
        "_class_name": "EulerDiscreteScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "steps_offset": 1, "timestep_spacing": "leading",
        "interpolation_type": "linear", "use_karras_sigmas": False,
        "prediction_type": "v_prediction" if v_parameterization else "epsilon",
    }


def diffusers_unet(unet):
    """Our SDXLUNet as a diffusers UNet2DConditionModel sharing its tensors."""
    from diffusers import UNet2DConditionModel

    from library.models.sd.loading import _build_empty
    from library.models.sdxl.key_maps import ours_to_diffusers

    cfg = unet.config
    model = _build_empty(lambda: UNet2DConditionModel(**cfg.diffusers_config()))
    result = model.load_state_dict(ours_to_diffusers(unet.state_dict(), cfg), strict=True, assign=True)
    assert not result.missing_keys and not result.unexpected_keys
    return model


def save_sdxl_diffusers(models, folder: str, save_dtype=None, safe_serialization: bool = True,
                        v_parameterization: bool = False, tokenizers=None) -> None:
    """Write a diffusers StableDiffusionXLPipeline folder; replaces `folder` atomically.

    `tokenizers` is (CLIP-L, bigG) or None (the folder is then written without them).
    """
    from library.io.atomic import atomic_folder

    def cast(m):
        return m.to(save_dtype) if save_dtype is not None else m

    with atomic_folder(folder) as tmp:
        cast(diffusers_unet(models.unet)).save_pretrained(os.path.join(tmp, "unet"), safe_serialization=safe_serialization)
        cast(models.vae).save_pretrained(os.path.join(tmp, "vae"), safe_serialization=safe_serialization)
        cast(models.text_encoder1).save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=safe_serialization)
        cast(models.text_encoder2).save_pretrained(os.path.join(tmp, "text_encoder_2"), safe_serialization=safe_serialization)
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler_config(v_parameterization), f, indent=2)
        tok = ["transformers", "CLIPTokenizer"] if tokenizers is not None else [None, None]
        index = {
            "_class_name": "StableDiffusionXLPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "text_encoder_2": ["transformers", "CLIPTextModelWithProjection"],
            "scheduler": ["diffusers", "EulerDiscreteScheduler"],
            "tokenizer": tok,
            "tokenizer_2": tok,
            "force_zeros_for_empty_prompt": True,
        }
        if tokenizers is not None:
            tokenizers[0].save_pretrained(os.path.join(tmp, "tokenizer"))
            tokenizers[1].save_pretrained(os.path.join(tmp, "tokenizer_2"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
    logger.info("saved diffusers SDXL folder %s", folder)


def save_sdxl_model(models, out_path: str, save_model_as: str | None = None, save_dtype=None, metadata=None,
                    v_parameterization: bool = False, tokenizers=None, epoch: int = 0, global_step: int = 0) -> str:
    """Save in the format `--save_model_as` names (default: follow the output path's extension)."""
    from library.models.dtypes import dtype_from_precision

    save_dtype = dtype_from_precision(save_dtype)
    fmt = save_model_as or ("diffusers" if not os.path.splitext(out_path)[1] else os.path.splitext(out_path)[1][1:].lower())
    if fmt in ("ckpt", "safetensors"):
        save_sdxl_checkpoint(models, out_path, save_dtype, metadata if fmt == "safetensors" else None, epoch, global_step)
    elif fmt in ("diffusers", "diffusers_safetensors"):
        save_sdxl_diffusers(models, out_path, save_dtype, fmt == "diffusers_safetensors", v_parameterization, tokenizers)
    else:
        raise UserInputError(f"--save_model_as {fmt}: expected one of {', '.join(SAVE_FORMATS)}")
    return fmt
