"""Shared helpers for the FLUX tests: tiny model files made once per session, and diffusers
as the reference (oracle) for our transformer.

diffusers 0.42.1 hard-codes FLUX.1's hidden width (3072) where its single-file converter
splits the single blocks' fused `linear1` (ENVIRONMENT.md). `diffusers_flux_from_bfl` runs
diffusers' own `FluxTransformer2DModel.from_single_file` with a local config, with only
that split size taken from the tensor (rows = 3 hidden + 4 hidden) instead of the constant.
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import tempfile
import types

import torch

_ROOT = None


def _root() -> str:
    global _ROOT
    if _ROOT is None:
        _ROOT = tempfile.mkdtemp(prefix="tiny_flux_")
        atexit.register(shutil.rmtree, _ROOT, True)
    return _ROOT


@functools.lru_cache(maxsize=None)
def tiny_flux_files(variant: str = "flux-dev", seed: int = 1234) -> dict:
    """{'flux', 'ae', 'clip_l', 't5xxl', 'folder'} paths of a tiny float32 FLUX set."""
    from library.models.flux.tiny import make_flux_models, save_flux_model_set

    folder = os.path.join(_root(), f"{variant}_{seed}")
    models = make_flux_models(variant, seed=seed)
    paths = save_flux_model_set(models, folder, variant)
    paths["folder"] = folder
    return paths


@functools.lru_cache(maxsize=None)
def tokenizer_dir() -> str:
    from library.tokenizer_builder import ensure_tokenizer_cache

    return str(ensure_tokenizer_cache(os.path.join(_root(), "tokenizers"), targets=["clip-l", "t5"]))


class _TorchWithWidthFromTensor(types.ModuleType):
    """`torch` for diffusers' FLUX converter, except that the 4-way split of `linear1` takes
    the hidden width from the tensor (rows = 7 x hidden at MLP ratio 4)."""

    def __getattr__(self, name):
        return getattr(torch, name)

    @staticmethod
    def split(t, sizes, dim=0):
        if isinstance(sizes, (tuple, list)) and len(sizes) == 4:
            h = t.shape[dim] // 7
            sizes = (h, h, h, 4 * h)
        return torch.split(t, sizes, dim=dim)


def diffusers_config_folder(config, folder: str) -> str:
    os.makedirs(os.path.join(folder, "transformer"), exist_ok=True)
    with open(os.path.join(folder, "transformer", "config.json"), "w") as f:
        json.dump(dict(_class_name="FluxTransformer2DModel", **config.diffusers_config()), f)
    return folder


def diffusers_flux_from_bfl(path: str, config, dtype=torch.float32):
    """diffusers' FluxTransformer2DModel from our BFL file, by diffusers' single-file loader."""
    import diffusers.loaders.single_file_utils as sfu
    from diffusers import FluxTransformer2DModel

    cfg_folder = diffusers_config_folder(config, tempfile.mkdtemp(dir=_root(), prefix="cfg_"))
    original = sfu.torch
    sfu.torch = _TorchWithWidthFromTensor("torch")
    try:
        model = FluxTransformer2DModel.from_single_file(path, config=cfg_folder, subfolder="transformer",
                                                        torch_dtype=dtype)
    finally:
        sfu.torch = original
    return model.eval()


def random_inputs(config, batch: int = 2, h: int = 4, w: int = 6, txt_len: int = 12, seed: int = 0):
    from library.models.flux.packing import prepare_img_ids, prepare_txt_ids

    g = torch.Generator().manual_seed(seed)
    return dict(
        img=torch.randn(batch, h * w, config.in_channels, generator=g),
        img_ids=prepare_img_ids(batch, h, w),
        txt=torch.randn(batch, txt_len, config.context_in_dim, generator=g),
        txt_ids=prepare_txt_ids(batch, txt_len),
        timesteps=torch.rand(batch, generator=g),
        y=torch.randn(batch, config.vec_in_dim, generator=g),
        guidance=torch.full((batch,), 3.5) if config.guidance_embed else None,
    )
