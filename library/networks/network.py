"""Base class of the networks: the interface the trainer and the inference tools call.

The method names and return values are those of the kohya plug-in interface, so a trainer
can use our networks and third-party ones (e.g. LyCORIS' `lycoris.kohya`) alike:
`apply_to`, `prepare_optimizer_params`, `prepare_grad_etc`, `on_epoch_start`,
`on_step_start`, `get_trainable_params`, `enable_gradient_checkpointing`, `set_multiplier`,
`load_weights`, `save_weights`, `is_mergeable`, `merge_to`, `backup_weights`,
`restore_weights`, `pre_calculation`, and (low-rank networks) `apply_max_norm_regularization`.

Adapters are registered as submodules under their key names when the network is built, so
`network.state_dict()` is the file's content at any time.
"""

from __future__ import annotations

import logging
import math
from typing import Iterable, Mapping

import torch

from library.errors import UserInputError
from library.networks.modules import AdapterModule
from library.networks.weights_io import load_weights_file, save_weights_file

logger = logging.getLogger(__name__)


def split_by_module(weights_sd: Mapping[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """{module name: {suffix: tensor}} for keys '<module name>.<suffix>'."""
    out: dict[str, dict[str, torch.Tensor]] = {}
    for k, v in weights_sd.items():
        name, dot, rest = k.partition(".")
        if dot:
            out.setdefault(name, {})[rest] = v
    return out


class AdapterNetwork(torch.nn.Module):
    """Holds the adapters of a U-Net and its text encoder(s)."""

    module_label = "network"  # used in messages, e.g. "networks.lora"

    def __init__(self, multiplier: float = 1.0):
        super().__init__()
        self.multiplier = float(multiplier)
        self.text_encoder_loras: list[AdapterModule] = []
        self.unet_loras: list[AdapterModule] = []
        self.loraplus_lr_ratio: float | None = None
        self.loraplus_unet_lr_ratio: float | None = None
        self.loraplus_text_encoder_lr_ratio: float | None = None
        self.block_lr_weight: list[float] | None = None  # per U-Net block, None = off

    # -- building ------------------------------------------------------------------------
    def _register(self, text_encoder_modules: Iterable[AdapterModule], unet_modules: Iterable[AdapterModule]) -> None:
        self.text_encoder_loras = list(text_encoder_modules)
        self.unet_loras = list(unet_modules)
        for m in self.text_encoder_loras + self.unet_loras:
            if m.lora_name in self._modules:
                raise ValueError(f"{self.module_label}: two layers map to the same key name {m.lora_name}")
            m.multiplier = self.multiplier
            self.add_module(m.lora_name, m)

    def _unregister(self, modules: Iterable[AdapterModule]) -> None:
        for m in modules:
            m.remove()
            self._modules.pop(m.lora_name, None)

    @property
    def all_loras(self) -> list[AdapterModule]:
        return self.text_encoder_loras + self.unet_loras

    # -- the trainer interface -----------------------------------------------------------
    def apply_to(self, text_encoder=None, unet=None, apply_text_encoder: bool = True, apply_unet: bool = True) -> None:
        """Hook the adapters into their layers. Parts not applied are dropped from the network
        (not trained, not saved), as the trainer expects for --network_train_*_only."""
        if not apply_text_encoder and self.text_encoder_loras:
            self._unregister(self.text_encoder_loras)
            self.text_encoder_loras = []
        if not apply_unet and self.unet_loras:
            self._unregister(self.unet_loras)
            self.unet_loras = []
        for m in self.all_loras:
            m.apply_to()
        logger.info("%s: applied to %d text-encoder and %d U-Net layers", self.module_label,
                    len(self.text_encoder_loras), len(self.unet_loras))

    def remove_from(self) -> None:
        """Undo apply_to: every layer gets its own forward back."""
        for m in self.all_loras:
            m.remove()

    def set_multiplier(self, multiplier: float) -> None:
        self.multiplier = float(multiplier)
        for m in self.all_loras:
            m.multiplier = self.multiplier

    def set_enabled(self, is_enabled: bool) -> None:
        for m in self.all_loras:
            m.enabled = bool(is_enabled)

    def is_mergeable(self) -> bool:
        return True

    def prepare_grad_etc(self, text_encoder=None, unet=None) -> None:
        self.requires_grad_(True)

    def on_epoch_start(self, text_encoder=None, unet=None) -> None:
        self.train()

    def on_step_start(self) -> None:
        pass

    def get_trainable_params(self):
        return self.parameters()

    def enable_gradient_checkpointing(self) -> None:
        pass  # adapters hold no activations worth checkpointing

    # -- learning rates ------------------------------------------------------------------
    def set_loraplus_lr_ratio(self, loraplus_lr_ratio=None, loraplus_unet_lr_ratio=None, loraplus_text_encoder_lr_ratio=None) -> None:
        self.loraplus_lr_ratio = loraplus_lr_ratio
        self.loraplus_unet_lr_ratio = loraplus_unet_lr_ratio
        self.loraplus_text_encoder_lr_ratio = loraplus_text_encoder_lr_ratio
        if any(r is not None for r in (loraplus_lr_ratio, loraplus_unet_lr_ratio, loraplus_text_encoder_lr_ratio)):
            logger.info("LoRA+ lr ratios: unet %s, text encoder %s",
                        self._unet_plus_ratio(), self._te_plus_ratio())

    def _unet_plus_ratio(self):
        return self.loraplus_unet_lr_ratio if self.loraplus_unet_lr_ratio is not None else self.loraplus_lr_ratio

    def _te_plus_ratio(self):
        return self.loraplus_text_encoder_lr_ratio if self.loraplus_text_encoder_lr_ratio is not None else self.loraplus_lr_ratio

    def get_lr_weight(self, module: AdapterModule) -> float:
        if self.block_lr_weight is None or module.block_index is None:
            return 1.0
        return self.block_lr_weight[module.block_index]

    @staticmethod
    def _is_plus_param(name: str) -> bool:
        return "lora_up" in name

    def _assemble(self, modules, lr, plus_ratio, label, groups, descriptions) -> None:
        plain, plus = [], []
        for m in modules:
            for name, p in m.named_parameters():
                (plus if plus_ratio is not None and self._is_plus_param(name) else plain).append(p)
        for params, suffix, group_lr in (
            (plain, "", lr),
            (plus, " plus", None if lr is None or plus_ratio is None else lr * plus_ratio),
        ):
            if not params:
                continue
            if group_lr is None or group_lr == 0:
                logger.info("%s: no learning rate for '%s%s', its parameters are not trained", self.module_label, label, suffix)
                continue
            groups.append({"params": params, "lr": group_lr})
            descriptions.append(label + suffix)

    def _text_encoder_lrs(self, text_encoder_lr, default_lr) -> list:
        count = 1 + max((m.te_index or 0 for m in self.text_encoder_loras), default=0)
        if isinstance(text_encoder_lr, (list, tuple)):
            values = list(text_encoder_lr) or [None]
        else:
            values = [text_encoder_lr]
        values = [default_lr if v is None else v for v in values]
        return [values[min(i, len(values) - 1)] for i in range(count)]

    def prepare_optimizer_params(self, text_encoder_lr, unet_lr, default_lr):
        """(param_groups, lr_descriptions).

        text_encoder_lr falls back to default_lr, unet_lr too. text_encoder_lr may be a list
        (one value per text encoder; one value is reused). With LoRA+ the `lora_up`
        parameters form their own groups at lr x ratio ("... plus"). With block-wise lr
        weights the U-Net groups are per block ("unet_block<i>"). Groups whose lr is 0 or
        None are left out.
        """
        self.requires_grad_(True)
        groups: list[dict] = []
        descriptions: list[str] = []
        if self.text_encoder_loras:
            lrs = self._text_encoder_lrs(text_encoder_lr, default_lr)
            ratio = self._te_plus_ratio()
            if len(set(lrs)) == 1:
                self._assemble(self.text_encoder_loras, lrs[0], ratio, "textencoder", groups, descriptions)
            else:
                for i, lr in enumerate(lrs):
                    mods = [m for m in self.text_encoder_loras if (m.te_index or 0) == i]
                    self._assemble(mods, lr, ratio, f"textencoder{i + 1}", groups, descriptions)
        if self.unet_loras:
            base = unet_lr if unet_lr is not None else default_lr
            ratio = self._unet_plus_ratio()
            if self.block_lr_weight is not None:
                by_block: dict[int, list] = {}
                for m in self.unet_loras:
                    by_block.setdefault(m.block_index if m.block_index is not None else -1, []).append(m)
                for idx in sorted(by_block):
                    mods = by_block[idx]
                    lr = None if base is None else base * self.get_lr_weight(mods[0])
                    self._assemble(mods, lr, ratio, f"unet_block{idx}" if idx >= 0 else "unet", groups, descriptions)
            else:
                self._assemble(self.unet_loras, base, ratio, "unet", groups, descriptions)
        return groups, descriptions

    def prepare_optimizer_params_with_multiple_te_lrs(self, text_encoder_lr, unet_lr, default_lr):
        """The trainer's entry for `--text_encoder_lr a b`: one learning rate per text encoder
        (SDXL: CLIP-L modules at a, bigG modules at b); same groups as prepare_optimizer_params."""
        return self.prepare_optimizer_params(text_encoder_lr, unet_lr, default_lr)

    # -- files ---------------------------------------------------------------------------
    def load_weights(self, file):
        """Load a weights file into this network (non-strict). Returns torch's load result
        (missing_keys, unexpected_keys); a file that shares no key with the network, or
        whose shapes differ, is a UserInputError."""
        weights_sd = load_weights_file(file)
        return self.load_state_dict_checked(weights_sd, source=str(file))

    def load_state_dict_checked(self, weights_sd: Mapping[str, torch.Tensor], source: str = "weights"):
        own = set(self.state_dict().keys())
        if weights_sd and own and not own.intersection(weights_sd.keys()):
            raise UserInputError(
                f"{source}: none of its {len(weights_sd)} tensors belongs to this {self.module_label} network "
                f"(another model type or network module?)"
            )
        try:
            info = self.load_state_dict(dict(weights_sd), strict=False)
        except RuntimeError as e:
            lines = [ln.strip() for ln in str(e).splitlines() if "size mismatch" in ln][:3]
            raise UserInputError(
                f"{source}: shapes do not match this network ({'; '.join(lines) or e}). Use --dim_from_weights to take "
                f"the ranks from the file, or the same network_dim / conv_dim as when it was trained"
            ) from None
        if info.unexpected_keys:
            logger.warning("%s: %d tensors have no matching layer and were ignored, e.g. %s", source,
                           len(info.unexpected_keys), info.unexpected_keys[:3])
        if info.missing_keys:
            logger.warning("%s: %d network tensors were not in the file and keep their initial values, e.g. %s",
                           source, len(info.missing_keys), info.missing_keys[:3])
        return info

    def save_weights(self, file, dtype=None, metadata=None) -> None:
        """Write the network: .safetensors with metadata and sshs_* hashes, else torch.save.
        Every tensor is cast to `dtype` when given. The caller's metadata is not modified."""
        save_weights_file(self.state_dict(), file, dtype, metadata)

    # -- merging / inference -------------------------------------------------------------
    def _required_suffixes(self, module: AdapterModule) -> set[str]:
        return {k for k in module.state_dict().keys() if k != "alpha"}

    def merge_to(self, text_encoder=None, unet=None, weights_sd=None, dtype=None, device=None) -> None:
        """Fold weights (default: the network's own) into the model layers, at the network's
        multiplier. The layers' weights change in place; the adapters stay unhooked."""
        if weights_sd is None:
            weights_sd = self.state_dict()
        per_module = split_by_module(weights_sd)
        merged = 0
        for m in self.all_loras:
            sub = per_module.get(m.lora_name)
            if not sub:
                continue
            missing = self._required_suffixes(m) - set(sub)
            if missing:
                raise UserInputError(f"{m.lora_name}: weights lack {sorted(missing)}")
            m.load_state_dict(sub, strict=False)
            m.merge_into_layer(self.multiplier, dtype, device)
            merged += 1
        unused = set(per_module) - {m.lora_name for m in self.all_loras}
        if unused:
            logger.warning("%s: %d modules of the weights match no layer and were not merged, e.g. %s",
                           self.module_label, len(unused), sorted(unused)[:3])
        logger.info("%s: merged %d modules", self.module_label, merged)

    def backup_weights(self) -> None:
        """Keep a copy of every adapted layer's weight (for restore_weights)."""
        for m in self.all_loras:
            m.backup_weight()

    def restore_weights(self) -> None:
        """Put back the weights saved by backup_weights; adapters become live again."""
        for m in self.all_loras:
            m.restore_weight()

    @torch.no_grad()
    def pre_calculation(self) -> None:
        """Fold every enabled adapter into its layer at its multiplier (faster inference);
        the adapters then pass their layer's output through unchanged."""
        for m in self.all_loras:
            if m.enabled and m.multiplier != 0.0 and not m._merged:
                m.merge_into_layer(m.multiplier)
                m._merged = True


class LowRankNetworkMixin:
    """Max-norm regularisation for networks whose adapters have an up@down product."""

    @torch.no_grad()
    def apply_max_norm_regularization(self, max_norm_value: float, device):
        """Scale down every module whose |scale * up @ down|_F exceeds max_norm_value.

        norm = max(|dW|, max/2); desired = min(norm, max); when desired/norm != 1 both up and
        down are multiplied by sqrt(desired/norm). Returns (modules scaled, mean norm,
        largest norm), the norms measured after scaling.
        """
        keys_scaled = 0
        norms = []
        for m in self.all_loras:
            dw = m.delta_weight(device=device)
            raw = dw.norm()
            norm = raw.clamp(min=max_norm_value / 2)
            desired = norm.clamp(max=max_norm_value)
            ratio = float(desired / norm)
            if ratio != 1.0:
                keys_scaled += 1
                m.scale_factors_(math.sqrt(ratio))
            norms.append(float(raw) * ratio)
        if not norms:
            return 0, 0.0, 0.0
        return keys_scaled, sum(norms) / len(norms), max(norms)
