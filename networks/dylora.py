"""DyLoRA for SD 1.x / 2.x (and SDXL): `--network_module networks.dylora`.

A LoRA trained so that its first k*unit rank components work on their own, for every k.
Each training forward of a layer draws b uniformly from 0..rank-1, rounds it down to a
multiple of `unit`, lets only the components [b, b+unit) receive gradients (the others
enter the product detached) and scales the delta by sqrt(rank / (b + unit)):

    y = W x + multiplier * (alpha / rank) * sqrt(rank / (b + unit)) * up(down(x))

In eval mode all components are used with factor 1, which is exactly what the saved file
means to any LoRA loader. Files are plain LoRA files (`lora_down.weight`, `lora_up.weight`,
`alpha`); `networks.lora` and other tools load them, and slicing the first k*unit rows of
down / columns of up gives a rank-k*unit LoRA (alpha unchanged).

Differences from the reference: with several text encoders (SDXL) the prefixes are
`lora_te1`/`lora_te2` like networks.lora (the reference names both `lora_te`, so their
keys collide); the drawn rank uses torch's RNG so gradient checkpointing recomputes the
same draw.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from library.errors import UserInputError
from library.networks import discovery as disc
from library.networks.args import FLOAT, INT, parse_network_kwargs
from library.networks.modules import AdapterModule, low_rank_product
from library.networks.network import AdapterNetwork, LowRankNetworkMixin
from library.networks.weights_io import load_weights_file
from networks.lora import _alpha_value, dims_from_weights

logger = logging.getLogger(__name__)

MODULE = "networks.dylora"

ACCEPTED_ARGS = {
    "unit": INT,
    "conv_dim": INT,
    "conv_alpha": FLOAT,
    "loraplus_lr_ratio": FLOAT,
    "loraplus_unet_lr_ratio": FLOAT,
    "loraplus_text_encoder_lr_ratio": FLOAT,
}

_FILE_KEYS = ("lora_down.weight", "lora_up.weight")


class DyLoRAModule(AdapterModule):
    """Rank components stored in chunks of `unit` (parameters lora_down_<i>, lora_up_<i>)."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, unit=1):
        super().__init__(lora_name, org_module, multiplier)
        if lora_dim <= 0 or unit <= 0 or lora_dim % unit:
            raise UserInputError(f"{MODULE}: rank {lora_dim} must be a positive multiple of unit {unit}")
        self.lora_dim = int(lora_dim)
        self.unit = int(unit)
        self.num_chunks = self.lora_dim // self.unit
        if self.is_conv:
            m = org_module
            down_shape = (self.lora_dim, self.in_dim, *m.kernel_size)
            up_shape = (self.out_dim, self.lora_dim, 1, 1)
        else:
            down_shape = (self.lora_dim, self.in_dim)
            up_shape = (self.out_dim, self.lora_dim)
        down = torch.empty(down_shape)
        torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
        up = torch.zeros(up_shape)
        for i, (d, u) in enumerate(zip(down.split(self.unit, 0), up.split(self.unit, 1))):
            self.register_parameter(f"lora_down_{i}", torch.nn.Parameter(d.clone()))
            self.register_parameter(f"lora_up_{i}", torch.nn.Parameter(u.clone()))
        alpha = _alpha_value(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = float(alpha) / self.lora_dim

    def downs(self):
        return [getattr(self, f"lora_down_{i}") for i in range(self.num_chunks)]

    def ups(self):
        return [getattr(self, f"lora_up_{i}") for i in range(self.num_chunks)]

    # -- file layout: one lora_down / lora_up pair, like LoRA ------------------------------
    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down = torch.cat(self.downs(), 0)
        up = torch.cat(self.ups(), 1)
        destination[prefix + "alpha"] = self.alpha if keep_vars else self.alpha.detach()
        destination[prefix + "lora_down.weight"] = down if keep_vars else down.detach()
        destination[prefix + "lora_up.weight"] = up if keep_vars else up.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        with torch.no_grad():
            for suffix, chunks, dim in (("lora_down.weight", self.downs(), 0), ("lora_up.weight", self.ups(), 1)):
                key = prefix + suffix
                if key not in state_dict:
                    missing_keys.append(key)
                    continue
                value = state_dict[key]
                expected = torch.Size(torch.cat([c.detach() for c in chunks], dim).shape)
                if value.shape != expected:
                    error_msgs.append(f"size mismatch for {key}: copying a param with shape {tuple(value.shape)}, "
                                      f"the shape in current model is {tuple(expected)}.")
                    continue
                for c, part in zip(chunks, value.split(self.unit, dim)):
                    c.copy_(part)
            key = prefix + "alpha"
            if key in state_dict:
                v = float(state_dict[key].detach().float()) or float(self.lora_dim)
                if not self.alpha.dtype.is_floating_point and not v.is_integer():
                    self.alpha = torch.zeros((), dtype=torch.float32, device=self.alpha.device)
                self.alpha.fill_(v)
                self.scale = v / self.lora_dim
            elif strict:
                missing_keys.append(key)
        if strict:
            known = {prefix + k for k in ("alpha",) + _FILE_KEYS}
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in known)

    # -- forward -----------------------------------------------------------------------------
    def adapt(self, x, org_out):
        downs, ups = self.downs(), self.ups()
        factor = 1.0
        if self.training:
            b = int(torch.randint(0, self.lora_dim, (1,)).item())
            b -= b % self.unit
            c = b // self.unit
            downs = [p if i == c else p.detach() for i, p in enumerate(downs)]
            ups = [p if i == c else p.detach() for i, p in enumerate(ups)]
            factor = math.sqrt(self.lora_dim / (b + self.unit))
        down = torch.cat(downs, 0)
        up = torch.cat(ups, 1)
        if x.dtype != down.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(down.dtype)
        if self.is_conv:
            m = self.org_module
            h = F.conv2d(F.conv2d(x, down, None, m.stride, m.padding, m.dilation), up)
        else:
            h = F.linear(F.linear(x, down), up)
        return org_out + (h * (self.multiplier * self.scale * factor)).to(org_out.dtype)

    # -- weights -----------------------------------------------------------------------------
    def delta_weight(self, device=None) -> torch.Tensor:
        down = torch.cat([p.detach() for p in self.downs()], 0).to(device, torch.float32)
        up = torch.cat([p.detach() for p in self.ups()], 1).to(device, torch.float32)
        return low_rank_product(up, down) * self.scale

    def merged_weight(self, weight, multiplier):
        return weight + multiplier * self.delta_weight(device=weight.device)

    @torch.no_grad()
    def scale_factors_(self, factor: float) -> None:
        for p in self.downs() + self.ups():
            p.mul_(factor)


class DyLoRANetwork(LowRankNetworkMixin, AdapterNetwork):
    module_label = MODULE
    LORA_PREFIX_UNET = disc.PREFIX_UNET
    LORA_PREFIX_TEXT_ENCODER = disc.PREFIX_TEXT_ENCODER

    def __init__(self, text_encoder, unet, multiplier=1.0, lora_dim=4, alpha=1, unit=1, apply_to_conv=False,
                 modules_dim=None, modules_alpha=None):
        super().__init__(multiplier)
        self.lora_dim, self.alpha, self.unit = lora_dim, alpha, unit
        from_weights = modules_dim is not None
        conv = from_weights or apply_to_conv
        unet_containers = list(disc.UNET_ATTENTION_CONTAINERS) + (list(disc.UNET_CONV_CONTAINERS) if conv else [])
        unet_kinds = ("linear", "conv1x1", "conv") if conv else ("linear", "conv1x1")
        te_modules, unet_modules = [], []
        for part, te_index, target in disc.iter_model_targets(
            unet, text_encoder, unet_containers, disc.TEXT_ENCODER_CONTAINERS, unet_kinds, ("linear", "conv1x1")
        ):
            if from_weights:
                if target.name not in modules_dim:
                    continue
                rank, a = modules_dim[target.name], (modules_alpha or {}).get(target.name)
                if rank % unit:
                    raise UserInputError(f"{MODULE}: {target.name} has rank {rank}, not a multiple of unit {unit}")
            else:
                rank, a = lora_dim, alpha
            m = DyLoRAModule(target.name, target.module, multiplier, rank, a, unit)
            m.te_index = te_index
            (te_modules if part == "text_encoder" else unet_modules).append(m)
        self._register(te_modules, unet_modules)
        logger.info("%s: %d text-encoder modules, %d U-Net modules, unit %d", MODULE, len(te_modules),
                    len(unet_modules), unit)


def _parse(kwargs):
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    unit = args.get("unit", 1)
    if unit <= 0:
        raise UserInputError(f"{MODULE}: unit must be positive, got {unit}")
    return args, unit


def _set_loraplus(network, args):
    ratios = [args.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """The trainer's entry point (`--network_module networks.dylora`)."""
    args, unit = _parse(kwargs)
    network_dim = 4 if network_dim is None else int(network_dim)
    if network_alpha is None:
        network_alpha = 1.0
    if network_dim <= 0 or network_dim % unit:
        raise UserInputError(f"{MODULE}: --network_dim {network_dim} must be a positive multiple of unit {unit}")
    conv_dim = args.get("conv_dim")
    if conv_dim is not None and conv_dim != network_dim:
        raise UserInputError(f"{MODULE}: conv_dim ({conv_dim}) must equal --network_dim ({network_dim}); "
                             f"DyLoRA uses one rank for every layer")
    if "conv_alpha" in args and args["conv_alpha"] != float(network_alpha):
        logger.warning("%s: conv_alpha is not used; every layer takes --network_alpha (%s)", MODULE, network_alpha)
    if neuron_dropout:
        logger.warning("%s: --network_dropout is not supported by DyLoRA and is ignored", MODULE)
    network = DyLoRANetwork(text_encoder, unet, multiplier, network_dim, network_alpha, unit,
                            apply_to_conv=conv_dim is not None)
    return _set_loraplus(network, args)


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A DyLoRA network shaped like a LoRA/DyLoRA file; returns (network, weights_sd)."""
    if weights_sd is None:
        weights_sd = load_weights_file(file)
    args, unit = _parse(kwargs)
    modules_dim, modules_alpha = dims_from_weights(weights_sd)
    if not modules_dim:
        raise UserInputError(f"{file or 'weights'}: no '*.lora_down.weight' tensors: not a (Dy)LoRA file")
    network = DyLoRANetwork(text_encoder, unet, multiplier, unit=unit, modules_dim=modules_dim,
                            modules_alpha=modules_alpha)
    return _set_loraplus(network, args), weights_sd
