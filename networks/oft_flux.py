"""OFT (orthogonal fine-tuning) for the FLUX.1 transformer: `--network_module networks.oft_flux`.

The rotation is that of networks/oft.py (Cayley transform of a skew-symmetric block stack,
norm-limited, multiplier interpolating towards the identity; `W'_i = R_i^T W_i`, bias
unchanged), applied per output *part* of a layer: the fused projections are split first,
a double block's `qkv` into q, k, v (3 x hidden) and a single block's `linear1` into q, k,
v and the MLP input (hidden, hidden, hidden, 4 x hidden). Each part has its own k blocks of
size part/k and its own constraint `alpha * part_size`.

Targets: by default the attention modules of the double blocks (`img_attn` / `txt_attn`:
`qkv`, `proj`); `enable_all_linear` (any non-empty text, as in sd-scripts; words meaning
false are read as false here, with a warning) takes every Linear of every
`DoubleStreamBlock` and `SingleStreamBlock`. No text-encoder modules.

Files: `oft_unet_<module path>.oft_blocks.<part>` (k, part/k, part/k) and `.alpha`.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F

from library.errors import UserInputError
from library.networks import discovery as disc
from library.networks.args import Converter, parse_network_kwargs
from library.networks.modules import AdapterModule
from library.networks.network import AdapterNetwork
from library.networks.weights_io import load_weights_file
from networks.oft import DEFAULT_ALPHA, _flag, cayley_rotation

logger = logging.getLogger(__name__)

MODULE = "networks.oft_flux"
PREFIX = "oft_unet"
ATTENTION_CLASSES = ("SelfAttention",)
BLOCK_CLASSES = ("DoubleStreamBlock", "SingleStreamBlock")

ACCEPTED_ARGS = {"enable_all_linear": Converter(_flag, "true/false")}


def part_sizes(path: str, layer: torch.nn.Linear, hidden: int) -> list[int]:
    """Output parts of a layer: q/k/v of `qkv`, q/k/v/MLP of `linear1`, else the whole output."""
    if path.endswith(".qkv"):
        return [layer.out_features // 3] * 3
    if path.startswith("single_blocks.") and path.endswith(".linear1"):
        return [hidden] * 3 + [layer.out_features - 3 * hidden]
    return [layer.out_features]


class FluxOFTModule(AdapterModule):
    """OFT on one Linear whose output is split into parts, each rotated by its own blocks."""

    def __init__(self, oft_name, org_module, parts, multiplier=1.0, dim=4, alpha=DEFAULT_ALPHA):
        super().__init__(oft_name, org_module, multiplier)
        k = int(dim)
        bad = [p for p in parts if k <= 0 or p % k]
        if bad:
            raise UserInputError(
                f"{MODULE}: {oft_name}: output part(s) of size {', '.join(map(str, sorted(set(bad))))} cannot be split "
                f"into {k} blocks (--network_dim must divide every part: {list(parts)})")
        self.num_blocks = k
        self.parts = [int(p) for p in parts]
        self.oft_blocks = torch.nn.ParameterList(
            [torch.nn.Parameter(torch.zeros(k, p // k, p // k)) for p in self.parts])
        if alpha is None:
            alpha = DEFAULT_ALPHA
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        self.register_buffer("alpha", torch.tensor(alpha))

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "alpha"
        if key in state_dict and not self.alpha.dtype.is_floating_point:
            value = float(state_dict[key].detach().float())
            if not value.is_integer():
                self.alpha = torch.zeros((), dtype=torch.float32, device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)

    def rotated_weight(self, weight: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """The weight with each part's row blocks rotated, float32."""
        m = self.multiplier if multiplier is None else multiplier
        alpha = float(self.alpha.float())
        out, row = [], 0
        w = weight.float()
        for blocks, size in zip(self.oft_blocks, self.parts):
            r = cayley_rotation(blocks, alpha * size, m).to(w.device)
            part = w[row: row + size].reshape(self.num_blocks, size // self.num_blocks, -1)
            out.append(torch.einsum("knm,kni->kmi", r, part).reshape(size, -1))
            row += size
        return torch.cat(out, dim=0)

    def forward(self, x, *args, **kwargs):
        if not self.active():
            return self.org_forward(x, *args, **kwargs)
        org = self.org_module
        w = self.rotated_weight(org.weight)
        bias = org.bias
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        return F.linear(x, w, bias)

    def merged_weight(self, weight, multiplier):
        return self.rotated_weight(weight, multiplier)


class OFTNetwork(AdapterNetwork):
    module_label = MODULE
    OFT_PREFIX_UNET = PREFIX

    def __init__(self, flux, multiplier=1.0, dim=4, alpha=DEFAULT_ALPHA, enable_all_linear=False,
                 modules_dim=None, modules_alpha=None):
        super().__init__(multiplier)
        self.dim, self.alpha, self.enable_all_linear = dim, alpha, enable_all_linear
        from_weights = modules_dim is not None
        containers = BLOCK_CLASSES if (enable_all_linear or from_weights) else ATTENTION_CLASSES
        hidden = getattr(flux, "hidden_size", None)
        modules = []
        for target in disc.find_targets(flux, PREFIX, containers, ("linear",)):
            if from_weights:
                if target.name not in modules_dim:
                    continue
                k, a = modules_dim[target.name], (modules_alpha or {}).get(target.name, alpha)
            else:
                k, a = dim, alpha
            parts = part_sizes(target.path, target.module, hidden or target.module.in_features)
            modules.append(FluxOFTModule(target.name, target.module, parts, multiplier, k, a))
        if from_weights:
            found = {m.lora_name for m in modules}
            unknown = [n for n in modules_dim if n not in found]
            if unknown:
                logger.warning("%s: %d modules in the weights match no layer and are ignored, e.g. %s",
                               MODULE, len(unknown), unknown[:3])
        self._register([], modules)
        logger.info("%s: %d transformer modules", MODULE, len(modules))

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True):
        # OFT has no text-encoder modules
        super().apply_to(text_encoder, unet, False, apply_unet)


def create_network(multiplier, network_dim, network_alpha, ae, text_encoders, flux, neuron_dropout=None, **kwargs):
    """The trainer's entry point (`--network_module networks.oft_flux`)."""
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    raw = kwargs.get("enable_all_linear")
    if isinstance(raw, str) and raw.strip() and not args["enable_all_linear"]:
        logger.warning("%s: enable_all_linear=%s is taken as false (sd-scripts would switch it on for any non-empty "
                       "text)", MODULE, raw)
    dim = 4 if network_dim is None else int(network_dim)
    if dim <= 0:
        raise UserInputError(f"{MODULE}: --network_dim (the number of OFT blocks) must be positive, got {dim}")
    alpha = DEFAULT_ALPHA if network_alpha is None else network_alpha
    if float(alpha) >= 1:
        logger.warning("%s: network_alpha %s is the constraint factor; OFT works best with small values such as 1e-3",
                       MODULE, alpha)
    if neuron_dropout:
        logger.warning("%s: --network_dropout is not supported by OFT and is ignored", MODULE)
    return OFTNetwork(flux, multiplier, dim, alpha, args.get("enable_all_linear", False))


def create_network_from_weights(multiplier, file, ae, text_encoders, flux, weights_sd=None, for_inference=False,
                                **kwargs):
    """An OFT network shaped like a weights file (blocks per module from `oft_blocks.0`, alpha per
    module); returns (network, weights_sd)."""
    if weights_sd is None:
        weights_sd = load_weights_file(file)
    parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix.startswith("oft_blocks.") and name not in modules_dim:
            modules_dim[name] = int(value.shape[0])
        elif suffix == "alpha":
            modules_alpha[name] = value
    if not modules_dim:
        raise UserInputError(f"{file or 'weights'}: no '*.oft_blocks.<part>' tensors: not an OFT file for FLUX")
    return OFTNetwork(flux, multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha), weights_sd


def check_before_loading(flux_config, network_dim, network_alpha=None, **kwargs) -> None:
    """The divisibility rule checked from the checkpoint's config (header only), before any
    model loads: every part size of every targeted layer must be a multiple of network_dim."""
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    k = 4 if network_dim is None else int(network_dim)
    if k <= 0:
        raise UserInputError(f"{MODULE}: --network_dim (the number of OFT blocks) must be positive, got {k}")
    h = flux_config.hidden_size
    mlp = int(h * flux_config.mlp_ratio)
    sizes = {"attention q/k/v and proj": h}
    if args.get("enable_all_linear"):
        sizes.update({"MLP input": mlp, "modulation (6 x hidden)": 6 * h})
    bad = {what: n for what, n in sizes.items() if n % k}
    if bad:
        what, n = next(iter(bad.items()))
        raise UserInputError(
            f"{MODULE}: --network_dim {k} does not divide the {what} output size {n} of this model; every part of "
            f"an adapted layer is cut into network_dim blocks (choose a divisor of {h}"
            f"{f' and {mlp}' if args.get('enable_all_linear') else ''})")
