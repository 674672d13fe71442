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


def all_layers(models) -> dict[str, tuple[str, disc.Target]]:
    """Every Linear / Conv2d of the U-Net and text encoder(s) under its LoRA name, the layers
    networks.lora trains and the others (conv_in, time embedding, ...), which LoRAs in kohya
    format from other trainers (e.g. LyCORIS LoCon) also adapt."""
    out = {}
    tes = text_encoders_of(models)
    parts = [(p, te, "text_encoder") for p, te in zip(disc.text_encoder_prefixes(len(tes)), tes)]
    for prefix, model, part in parts + [(disc.PREFIX_UNET, models.unet, "unet")]:
        root = disc.canonical_root(model)
        for path, module in model.named_modules():
            kind = disc.layer_kind(module)
            if kind is None or not path:
                continue
            name = disc.key_name(prefix, root + path)
            out[name] = (part, disc.Target(name, root + path, module, kind, type(module).__name__))
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


def merge_into(models, loras: Sequence[tuple[LoraFile, float]], device=None, show_progress: bool = True,
               weights_for=None) -> tuple[int, int]:
    """Fold each (LoRA, ratio) into the model's layers in place; call check_against (with
    all_layers) first. Modules on layers networks.lora trains are merged by networks.lora's own
    merge; modules on other layers (conv_in, ...) get W += ratio * delta directly. Both compute
    in float32 and store in the layer's dtype. `weights_for(lora index, module name)`, when
    given, replaces the ratio per module (LoRA block weights: ratio x block weight).
    Returns (modules merged, of which direct)."""
    import networks.lora as lora_net
    from library.networks.network import split_by_module

    trained = model_layers(models, conv=True)
    everything = None
    merged = direct = 0
    tes = text_encoders_of(models)
    for index, (lf, ratio) in enumerate(loras):
        weight = (lambda name, r=ratio: r) if weights_for is None else (lambda name, i=index: weights_for(i, name))
        own = [m for name, m in lf.modules.items() if name in trained]
        other = [m for name, m in lf.modules.items() if name not in trained]
        with torch.no_grad():
            if own:
                weights = to_state_dict(own)
                net, _ = lora_net.create_network_from_weights(ratio, None, None, tes if len(tes) > 1 else tes[0],
                                                              models.unet, weights_sd=weights, for_inference=True)
                per_module = split_by_module(weights)
                for m in progress_bar(net.all_loras, desc=f"merging {lf.title}", enabled=show_progress):
                    m.load_state_dict(per_module[m.lora_name], strict=False)
                    m.merge_into_layer(weight(m.lora_name), None, device)
                    merged += 1
                del net, weights
            if other:
                everything = everything or all_layers(models)
                for m in other:
                    w = everything[m.name][1].module.weight
                    dev = device or w.device
                    w.copy_((w.detach().to(dev, torch.float32) + m.delta(weight(m.name), dev)).to(w.device, w.dtype))
                    merged += 1
                    direct += 1
                logger.info("%s: %d modules on layers outside networks.lora's (e.g. %s) merged directly", lf.path,
                            len(other), other[0].name)
    return merged, direct


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
