"""OFT (orthogonal fine-tuning) for the SD 1.x / 2.x / SDXL U-Net: `--network_module networks.oft`.

Each adapted layer's output channels are split into k = network_dim blocks of b = out/k
channels. A block-diagonal rotation R (one b x b block per group) turns the weight:

    W'_i = R_i^T W_i            (rows of block i; conv kernels flattened per output channel)
    y    = W' x + bias          (the bias is not rotated)

which is the layer's output with each block of b channels multiplied from the right by R_i
before the bias is added: y_i = (W_i x)^T R_i + b_i. R comes from the trainable parameter
`oft_blocks` B (k, b, b) by the Cayley transform of its skew-symmetric part:

    Q = B - B^T;  if |Q|_F > c:  Q <- Q (c + 1e-8) / (|Q|_F + 1e-8),  c = alpha * out_dim
    R = (I + Q)(I - Q)^-1;       with multiplier m:  R_m = m (R - I) + I

B starts at zero, so R = I and a new network changes nothing. R and W' are computed in
float32 whatever the model's dtype (the inverse is not available, or not accurate, in half
precision). Because forward and merge use the same W' and leave the bias alone, a merged
model gives the same outputs as the live network.

Files: `oft_unet_<module path>.oft_blocks` (k, b, b) and `.alpha` (0-dim).
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

logger = logging.getLogger(__name__)

MODULE = "networks.oft"
PREFIX = "oft_unet"
DEFAULT_ALPHA = 1e-3

_FALSE_WORDS = {"", "false", "0", "no", "off", "none"}


def _flag(value) -> bool:
    # The reference converts with bool(str), so 'False' would switch the option on. Words
    # that say false are taken as false here (with a warning in create_network).
    if isinstance(value, str):
        return value.strip().lower() not in _FALSE_WORDS
    return bool(value)


ACCEPTED_ARGS = {
    "enable_all_linear": Converter(_flag, "true/false"),
    "enable_conv": Converter(_flag, "true/false"),
}


def cayley_rotation(oft_blocks: torch.Tensor, constraint: float, multiplier: float = 1.0) -> torch.Tensor:
    """R_m (k, b, b) in float32 from the parameter B (k, b, b): Q = B - B^T norm-limited to
    `constraint`, R = (I + Q)(I - Q)^-1, R_m = m (R - I) + I (differentiable in B)."""
    blocks = oft_blocks.float()
    q = blocks - blocks.transpose(1, 2)
    norm = torch.linalg.vector_norm(q)
    c = constraint
    q = torch.where(norm > c, q * ((c + 1e-8) / (norm + 1e-8)), q)
    eye = torch.eye(blocks.shape[-1], device=q.device, dtype=torch.float32)
    # (I + Q)(I - Q)^-1 == (I - Q)^-1 (I + Q): both are functions of Q and commute
    r = torch.linalg.solve(eye - q, eye + q)
    if multiplier == 1.0:
        return r
    return multiplier * (r - eye) + eye


class OFTModule(AdapterModule):
    def __init__(self, oft_name, org_module, multiplier=1.0, dim=4, alpha=DEFAULT_ALPHA):
        super().__init__(oft_name, org_module, multiplier)
        k = int(dim)
        if k <= 0 or self.out_dim % k:
            raise UserInputError(f"{MODULE}: {oft_name}: {self.out_dim} output channels cannot be split into "
                                 f"{k} blocks (--network_dim must divide every adapted layer's width)")
        self.num_blocks = k
        self.block_size = self.out_dim // k
        self.oft_blocks = torch.nn.Parameter(torch.zeros(k, self.block_size, self.block_size))
        if alpha is None:
            alpha = DEFAULT_ALPHA
        if isinstance(alpha, torch.Tensor):
            alpha = float(alpha.detach().float())
        self.register_buffer("alpha", torch.tensor(alpha))
        # from the stored value, so a reloaded file gives exactly the same constraint
        self.constraint = float(self.alpha.float()) * self.out_dim

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs):
        key = prefix + "alpha"
        value = None
        if key in state_dict:
            value = float(state_dict[key].detach().float())
            if not self.alpha.dtype.is_floating_point and not value.is_integer():
                self.alpha = torch.zeros((), dtype=torch.float32, device=self.alpha.device)
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        if value is not None:
            self.constraint = float(self.alpha.float()) * self.out_dim

    # -- the rotation --------------------------------------------------------------------------
    def rotation(self, multiplier: float | None = None) -> torch.Tensor:
        """R_m as a float32 (k, b, b) tensor (differentiable in oft_blocks)."""
        m = self.multiplier if multiplier is None else multiplier
        return cayley_rotation(self.oft_blocks, self.constraint, m)

    def rotated_weight(self, weight: torch.Tensor, multiplier: float | None = None) -> torch.Tensor:
        """W' = blockdiag(R_m)^T W in float32."""
        r = self.rotation(multiplier).to(weight.device)
        w = weight.float().reshape(self.num_blocks, self.block_size, -1)
        return torch.einsum("knm,kni->kmi", r, w).reshape(weight.shape)

    def forward(self, x, *args, **kwargs):
        if not self.active():
            return self.org_forward(x, *args, **kwargs)
        org = self.org_module
        w = self.rotated_weight(org.weight)
        bias = org.bias
        if not torch.is_autocast_enabled(x.device.type):
            w = w.to(x.dtype)
            bias = None if bias is None else bias.to(x.dtype)
        if self.is_conv:
            return org._conv_forward(x, w, bias)
        return F.linear(x, w, bias)

    def merged_weight(self, weight, multiplier):
        return self.rotated_weight(weight, multiplier)


class OFTNetwork(AdapterNetwork):
    module_label = MODULE
    OFT_PREFIX_UNET = PREFIX

    def __init__(self, unet, multiplier=1.0, dim=4, alpha=DEFAULT_ALPHA, enable_all_linear=False, enable_conv=False,
                 modules_dim=None, modules_alpha=None):
        super().__init__(multiplier)
        self.dim, self.alpha = dim, alpha
        self.enable_all_linear, self.enable_conv = enable_all_linear, enable_conv
        from_weights = modules_dim is not None
        if from_weights:
            containers = list(disc.UNET_ATTENTION_CONTAINERS) + list(disc.UNET_CONV_CONTAINERS)
            kinds = ("linear", "conv1x1", "conv")
        else:
            if enable_all_linear:
                containers, kinds = list(disc.UNET_ATTENTION_CONTAINERS), ["linear", "conv1x1"]
            else:
                containers, kinds = list(disc.ATTENTION_CLASSES), ["linear"]
            if enable_conv:
                containers += list(disc.UNET_CONV_CONTAINERS)
                kinds = ["linear", "conv1x1", "conv"]
        modules = []
        for target in disc.find_targets(unet, PREFIX, containers, kinds):
            if from_weights:
                if target.name not in modules_dim:
                    continue
                k, a = modules_dim[target.name], (modules_alpha or {}).get(target.name, alpha)
            else:
                # inside the default attention containers only the projections are adapted
                k, a = dim, alpha
            m = OFTModule(target.name, target.module, multiplier, k, a)
            modules.append(m)
        if from_weights:
            found = {m.lora_name for m in modules}
            unknown = [n for n in modules_dim if n not in found]
            if unknown:
                logger.warning("%s: %d modules in the weights match no layer and are ignored, e.g. %s",
                               MODULE, len(unknown), unknown[:3])
        self._register([], modules)
        logger.info("%s: %d U-Net modules", MODULE, len(modules))

    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder=True, apply_unet=True):
        # OFT has no text-encoder modules; apply_text_encoder is accepted and has no effect
        super().apply_to(text_encoder, unet, False, apply_unet)


def create_network(multiplier, network_dim, network_alpha, vae, text_encoder, unet, neuron_dropout=None, **kwargs):
    """The trainer's entry point (`--network_module networks.oft`)."""
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    for key in ACCEPTED_ARGS:
        raw = kwargs.get(key)
        if isinstance(raw, str) and raw.strip() and not args[key]:
            logger.warning("%s: %s=%s is taken as false (sd-scripts would switch it on for any non-empty text)",
                           MODULE, key, raw)
    dim = 4 if network_dim is None else int(network_dim)
    alpha = DEFAULT_ALPHA if network_alpha is None else network_alpha
    if float(alpha) >= 1:
        logger.warning("%s: network_alpha %s is the constraint factor; OFT works best with small values such as 1e-3",
                       MODULE, alpha)
    if neuron_dropout:
        logger.warning("%s: --network_dropout is not supported by OFT and is ignored", MODULE)
    return OFTNetwork(unet, multiplier, dim, alpha, args.get("enable_all_linear", False), args.get("enable_conv", False))


def create_network_from_weights(multiplier, file, vae, text_encoder, unet, weights_sd=None, for_inference=False,
                                **kwargs):
    """An OFT network shaped like a weights file (blocks and alpha per module); returns
    (network, weights_sd)."""
    if weights_sd is None:
        weights_sd = load_weights_file(file)
    parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "oft_blocks":
            modules_dim[name] = int(value.shape[0])
        elif suffix == "alpha":
            modules_alpha[name] = value
    if not modules_dim:
        raise UserInputError(f"{file or 'weights'}: no '*.oft_blocks' tensors: not an OFT file")
    return OFTNetwork(unet, multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha), weights_sd
