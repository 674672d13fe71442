"""The FLUX.1 side of the LoRA tools: LoRA key layouts, the diffusers / ai-toolkit layout, and
model files seen as {LoRA module name: weight tensor}.

Kohya FLUX LoRA module names (formats.md a.1, a.4) are module paths with '.' -> '_':

| prefix       | model                        | example                                               |
|--------------|------------------------------|-------------------------------------------------------|
| `lora_unet_` | transformer, BFL names       | `lora_unet_double_blocks_0_img_attn_qkv`, `..._single_blocks_3_linear1` |
| `lora_te1_`  | CLIP-L (canonical names)     | `lora_te1_text_model_encoder_layers_0_self_attn_q_proj` |
| `lora_te3_`  | T5-XXL                       | `lora_te3_encoder_block_0_layer_1_DenseReluDense_wi_0` |

A `split_qkv` LoRA is stored fused (network-args.md section 4): `lora_down` (k r, in) is the
parts' downs stacked, `lora_up` (out, k r) block-diagonal, alpha unchanged; a reader taking
the rank from `lora_down` (scale alpha / (k r)) sees an ordinary module, and so do these tools.

The diffusers / ai-toolkit layout (PEFT style): `transformer.<diffusers module>.lora_A.weight`
(down) and `.lora_B.weight` (up), no alpha (scale 1); CLIP-L modules under `text_encoder.`, T5
under `text_encoder_2.`. The transformer modules are diffusers' (library/models/flux/key_maps.py):
the fused BFL layers are split into `to_q`/`to_k`/`to_v` (`add_*_proj` for the text stream;
plus `proj_mlp` in the single blocks), and the final adaLN's two halves are swapped.

* kohya -> diffusers: alpha/rank is folded into the factors (down x s * 2^k, up x 2^-k, the
  powers of two chosen to keep both factors' magnitudes alike). A fused module whose `up` is
  block-diagonal in k equal ranks (a split_qkv LoRA) gives each part its own rows of `down`;
  otherwise each part gets the whole `down` and its rows of `up`.
* diffusers -> kohya: parts whose `lora_A` are identical (what the direction above writes for
  an unsplit module) become one module of that rank again; other parts are stacked (down) and
  placed block-diagonally (up) with alpha = the stacked rank, as formats.md describes. The
  deltas are unchanged in both directions.

Model files for merging (`open_model_part`): the FLUX transformer (BFL single file, or any
source `library.models.flux.loading.FluxSource` reads), CLIP-L and T5-XXL single files, each
as its stored keys plus {LoRA name: weight key}, read one tensor at a time.
"""

from __future__ import annotations

import functools
import logging
import os
import re
from dataclasses import dataclass, field
from typing import Callable, Iterable, Mapping, Sequence

import torch

from library.errors import UserInputError
from library.lora_tools.lorafile import LoraFile, LoraModule

logger = logging.getLogger(__name__)

PREFIX_UNET = "lora_unet"
PREFIX_CLIP_L = "lora_te1"
PREFIX_T5 = "lora_te3"
PREFIXES = (PREFIX_UNET, PREFIX_CLIP_L, PREFIX_T5)
PART_LABELS = {PREFIX_UNET: "FLUX.1 transformer", PREFIX_CLIP_L: "CLIP-L", PREFIX_T5: "T5-XXL"}

# diffusers / PEFT key prefixes per part
DIFFUSERS_PREFIXES = {PREFIX_UNET: "transformer.", PREFIX_CLIP_L: "text_encoder.", PREFIX_T5: "text_encoder_2."}

# the layers networks.lora_flux trains by default (every Linear of the double and single blocks)
_DEFAULT_TARGET = re.compile(
    r"^(double_blocks\.\d+\.(img|txt)_(mod\.lin|attn\.qkv|attn\.proj|mlp\.0|mlp\.2)"
    r"|single_blocks\.\d+\.(linear1|linear2|modulation\.lin))\.weight$"
)


def lora_name(prefix: str, module_path: str) -> str:
    """kohya module name of a module path: `lora_unet` + `double_blocks.0.img_attn.qkv` ->
    `lora_unet_double_blocks_0_img_attn_qkv`."""
    return f"{prefix}_{module_path.replace('.', '_')}"


def part_of(name: str) -> str | None:
    """The prefix (lora_unet / lora_te1 / lora_te3) of a module name, None for others."""
    for p in PREFIXES:
        if name.startswith(p + "_"):
            return p
    return None


def default_targets(bfl_keys: Iterable[str]) -> list[str]:
    """BFL weight keys of the layers networks.lora_flux trains by default, in the given order."""
    return [k for k in bfl_keys if _DEFAULT_TARGET.match(k)]


def fused_part_sizes(bfl_module: str, out_features: int) -> list[int] | None:
    """Output rows of each part of a fused layer (q, k, v [, mlp]); None for other layers.
    Double-block `qkv`: three equal parts; single-block `linear1`: q, k, v of the hidden width
    and the MLP input of 4x the hidden width (FLUX.1's MLP ratio)."""
    if re.fullmatch(r"double_blocks\.\d+\.(img|txt)_attn\.qkv", bfl_module):
        if out_features % 3:
            raise UserInputError(f"{bfl_module}: {out_features} output rows cannot be split into q, k, v")
        return [out_features // 3] * 3
    if re.fullmatch(r"single_blocks\.\d+\.linear1", bfl_module):
        if out_features % 7:
            raise UserInputError(f"{bfl_module}: {out_features} output rows are not 3 x hidden + 4 x hidden (q, k, v, mlp)")
        h = out_features // 7
        return [h, h, h, 4 * h]
    return None


# -- the BFL <-> diffusers module table ------------------------------------------------------
@functools.lru_cache(maxsize=16)
def _module_rules(depth: int, depth_single: int) -> tuple[dict, dict]:
    """({BFL module: (diffusers modules, op)}, {diffusers module: (BFL module, op, part index)})
    for the Linear layers of a transformer with these block counts (names only; part sizes are
    taken from the tensors)."""
    from library.models.flux.key_maps import key_rules

    fwd, back = {}, {}
    for r in key_rules(1, 4, depth, depth_single, guidance=True, biases=False):
        if not r.bfl.endswith(".weight"):
            continue
        bfl = r.bfl[: -len(".weight")]
        diff = tuple(d[: -len(".weight")] for d in r.diffusers)
        fwd[bfl] = (diff, r.op)
        for i, d in enumerate(diff):
            back[d] = (bfl, r.op, i)
    return fwd, back


def _block_counts(paths: Iterable[str], double_rx: str, single_rx: str) -> tuple[int, int]:
    depth = depth_single = 0
    for p in paths:
        m = re.match(double_rx, p)
        if m:
            depth = max(depth, int(m.group(1)) + 1)
        m = re.match(single_rx, p)
        if m:
            depth_single = max(depth_single, int(m.group(1)) + 1)
    return depth, depth_single


# text-encoder module paths: kohya names lose the dots, these put them back
_CLIP_RX = re.compile(r"^text_model_encoder_layers_(\d+)_(self_attn|mlp)_(q_proj|k_proj|v_proj|out_proj|fc1|fc2)$")
_T5_RX = re.compile(r"^encoder_block_(\d+)_layer_(\d+)_(SelfAttention|DenseReluDense)_(q|k|v|o|wi_0|wi_1|wo|wi)$")


def _te_dotted(prefix: str, rest: str) -> str | None:
    if prefix == PREFIX_CLIP_L:
        m = _CLIP_RX.match(rest)
        return f"text_model.encoder.layers.{m.group(1)}.{m.group(2)}.{m.group(3)}" if m else None
    m = _T5_RX.match(rest)
    return f"encoder.block.{m.group(1)}.layer.{m.group(2)}.{m.group(3)}.{m.group(4)}" if m else None


# -- kohya -> diffusers / ai-toolkit -------------------------------------------------------
def fold_scale(scale: float) -> tuple[float, float]:
    """(down factor, up factor) whose product is `scale`: the up factor a power of two <= 1,
    halved while the down factor stays below half of it (both factors of similar size)."""
    down, up = float(scale), 1.0
    while down * 2 < up:
        down *= 2
        up /= 2
    return down, up


def _scaled(t: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1.0:
        return t.contiguous()
    return (t.float() * factor).to(t.dtype)


def _is_block_diagonal(up: torch.Tensor, sizes: Sequence[int], rank: int) -> bool:
    k = len(sizes)
    if rank % k:
        return False
    r = rank // k
    row = 0
    for j, size in enumerate(sizes):
        block = up[row:row + size]
        if block[:, : j * r].count_nonzero() or block[:, (j + 1) * r:].count_nonzero():
            return False
        row += size
    return True


def kohya_to_diffusers(modules: Mapping[str, LoraModule], what: str = "LoRA") -> dict[str, torch.Tensor]:
    """A kohya FLUX LoRA's modules as a diffusers / ai-toolkit state dict (see the module
    docstring). Unknown module names are an error naming the module."""
    unet = [n for n in modules if part_of(n) == PREFIX_UNET]
    paths = [n[len(PREFIX_UNET) + 1:] for n in unet]
    depth, depth_single = _block_counts(paths, r"double_blocks_(\d+)_", r"single_blocks_(\d+)_")
    fwd, _ = _module_rules(depth, depth_single)
    by_kohya = {lora_name(PREFIX_UNET, bfl): bfl for bfl in fwd}
    out: dict[str, torch.Tensor] = {}
    for name, m in modules.items():
        if m.is_conv:
            raise UserInputError(f"{what}: module {name} is a convolution; FLUX LoRAs adapt Linear layers only")
        prefix = part_of(name)
        down, up = m.down, m.up
        s_down, s_up = fold_scale(m.scale)
        if prefix == PREFIX_UNET:
            bfl = by_kohya.get(name)
            if bfl is None:
                raise UserInputError(f"{what}: module {name} is not a layer of the FLUX.1 transformer; cannot convert it")
            diff, op = fwd[bfl]
            base = DIFFUSERS_PREFIXES[PREFIX_UNET]
            if op == "same":
                out[f"{base}{diff[0]}.lora_A.weight"] = _scaled(down, s_down)
                out[f"{base}{diff[0]}.lora_B.weight"] = _scaled(up, s_up)
            elif op == "swap":
                a, b = up.chunk(2, dim=0)
                out[f"{base}{diff[0]}.lora_A.weight"] = _scaled(down, s_down)
                out[f"{base}{diff[0]}.lora_B.weight"] = _scaled(torch.cat([b, a], 0), s_up)
            else:  # "cat": fused q/k/v(/mlp)
                sizes = fused_part_sizes(bfl, m.out_features)
                if len(sizes) != len(diff):
                    raise UserInputError(f"{what}: module {name}: internal part count mismatch")  # pragma: no cover
                ups = torch.split(up, sizes, dim=0)
                if _is_block_diagonal(up, sizes, m.rank):
                    r = m.rank // len(sizes)
                    for j, d in enumerate(diff):
                        out[f"{base}{d}.lora_A.weight"] = _scaled(down[j * r:(j + 1) * r], s_down)
                        out[f"{base}{d}.lora_B.weight"] = _scaled(ups[j][:, j * r:(j + 1) * r], s_up)
                else:
                    shared = _scaled(down, s_down)
                    for j, d in enumerate(diff):
                        out[f"{base}{d}.lora_A.weight"] = shared.clone()
                        out[f"{base}{d}.lora_B.weight"] = _scaled(ups[j], s_up)
        elif prefix in (PREFIX_CLIP_L, PREFIX_T5):
            dotted = _te_dotted(prefix, name[len(prefix) + 1:])
            if dotted is None:
                raise UserInputError(f"{what}: module {name} is not an attention or MLP layer of "
                                     f"{PART_LABELS[prefix]}; cannot convert it")
            base = DIFFUSERS_PREFIXES[prefix] + dotted
            out[f"{base}.lora_A.weight"] = _scaled(down, s_down)
            out[f"{base}.lora_B.weight"] = _scaled(up, s_up)
        else:
            raise UserInputError(f"{what}: module {name} has no FLUX prefix (lora_unet_, lora_te1_, lora_te3_)")
    return out


# -- diffusers / ai-toolkit -> kohya -------------------------------------------------------
_SUFFIXES = {".lora_A.weight": "down", ".lora_B.weight": "up", ".lora.down.weight": "down", ".lora.up.weight": "up",
             ".lora_down.weight": "down", ".lora_up.weight": "up", ".alpha": "alpha"}


def is_diffusers_lora(keys: Iterable[str]) -> bool:
    """True for PEFT/diffusers-style keys (`lora_A` / `lora_B`, or diffusers module paths with a
    `transformer.` prefix)."""
    for k in keys:
        if ".lora_A." in k or ".lora_B." in k or ".lora.down." in k or ".lora.up." in k:
            return True
        if k.startswith(("transformer.", "text_encoder.", "text_encoder_2.")):
            return True
    return False


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix, kind in _SUFFIXES.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], kind
    return None


@dataclass
class _Part:
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None
    alpha: float | None = None

    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.down.shape[0]


def diffusers_to_kohya(state_dict: Mapping[str, torch.Tensor], path: str = "LoRA",
                       what: str = "--models") -> dict[str, LoraModule]:
    """kohya modules of a diffusers / ai-toolkit FLUX LoRA (see the module docstring).

    Keys: `transformer.<diffusers module>` (also without the prefix), `text_encoder.` (CLIP-L),
    `text_encoder_2.` (T5), with `.lora_A.weight` / `.lora_B.weight` (or `.lora.down.weight` /
    `.lora.up.weight`) and an optional `.alpha`; BFL-named transformer modules under
    `diffusion_model.` are read too."""
    groups: dict[tuple[str, str], _Part] = {}
    for key, t in state_dict.items():
        split = _split_key(key)
        if split is None:
            raise UserInputError(f"{what} {path}: tensor '{key}' is not a LoRA weight (expected '.lora_A.weight', "
                                 f"'.lora_B.weight' or '.alpha')")
        module, kind = split
        if module.startswith("text_encoder_2."):
            part, module = PREFIX_T5, module[len("text_encoder_2."):]
        elif module.startswith("text_encoder."):
            part, module = PREFIX_CLIP_L, module[len("text_encoder."):]
        elif module.startswith("transformer."):
            part, module = PREFIX_UNET, module[len("transformer."):]
        elif module.startswith("diffusion_model."):
            part, module = "bfl", module[len("diffusion_model."):]
        else:
            part = PREFIX_UNET
        g = groups.setdefault((part, module), _Part())
        if kind == "alpha":
            g.alpha = float(t.float().reshape(()))
        else:
            if t.dim() != 2:
                raise UserInputError(f"{what} {path}: '{key}' has shape {tuple(t.shape)}; FLUX LoRA factors are matrices")
            setattr(g, kind, t)
    for (part, module), g in groups.items():
        if g.down is None or g.up is None:
            raise UserInputError(f"{what} {path}: module '{module}' lacks its {'lora_A' if g.down is None else 'lora_B'} weight")
        if g.up.shape[1] != g.down.shape[0]:
            raise UserInputError(f"{what} {path}: module '{module}': lora_A has {g.down.shape[0]} rows, lora_B "
                                 f"{g.up.shape[1]} columns")

    unet_paths = [m for (p, m) in groups if p == PREFIX_UNET]
    depth, depth_single = _block_counts(unet_paths, r"transformer_blocks\.(\d+)\.", r"single_transformer_blocks\.(\d+)\.")
    fwd, back = _module_rules(depth, depth_single)
    modules: dict[str, LoraModule] = {}
    fused: dict[str, dict[int, _Part]] = {}
    for (part, module), g in groups.items():
        if part in (PREFIX_CLIP_L, PREFIX_T5):
            name = lora_name(part, module)
            modules[name] = LoraModule(name, g.down, g.up, g.alpha if g.alpha is not None else float(g.down.shape[0]))
            continue
        if part == "bfl":
            name = lora_name(PREFIX_UNET, module)
            modules[name] = LoraModule(name, g.down, g.up, g.alpha if g.alpha is not None else float(g.down.shape[0]))
            continue
        hit = back.get(module)
        if hit is None:
            raise UserInputError(f"{what} {path}: module '{module}' is not a Linear layer of diffusers' FLUX.1 "
                                 f"transformer; not a FLUX LoRA?")
        bfl, op, idx = hit
        name = lora_name(PREFIX_UNET, bfl)
        alpha = g.alpha if g.alpha is not None else float(g.down.shape[0])
        if op == "same":
            modules[name] = LoraModule(name, g.down, g.up, alpha)
        elif op == "swap":
            a, b = g.up.chunk(2, dim=0)
            modules[name] = LoraModule(name, g.down, torch.cat([b, a], 0), alpha)
        else:
            fused.setdefault(bfl, {})[idx] = g
    for bfl, parts in fused.items():
        name = lora_name(PREFIX_UNET, bfl)
        n = len(fwd[bfl][0])
        modules[name] = _fuse(name, bfl, parts, n, path, what)
    return modules


def _fuse(name: str, bfl: str, parts: dict[int, _Part], n: int, path: str, what: str) -> LoraModule:
    present = [parts[i] for i in sorted(parts)]
    first = present[0]
    if len(parts) == n and all(p.down.shape == first.down.shape and torch.equal(p.down, first.down)
                               and p.alpha == first.alpha for p in present):
        # every part shares one down: an unsplit module (what kohya_to_diffusers writes for it)
        alpha = first.alpha if first.alpha is not None else float(first.down.shape[0])
        return LoraModule(name, first.down, torch.cat([p.up for p in present], 0), alpha)
    # part rows: q/k/v have the hidden width; a single block's mlp part 4x that
    widths = {i: p.up.shape[0] for i, p in parts.items()}
    if n == 4:
        hidden = next((w for i, w in widths.items() if i < 3), None) or widths[3] // 4
        sizes = [hidden, hidden, hidden, 4 * hidden]
    else:
        sizes = [next(iter(widths.values()))] * n
    for i, w in widths.items():
        if w != sizes[i]:
            raise UserInputError(f"{what} {path}: the parts of {bfl} have inconsistent widths ({widths})")
    in_features = {p.down.shape[1] for p in present}
    if len(in_features) != 1:
        raise UserInputError(f"{what} {path}: the parts of {bfl} have different input widths {sorted(in_features)}")
    ranks = [parts[i].down.shape[0] if i in parts else 0 for i in range(n)]
    total = sum(ranks)
    dtype = first.up.dtype
    down = torch.cat([p.down for p in present], 0)
    up = torch.zeros(sum(sizes), total, dtype=dtype)
    row = col = 0
    for i in range(n):
        if i in parts:
            p = parts[i]
            up[row:row + sizes[i], col:col + ranks[i]] = _scaled(p.up, p.scale()).to(dtype)
            col += ranks[i]
        row += sizes[i]
    return LoraModule(name, down.contiguous(), up, float(total))


def read_flux_lora(path: str, what: str = "--models") -> tuple[LoraFile, str]:
    """(LoraFile, 'kohya' | 'diffusers'): a kohya FLUX LoRA read on demand, or a diffusers /
    ai-toolkit one converted to kohya modules."""
    from library.io.tensor_files import TensorFile
    from library.lora_tools.lorafile import read_lora

    with TensorFile(path, what) as tf:
        keys = tf.keys()
        if is_diffusers_lora(keys):
            sd = {k: tf.get(k) for k in keys}
            metadata = dict(tf.metadata)
        else:
            sd = None
    if sd is None:
        return read_lora(path, what), "kohya"
    return LoraFile(path, diffusers_to_kohya(sd, path, what), metadata), "diffusers"


def check_flux_family(lora: LoraFile, what: str = "--models") -> None:
    """Refuse LoRAs for other model families (by key names), naming the right tool. A LoRA whose
    every module is a CLIP-L one (`lora_te1_`) fits FLUX as well as SDXL and is accepted."""
    from library.lora_tools.arch import detect_family, require_family

    names = list(lora.modules)
    if names and all(n.startswith(PREFIX_CLIP_L + "_") for n in names):
        return
    where = f"{what} {lora.path}"
    require_family(where, detect_family(names, where), "flux")
    stray = [n for n in names if part_of(n) is None]
    if stray:
        raise UserInputError(f"{what} {lora.path}: module {stray[0]} has no FLUX prefix (lora_unet_, lora_te1_, lora_te3_)")


# -- model files ----------------------------------------------------------------------------
@dataclass
class ModelPart:
    """One model file to merge into: its tensors in output order, read on demand, and the
    weight key of every layer a LoRA module may name."""

    prefix: str  # lora_unet | lora_te1 | lora_te3
    option: str  # the option the path came from
    path: str
    keys: list[str]
    shapes: dict[str, tuple]
    dtypes: dict[str, torch.dtype]
    layers: dict[str, str]  # LoRA module name -> weight key
    fetch: Callable[[str], torch.Tensor]
    closers: list = field(default_factory=list)
    description: str = ""
    variant: str | None = None  # FLUX: 'dev' / 'schnell'
    metadata: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        return PART_LABELS[self.prefix]

    def close(self) -> None:
        for c in self.closers:
            c()
        self.closers = []

    def fp8_keys(self) -> set[str]:
        """Tensors an fp8 --save_precision stores in fp8: the Linear weights (for the transformer,
        every 2-D weight; for the text encoders, the layers a LoRA can adapt)."""
        if self.prefix == PREFIX_UNET:
            return {k for k in self.keys if k.endswith(".weight") and len(self.shapes[k]) == 2}
        return set(self.layers.values())


def _linear_layers(prefix: str, keys: Iterable[tuple[str, str]], shapes: Mapping[str, tuple]) -> dict[str, str]:
    """{LoRA name: stored key} for (module path, stored key) pairs of 2-D weights."""
    out = {}
    for path, stored in keys:
        if stored.endswith(".weight") and len(shapes[stored]) == 2:
            out[lora_name(prefix, path[: -len(".weight")])] = stored
    return out


def open_flux_part(path: str, option: str = "--flux_model") -> ModelPart:
    """The FLUX transformer at `path`. A BFL single file keeps its keys as stored (a
    `model.diffusion_model.` prefix and bundled non-transformer tensors included); other
    sources (diffusers folders/shards/files, BFL shards) are written as one BFL file."""
    from library.io.tensor_files import TensorFile
    from library.models.flux import config as cfgmod
    from library.models.flux.loading import FluxSource

    src = FluxSource(path, option)
    try:
        cfg = src.config()
    except BaseException:
        src.close()
        raise
    variant = "dev" if cfg.guidance_embed else "schnell"
    if src.format == "bfl" and len(src.files) == 1:
        file = src.files[0]
        src.close()
        tf = TensorFile(file, option)
        shapes = {k: tf.shape(k) for k in tf.keys()}
        names = cfgmod.strip_prefix(shapes)
        layers = _linear_layers(PREFIX_UNET, ((n, s) for n, s in names.items()
                                              if n.split(".", 1)[0] in _TRANSFORMER_ROOTS), shapes)
        return ModelPart(PREFIX_UNET, option, path, list(shapes), shapes, {k: tf.dtype(k) for k in shapes}, layers,
                         tf.get, [tf.close], cfg.describe(), variant, dict(tf.metadata))
    shapes = dict(src.shapes)
    if src.extra:
        logger.warning("%s %s: %d tensors that are not part of the transformer are not copied (e.g. '%s')", option,
                       path, len(src.extra), src.extra[0])
    layers = _linear_layers(PREFIX_UNET, ((k, k) for k in shapes), shapes)
    return ModelPart(PREFIX_UNET, option, path, list(shapes), shapes, dict(src.dtypes), layers, src.get, [src.close],
                     cfg.describe() + f", {src.format} layout", variant, dict(src.metadata))


_TRANSFORMER_ROOTS = {"img_in", "time_in", "vector_in", "guidance_in", "txt_in", "double_blocks", "single_blocks",
                      "final_layer"}

_CLIP_PREFIXES = ("", "text_encoders.clip_l.transformer.", "clip_l.transformer.", "transformer.",
                  "cond_stage_model.transformer.")
_T5_PREFIXES = ("", "text_encoders.t5xxl.transformer.", "t5xxl.transformer.", "transformer.")


def open_clip_l_part(path: str, option: str = "--clip_l") -> ModelPart:
    """A CLIP-L single file (Hugging Face names, `text_model.` or the flat transformers-5 layout)."""
    from library.io.tensor_files import TensorFile

    tf = TensorFile(path, option)
    shapes = {k: tf.shape(k) for k in tf.keys()}
    prefix = flat = None
    for p in _CLIP_PREFIXES:
        if f"{p}text_model.embeddings.token_embedding.weight" in shapes:
            prefix, flat = p, False
            break
        if f"{p}embeddings.token_embedding.weight" in shapes:
            prefix, flat = p, True
            break
    if prefix is None:
        tf.close()
        raise UserInputError(f"{option} {path}: not a CLIP text encoder (no 'text_model.embeddings.token_embedding.weight')")
    pairs = []
    for k in shapes:
        if k.startswith(prefix):
            rest = k[len(prefix):]
            pairs.append(("text_model." + rest if flat else rest, k))
    layers = _linear_layers(PREFIX_CLIP_L, [(a, k) for a, k in pairs if a.startswith("text_model.encoder.layers.")], shapes)
    n = len({k.split(".")[3] for k, _ in pairs if k.startswith("text_model.encoder.layers.")})
    return ModelPart(PREFIX_CLIP_L, option, path, list(shapes), shapes, {k: tf.dtype(k) for k in shapes}, layers, tf.get,
                     [tf.close], f"CLIP-L, {n} layers", None, dict(tf.metadata))


def open_t5_part(path: str, option: str = "--t5xxl") -> ModelPart:
    """A T5-XXL encoder single file (Hugging Face T5EncoderModel names)."""
    from library.io.tensor_files import TensorFile

    tf = TensorFile(path, option)
    shapes = {k: tf.shape(k) for k in tf.keys()}
    prefix = next((p for p in _T5_PREFIXES if f"{p}encoder.block.0.layer.0.SelfAttention.q.weight" in shapes), None)
    if prefix is None:
        tf.close()
        raise UserInputError(f"{option} {path}: not a T5 encoder (no 'encoder.block.0.layer.0.SelfAttention.q.weight')")
    pairs = [(k[len(prefix):], k) for k in shapes if k.startswith(prefix)]
    layers = _linear_layers(PREFIX_T5, [(a, k) for a, k in pairs
                                        if a.startswith("encoder.block.") and "relative_attention_bias" not in a], shapes)
    n = len({k.split(".")[2] for k, _ in pairs if k.startswith("encoder.block.")})
    return ModelPart(PREFIX_T5, option, path, list(shapes), shapes, {k: tf.dtype(k) for k in shapes}, layers, tf.get,
                     [tf.close], f"T5 encoder, {n} blocks", None, dict(tf.metadata))


def check_against(lora: LoraFile, parts: Mapping[str, ModelPart], what: str = "--models") -> dict[str, int]:
    """Every module for a given model part must name one of its layers with the layer's shape;
    errors name the file, the module and the weight key. Returns {prefix: modules} of the
    modules for parts that were not given (they are not merged)."""
    unused: dict[str, int] = {}
    for name, m in lora.modules.items():
        prefix = part_of(name)
        part = parts.get(prefix)
        if part is None:
            unused[prefix] = unused.get(prefix, 0) + 1
            continue
        key = part.layers.get(name)
        if key is None:
            raise UserInputError(
                f"{what} {lora.path}: module {name} names no layer of the {part.label} {part.option} {part.path} "
                f"({part.description}); a LoRA for another FLUX variant or model size?"
            )
        if m.is_conv or tuple(part.shapes[key]) != m.layer_shape:
            have = "x".join(str(d) for d in m.layer_shape)
            want = "x".join(str(d) for d in part.shapes[key])
            raise UserInputError(
                f"{what} {lora.path}: module {name} is for a {have} layer, but {key} of {part.option} {part.path} "
                f"is {want}; a LoRA for another model size?"
            )
    return unused


# -- merging into model files ---------------------------------------------------------------
@dataclass
class PartMergeReport:
    part: str
    path: str
    save_to: str
    tensors: int
    merged_layers: int
    modules: int
    seconds: float


def merge_into_part(part: ModelPart, loras: Sequence[tuple[LoraFile, float]], save_to: str, precision: torch.dtype,
                    save_dtype, loading_device="cpu", working_device="cpu", mem_eff: bool = False,
                    metadata: Mapping[str, str] | None = None, show_progress: bool = True) -> PartMergeReport:
    """Write `part` with every (LoRA, ratio) folded in: W' = W + sum(ratio * alpha/r * up @ down).

    Each tensor is converted to `precision` on `loading_device`; a LoRA-adapted weight is summed
    with its deltas in float32 on `working_device` and rounded to `precision`; the file stores
    `save_dtype` (an fp8 dtype: Linear weights in fp8, everything else bf16). Without `mem_eff`
    the whole model is loaded first (as a model in memory), with it each tensor is read,
    merged and written in turn; the output is the same bit for bit."""
    import time

    from library.lora_tools.cli import progress
    from library.models.flux.loading import is_fp8, write_tensors

    t0 = time.perf_counter()
    by_key: dict[str, list[tuple[LoraModule, float]]] = {}
    count = 0
    for lf, ratio in loras:
        for name, m in lf.modules.items():
            if part_of(name) == part.prefix:
                by_key.setdefault(part.layers[name], []).append((m, ratio))
                count += 1
    fp8 = save_dtype is not None and is_fp8(save_dtype)
    fp8_keys = part.fp8_keys() if fp8 else set()

    def out_dtype(key: str, dtype: torch.dtype) -> torch.dtype:
        if not dtype.is_floating_point:
            return dtype
        if fp8:
            return save_dtype if key in fp8_keys else torch.bfloat16
        return save_dtype if save_dtype is not None else dtype

    def load(key: str) -> torch.Tensor:
        t = part.fetch(key)
        if t.is_floating_point():
            t = t.to(device=loading_device, dtype=precision)
        elif str(loading_device) != "cpu":
            t = t.to(loading_device)
        return t

    @torch.no_grad()
    def merged(key: str, t: torch.Tensor) -> torch.Tensor:
        contribs = by_key.get(key)
        if not contribs:
            return t
        w = t.to(device=working_device, dtype=torch.float32)  # t is this merge's own tensor
        for m, ratio in contribs:
            # W += (ratio * scale) * up @ down in place: no (out, in) temporaries
            up = m.up.to(device=working_device, dtype=torch.float32)
            down = m.down.to(device=working_device, dtype=torch.float32)
            w.addmm_(up.reshape(m.out_features, m.rank), down.reshape(m.rank, -1), alpha=ratio * m.scale)
        return w.to(device=t.device, dtype=precision)

    stored_dtype = {k: (precision if part.dtypes[k].is_floating_point else part.dtypes[k]) for k in part.keys}
    items = []
    if mem_eff:
        for k in part.keys:
            items.append((k, tuple(part.shapes[k]), out_dtype(k, stored_dtype[k]), (lambda k=k: merged(k, load(k)))))
        write_tensors(save_to, items, metadata, show_progress, f"merging into {part.label}")
    else:
        state: dict[str, torch.Tensor] = {}
        for k in progress(part.keys, desc=f"loading {part.label}", enabled=show_progress, unit="tensor"):
            state[k] = load(k)
        for k in progress(list(by_key), desc=f"merging into {part.label}", enabled=show_progress, unit="layer"):
            state[k] = merged(k, state[k])
        for k in part.keys:
            items.append((k, tuple(part.shapes[k]), out_dtype(k, stored_dtype[k]), (lambda k=k: state.pop(k))))
        write_tensors(save_to, items, metadata, show_progress, f"saving {part.label}")
        state.clear()
    return PartMergeReport(part.label, part.path, save_to, len(part.keys), len(by_key), count, time.perf_counter() - t0)


# -- LoRA + LoRA ----------------------------------------------------------------------------
def merge_loras(loras: Sequence[LoraFile], ratios: Sequence[float], save_to: str, precision: torch.dtype, save_dtype,
                concat: bool = False, shuffle: bool = False, no_metadata: bool = False, seed: int | None = None):
    """One LoRA from several (library.lora_tools.ops.merge_factors: factors added, or stacked
    along the rank with --concat), with the minimum metadata set (formats.md b.2) and, unless
    `no_metadata`, modelspec.*. Returns (ops.Result, metadata written)."""
    from library.lora_tools import metadata as mdmod
    from library.lora_tools import ops

    gen = torch.Generator().manual_seed(seed if seed is not None else int.from_bytes(os.urandom(4), "little"))
    res = ops.merge_factors(loras, ratios, concat=concat, shuffle=shuffle, generator=gen)
    first = loras[0]
    info = mdmod.arch_info(first.metadata, "flux")
    dim, alpha, _ = mdmod.dims_for(res.modules, conv=False)
    md = mdmod.minimum_network_metadata(info, "networks.lora", dim, alpha, None)
    if not no_metadata:
        md.update(mdmod.lora_modelspec(info, mdmod.file_title(save_to), mdmod.merged_from(lf.title for lf in loras)))
    out = [LoraModule(m.name, m.down.to(precision), m.up.to(precision), m.alpha, m.alpha_int) for m in res.modules.values()]
    written = mdmod.save_lora(out, save_to, save_dtype or precision, md)
    return res, written

