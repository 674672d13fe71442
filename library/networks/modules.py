"""Base class of the per-layer adapters (LoRA, DyLoRA, OFT modules).

An adapter wraps one Linear/Conv2d of a model without becoming its submodule: it replaces
the layer's `forward` (instance attribute) by its own and can put the original back. The
layer itself stays where it is, so the model's state dict, its dtype and device handling
and `named_modules()` are unchanged, and the adapter's own state dict holds only the
network's tensors under the kohya key names.
"""

from __future__ import annotations

import torch

_NO_FORWARD = object()


def low_rank_product(up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """up @ down shaped like the adapted layer's weight.

    Linear: (out, r) @ (r, in). 1x1 conv: the same on squeezed kernels. kxk conv: a kxk
    conv (down) followed by a 1x1 conv (up) is one kxk conv whose kernel is
    sum_r up[o, r] * down[r, i, :, :].
    """
    if down.dim() == 2:
        return up @ down
    if down.shape[2:] == (1, 1):
        return (up[:, :, 0, 0] @ down[:, :, 0, 0])[:, :, None, None]
    return torch.einsum("or,rikl->oikl", up[:, :, 0, 0], down)


class AdapterModule(torch.nn.Module):
    """Common state: name, wrapped layer, multiplier, enable flag, merge bookkeeping."""

    def __init__(self, lora_name: str, org_module: torch.nn.Module, multiplier: float = 1.0):
        super().__init__()
        self.lora_name = lora_name
        self.multiplier = float(multiplier)
        self.enabled = True
        self.block_index: int | None = None  # U-Net block (block-wise lr), set by the network
        self.te_index: int | None = None  # which text encoder, None for the U-Net
        # A list keeps the layer out of this module's children (and so out of its state dict).
        self._org = [org_module]
        self._org_forward = None
        self._saved_forward = _NO_FORWARD
        self._merged = False  # pre_calculation() folded the delta into the layer's weight
        self._backup: torch.Tensor | None = None

    # -- the wrapped layer ---------------------------------------------------------------
    @property
    def org_module(self) -> torch.nn.Module:
        return self._org[0]

    @property
    def is_conv(self) -> bool:
        return isinstance(self.org_module, torch.nn.Conv2d)

    @property
    def in_dim(self) -> int:
        m = self.org_module
        return m.in_channels if self.is_conv else m.in_features

    @property
    def out_dim(self) -> int:
        m = self.org_module
        return m.out_channels if self.is_conv else m.out_features

    @property
    def applied(self) -> bool:
        return self._org_forward is not None

    def apply_to(self) -> None:
        """Route the layer's forward through this adapter (idempotent)."""
        if self._org_forward is not None:
            return
        org = self.org_module
        self._saved_forward = org.__dict__.get("forward", _NO_FORWARD)
        self._org_forward = org.forward
        org.forward = self.forward

    def remove(self) -> None:
        """Give the layer its own forward back."""
        if self._org_forward is None:
            return
        org = self.org_module
        if self._saved_forward is _NO_FORWARD:
            org.__dict__.pop("forward", None)
        else:
            org.forward = self._saved_forward
        self._org_forward = None
        self._saved_forward = _NO_FORWARD

    def org_forward(self, x, *args, **kwargs):
        if self._org_forward is not None:
            return self._org_forward(x, *args, **kwargs)
        return type(self.org_module).forward(self.org_module, x, *args, **kwargs)

    # -- forward -------------------------------------------------------------------------
    def active(self) -> bool:
        return self.enabled and not self._merged and self.multiplier != 0.0

    def forward(self, x, *args, **kwargs):
        out = self.org_forward(x, *args, **kwargs)
        if not self.active():
            return out
        return self.adapt(x, out)

    def adapt(self, x: torch.Tensor, org_out: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    # -- weights -------------------------------------------------------------------------
    def merged_weight(self, weight: torch.Tensor, multiplier: float) -> torch.Tensor:
        """The layer's weight with this adapter folded in (float32 in, float32 out, on the
        weight's device; implementations move their own tensors there)."""
        raise NotImplementedError

    @torch.no_grad()
    def merge_into_layer(self, multiplier: float | None = None, dtype=None, device=None) -> None:
        """Fold the adapter into the wrapped layer's weight, in place.

        Computed in float32 on `device` (default: the weight's device). The weight keeps its
        dtype; `dtype`, when given, is the precision the merged values are rounded through.
        """
        multiplier = self.multiplier if multiplier is None else multiplier
        w = self.org_module.weight
        device = device or w.device
        new = self.merged_weight(w.detach().to(device, torch.float32), multiplier)
        if dtype is not None:
            new = new.to(dtype)
        w.copy_(new.to(w.device))

    @torch.no_grad()
    def backup_weight(self) -> None:
        if self._backup is None:
            self._backup = self.org_module.weight.detach().clone()

    @torch.no_grad()
    def restore_weight(self) -> None:
        """Put back the weight saved by backup_weight (without a backup there is nothing to
        restore, and a merged adapter stays merged)."""
        if self._backup is not None:
            self.org_module.weight.copy_(self._backup)
            self._backup = None
            self._merged = False

    def extra_repr(self) -> str:
        return f"{self.lora_name}, multiplier={self.multiplier}"
