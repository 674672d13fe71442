"""Shared fixtures: tiny random models written once per test session."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# Nothing in the suite may reach a model hub.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session", autouse=True)
def _torch_one_thread():
    """Every model in the suite is tiny: threads gain nothing, and on a busy 2-core machine
    the thread pool's barriers cost more than the arithmetic."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class TinySD:
    """A tiny SD model on disk plus a diffusers folder holding its true configuration."""

    def __init__(self, variant: str, path: str, reference_folder: str):
        self.variant = variant
        self.path = path
        self.reference_folder = reference_folder


@pytest.fixture(scope="session")
def tiny_sd(tmp_path_factory):
    """variant -> TinySD, built lazily (each variant once per session)."""
    cache: dict[str, TinySD] = {}
    root = tmp_path_factory.mktemp("tiny_sd")

    def get(variant: str) -> TinySD:
        if variant not in cache:
            from library.models.sd.saving import save_diffusers, save_ldm_checkpoint
            from library.models.sd.tiny import make_sd_models

            models = make_sd_models(variant, seed=1234)
            path = str(root / f"{variant}.safetensors")
            save_ldm_checkpoint(models, path)
            ref = str(root / f"{variant}_reference")
            save_diffusers(models, ref, v_parameterization=variant == "sd2-v")
            cache[variant] = TinySD(variant, path, ref)
        return cache[variant]

    return get


@pytest.fixture(scope="session")
def tokenizer_cache(tmp_path_factory) -> str:
    """A --tokenizer_cache_dir holding every tokenizer, built offline once per session."""
    from library.tokenizer_builder import ensure_tokenizer_cache

    return ensure_tokenizer_cache(tmp_path_factory.mktemp("tokenizers"))


class TinySDXLFiles:
    """A tiny SDXL single file plus a complete diffusers folder (with tokenizers) of the same weights."""

    def __init__(self, path: str, reference_folder: str):
        self.path = path
        self.reference_folder = reference_folder


@pytest.fixture(scope="session")
def tiny_sdxl_files(tmp_path_factory, tokenizer_cache) -> TinySDXLFiles:
    from library.models.sdxl.saving import save_sdxl_checkpoint, save_sdxl_diffusers
    from library.models.sdxl.tiny import make_sdxl_models
    from library.tokenizers import load_sdxl_tokenizers

    root = tmp_path_factory.mktemp("tiny_sdxl_files")
    models = make_sdxl_models(seed=1234)
    path = str(root / "sdxl.safetensors")
    save_sdxl_checkpoint(models, path)
    ref = str(root / "sdxl_reference")
    save_sdxl_diffusers(models, ref, tokenizers=load_sdxl_tokenizers(tokenizer_cache))
    return TinySDXLFiles(path, ref)
