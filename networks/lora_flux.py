"""LoRA for FLUX.1 (and its text encoders): `--network_module networks.lora_flux`.

Targets (network-args.md §4):

* transformer, prefix `lora_unet`: every Linear of each `DoubleStreamBlock`
  (`img_mod.lin`, `img_attn.qkv`, `img_attn.proj`, `img_mlp.0`, `img_mlp.2` and the same
  for `txt_`) and `SingleStreamBlock` (`linear1`, `linear2`, `modulation.lin`);
  `train_blocks=single|double` keeps one kind; `in_dims=[img,time,vector,guidance,txt]`
  adds the input layers (`img_in`, `time_in.*`, `vector_in.*`, `guidance_in.*`, `txt_in`);
* CLIP-L, prefix `lora_te1` (its attention and MLP, canonical `text_model_` names), unless
  `--network_train_unet_only`;
* T5-XXL, prefix `lora_te3`, only with `train_t5xxl=True` (`q`, `k`, `v`, `o`, `wi_0`,
  `wi_1`, `wo`).

The module classes are those of networks/lora.py (same arithmetic, dropouts, merging,
max-norm); this file adds the FLUX rank rules, block selection, `split_qkv`, LoRA-GGPO and
the per-encoder learning rates.

`split_qkv=True` trains one low-rank pair per part of the fused projections (q, k, v of a
double block's `qkv`; q, k, v, MLP of a single block's `linear1`), each of rank r. The file
keeps the fused layout every loader reads: `lora_down` = the parts' downs stacked (k*r, in),
`lora_up` = block-diagonal (out, k*r). Loaders take the rank from `lora_down` (k*r), so the
file's `alpha` is written as k times the per-part alpha: the file read as an ordinary LoRA
gives exactly the delta that was trained (sd-scripts writes the per-part alpha unchanged,
so every loader, its own inference included, applies 1/k of the trained delta; see
docs/networks.md).
"""

from __future__ import annotations

import logging
import math
import re
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

from library.errors import UserInputError
from library.networks import discovery as disc
from library.networks.args import EXACT_TRUE, FLOAT, INT, STR, Converter, parse_network_kwargs
from library.networks.modules import AdapterModule
from library.networks.network import AdapterNetwork, LowRankNetworkMixin
from library.networks.weights_io import load_weights_file
from networks.lora import LoRAModule, _alpha_value, _check_probability

logger = logging.getLogger(__name__)

MODULE = "networks.lora_flux"

LORA_PREFIX_FLUX = "lora_unet"  # ComfyUI's name for the transformer part
LORA_PREFIX_CLIP = "lora_te1"
LORA_PREFIX_T5 = "lora_te3"
FLUX_TARGET_CLASSES = ("DoubleStreamBlock", "SingleStreamBlock")
T5_TARGET_CLASSES = ("T5Attention", "T5DenseGatedActDense")
# The reference checks block selections against the full model's counts, whatever the checkpoint.
NUM_DOUBLE_BLOCKS = 19
NUM_SINGLE_BLOCKS = 38
# in_dims order and the layers each entry adapts
IN_LAYERS = (
    ("img", ("img_in",)),
    ("time", ("time_in.in_layer", "time_in.out_layer")),
    ("vector", ("vector_in.in_layer", "vector_in.out_layer")),
    ("guidance", ("guidance_in.in_layer", "guidance_in.out_layer")),
    ("txt", ("txt_in",)),
)
# (name of the dim option, substrings that must all be in the module name), first match wins
TYPE_RULES = (
    ("img_attn_dim", ("img_attn",)),
    ("txt_attn_dim", ("txt_attn",)),
    ("img_mlp_dim", ("img_mlp",)),
    ("txt_mlp_dim", ("txt_mlp",)),
    ("img_mod_dim", ("img_mod",)),
    ("txt_mod_dim", ("txt_mod",)),
    ("single_dim", ("single_blocks", "linear")),
    ("single_mod_dim", ("modulation",)),
)
TRAIN_BLOCKS = ("all", "single", "double")


def _in_dims(value) -> list[int]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = [s for s in str(value).strip().strip("[]").split(",")]
    dims = [INT(v) for v in items]
    if len(dims) != len(IN_LAYERS):
        raise ValueError(value)
    return dims


def _regex_map(kind):
    def parse(value):
        if isinstance(value, dict):
            items = list(value.items())
        else:
            items = []
            for part in str(value).split(","):
                part = part.strip()
                if not part:
                    continue
                pattern, sep, num = part.rpartition("=")
                if not sep or not pattern:
                    raise ValueError(part)
                items.append((pattern.strip(), num))
        out = []
        for pattern, num in items:
            try:
                rx = re.compile(pattern)
            except re.error:
                raise ValueError(pattern) from None
            out.append((rx, kind(num)))
        return out

    return parse


ACCEPTED_ARGS = {
    "train_blocks": STR,
    "train_double_block_indices": STR,
    "train_single_block_indices": STR,
    **{name: INT for name, _ in TYPE_RULES},
    "in_dims": Converter(_in_dims, "5 integers [img,time,vector,guidance,txt]"),
    "split_qkv": EXACT_TRUE,
    "train_t5xxl": EXACT_TRUE,
    "verbose": EXACT_TRUE,
    "network_reg_dims": Converter(_regex_map(INT), "regex=int pairs separated by commas"),
    "network_reg_lrs": Converter(_regex_map(FLOAT), "regex=number pairs separated by commas"),
    "ggpo_sigma": FLOAT,
    "ggpo_beta": FLOAT,
    "rank_dropout": FLOAT,
    "module_dropout": FLOAT,
    "loraplus_lr_ratio": FLOAT,
    "loraplus_unet_lr_ratio": FLOAT,
    "loraplus_text_encoder_lr_ratio": FLOAT,
    "conv_dim": INT,
    "conv_alpha": FLOAT,
}
FLAGS = ("split_qkv", "train_t5xxl", "verbose")


def parse_block_selection(value: Optional[str], total: int, what: str) -> Optional[set[int]]:
    """`all` (None: every block), `none` or empty (no block), or indices and inclusive
    ranges `0-5,10,12-14`, each within 0..total-1."""
    if value is None:
        return None
    text = str(value).strip()
    if text.lower() == "all":
        return None
    if text == "" or text.lower() == "none":
        return set()
    selected: set[int] = set()
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*-\s*(\d+)|(\d+)", part)
        if not m:
            raise UserInputError(
                f"{MODULE}: {what}={value!r}: {part!r} is not an index or a range a-b "
                f"(use e.g. 0-5,10,12-14, 'all' or 'none')"
            )
        lo, hi = (int(m.group(1)), int(m.group(2))) if m.group(3) is None else (int(m.group(3)),) * 2
        if lo > hi:
            raise UserInputError(f"{MODULE}: {what}={value!r}: range {part!r} runs backwards")
        if hi >= total:
            raise UserInputError(
                f"{MODULE}: {what}={value!r}: block {hi} is out of range; valid indices are 0-{total - 1}"
            )
        selected.update(range(lo, hi + 1))
    return selected


def _block_of(lora_name: str) -> tuple[Optional[str], Optional[int]]:
    """('double'|'single', index) from `lora_unet_double_blocks_<n>_...` (the 5th '_' token)."""
    parts = lora_name.split("_")
    if len(parts) > 4 and parts[2] in ("double", "single") and parts[3] == "blocks" and parts[4].isdigit():
        return parts[2], int(parts[4])
    return None, None


# --------------------------------------------------------------------------------------
# modules


class FluxLoRAModule(LoRAModule):
    """networks.lora's LoRAModule plus LoRA-GGPO (weight perturbation from weight and gradient norms)."""

    def __init__(self, *args, ggpo_sigma=None, ggpo_beta=None, **kwargs):
        super().__init__(*args, **kwargs)
        self.ggpo_sigma = ggpo_sigma
        self.ggpo_beta = ggpo_beta
        self._ggpo_n0: Optional[float] = None
        self.combined_weight_norms: Optional[torch.Tensor] = None
        self.grad_norms: Optional[torch.Tensor] = None

    @property
    def ggpo(self) -> bool:
        return self.ggpo_sigma is not None and self.ggpo_beta is not None

    @torch.no_grad()
    def initialize_norm_cache(self) -> None:
        """n0: mean L2 norm of up to 1000 random rows of the original weight (once)."""
        w = self.org_module.weight
        rows = torch.randperm(w.shape[0])[:1000].to(w.device)
        self._ggpo_n0 = float(w.index_select(0, rows).float().norm(dim=1).mean())

    @torch.no_grad()
    def update_norms(self) -> None:
        if not self.ggpo:
            return
        if self._ggpo_n0 is None:
            self.initialize_norm_cache()
        dw = self.lora_up.weight.float() @ self.lora_down.weight.float().reshape(self.lora_dim, -1)
        self.combined_weight_norms = torch.sqrt(self._ggpo_n0 ** 2 + dw.pow(2).sum(dim=1, keepdim=True))

    @torch.no_grad()
    def update_grad_norms(self) -> None:
        if not self.ggpo:
            return
        up, down = self.lora_up.weight, self.lora_down.weight
        if up.grad is None or down.grad is None:
            return
        d = down.float().reshape(self.lora_dim, -1)
        gd = down.grad.float().reshape(self.lora_dim, -1)
        u, gu = up.float().reshape(-1, self.lora_dim), up.grad.float().reshape(-1, self.lora_dim)
        self.grad_norms = (self.scale * (u @ gd + gu @ d)).norm(dim=1, keepdim=True)

    def adapt(self, x, org_out):
        out = super().adapt(x, org_out)
        if (self.training and self.ggpo and self.combined_weight_norms is not None and self.grad_norms is not None
                and not self.is_conv):
            with torch.no_grad():
                w = self.org_module.weight
                factor = (self.ggpo_sigma * self.combined_weight_norms + self.ggpo_beta * self.grad_norms ** 2)
                factor = factor / math.sqrt(self.out_dim)
                noise = torch.randn(w.shape, device=x.device, dtype=torch.float32) * factor.to(x.device)
            out = out + (x.to(noise.dtype) @ noise.T).to(out.dtype)
        return out


class SplitLoRAModule(AdapterModule):
    """One low-rank pair per output part of a fused projection (`split_qkv`).

    Per part i: delta_i = multiplier * (alpha / r) * up_i(down_i(x)); the outputs of the parts
    are concatenated. Parameters `lora_down_<i>` (r, in) and `lora_up_<i>` (out_i, r); the
    state dict is the fused layout (see the module docstring): `lora_down` (k*r, in) stacked,
    `lora_up` (out, k*r) block-diagonal, `alpha` = k * alpha.
    """

    def __init__(self, lora_name, org_module, split_dims: Sequence[int], multiplier=1.0, lora_dim=4, alpha=1,
                 dropout=None, rank_dropout=None, module_dropout=None):
        super().__init__(lora_name, org_module, multiplier)
        if not isinstance(org_module, torch.nn.Linear):
            raise ValueError(f"{lora_name}: split_qkv needs a Linear layer")
        if sum(split_dims) != self.out_dim:
            raise ValueError(f"{lora_name}: parts {list(split_dims)} do not add up to {self.out_dim} outputs")
        if lora_dim <= 0:
            raise ValueError(f"{lora_name}: rank must be positive, got {lora_dim}")
        self.lora_dim = int(lora_dim)
        self.split_dims = [int(d) for d in split_dims]
        for i, d in enumerate(self.split_dims):
            down = torch.empty(self.lora_dim, self.in_dim)
            torch.nn.init.kaiming_uniform_(down, a=math.sqrt(5))
            self.register_parameter(f"lora_down_{i}", torch.nn.Parameter(down))
            self.register_parameter(f"lora_up_{i}", torch.nn.Parameter(torch.zeros(d, self.lora_dim)))
        alpha = _alpha_value(alpha, self.lora_dim)
        self.register_buffer("alpha", torch.tensor(alpha))
        self.scale = float(alpha) / self.lora_dim
        self.dropout = dropout
        self.rank_dropout = rank_dropout
        self.module_dropout = module_dropout

    @property
    def parts(self) -> int:
        return len(self.split_dims)

    @property
    def downs(self) -> list:
        return [getattr(self, f"lora_down_{i}") for i in range(self.parts)]

    @property
    def ups(self) -> list:
        return [getattr(self, f"lora_up_{i}") for i in range(self.parts)]

    # -- fused file layout ---------------------------------------------------------------
    def fused_factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (k*r, in), up (out, k*r) block-diagonal), detached."""
        r = self.lora_dim
        down = torch.cat([d.detach() for d in self.downs], dim=0)
        ups = self.ups
        up = ups[0].new_zeros(self.out_dim, r * self.parts).detach()
        row = 0
        for i, u in enumerate(ups):
            up[row: row + self.split_dims[i], i * r: (i + 1) * r] = u.detach()
            row += self.split_dims[i]
        return down, up

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        down, up = self.fused_factors()
        destination[prefix + "lora_down.weight"] = down
        destination[prefix + "lora_up.weight"] = up
        destination[prefix + "alpha"] = self.alpha.detach() * self.parts

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        dk, uk, ak = prefix + "lora_down.weight", prefix + "lora_up.weight", prefix + "alpha"
        r, k = self.lora_dim, self.parts
        if dk not in state_dict or uk not in state_dict:
            missing_keys.extend([key for key in (dk, uk) if key not in state_dict])
            return
        down, up = state_dict[dk], state_dict[uk]
        if tuple(down.shape) != (k * r, self.in_dim) or tuple(up.shape) != (self.out_dim, k * r):
            error_msgs.append(
                f"size mismatch for {prefix[:-1]}: the file has lora_down {tuple(down.shape)} / lora_up "
                f"{tuple(up.shape)}, split_qkv with rank {r} needs {(k * r, self.in_dim)} / {(self.out_dim, k * r)}")
            return
        row, off_diagonal = 0, False
        with torch.no_grad():
            for i, (d, u) in enumerate(zip(self.downs, self.ups)):
                rows = slice(row, row + self.split_dims[i])
                d.copy_(down[i * r: (i + 1) * r])
                u.copy_(up[rows, i * r: (i + 1) * r])
                others = torch.ones(k * r, dtype=torch.bool)
                others[i * r: (i + 1) * r] = False
                off_diagonal = off_diagonal or bool(up[rows][:, others].abs().max() > 0)
                row += self.split_dims[i]
            if ak in state_dict:
                value = float(state_dict[ak].detach().float()) / k
                if value == 0:
                    value = float(r)
                if not self.alpha.dtype.is_floating_point and not value.is_integer():
                    self.alpha = torch.zeros((), dtype=torch.float32, device=self.alpha.device)
                self.alpha.fill_(value)
                self.scale = value / r
        if off_diagonal:
            logger.warning("%s: lora_up is not block-diagonal (not trained with split_qkv); splitting it drops the "
                           "cross terms", self.lora_name)
        if strict:
            unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and k not in (dk, uk, ak))

    # -- forward -------------------------------------------------------------------------
    def adapt(self, x, org_out):
        if self.training and self.module_dropout and torch.rand(1).item() < self.module_dropout:
            return org_out
        downs, ups = self.downs, self.ups
        if x.dtype != downs[0].dtype and not torch.is_autocast_enabled(x.device.type):
            x = x.to(downs[0].dtype)
        scale = self.scale
        keep = None
        if self.training and self.rank_dropout:
            keep = torch.rand((x.size(0), self.lora_dim), device=x.device) > self.rank_dropout
            keep = keep.view(x.size(0), *([1] * (x.dim() - 2)), self.lora_dim)
            scale = scale / (1.0 - self.rank_dropout)
        outs = []
        for down, up in zip(downs, ups):
            lx = F.linear(x, down)
            if self.training and self.dropout:
                lx = F.dropout(lx, p=self.dropout)
            if keep is not None:
                lx = lx * keep.to(lx.dtype)
            outs.append(F.linear(lx, up))
        delta = torch.cat(outs, dim=-1)
        return org_out + (delta * (self.multiplier * scale)).to(org_out.dtype)

    # -- weights -------------------------------------------------------------------------
    def delta_weight(self, device=None) -> torch.Tensor:
        parts = [u.detach().to(device, torch.float32) @ d.detach().to(device, torch.float32)
                 for d, u in zip(self.downs, self.ups)]
        return torch.cat(parts, dim=0) * self.scale

    def get_weight(self, multiplier=None) -> torch.Tensor:
        return self.delta_weight() * (self.multiplier if multiplier is None else multiplier)

    def merged_weight(self, weight, multiplier):
        return weight + multiplier * self.delta_weight(device=weight.device)

    @torch.no_grad()
    def scale_factors_(self, factor: float) -> None:
        for d, u in zip(self.downs, self.ups):
            d.mul_(factor)
            u.mul_(factor)


# --------------------------------------------------------------------------------------
# the network


def _split_dims_for(path: str, module: torch.nn.Linear, flux) -> Optional[list[int]]:
    """Output parts of a fused projection: double-block qkv (3 x hidden), single-block
    linear1 (3 x hidden + MLP); None for any other layer."""
    hidden = getattr(flux, "hidden_size", None) or module.in_features
    if path.endswith("_attn.qkv") and path.startswith("double_blocks."):
        return [hidden] * 3
    if path.endswith(".linear1") and path.startswith("single_blocks."):
        return [hidden] * 3 + [module.out_features - 3 * hidden]
    return None


class LoRANetwork(LowRankNetworkMixin, AdapterNetwork):
    """LoRA adapters for the FLUX transformer, CLIP-L and (optionally) T5-XXL."""

    module_label = MODULE
    LORA_PREFIX_FLUX = LORA_PREFIX_FLUX
    LORA_PREFIX_TEXT_ENCODER_CLIP = LORA_PREFIX_CLIP
    LORA_PREFIX_TEXT_ENCODER_T5 = LORA_PREFIX_T5
    FLUX_TARGET_REPLACE_MODULE_DOUBLE = ["DoubleStreamBlock"]
    FLUX_TARGET_REPLACE_MODULE_SINGLE = ["SingleStreamBlock"]
    TEXT_ENCODER_TARGET_REPLACE_MODULE = list(disc.TEXT_ENCODER_CONTAINERS) + list(T5_TARGET_CLASSES)

    def __init__(self, text_encoders, unet, multiplier=1.0, lora_dim=4, alpha=1, dropout=None, rank_dropout=None,
                 module_dropout=None, train_blocks="all", train_double_block_indices=None,
                 train_single_block_indices=None, type_dims=None, in_dims=None, split_qkv=False, train_t5xxl=False,
                 reg_dims=None, reg_lrs=None, ggpo_sigma=None, ggpo_beta=None, modules_dim=None, modules_alpha=None,
                 verbose=False):
        """modules_dim given (built from a file): exactly the named layers with those ranks
        (alpha from modules_alpha, missing = rank), fused layers unsplit. Otherwise the
        rank rules of network-args.md §4."""
        super().__init__(multiplier)
        self.lora_dim, self.alpha = lora_dim, alpha
        self.dropout, self.rank_dropout, self.module_dropout = dropout, rank_dropout, module_dropout
        self.train_blocks = train_blocks
        self.split_qkv = bool(split_qkv)
        self.train_t5xxl = bool(train_t5xxl)
        self.reg_lrs = list(reg_lrs or [])
        self.ggpo_sigma, self.ggpo_beta = ggpo_sigma, ggpo_beta
        type_dims = dict(type_dims or {})
        from_weights = modules_dim is not None
        clip_l, t5 = _text_encoder_pair(text_encoders)

        def rank_for(name: str, default_dim: int, dit: bool):
            if from_weights:
                if name not in modules_dim:
                    return 0, None
                return modules_dim[name], (modules_alpha or {}).get(name)
            for rx, d in reg_dims or ():
                if rx.search(name):
                    return d, alpha
            dim = default_dim
            if dit:
                for key, needles in TYPE_RULES:
                    d = type_dims.get(key)
                    if d is not None and all(n in name for n in needles):
                        dim = d
                        break
                kind, index = _block_of(name)
                selection = {"double": train_double_block_indices, "single": train_single_block_indices}.get(kind)
                if dim and selection is not None and index not in selection:
                    dim = 0
            return dim, alpha

        te_modules, dit_modules, skipped = [], [], []

        def make(target, rank, a, te_index, split_dims=None):
            if split_dims is not None and not from_weights:
                m = SplitLoRAModule(target.name, target.module, split_dims, multiplier, rank, a, dropout=dropout,
                                    rank_dropout=rank_dropout, module_dropout=module_dropout)
            else:
                m = FluxLoRAModule(target.name, target.module, multiplier, rank, a, dropout=dropout,
                                   rank_dropout=rank_dropout, module_dropout=module_dropout,
                                   ggpo_sigma=ggpo_sigma, ggpo_beta=ggpo_beta)
            m.te_index = te_index
            return m

        # text encoders: CLIP-L (te1), T5-XXL (te3)
        for te_index, (te, prefix, classes, wanted) in enumerate((
            (clip_l, LORA_PREFIX_CLIP, disc.TEXT_ENCODER_CONTAINERS, True),
            (t5, LORA_PREFIX_T5, T5_TARGET_CLASSES, self.train_t5xxl or (from_weights and any(
                n.startswith(LORA_PREFIX_T5 + "_") for n in modules_dim))),
        )):
            if te is None or not wanted:
                continue
            for target in disc.find_targets(te, prefix, classes, ("linear",)):
                rank, a = rank_for(target.name, lora_dim, dit=False)
                if not rank:
                    skipped.append(target.name)
                    continue
                te_modules.append(make(target, rank, a, te_index))

        # transformer
        if unet is not None:
            classes = {"all": FLUX_TARGET_CLASSES, "single": ("SingleStreamBlock",),
                       "double": ("DoubleStreamBlock",)}[train_blocks]
            if from_weights:
                classes = FLUX_TARGET_CLASSES
            targets = disc.find_targets(unet, LORA_PREFIX_FLUX, classes, ("linear",))
            input_targets = _input_targets(unet, in_dims, from_weights)
            for target, default_dim in [(t, lora_dim) for t in targets] + input_targets:
                rank, a = rank_for(target.name, default_dim, dit=True)
                if not rank:
                    skipped.append(target.name)
                    continue
                split = _split_dims_for(target.path, target.module, unet) if self.split_qkv else None
                dit_modules.append(make(target, rank, a, None, split))

        if from_weights:
            found = {m.lora_name for m in te_modules + dit_modules}
            unknown = [n for n in modules_dim if n not in found]
            if unknown:
                logger.warning("%s: %d modules in the weights match no layer of these models and are ignored, e.g. %s",
                               MODULE, len(unknown), unknown[:3])
        self._register(te_modules, dit_modules)
        if verbose:
            for m in self.all_loras:
                logger.info("%s: rank %d, alpha %s%s", m.lora_name, m.lora_dim, float(m.alpha),
                            f" (split into {m.parts} parts)" if isinstance(m, SplitLoRAModule) else "")
            for name in skipped:
                logger.info("%s: skipped (rank 0)", name)
        n_clip = sum(1 for m in te_modules if m.te_index == 0)
        logger.info("%s: %d CLIP-L modules, %d T5-XXL modules, %d transformer modules%s", MODULE, n_clip,
                    len(te_modules) - n_clip, len(dit_modules),
                    f" ({len(skipped)} layers left out by rank 0)" if skipped else "")

    # -- trainer interface ---------------------------------------------------------------
    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """Param groups: `network_reg_lrs` groups first ("reg_lr_<i>"), then the text
        encoders' ([CLIP-L, T5] from --text_encoder_lr; one value serves both) and the
        transformer's. LoRA+ splits `lora_up` parameters into "... plus" groups."""
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []
        claimed: set[int] = set()
        for i, (rx, lr) in enumerate(self.reg_lrs):
            mods = [m for m in self.all_loras if id(m) not in claimed and rx.search(m.lora_name)]
            if not mods:
                continue
            claimed.update(id(m) for m in mods)
            te = [m for m in mods if m.te_index is not None]
            dit = [m for m in mods if m.te_index is None]
            for part, ratio in ((te, self._te_plus_ratio()), (dit, self._unet_plus_ratio())):
                self._assemble(part, lr, ratio, f"reg_lr_{i}", groups, descriptions)
        te_mods = [m for m in self.text_encoder_loras if id(m) not in claimed]
        if te_mods:
            lrs = self._text_encoder_lrs(text_encoder_lr, default_lr)
            ratio = self._te_plus_ratio()
            for i, name in ((0, "textencoder1"), (1, "textencoder2")):
                mods = [m for m in te_mods if (m.te_index or 0) == i]
                if mods:
                    self._assemble(mods, lrs[min(i, len(lrs) - 1)], ratio, name, groups, descriptions)
        dit_mods = [m for m in self.unet_loras if id(m) not in claimed]
        if dit_mods:
            base = unet_lr if unet_lr is not None else default_lr
            self._assemble(dit_mods, base, self._unet_plus_ratio(), "unet", groups, descriptions)
        return groups, descriptions

    def _text_encoder_lrs(self, text_encoder_lr, default_lr) -> list:
        if isinstance(text_encoder_lr, (list, tuple)):
            values = list(text_encoder_lr) or [None]
        else:
            values = [text_encoder_lr]
        values = [default_lr if v is None else v for v in values]
        return [values[0], values[1] if len(values) > 1 else values[0]]

    # LoRA-GGPO, called by the trainer after each synchronised backward
    def update_norms(self) -> None:
        for m in self.all_loras:
            if isinstance(m, FluxLoRAModule):
                m.update_norms()

    def update_grad_norms(self) -> None:
        for m in self.all_loras:
            if isinstance(m, FluxLoRAModule):
                m.update_grad_norms()

    @property
    def uses_ggpo(self) -> bool:
        return self.ggpo_sigma is not None and self.ggpo_beta is not None


def _text_encoder_pair(text_encoders):
    """(CLIP-L or None, T5 or None) from one model, a list [clip_l, t5] or None."""
    if text_encoders is None:
        return None, None
    if not isinstance(text_encoders, (list, tuple)):
        text_encoders = [text_encoders]
    clip_l = t5 = None
    for te in text_encoders:
        if te is None:
            continue
        name = type(getattr(te, "wrapped", te)).__name__
        if name.startswith("T5"):
            t5 = te
        else:
            clip_l = te
    return clip_l, t5


def _input_targets(flux, in_dims, from_weights: bool) -> list:
    """[(Target, rank)] for the input layers of `in_dims` (all of them when building from weights)."""
    if in_dims is None and not from_weights:
        return []
    modules = dict(flux.named_modules())
    out = []
    for i, (_, paths) in enumerate(IN_LAYERS):
        dim = in_dims[i] if in_dims is not None else 0
        if not dim and not from_weights:
            continue
        for path in paths:
            layer = modules.get(path)
            if isinstance(layer, torch.nn.Linear):
                out.append((disc.Target(disc.key_name(LORA_PREFIX_FLUX, path), path, layer, "linear", "Flux"), dim))
    return out


# --------------------------------------------------------------------------------------
# entry points


def _parse(kwargs, neuron_dropout=None):
    args = parse_network_kwargs(kwargs, ACCEPTED_ARGS, MODULE)
    for flag in FLAGS:
        raw = kwargs.get(flag)
        if isinstance(raw, str) and raw.strip().lower() in ("true", "1", "yes", "on") and raw.strip() != "True":
            logger.warning("%s: %s=%s is taken as false: only the exact text 'True' switches it on (as in sd-scripts)",
                           MODULE, flag, raw)
    for name in ("rank_dropout", "module_dropout"):
        _check_probability(name, args.get(name))
    _check_probability("network_dropout", neuron_dropout)
    for name in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio"):
        if name in args and args[name] <= 0:
            raise UserInputError(f"{MODULE}: {name} must be positive, got {args[name]}")
    tb = args.get("train_blocks", "all")
    if tb not in TRAIN_BLOCKS:
        raise UserInputError(f"{MODULE}: train_blocks={tb!r}: expected one of {', '.join(TRAIN_BLOCKS)}")
    for name, _ in TYPE_RULES:
        if name in args and args[name] < 0:
            raise UserInputError(f"{MODULE}: {name} must be 0 (skip) or a positive rank, got {args[name]}")
    if any(d < 0 for d in args.get("in_dims", [])):
        raise UserInputError(f"{MODULE}: in_dims entries must be 0 (skip) or positive ranks, got {args['in_dims']}")
    if ("ggpo_sigma" in args) != ("ggpo_beta" in args):
        raise UserInputError(f"{MODULE}: LoRA-GGPO needs both ggpo_sigma and ggpo_beta")
    if "ggpo_sigma" in args and args.get("split_qkv"):
        raise UserInputError(f"{MODULE}: LoRA-GGPO (ggpo_sigma/ggpo_beta) cannot be combined with split_qkv=True")
    if "conv_dim" in args or "conv_alpha" in args:
        logger.info("%s: conv_dim/conv_alpha have no effect: FLUX has no convolution layers to adapt", MODULE)
    return args


def create_network(multiplier, network_dim, network_alpha, vae, text_encoders, flux_model, neuron_dropout=None,
                   **kwargs):
    """The trainer's entry point (`--network_module networks.lora_flux`)."""
    args = _parse(kwargs, neuron_dropout)
    network_dim = 4 if network_dim is None else int(network_dim)
    if network_alpha is None:
        network_alpha = 1.0
    if network_dim <= 0:
        raise UserInputError(f"{MODULE}: --network_dim must be positive, got {network_dim}")
    double_sel = parse_block_selection(args.get("train_double_block_indices"), NUM_DOUBLE_BLOCKS,
                                       "train_double_block_indices")
    single_sel = parse_block_selection(args.get("train_single_block_indices"), NUM_SINGLE_BLOCKS,
                                       "train_single_block_indices")
    if flux_model is not None:
        for sel, blocks, what in ((double_sel, getattr(flux_model, "double_blocks", ()), "double"),
                                  (single_sel, getattr(flux_model, "single_blocks", ()), "single")):
            if sel:
                absent = sorted(i for i in sel if i >= len(blocks))
                if absent:
                    logger.warning("%s: this model has %d %s blocks; selected %s block(s) %s do not exist", MODULE,
                                   len(blocks), what, what, absent if len(absent) < 8 else f"{absent[0]}-{absent[-1]}")
    type_dims = {name: args[name] for name, _ in TYPE_RULES if name in args}
    network = LoRANetwork(
        text_encoders, flux_model, multiplier=multiplier, lora_dim=network_dim, alpha=network_alpha,
        dropout=neuron_dropout, rank_dropout=args.get("rank_dropout"), module_dropout=args.get("module_dropout"),
        train_blocks=args.get("train_blocks", "all"), train_double_block_indices=double_sel,
        train_single_block_indices=single_sel, type_dims=type_dims, in_dims=args.get("in_dims"),
        split_qkv=args.get("split_qkv", False), train_t5xxl=args.get("train_t5xxl", False),
        reg_dims=args.get("network_reg_dims"), reg_lrs=args.get("network_reg_lrs"),
        ggpo_sigma=args.get("ggpo_sigma"), ggpo_beta=args.get("ggpo_beta"), verbose=args.get("verbose", False),
    )
    ratios = [args.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network


def dims_from_weights(weights_sd):
    """({module: rank}, {module: alpha}) of a LoRA state dict (rank = lora_down rows)."""
    modules_dim, modules_alpha = {}, {}
    for key, value in weights_sd.items():
        name, _, suffix = key.partition(".")
        if suffix == "lora_down.weight":
            modules_dim[name] = int(value.shape[0])
        elif suffix == "alpha":
            modules_alpha[name] = value
    return modules_dim, modules_alpha


def create_network_from_weights(multiplier, file, ae, text_encoders, flux_model, weights_sd=None,
                                for_inference=False, **kwargs):
    """A network shaped like a weights file: rank from `lora_down` rows, alpha from `.alpha`,
    T5 modules when any key starts with `lora_te3_`. Fused (split_qkv) files load as one
    module per layer, which gives the same delta. Returns (network, weights_sd)."""
    if weights_sd is None:
        weights_sd = load_weights_file(file)
    args = _parse(kwargs)
    modules_dim, modules_alpha = dims_from_weights(weights_sd)
    if not modules_dim:
        raise UserInputError(f"{file or 'weights'}: no '*.lora_down.weight' tensors: not a LoRA file for {MODULE}")
    network = LoRANetwork(
        text_encoders, flux_model, multiplier=multiplier, modules_dim=modules_dim, modules_alpha=modules_alpha,
        rank_dropout=None if for_inference else args.get("rank_dropout"),
        module_dropout=None if for_inference else args.get("module_dropout"),
        verbose=args.get("verbose", False),
    )
    network.for_inference = bool(for_inference)
    ratios = [args.get(k) for k in ("loraplus_lr_ratio", "loraplus_unet_lr_ratio", "loraplus_text_encoder_lr_ratio")]
    if any(r is not None for r in ratios):
        network.set_loraplus_lr_ratio(*ratios)
    return network, weights_sd


def check_before_loading(flux_config, network_dim, network_alpha=None, **kwargs) -> None:
    """Every network arg checked from the checkpoint's config (header only), before models load:
    keys and values, block selections (0-18 / 0-37), dims."""
    args = _parse(kwargs)
    if network_dim is not None and int(network_dim) <= 0:
        raise UserInputError(f"{MODULE}: --network_dim must be positive, got {network_dim}")
    parse_block_selection(args.get("train_double_block_indices"), NUM_DOUBLE_BLOCKS, "train_double_block_indices")
    parse_block_selection(args.get("train_single_block_indices"), NUM_SINGLE_BLOCKS, "train_single_block_indices")
