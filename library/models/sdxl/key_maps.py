"""diffusers SDXL U-Net names <-> our U-Net (the LDM names of the single files).

Our module tree already uses the LDM names, so single files need no map at all; this one
serves diffusers folders and comparisons with diffusers' UNet2DConditionModel. It is the
SD1/2 module-pair table (library/models/sd/key_maps.py, generated from the level layout)
plus the pooled-text/size embedding (`add_embedding` <-> `label_emb.0`).
"""

from __future__ import annotations

from library.models.sd.key_maps import ModulePair, map_diffusers_keys_to_ldm
from library.models.sd.key_maps import unet_module_pairs as _sd_unet_pairs
from library.models.sdxl.config import SDXLUNetConfig


def unet_module_pairs(cfg: SDXLUNetConfig) -> list[ModulePair]:
    return _sd_unet_pairs(cfg.diffusers_config()) + [
        ModulePair("add_embedding.linear_1", "label_emb.0.0"),
        ModulePair("add_embedding.linear_2", "label_emb.0.2"),
    ]


def diffusers_to_ours(diffusers_sd: dict, cfg: SDXLUNetConfig) -> dict:
    """A diffusers UNet2DConditionModel state dict renamed for SDXLUNet (tensors shared)."""
    mapping = map_diffusers_keys_to_ldm(diffusers_sd.keys(), unet_module_pairs(cfg), "")
    return {m.ldm_key: diffusers_sd[k] for k, m in mapping.items()}


def ours_to_diffusers(our_sd: dict, cfg: SDXLUNetConfig) -> dict:
    """Inverse of `diffusers_to_ours`."""
    diffusers_keys = diffusers_unet_keys(cfg)
    mapping = map_diffusers_keys_to_ldm(diffusers_keys, unet_module_pairs(cfg), "")
    return {k: our_sd[m.ldm_key] for k, m in mapping.items()}


def diffusers_unet_keys(cfg: SDXLUNetConfig) -> list[str]:
    """The state-dict keys of the equivalent diffusers U-Net (built without weights)."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    with init_empty_weights():
        model = UNet2DConditionModel(**cfg.diffusers_config())
    return list(model.state_dict().keys())
