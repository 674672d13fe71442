"""Minimal kohya-format adapter loading for FLUX.1 inference (`--lora_weights path;mult`).

It reads saved files (ours from networks/lora_flux.py and networks/oft_flux.py, or any
kohya-format FLUX LoRA/OFT) directly and applies them to our model tree, with the OFT
rotation of networks/oft.py (tests/test_lora_flux.py checks it gives the networks' own
outputs), where a kohya module name is the module
path with '.' -> '_' (`lora_unet_double_blocks_0_img_attn_qkv`). Supported:

- LoRA (`<name>.lora_down.weight`, `.lora_up.weight`, optional `.alpha`): delta
  `multiplier * alpha / rank * up @ down`, rank = rows of `lora_down` (so `split_qkv`
  files, stored in the fused layout, load as one module of rank k*r, as the reference's
  loader reads them). Prefixes `lora_unet_` (transformer), `lora_te1_` (CLIP-L, canonical
  `text_model_` names), `lora_te3_` (T5-XXL).
- OFT (`<name>.oft_blocks.<part>` (k, b, b) and `.alpha`, prefix `oft_unet_`): per output
  part (q/k/v/MLP of fused layers) `R = (I + Q)(I - Q)^-1`, `Q = B - B^T` norm-limited to
  `alpha * part_size`, `R_m = m (R - I) + I`, each block of rows `W_i <- R_i^T W_i`.

Applied either live (a forward wrapper; the multiplier can change later, `set_multiplier`)
or merged into the weights (`merge=True`, `--merge_lora_weights`). A module name that has no
layer in the loaded models, or a shape that does not fit, is a UserInputError naming the
file and the module: typically a LoRA made for another FLUX variant or another model family.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from library.errors import UserInputError

logger = logging.getLogger(__name__)

PREFIXES = {"lora_unet": "transformer", "lora_te1": "CLIP-L", "lora_te3": "T5-XXL", "oft_unet": "transformer"}


def parse_entry(entry: str) -> tuple[str, float]:
    """'path;multiplier' (multiplier optional, default 1.0)."""
    if ";" in entry:
        path, mult = entry.rsplit(";", 1)
        try:
            return path, float(mult)
        except ValueError:
            raise UserInputError(f"--lora_weights {entry!r}: multiplier {mult!r} is not a number") from None
    return entry, 1.0


def check_entries(entries) -> list[tuple[str, float]]:
    out = []
    for e in entries or []:
        path, mult = parse_entry(e)
        if not os.path.isfile(path):
            raise UserInputError(f"--lora_weights {path}: file not found")
        out.append((path, mult))
    return out


@dataclass
class _Module:
    name: str
    kind: str  # "lora" | "oft"
    tensors: dict = field(default_factory=dict)


def _read(path: str) -> tuple[dict[str, _Module], str]:
    from library.io.tensor_files import TensorFile

    with TensorFile(path, "--lora_weights") as tf:
        keys = tf.keys()
        if any(".lora_A." in k or ".lora_B." in k for k in keys):
            raise UserInputError(
                f"--lora_weights {path}: diffusers/ai-toolkit (PEFT) layout; convert it to the kohya layout with "
                "networks/convert_flux_lora.py first"
            )
        modules: dict[str, _Module] = {}
        for k in keys:
            name, _, rest = k.partition(".")
            if not rest:
                continue
            if rest in ("lora_down.weight", "lora_up.weight", "alpha") and not name.startswith("oft_"):
                kind = "lora"
            elif rest.startswith("oft_blocks") or (rest == "alpha" and name.startswith("oft_")):
                kind = "oft"
            elif rest in ("dora_scale",) or rest.startswith(("hada_", "lokr_")):
                raise UserInputError(f"--lora_weights {path}: '{k}' is a LyCORIS/DoRA tensor; only kohya LoRA and OFT "
                                     "files are supported by flux_minimal_inference.py")
            else:
                raise UserInputError(f"--lora_weights {path}: unexpected tensor '{k}' (not a kohya LoRA/OFT file)")
            m = modules.setdefault(name, _Module(name, kind))
            m.tensors[rest] = tf.get(k)
    if not modules:
        raise UserInputError(f"--lora_weights {path}: no LoRA or OFT modules in this file")
    kinds = {m.kind for m in modules.values()}
    if len(kinds) > 1:
        raise UserInputError(f"--lora_weights {path}: mixes LoRA and OFT modules")
    for m in modules.values():
        if m.kind == "lora" and ("lora_down.weight" not in m.tensors or "lora_up.weight" not in m.tensors):
            raise UserInputError(f"--lora_weights {path}: module '{m.name}' lacks lora_down or lora_up")
        if m.kind == "oft" and not any(k.startswith("oft_blocks") for k in m.tensors):
            raise UserInputError(f"--lora_weights {path}: module '{m.name}' has no oft_blocks")
    return modules, kinds.pop()


def layer_names(flux, clip_l=None, t5=None) -> dict[str, torch.nn.Linear]:
    """kohya module name -> Linear layer, for every prefix."""
    from library.networks.discovery import canonical_root

    out = {}
    for prefix, model in (("lora_unet", flux), ("oft_unet", flux), ("lora_te1", clip_l), ("lora_te3", t5)):
        if model is None:
            continue
        root = canonical_root(model) if prefix == "lora_te1" else ""
        for path, module in model.named_modules():
            if isinstance(module, torch.nn.Linear):
                out[f"{prefix}.{root}{path}".replace(".", "_")] = module
    return out


def _describe(flux) -> str:
    return flux.config.describe() if hasattr(flux, "config") else "this model"


def _cayley(blocks: torch.Tensor, constraint: float, multiplier: float) -> torch.Tensor:
    from networks.oft import cayley_rotation  # the training networks' own rotation

    return cayley_rotation(blocks, constraint, multiplier)


class _Applied:
    """One adapted layer of one file: computes its delta / rotated weight."""

    def __init__(self, module: _Module, layer: torch.nn.Linear, path: str):
        self.name = module.name
        self.kind = module.kind
        self.layer = layer
        self.multiplier = 1.0
        out_f, in_f = layer.weight.shape
        if module.kind == "lora":
            down, up = module.tensors["lora_down.weight"], module.tensors["lora_up.weight"]
            if down.dim() != 2 or up.dim() != 2 or down.shape[1] != in_f or up.shape[0] != out_f or up.shape[1] != down.shape[0]:
                raise UserInputError(
                    f"--lora_weights {path}: '{module.name}' has down {tuple(down.shape)} / up {tuple(up.shape)}, "
                    f"but the layer is {out_f}x{in_f} — a LoRA for a different model?"
                )
            rank = down.shape[0]
            alpha = module.tensors.get("alpha")
            alpha = float(alpha) if alpha is not None and float(alpha) != 0 else float(rank)
            self.down, self.up, self.scale = down, up, alpha / rank
        else:
            parts = sorted((int(k.rsplit(".", 1)[1]) if k != "oft_blocks" else 0, v)
                           for k, v in module.tensors.items() if k.startswith("oft_blocks"))
            self.blocks = [v for _, v in parts]
            sizes = [b.shape[0] * b.shape[1] for b in self.blocks]
            if sum(sizes) != out_f or any(b.dim() != 3 or b.shape[1] != b.shape[2] for b in self.blocks):
                raise UserInputError(
                    f"--lora_weights {path}: OFT module '{module.name}' covers {sum(sizes)} output rows, the layer has "
                    f"{out_f} — an OFT file for a different model?"
                )
            alpha = module.tensors.get("alpha")
            self.alpha = float(alpha) if alpha is not None else 1e-3
            self.sizes = sizes

    def delta(self) -> torch.Tensor:
        dev = self.layer.weight.device
        return (self.up.to(dev, torch.float32) @ self.down.to(dev, torch.float32)) * (self.multiplier * self.scale)

    def rotated(self, weight: torch.Tensor) -> torch.Tensor:
        w = weight.float()
        out, start = [], 0
        for blocks, size in zip(self.blocks, self.sizes):
            k, bsz, _ = blocks.shape
            r = _cayley(blocks.to(w.device), self.alpha * size, self.multiplier)
            part = w[start:start + size].reshape(k, bsz, -1)
            out.append(torch.einsum("knm,kni->kmi", r, part).reshape(size, -1))
            start += size
        return torch.cat(out, dim=0)


class FluxAdapters:
    """The adapters loaded from `--lora_weights`, live or merged."""

    def __init__(self):
        self.files: list[tuple[str, list[_Applied]]] = []
        self._wrapped: dict[int, list[_Applied]] = {}
        self.merged = False

    def set_multipliers(self, multipliers: list[float]) -> None:
        if self.merged:
            raise UserInputError("multipliers cannot change after --merge_lora_weights")
        if len(multipliers) != len(self.files):
            raise UserInputError(f"expected {len(self.files)} multipliers (one per --lora_weights file), got {len(multipliers)}")
        for (_, applied), m in zip(self.files, multipliers):
            for a in applied:
                a.multiplier = float(m)

    def _wrap(self, a: _Applied) -> None:
        layer = a.layer
        key = id(layer)
        if key not in self._wrapped:
            self._wrapped[key] = []
            original = layer.forward
            stack = self._wrapped[key]

            def forward(x, _orig=original, _layer=layer, _stack=stack):
                ofts = [s for s in _stack if s.kind == "oft"]
                if ofts:
                    w = _layer.weight
                    for s in ofts:
                        w = s.rotated(w)
                    bias = None if _layer.bias is None else _layer.bias.to(x.dtype)
                    y = F.linear(x, w.to(x.dtype), bias)
                else:
                    y = _orig(x)
                for s in _stack:
                    if s.kind == "lora" and s.multiplier != 0:
                        h = F.linear(x, s.down.to(x.device, x.dtype))
                        y = y + F.linear(h, s.up.to(x.device, x.dtype)) * (s.multiplier * s.scale)
                return y

            layer.forward = forward
        self._wrapped[key].append(a)

    @torch.no_grad()
    def _merge(self, a: _Applied) -> None:
        w = a.layer.weight
        new = a.rotated(w) if a.kind == "oft" else w.float() + a.delta()
        if w.dtype == getattr(torch, "float8_e4m3fn", None):
            logger.warning("%s: merging into fp8-stored weights rounds the result to fp8", a.name)
        a.layer.weight.data = new.to(w.dtype)


def load_adapters(entries: list[tuple[str, float]], flux, clip_l=None, t5=None, merge: bool = False) -> FluxAdapters:
    """Read and apply every `(path, multiplier)`; see the module docstring."""
    names = layer_names(flux, clip_l, t5)
    adapters = FluxAdapters()
    adapters.merged = merge
    for path, mult in entries:
        modules, kind = _read(path)
        applied = []
        for name, m in modules.items():
            prefix = next((p for p in PREFIXES if name.startswith(p + "_")), None)
            if prefix is None:
                raise UserInputError(
                    f"--lora_weights {path}: module '{name}' has no FLUX prefix (lora_unet_, lora_te1_, lora_te3_, "
                    "oft_unet_): a LoRA for another model family?"
                )
            if prefix == "lora_te3" and t5 is None or prefix == "lora_te1" and clip_l is None:
                raise UserInputError(f"--lora_weights {path}: has {PREFIXES[prefix]} modules but no {PREFIXES[prefix]} is loaded")
            layer = names.get(name)
            if layer is None:
                what = _describe(flux) if prefix in ("lora_unet", "oft_unet") else PREFIXES[prefix]
                raise UserInputError(
                    f"--lora_weights {path}: module '{name}' has no matching layer in {what} — a LoRA for a different "
                    "FLUX variant (dev/schnell, block count) or another model?"
                )
            a = _Applied(m, layer, path)
            a.multiplier = mult
            applied.append(a)
        for a in applied:
            if merge:
                adapters._merge(a)
            else:
                adapters._wrap(a)
        adapters.files.append((path, applied))
        counts = {}
        for a in applied:
            counts[a.name.split("_", 2)[1]] = counts.get(a.name.split("_", 2)[1], 0) + 1
        logger.info("%s %s %s (multiplier %g): %d modules (%s)", "merged" if merge else "applied", kind.upper(),
                    os.path.basename(path), mult, len(applied), ", ".join(f"{k} {v}" for k, v in sorted(counts.items())))
    return adapters

