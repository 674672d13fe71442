"""Load SD1.x/2.x models: LDM single files (.safetensors / .ckpt) or diffusers folders.

Sizes come from the file (config.py); modules are built without allocating weights
(accelerate's init_empty_weights) and then take the file's tensors directly
(load_state_dict(assign=True)). With a .safetensors file those tensors are memory-mapped,
so loading is nearly free until the weights are used, and RSS stays near the file size.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

from library.errors import UserInputError
from library.io import checkpoint_io, safetensors_io
from library.models.dtypes import dtype_from_precision as _dtype_of
from library.models.sd import config as cfgmod
from library.models.sd.key_maps import (
    map_diffusers_keys_to_ldm,
    to_diffusers_tensor,
    unet_module_pairs,
    vae_module_pairs,
)
from library.models.sd.openclip import openclip_keys_used, openclip_to_hf

logger = logging.getLogger(__name__)


@dataclass
class SDModels:
    text_encoder: object  # transformers CLIPTextModel
    vae: object  # diffusers AutoencoderKL
    unet: object  # diffusers UNet2DConditionModel
    v2: bool
    source_path: str
    source_format: str  # "ldm" or "diffusers"
    # Tensors of the source file that no model consumed (EMA weights, schedules, SD2's last
    # OpenCLIP layer...). Saving writes them back so a load/save round trip is exact.
    unused_tensors: dict = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0


class _TensorSource:
    """Uniform, lazy access to a checkpoint's tensors by key.

    A safetensors tensor wanted in its stored dtype comes from the file's memory map
    (zero-copy: the model's weights are the file's pages). One wanted in another dtype is
    converted at once and its pages handed back (`TensorFile.get_as`): left mapped, the
    pages it touched would stay counted in resident memory next to the converted copy
    until the map closed (for SD 1.5 fp16 -> fp32 training, ~2 GB more peak RSS).
    With `mmap=False` (`--disable_mmap_load_safetensors`) the file is read whole at once.
    """

    def __init__(self, path: str, mmap: bool):
        self.path = path
        self._file = None  # TensorFile: private reads
        self._map = None  # safe_open handle, opened on first zero-copy read
        self._sd = None
        self.metadata: dict = {}
        self.epoch = self.global_step = 0
        if safetensors_io.is_safetensors_path(path):
            if mmap:
                from library.io.tensor_files import TensorFile

                self._file = TensorFile(path, "checkpoint")
                self.metadata = self._file.metadata
                self.shapes = {k: self._file.shape(k) for k in self._file.keys()}
            else:
                self.metadata = safetensors_io.read_metadata(path)
                self._sd = safetensors_io.load_state_dict(path, mmap=False)
                self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
        else:
            ckpt = checkpoint_io.load_checkpoint(path)
            self._sd = ckpt.state_dict
            self.epoch, self.global_step = ckpt.epoch, ckpt.global_step
            self.shapes = {k: tuple(v.shape) for k, v in self._sd.items()}
        self._rename = {}
        normalized = cfgmod.normalize_clip_keys({k: k for k in self.shapes})
        if len(normalized) == len(self.shapes) and any(k != v for k, v in normalized.items()):
            self._rename = {new: old for new, old in normalized.items()}
            self.shapes = {new: self.shapes[old] for new, old in normalized.items()}
        self.used: set[str] = set()

    def get(self, key: str, dtype=None):
        """The tensor; floating tensors converted to `dtype` (None: as stored)."""
        self.used.add(key)
        stored = self._rename.get(key, key)
        if self._file is None:
            t = self._sd[stored]
        elif dtype is None or not self._file.dtype(stored).is_floating_point or self._file.dtype(stored) == dtype:
            if self._map is None:
                from safetensors import safe_open

                self._map = safe_open(self.path, framework="pt", device="cpu")
            return self._map.get_tensor(stored)
        else:
            return self._file.get_as(stored, dtype)
        return t.to(dtype) if dtype is not None and t.is_floating_point() else t

    def unused(self) -> dict:
        return {k: self.get(k) for k in list(self.shapes) if k not in self.used}

    def close(self) -> None:
        """Release the file handles (zero-copy tensors keep their own reference to the map)."""
        if self._file is not None:
            self._file.close()
        self._map = None
        self._sd = None


def _assign(model, state_dict: dict, dtype, what: str, path: str):
    if dtype is not None:
        state_dict = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in state_dict.items()}
    result = model.load_state_dict(state_dict, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise UserInputError(
            f"{path}: {what} weights do not fit the inferred architecture "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _check_shapes(model, state_dict: dict, what: str, path: str):
    expected = model.state_dict(keep_vars=True)
    for k, v in state_dict.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise UserInputError(f"{path}: {what} tensor for '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")


def _build_empty(factory):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def _load_ldm_part(src: _TensorSource, model, pairs, prefix: str, dtype, what: str):
    mapping = map_diffusers_keys_to_ldm(model.state_dict().keys(), pairs, prefix)
    missing = [m.ldm_key for m in mapping.values() if m.ldm_key not in src.shapes]
    if missing:
        raise UserInputError(f"{src.path}: {what} is missing {len(missing)} tensors, e.g. '{missing[0]}'")
    sd = {k: to_diffusers_tensor(src.get(m.ldm_key, dtype), m) for k, m in mapping.items()}
    _check_shapes(model, sd, what, src.path)
    _assign(model, sd, dtype, what, src.path)


def load_unet(src: _TensorSource, config: cfgmod.SDModelConfig, dtype):
    from diffusers import UNet2DConditionModel

    unet = _build_empty(lambda: UNet2DConditionModel(**config.unet))
    _load_ldm_part(src, unet, unet_module_pairs(config.unet), cfgmod.UNET_PREFIX, dtype, "U-Net")
    return unet


def load_text_encoder(src: _TensorSource, config: cfgmod.SDModelConfig, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel

    te = _build_empty(lambda: CLIPTextModel(CLIPTextConfig(**config.text_encoder)))
    from library.models import clip_naming

    if config.v2:
        layers = config.text_encoder["num_hidden_layers"]
        needed = openclip_keys_used(layers)
        missing = [k for k in needed if cfgmod.OPENCLIP_PREFIX + k not in src.shapes]
        if missing:
            raise UserInputError(f"{src.path}: OpenCLIP text encoder is missing '{cfgmod.OPENCLIP_PREFIX + missing[0]}'")
        sd = clip_naming.to_model_keys(te, openclip_to_hf(lambda k: src.get(cfgmod.OPENCLIP_PREFIX + k, dtype), layers))
    else:
        prefix = cfgmod.CLIP_PREFIX
        wanted = clip_naming.canonical_keys(te)
        missing = [k for k in wanted if prefix + k not in src.shapes]
        if missing:
            raise UserInputError(f"{src.path}: text encoder is missing '{prefix + missing[0]}'")
        sd = {k: src.get(prefix + k, dtype) for k in wanted}
    sd = clip_naming.to_model_keys(te, sd)
    _check_shapes(te, sd, "text encoder", src.path)
    _assign(te, sd, dtype, "text encoder", src.path)
    return te


def load_vae(path: str, dtype=None, mmap: bool = True):
    """A replacement VAE (`--vae`): diffusers folder, diffusers-format file or LDM file."""
    from diffusers import AutoencoderKL

    if not os.path.exists(path):
        raise UserInputError(f"--vae {path}: file or folder not found")
    if os.path.isdir(path):
        sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
        if not os.path.exists(os.path.join(path, sub or "", "config.json")):
            raise UserInputError(f"--vae {path}: folder has no diffusers VAE (config.json) inside")
        return AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=_dtype_of(dtype))
    src = _TensorSource(path, mmap)
    if any(k.startswith("encoder.down_blocks.") for k in src.shapes):
        raise UserInputError(f"--vae {path}: diffusers-format VAE files need their config: pass the diffusers folder instead")
    prefix = cfgmod.VAE_PREFIX if any(k.startswith(cfgmod.VAE_PREFIX) for k in src.shapes) else ""
    vae_cfg = cfgmod.infer_vae_config(src.shapes, path, prefix)
    vae = _build_empty(lambda: AutoencoderKL(**vae_cfg))
    _load_ldm_part(src, vae, vae_module_pairs(vae_cfg), prefix, _dtype_of(dtype), "VAE")
    src.close()
    logger.info("loaded VAE from %s (latent channels %d)", path, vae_cfg["latent_channels"])
    return vae


def load_sd_models(
    path: str,
    v2: bool | None = None,
    v_parameterization: bool = False,
    vae_path: str | None = None,
    dtype=None,
    mmap: bool = True,
    vae_dtype=None,
) -> SDModels:
    """Load text encoder, VAE and U-Net of an SD1.x/2.x model.

    `path` is an LDM single file or a diffusers folder. `v2` None means "infer from the
    file"; a flag that contradicts the file is reported and the file wins. `dtype` None
    keeps the stored precision (no copy); otherwise floating tensors are converted, one
    tensor at a time. `vae_dtype` (default: `dtype`) is the VAE's.
    """
    dtype = _dtype_of(dtype)
    vae_dtype = dtype if vae_dtype is None else _dtype_of(vae_dtype)
    if not os.path.exists(path):
        raise UserInputError(f"--pretrained_model_name_or_path {path}: file or folder not found")
    if os.path.isdir(path):
        models = _load_diffusers_folder(path, dtype, vae_dtype)
    else:
        src = _TensorSource(path, mmap)
        config = cfgmod.infer_sd_config(src.shapes, path, v2, v_parameterization)
        for note in config.notes:
            logger.warning(note)
        if not config.has_text_encoder:
            raise UserInputError(f"{path}: checkpoint has no text encoder (neither '{cfgmod.CLIP_PREFIX}' nor '{cfgmod.OPENCLIP_PREFIX}' keys)")
        if not config.has_vae and vae_path is None:
            raise UserInputError(f"{path}: checkpoint has no VAE ('{cfgmod.VAE_PREFIX}' keys); pass one with --vae")
        unet = load_unet(src, config, dtype)
        te = load_text_encoder(src, config, dtype)
        if config.has_vae:
            from diffusers import AutoencoderKL

            vae = _build_empty(lambda: AutoencoderKL(**config.vae))
            _load_ldm_part(src, vae, vae_module_pairs(config.vae), cfgmod.VAE_PREFIX, vae_dtype, "VAE")
        else:
            vae = None
        models = SDModels(te, vae, unet, config.v2, path, "ldm", src.unused(), src.epoch, src.global_step)
        src.close()
        logger.info(
            "loaded %s checkpoint %s: U-Net widths %s, %d text-encoder layers (width %d), %d unused tensors kept",
            config.version_name, path, config.unet["block_out_channels"], config.text_encoder["num_hidden_layers"],
            config.text_encoder["hidden_size"], len(models.unused_tensors),
        )
    if vae_path is not None:
        models.vae = load_vae(vae_path, vae_dtype, mmap)
    return models


def _load_diffusers_folder(path: str, dtype, vae_dtype=None) -> SDModels:
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextModel

    for sub in ("unet", "vae", "text_encoder"):
        if not os.path.exists(os.path.join(path, sub, "config.json")):
            raise UserInputError(f"{path}: not a diffusers Stable Diffusion folder (missing {sub}/config.json)")
    unet = UNet2DConditionModel.from_pretrained(path, subfolder="unet", torch_dtype=dtype)
    vae = AutoencoderKL.from_pretrained(path, subfolder="vae", torch_dtype=dtype if vae_dtype is None else vae_dtype)
    te = CLIPTextModel.from_pretrained(path, subfolder="text_encoder", torch_dtype=dtype)
    v2 = te.config.hidden_act == "gelu" or unet.config.cross_attention_dim == 1024
    logger.info("loaded diffusers folder %s (%s)", path, "SD2.x" if v2 else "SD1.x")
    return SDModels(te, vae, unet, v2, path, "diffusers")
