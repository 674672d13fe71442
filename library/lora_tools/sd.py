"""The model side of the LoRA tools for U-Net models: SD1.x/2.x and SDXL.

A loaded checkpoint (library.models.sd.loading.SDModels, library.models.sdxl.loading.SDXLModels)
exposes its adaptable layers under their kohya LoRA names through library.networks.discovery,
the same discovery the trainer uses, so names always agree with the files our trainer (and
sd-scripts) writes: `lora_unet_...`, `lora_te_...` (one text encoder) or `lora_te1_...` /
`lora_te2_...` (SDXL). Here:

* `model_layers`      -- {lora name: Target} of the U-Net and text encoder;
* `check_against`     -- every module of a LoRA must name a layer of the model and fit its
                         shape; otherwise a one-line error that says what the LoRA is for;
* `merge_into`        -- fold LoRAs into the model with networks.lora's own merge code;
* `weight_pairs`      -- (original, tuned) weights of two models, layer by layer, for
                         extraction.
"""

from __future__ import annotations

import logging
from typing import Sequence

import torch

from library.errors import UserInputError
from library.lora_tools.arch import family_label
from library.lora_tools.cli import progress as progress_bar
from library.lora_tools.lorafile import LoraFile, to_state_dict
from library.lora_tools.ops import WeightPair
from library.networks import discovery as disc

logger = logging.getLogger(__name__)


def text_encoders_of(models) -> list:
    """The text encoder(s) of an SDModels (one) or SDXLModels (two)."""
    if hasattr(models, "text_encoders"):
        return list(models.text_encoders)
    return [models.text_encoder]


def model_layers(models, conv: bool = True) -> dict[str, tuple[str, disc.Target]]:
    """{lora name: (part, target)} for the U-Net (attention blocks; with `conv` also the ResNet
    blocks and samplers, 3x3 convolutions included) and the text encoder(s)."""
    unet_containers = list(disc.UNET_ATTENTION_CONTAINERS) + (list(disc.UNET_CONV_CONTAINERS) if conv else [])
    kinds_unet = ("linear", "conv1x1", "conv") if conv else ("linear", "conv1x1")
    out = {}
    for part, _idx, target in disc.iter_model_targets(
        models.unet, text_encoders_of(models), unet_containers, disc.TEXT_ENCODER_CONTAINERS, kinds_unet,
        ("linear", "conv1x1"),
    ):
        out[target.name] = (part, target)
    return out


def _version(models) -> str:
    if hasattr(models, "text_encoders"):
        return "SDXL"
    return "SD2.x" if models.v2 else "SD1.x"


def check_against(lora: LoraFile, layers: dict[str, tuple[str, disc.Target]], models, what: str = "--models") -> None:
    """Every LoRA module must have a layer of the same shape; errors name file and cause."""
    missing, wrong = [], []
    for name, m in lora.modules.items():
        hit = layers.get(name)
        if hit is None:
            missing.append(name)
            continue
        w = hit[1].module.weight
        if tuple(w.shape) != m.layer_shape:
            wrong.append((name, m.layer_shape, tuple(w.shape)))
    if not missing and not wrong:
        return
    family = lora.family
    if family not in ("sdxl" if hasattr(models, "text_encoders") else "sd", "unknown"):
        raise UserInputError(f"{what} {lora.path}: a LoRA for {family_label(family)} (by its key names) cannot be "
                             f"merged into the {_version(models)} model")
    parts = []
    if wrong:
        name, have, want = wrong[0]
        parts.append(f"{len(wrong)} modules do not fit the layer shapes (e.g. {name}: LoRA for {have}, model has {want})")
    if missing:
        parts.append(f"{len(missing)} modules name no layer of the model (e.g. {missing[0]})")
    hint = ""
    if wrong and any(len(h) != len(w) or h[1] != w[1] or h[0] != w[0] for _, h, w in wrong):
        hint = f"; a LoRA for another SD version or model size than this {_version(models)} model?"
    raise UserInputError(f"{what} {lora.path}: " + "; ".join(parts) + hint)


def merge_into(models, loras: Sequence[tuple[LoraFile, float]], device=None, show_progress: bool = True) -> int:
    """Fold each (LoRA, ratio) into the model's layers in place, with networks.lora's merge
    (float32 arithmetic, result in each layer's dtype). Returns the number of modules merged.
    Call check_against first."""
    import networks.lora as lora_net
    from library.networks.network import split_by_module

    merged = 0
    for lf, ratio in loras:
        weights = to_state_dict(lf.modules)
        net, _ = lora_net.create_network_from_weights(ratio, None, None, models.text_encoder, models.unet,
                                                      weights_sd=weights, for_inference=True)
        per_module = split_by_module(weights)
        with torch.no_grad():
            for m in progress_bar(net.all_loras, desc=f"merging {lf.title}", enabled=show_progress):
                m.load_state_dict(per_module[m.lora_name], strict=False)
                m.merge_into_layer(ratio, None, device)
                merged += 1
        del net, weights
    return merged


def weight_pairs(org_models, tuned_models, conv: bool) -> list[WeightPair]:
    """The adaptable layers of two models of the same architecture, paired by LoRA name."""
    a = model_layers(org_models, conv)
    b = model_layers(tuned_models, conv)
    if set(a) != set(b):
        only = sorted(set(a) ^ set(b))
        raise UserInputError(f"--model_org and --model_tuned have different architectures ({len(only)} layers differ, "
                             f"e.g. {only[0]})")
    pairs = []
    for name, (part, ta) in a.items():
        tb = b[name][1]
        if ta.module.weight.shape != tb.module.weight.shape:
            raise UserInputError(f"--model_org and --model_tuned differ at {name}: {tuple(ta.module.weight.shape)} vs "
                                 f"{tuple(tb.module.weight.shape)}")
        pairs.append(WeightPair(
            name, ta.kind, tuple(ta.module.weight.shape),
            (lambda wa=ta.module.weight, wb=tb.module.weight: (wa.detach(), wb.detach())),
            part,
        ))
    return pairs
