"""Which layers a network adapts, and what their keys are called.

The kohya key of an adapted layer is `<prefix>.<module path>` with every `.` replaced by
`_`, e.g. `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q`. Layers
are selected by the class name of a container (`Transformer2DModel`, `CLIPAttention`, ...)
and the layer type inside it: `Linear`, 1x1 `Conv2d`, or other `Conv2d` ("conv", i.e. 3x3).

Text encoders are named by their canonical path. transformers 5.x flattened
`CLIPTextModel` (no `text_model` level), but every file in the ecosystem says
`lora_te_text_model_encoder_layers_0_self_attn_q_proj`, so the missing level is put back
in the name here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator

import torch

# Container classes, matched by class name (as the reference and third-party modules do).
UNET_ATTENTION_CONTAINERS = ("Transformer2DModel",)
UNET_CONV_CONTAINERS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_CONTAINERS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
# Attention modules proper (OFT's default target): the reference's own U-Net calls them
# CrossAttention, diffusers calls them Attention.
ATTENTION_CLASSES = ("CrossAttention", "Attention")

PREFIX_UNET = "lora_unet"
PREFIX_TEXT_ENCODER = "lora_te"  # single text encoder (SD1/2)


def text_encoder_prefixes(count: int, base: str = PREFIX_TEXT_ENCODER) -> list[str]:
    """`lora_te` for one encoder, `lora_te1`, `lora_te2`, ... for several (SDXL)."""
    if count == 1:
        return [base]
    return [f"{base}{i + 1}" for i in range(count)]


def as_model_list(models) -> list:
    """One model, a list/tuple of models, or None -> list without Nones."""
    if models is None:
        return []
    if isinstance(models, (list, tuple)):
        return [m for m in models if m is not None]
    return [models]


def is_sdxl_unet(unet) -> bool:
    """SDXL's U-Net carries the LDM layout (input_blocks/middle_block/output_blocks)."""
    return type(unet).__name__ == "SdxlUNet2DConditionModel" or hasattr(unet, "input_blocks")


def canonical_root(model) -> str:
    """Path prefix that turns the model's live module paths into canonical ones.

    A transformers 5.x `CLIPTextModel` has no `text_model` submodule, while the files (and
    `CLIPTextModelWithProjection`) do: its modules get `text_model.` in front.
    """
    name = type(model).__name__
    if name.startswith("CLIPText") and not hasattr(model, "text_model") and hasattr(model, "encoder"):
        return "text_model."
    return ""


class CanonicalNamesView(torch.nn.Module):
    """A model seen under its canonical module paths (`text_model.<...>`).

    Third-party network modules (LyCORIS' `lycoris.kohya`, ...) name layers from
    `named_modules()` of what they are given. Handing them this view of a transformers 5.x
    `CLIPTextModel` makes their keys `lora_te_text_model_encoder_...` like every file in the
    ecosystem. The view owns nothing: its one child is the model itself, attribute lookups
    and calls are passed through.
    """

    def __init__(self, model: torch.nn.Module, root: str = "text_model"):
        super().__init__()
        self._root = root
        self.add_module(root, model)

    @property
    def wrapped(self) -> torch.nn.Module:
        return self._modules[self._root]

    def forward(self, *args, **kwargs):
        return self.wrapped(*args, **kwargs)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get(self.__dict__.get("_root"))
            if inner is None:
                raise
            return getattr(inner, name)


def plugin_view(models):
    """What to give a third-party network module for one model or a list of models: a
    CanonicalNamesView where the live paths lack the canonical `text_model.` level, the model
    itself otherwise."""
    if isinstance(models, (list, tuple)):
        return [plugin_view(m) for m in models]
    if models is not None and canonical_root(models) == "text_model.":
        return CanonicalNamesView(models)
    return models


def key_name(prefix: str, path: str) -> str:
    return f"{prefix}.{path}".replace(".", "_")


def layer_kind(module: torch.nn.Module) -> str | None:
    """'linear', 'conv1x1', 'conv' (any other kernel) or None (not adaptable)."""
    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Conv2d):
        if module.groups != 1:
            return None
        return "conv1x1" if tuple(module.kernel_size) == (1, 1) else "conv"
    return None


@dataclass
class Target:
    name: str  # kohya key name, e.g. lora_unet_mid_block_attentions_0_proj_in
    path: str  # canonical module path inside the model, e.g. mid_block.attentions.0.proj_in
    module: torch.nn.Module
    kind: str  # 'linear' | 'conv1x1' | 'conv'
    container_class: str


def find_targets(model, prefix: str, container_classes: Iterable[str], kinds: Iterable[str]) -> list[Target]:
    """Every layer of an allowed kind inside a module whose class is in `container_classes`.

    Order follows `model.named_modules()`. A layer reachable through nested containers is
    listed once.
    """
    classes = set(container_classes)
    kinds = set(kinds)
    root = canonical_root(model)
    seen: set[int] = set()
    out: list[Target] = []
    for cpath, container in model.named_modules():
        cls = type(container).__name__
        if cls not in classes:
            continue
        for child_path, child in container.named_modules():
            if not child_path or id(child) in seen:
                continue
            kind = layer_kind(child)
            if kind is None or kind not in kinds:
                continue
            seen.add(id(child))
            path = root + (f"{cpath}.{child_path}" if cpath else child_path)
            out.append(Target(key_name(prefix, path), path, child, kind, cls))
    return out


def iter_model_targets(unet, text_encoders, unet_containers, te_containers, kinds_unet, kinds_te,
                       te_prefixes=None) -> Iterator[tuple[str, int | None, Target]]:
    """(part, text-encoder index or None, target) for the U-Net and every text encoder."""
    tes = as_model_list(text_encoders)
    te_prefixes = te_prefixes or text_encoder_prefixes(len(tes))
    for i, te in enumerate(tes):
        for t in find_targets(te, te_prefixes[i], te_containers, kinds_te):
            yield "text_encoder", i, t
    if unet is not None:
        for t in find_targets(unet, PREFIX_UNET, unet_containers, kinds_unet):
            yield "unet", None, t
