"""Save SD1.x/2.x models as an LDM single file or as a diffusers folder."""

from __future__ import annotations

import json
import logging
import math
import os

from library.errors import UserInputError
from library.models.sd import config as cfgmod
from library.models.sd.key_maps import map_diffusers_keys_to_ldm, to_ldm_tensor, unet_module_pairs, vae_module_pairs
from library.models.sd.openclip import hf_to_openclip

logger = logging.getLogger(__name__)

SAVE_FORMATS = ("ckpt", "safetensors", "diffusers", "diffusers_safetensors")


def _unet_config(unet) -> dict:
    return dict(unet.config)


def _vae_config(vae) -> dict:
    return dict(vae.config)


def build_ldm_state_dict(models, save_dtype=None) -> dict:
    """The full LDM-layout state dict of `models` (an SDModels)."""
    import torch

    out = {}
    usd = models.unet.state_dict()
    for k, m in map_diffusers_keys_to_ldm(usd.keys(), unet_module_pairs(_unet_config(models.unet)), cfgmod.UNET_PREFIX).items():
        out[m.ldm_key] = to_ldm_tensor(usd[k], m)
    if models.vae is not None:
        vsd = models.vae.state_dict()
        for k, m in map_diffusers_keys_to_ldm(vsd.keys(), vae_module_pairs(_vae_config(models.vae)), cfgmod.VAE_PREFIX).items():
            out[m.ldm_key] = to_ldm_tensor(vsd[k], m)

    from library.models import clip_naming

    tsd = clip_naming.canonical_state_dict(models.text_encoder)
    if models.v2:
        layers = models.text_encoder.config.num_hidden_layers
        for k, v in hf_to_openclip(tsd, layers).items():
            out[cfgmod.OPENCLIP_PREFIX + k] = v
        source = models.unused_tensors
        last = f"{cfgmod.OPENCLIP_PREFIX}transformer.resblocks.{layers}."
        if not any(k.startswith(last) for k in source):
            # SD2 files store one more OpenCLIP layer than the model uses. Without a source
            # checkpoint to take it from, repeat the last used layer (it never affects output).
            prev = f"{cfgmod.OPENCLIP_PREFIX}transformer.resblocks.{layers - 1}."
            for k in [k for k in out if k.startswith(prev)]:
                out[last + k[len(prev):]] = out[k].clone()
        hidden = models.text_encoder.config.hidden_size
        if cfgmod.OPENCLIP_PREFIX + "text_projection" not in source:
            ref = out[cfgmod.OPENCLIP_PREFIX + "ln_final.weight"]
            out[cfgmod.OPENCLIP_PREFIX + "text_projection"] = torch.eye(hidden, dtype=ref.dtype)
        if cfgmod.OPENCLIP_PREFIX + "logit_scale" not in source:
            out[cfgmod.OPENCLIP_PREFIX + "logit_scale"] = torch.tensor(math.log(100.0))
    else:
        for k, v in tsd.items():
            out[cfgmod.CLIP_PREFIX + k] = v

    # tensors of the source file that no model used come back unchanged
    for k, v in models.unused_tensors.items():
        out.setdefault(k, v)

    if save_dtype is not None:
        out = {k: (v.to(save_dtype) if v.is_floating_point() else v) for k, v in out.items()}
    return out


def save_ldm_checkpoint(models, path: str, save_dtype=None, metadata: dict | None = None, epoch: int = 0, global_step: int = 0) -> None:
    """Write an LDM single file (.safetensors with metadata, or .ckpt); atomic.

    For .ckpt, the source checkpoint's epoch/global_step are added to the given ones.
    """
    from library.io.checkpoint_io import save_checkpoint

    sd = build_ldm_state_dict(models, save_dtype)
    save_checkpoint(path, sd, metadata, epoch + models.epoch, global_step + models.global_step)
    logger.info("saved %s checkpoint (%d tensors) to %s", "SD2.x" if models.v2 else "SD1.x", len(sd), path)


def scheduler_config(v_parameterization: bool) -> dict:
    """The DDIM scheduler SD checkpoints are trained with (training-math §2.1)."""
    return {
        "_class_name": "DDIMScheduler",
        "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
        "num_train_timesteps": 1000, "clip_sample": False, "set_alpha_to_one": False,
        "steps_offset": 1, "prediction_type": "v_prediction" if v_parameterization else "epsilon",
    }


def save_diffusers(models, folder: str, save_dtype=None, safe_serialization: bool = True,
                   v_parameterization: bool = False, tokenizer=None) -> None:
    """Write a diffusers StableDiffusionPipeline folder; replaces `folder` atomically."""
    from library.io.atomic import atomic_folder

    def cast(m):
        return m.to(save_dtype) if save_dtype is not None else m

    with atomic_folder(folder) as tmp:
        cast(models.unet).save_pretrained(os.path.join(tmp, "unet"), safe_serialization=safe_serialization)
        cast(models.vae).save_pretrained(os.path.join(tmp, "vae"), safe_serialization=safe_serialization)
        cast(models.text_encoder).save_pretrained(os.path.join(tmp, "text_encoder"), safe_serialization=safe_serialization)
        os.makedirs(os.path.join(tmp, "scheduler"))
        with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w") as f:
            json.dump(scheduler_config(v_parameterization), f, indent=2)
        index = {
            "_class_name": "StableDiffusionPipeline",
            "unet": ["diffusers", "UNet2DConditionModel"],
            "vae": ["diffusers", "AutoencoderKL"],
            "text_encoder": ["transformers", "CLIPTextModel"],
            "scheduler": ["diffusers", "DDIMScheduler"],
            "tokenizer": ["transformers", "CLIPTokenizer"] if tokenizer is not None else [None, None],
            "safety_checker": [None, None],
            "feature_extractor": [None, None],
            "requires_safety_checker": False,
        }
        if tokenizer is not None:
            tokenizer.save_pretrained(os.path.join(tmp, "tokenizer"))
        with open(os.path.join(tmp, "model_index.json"), "w") as f:
            json.dump(index, f, indent=2)
    logger.info("saved diffusers folder %s", folder)


def save_sd_model(models, out_path: str, save_model_as: str | None = None, save_dtype=None, metadata=None,
                  v_parameterization: bool = False, tokenizer=None, epoch: int = 0, global_step: int = 0) -> str:
    """Save in the format `--save_model_as` names (default: follow the output path's extension).

    `save_dtype` is a torch dtype or a `--save_precision` name (float, fp16, bf16).
    """
    from library.models.dtypes import dtype_from_precision

    save_dtype = dtype_from_precision(save_dtype)
    fmt = save_model_as or ("diffusers" if not os.path.splitext(out_path)[1] else os.path.splitext(out_path)[1][1:].lower())
    if fmt in ("ckpt", "safetensors"):
        save_ldm_checkpoint(models, out_path, save_dtype, metadata if fmt == "safetensors" else None, epoch, global_step)
    elif fmt in ("diffusers", "diffusers_safetensors"):
        save_diffusers(models, out_path, save_dtype, fmt == "diffusers_safetensors", v_parameterization, tokenizer)
    else:
        raise UserInputError(f"--save_model_as {fmt}: expected one of {', '.join(SAVE_FORMATS)}")
    return fmt
