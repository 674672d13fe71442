"""LoRA for SD 1.x / 2.x (and SDXL): `--network_module networks.lora`.

LoRA-LierLa adapts every Linear and 1x1 conv inside the U-Net's transformer blocks and the
text encoder's attention/MLP; LoRA-C3Lier (`conv_dim`) also adapts the ResNet blocks and
the down/up samplers, their 3x3 convs at `conv_dim`/`conv_alpha`. Per layer:

    y = W x + multiplier * (alpha / rank) * up(down(x))

with `down` Kaiming-uniform and `up` zero at start, so a new network changes nothing.
Files use the kohya key names (`lora_unet_...`, `lora_te_...`, `lora_te1_/lora_te2_` for
SDXL) with `.lora_down.weight`, `.lora_up.weight` and a 0-dim `.alpha`; ComfyUI, A1111 and
diffusers' `load_lora_weights` read them as they are. See docs/networks.md for every
`--network_args` key.
"""

from __future__ import annotations

import logging
import math

import torch
import torch.nn.functional as F

from library.errors import UserInputError
from library.networks import discovery as disc
from library.networks.args import FLOAT, FLOAT_LIST, INT, INT_LIST, STR, Converter, parse_network_kwargs
from library.networks.blocks import layout_for, parse_lr_weights, per_block
from library.networks.modules import AdapterModule, low_rank_product
from library.networks.network import AdapterNetwork, LowRankNetworkMixin
from library.networks.weights_io import load_weights_file

logger = logging.getLogger(__name__)

MODULE = "networks.lora"

_RAW = Converter(lambda v: v if isinstance(v, (list, tuple)) else str(v).strip(), "comma-separated numbers or a preset")

ACCEPTED_ARGS = {
    "conv_dim": INT,
    "conv_alpha": FLOAT,
    "block_dims": INT_LIST,
    "block_alphas": FLOAT_LIST,
    "conv_block_dims": INT_LIST,
    "conv_block_alphas": FLOAT_LIST,
    "down_lr_weight": _RAW,
    "mid_lr_weight": _RAW,
    "up_lr_weight": _RAW,
    "block_lr_zero_threshold": FLOAT,
    "rank_dropout": FLOAT,
    "module_dropout": FLOAT,
    "loraplus_lr_ratio": FLOAT,
    "loraplus_unet_lr_ratio": FLOAT,
    "loraplus_text_encoder_lr_ratio": FLOAT,
}


def _check_probability(name: str, p):
    if p is not None and not 0.0 <= p < 1.0:
        raise UserInputError(f"{MODULE}: {name} must be in [0, 1), got {p}")
    return p


def _alpha_value(alpha, rank: int):
    """alpha None or 0 -> rank. Python ints stay ints (saved as int64, as the reference does);
    tensors from files become float32."""
    if isinstance(alpha, torch.Tensor):
        alpha = float(alpha.detach().float())
        return float(rank) if alpha == 0 else alpha
    if alpha is None or alpha == 0:
        return rank
    return alpha


class LoRAModule(AdapterModule):
    """Low-rank delta for one Linear / Conv2d layer."""

    def __init__(self, lora_name, org_module, multiplier=1.0, lora_dim=4, alpha=1, dropout=None,
                 rank_dropout=None, module_dropout=None):
        super().__init__(lora_name, org_module, multiplier)
        if lora_dim <= 0:
            raise ValueError(f"{lora_name}: rank must be positive, got {lora_dim}")
        self.lora_dim = int(lora_dim)
        if self.is_conv:
            k, s, p, d = org_module.kernel_size, org_module.stride, org_module.padding, org_module.dilation
            self.lora_down = torch.nn.Conv2d(self.in_dim, self.lora_dim, k, s, p, d, bias=False)
            self.lora_up = torch.nn.Conv2d(self.lora_dim, self.out_dim, 1, 1, bias=False)
        else:
            self.lora_down = torch.nn.Linear(self.in_dim, self.lora_dim, bias=False)
            self.lora_up = torch.nn.Linear(self.lora_dim, self.out_dim, bias=False)
        torch.nn.init.kaiming_uniform_(self.lora_down.weight, a=math.sqrt(5))
        torch.nn.init.zeros_(self.lora_up.weight)
        alpha = _alpha_value(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = float(alpha) / self.lora_dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    # alpha read from a file replaces ours, and the scale follows it
    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "alpha"
        value = None
        if key in state_dict:
            value = float(state_dict[key].detach().float())
            if value == 0:  # alpha 0 means alpha = rank
                value = float(self.lora_dim)
            if not self.alpha.dtype.is_floating_point and not value.is_integer():
                self.alpha = torch.zeros((), dtype=torch.float32, device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if value is not None:
            with torch.no_grad():
                self.alpha.fill_(value)
            self.scale = value / self.lora_dim

    def adapt(self, x, org_out):
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return org_out
        w = self.lora_down.weight
        if x.dtype != w.dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(w.dtype)
        lx = self.lora_down(x)
        if self.training and self.dropout:
            lx = F.dropout(lx, p=self.dropout)
        scale = self.scale
        if self.training and self.rank_dropout:
            keep = torch.rand((lx.size(0), self.lora_dim), device=lx.device) > self.rank_dropout
            if self.is_conv:
                keep = keep.view(lx.size(0), self.lora_dim, *([1] * (lx.dim() - 2)))
            else:
                keep = keep.view(lx.size(0), *([1] * (lx.dim() - 2)), self.lora_dim)
            lx = lx * keep.to(lx.dtype)
            scale = scale / (1.0 - self.rank_dropout)
        delta = self.lora_up(lx)
        return org_out + (delta * (self.multiplier * scale)).to(org_out.dtype)

    # -- weights -------------------------------------------------------------------------
    def delta_weight(self, device=None) -> torch.Tensor:
        """scale * up @ down as a float32 tensor shaped like the layer's weight."""
        down = self.lora_down.weight.detach().to(device, torch.float32)
        up = self.lora_up.weight.detach().to(device, torch.float32)
        return low_rank_product(up, down) * self.scale

    def get_weight(self, multiplier=None) -> torch.Tensor:
        return self.delta_weight() * (self.multiplier if multiplier is None else multiplier)

    def merged_weight(self, weight, multiplier):
        return weight + multiplier * self.delta_weight(device=weight.device)

    @torch.no_grad()
    def scale_factors_(self, factor: float) -> None:
        self.lora_up.weight.mul_(factor)
        self.lora_down.weight.mul_(factor)


class LoRANetwork(LowRankNetworkMixin, AdapterNetwork):
    """LoRA adapters for a U-Net and its text encoder(s)."""

    module_label = MODULE
    LORA_PREFIX_UNET = disc.PREFIX_UNET
    LORA_PREFIX_TEXT_ENCODER = disc.PREFIX_TEXT_ENCODER
    UNET_TARGET_REPLACE_MODULE = list(disc.UNET_ATTENTION_CONTAINERS)
    UNET_TARGET_REPLACE_MODULE_CONV2D_3X3 = list(disc.UNET_CONV_CONTAINERS)
    TEXT_ENCODER_TARGET_REPLACE_MODULE = list(disc.TEXT_ENCODER_CONTAINERS)

    def __init__(self, text_encoder, unet, multiplier=1.0, lora_dim=4, alpha=1, dropout=None, rank_dropout=None,
                 module_dropout=None, conv_lora_dim=None, conv_alpha=None, block_dims=None, block_alphas=None,
                 conv_block_dims=None, conv_block_alphas=None, modules_dim=None, modules_alpha=None,
                 module_class=LoRAModule, is_sdxl=None, verbose=False):
        """Layers and ranks:
        * modules_dim given (built from a file): exactly the named layers, with those ranks
          and modules_alpha (missing alpha = rank); 3x3 convs are searched too.
        * else block_dims given (length N): U-Net Linear/1x1 rank per block; conv_block_dims
          likewise for 3x3 (None: no 3x3 layers).
        * else lora_dim/alpha everywhere, conv_lora_dim/conv_alpha for 3x3 when given.
        Text encoders always use lora_dim/alpha (or the file's values).
        """
        super().__init__(multiplier)
        self.lora_dim = lora_dim
        self.alpha = alpha
        self.conv_lora_dim = conv_lora_dim
        self.conv_alpha = conv_alpha
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout
        self.is_sdxl = disc.is_sdxl_unet(unet) if is_sdxl is None else is_sdxl
        layout = layout_for(self.is_sdxl)

        from_weights = modules_dim is not None
        conv_enabled = from_weights or conv_lora_dim is not None or conv_block_dims is not None
        unet_containers = list(disc.UNET_ATTENTION_CONTAINERS) + (list(disc.UNET_CONV_CONTAINERS) if conv_enabled else [])
        text_encoders = disc.as_model_list(text_encoder)

        def rank_for(part, target, block):
            if from_weights:
                if target.name not in modules_dim:
                    return 0, None
                return modules_dim[target.name], (modules_alpha or {}).get(target.name)
            if part == "text_encoder":
                return lora_dim, alpha
            if target.kind in ("linear", "conv1x1"):
                if block_dims is not None and block is not None:
                    return block_dims[block], block_alphas[block]
                return lora_dim, alpha
            if conv_block_dims is not None and block is not None:
                return conv_block_dims[block], conv_block_alphas[block]
            if conv_lora_dim is not None:
                return conv_lora_dim, conv_alpha
            return 0, None

        te_modules, unet_modules, skipped = [], [], []
        for part, te_index, target in disc.iter_model_targets(
            unet, text_encoders, unet_containers, disc.TEXT_ENCODER_CONTAINERS,
            ("linear", "conv1x1", "conv"), ("linear", "conv1x1"),
        ):
            block = layout.block_index(target.path) if part == "unet" else None
            rank, a = rank_for(part, target, block)
            if not rank:
                skipped.append(target.name)
                continue
            m = module_class(target.name, target.module, multiplier, rank, a, dropout=dropout,
                             rank_dropout=rank_dropout, module_dropout=module_dropout)
            m.block_index = block
            m.te_index = te_index
            (te_modules if part == "text_encoder" else unet_modules).append(m)
            if verbose:
                logger.info("%s: rank %d alpha %s", target.name, rank, a)
        if from_weights:
            found = {m.lora_name for m in te_modules + unet_modules}
            unknown = [n for n in modules_dim if n not in found]
            if unknown:
                logger.warning("%s: %d modules in the weights match no layer of this model and are ignored, e.g. %s",
                               MODULE, len(unknown), unknown[:3])
        self._register(te_modules, unet_modules)
        logger.info("%s: %d text-encoder modules, %d U-Net modules%s", MODULE, len(te_modules), len(unet_modules),
                    f" ({len(skipped)} layers left out by rank 0)" if skipped and not from_weights and block_dims is not None else "")

    def set_block_lr_weight(self, lr_weights):
        """Per-block lr multipliers (length N) or None."""
        self.block_lr_weight = None if lr_weights is None else list(lr_weights)


def _network_kwargs(kwargs, neuron_dropout):
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    for name in ("rank_dropout", "module_dropout"):
        _check_probability(name, args.get(name))
    _check_probability("network_dropout", neuron_dropout)
    for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if name in args and args[name] <= 0:
            raise UserInputError(f"{MODULE}: {name} must be positive, got {args[name]}")
    return args


def _lr_weights(args, sdxl):
    return parse_lr_weights(
        layout_for(sdxl), args.get("down_lr_weight"), args.get("mid_lr_weight"), args.get("up_lr_weight"),
        args.get("block_lr_zero_threshold", 0.0),
    )


def _finish(network, args, lr_weights):
    if lr_weights is not None:
        network.set_block_lr_weight(lr_weights)
    ratios = [args.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """The trainer's entry point (`--network_module networks.lora`)."""
    args = _network_kwargs(kwargs, neuron_dropout)
    network_dim = 4 if network_dim is None else int(network_dim)
    if network_alpha is None:
        network_alpha = 1.0
    if network_dim <= 0:
        raise UserInputError(f"{MODULE}: --network_dim must be positive, got {network_dim}")
    conv_dim = args.get("conv_dim")
    conv_alpha = args.get("conv_alpha")
    if conv_dim is not None and conv_dim <= 0:
        conv_dim = None  # conv_dim=0 means no 3x3 layers
    if conv_dim is not None and conv_alpha is None:
        conv_alpha = 1.0

    sdxl = disc.is_sdxl_unet(unet)
    layout = layout_for(sdxl)
    lr_weights = _lr_weights(args, sdxl)
    block_keys = ("block_dims", "block_alphas", "conv_block_dims", "conv_block_alphas")
    block_dims = block_alphas = conv_block_dims = conv_block_alphas = None
    if lr_weights is not None or any(k in args for k in block_keys):
        n = layout.num_blocks
        block_dims = per_block(args.get("block_dims"), n, "block_dims", network_dim)
        block_alphas = per_block(args.get("block_alphas"), n, "block_alphas", network_alpha)
        if "conv_block_dims" in args:
            conv_block_dims = per_block(args["conv_block_dims"], n, "conv_block_dims", None)
            conv_block_alphas = per_block(args.get("conv_block_alphas"), n, "conv_block_alphas",
                                          conv_alpha if conv_alpha is not None else 1.0)
        elif conv_dim is not None:
            conv_block_dims = [conv_dim] * n
            conv_block_alphas = per_block(args.get("conv_block_alphas"), n, "conv_block_alphas", conv_alpha)
        if lr_weights is not None:
            for i, w in enumerate(lr_weights):
                if w == 0:
                    block_dims[i] = 0
                    if conv_block_dims is not None:
                        conv_block_dims[i] = 0

    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout, rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        conv_lora_dim=conv_dim, conv_alpha=conv_alpha, block_dims=block_dims, block_alphas=block_alphas,
        conv_block_dims=conv_block_dims, conv_block_alphas=conv_block_alphas, is_sdxl=sdxl,
    )
    return _finish(network, args, lr_weights)


def dims_from_weights(weights_sd):
    """({module: rank}, {module: alpha}) read from a LoRA state dict (rank = lora_down dim 0)."""
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
        elif suffix == "alpha":
            modules_alpha[name] = value
    return modules_dim, modules_alpha


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """A network shaped like a weights file (ranks and alphas from the file). Returns
    (network, weights_sd); the caller loads the weights (load_weights / load_state_dict /
    merge_to)."""
    if weights_sd is None:
        weights_sd = load_weights_file(file)
    args = _network_kwargs(kwargs, None)
    modules_dim, modules_alpha = dims_from_weights(weights_sd)
    if not modules_dim:
        raise UserInputError(f"{file or 'weights'}: no '*.lora_down.weight' tensors: not a LoRA file for {MODULE}")
    sdxl = disc.is_sdxl_unet(unet)
    network = LoRANetwork(
        text_encoder, unet, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"), is_sdxl=sdxl,
    )
    network.for_inference = bool(for_inference)
    return _finish(network, args, _lr_weights(args, sdxl)), weights_sd
