"""Load and save the FLUX.1 transformer and its 16-channel autoencoder.

Transformer sources (formats.md §c.3), all seen through one BFL-named `FluxSource`:
- a BFL single file (`flux1-dev.safetensors`; a leading `model.diffusion_model.` is
  stripped), stored in float32, bf16, fp16 or fp8 (e4m3fn / e5m2);
- a diffusers-format transformer: a folder with `diffusion_pytorch_model*.safetensors`
  (+ the shard index), a pipeline folder with `transformer/`, a path naming one shard
  (`...-00001-of-00003.safetensors`: all shards are read), or a diffusers-named single
  file. Tensors are renamed / fused to BFL names as they are read (key_maps.py).

The model is built without weights (accelerate's init_empty_weights) and each tensor is
read once, privately (library/io/tensor_files.TensorFile), and converted to the wanted dtype
at once. `fp8_base=True` keeps every Linear weight in float8_e4m3fn (converted per tensor
while loading, so no bf16 copy of the model ever exists) and computes in `dtype`
(library/training/model_options.store_weights_in_fp8).

    model = load_flux_transformer(path, dtype=torch.bfloat16, fp8_base=False)
    save_flux_transformer(model, "out.safetensors", dtype=None, metadata=None)   # BFL, atomic
    ae = load_ae(path, dtype)            # diffusers AutoencoderKL, FLUX config
    save_ae(ae, "ae.safetensors")
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
from typing import Callable, Iterable, Optional

import torch

from library.errors import UserInputError
from library.models.flux import config as cfgmod
from library.models.flux import key_maps

logger = logging.getLogger(__name__)

SHARD_RX = re.compile(r"^(?P<stem>.*)-(?P<index>\d{5})-of-(?P<total>\d{5})\.safetensors$")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
DIFFUSERS_INDEX = "diffusion_pytorch_model.safetensors.index.json"

_FP8 = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
             if hasattr(torch, n))


def is_fp8(dtype) -> bool:
    return dtype in _FP8


# --------------------------------------------------------------------------------------
# dtype names (--dtype, --flux_dtype, --save_precision ...)

_DTYPE_NAMES = {
    "float": "float32", "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
    "fp8": "float8_e4m3fn", "fp8_e4m3fn": "float8_e4m3fn", "float8_e4m3fn": "float8_e4m3fn", "e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2", "float8_e5m2": "float8_e5m2", "e5m2": "float8_e5m2",
}


def parse_dtype(name, option: str, default=None, allow_fp8: bool = True, any_fp8: bool = False):
    """A dtype option value -> torch dtype (None -> `default`). fp8 names mean 'stored in fp8'
    (e4m3fn only, unless `any_fp8`: saving may use e5m2 too)."""
    if name is None or (isinstance(name, str) and name.strip() == ""):
        return default
    if isinstance(name, torch.dtype):
        return name
    key = str(name).strip().lower()
    if key not in _DTYPE_NAMES:
        choices = "float32, float16 (fp16), bfloat16 (bf16)" + (", fp8 (float8_e4m3fn)" if allow_fp8 else "")
        raise UserInputError(f"{option} {name}: unknown dtype; expected one of {choices}")
    dtype = getattr(torch, _DTYPE_NAMES[key], None)
    if dtype is None:
        raise UserInputError(f"{option} {name}: this PyTorch build has no {_DTYPE_NAMES[key]}")
    if is_fp8(dtype):
        if not allow_fp8:
            raise UserInputError(f"{option} {name}: fp8 is not supported here; use float32, fp16 or bf16")
        if dtype != torch.float8_e4m3fn and not any_fp8:
            raise UserInputError(f"{option} {name}: only fp8 e4m3fn storage is supported (fp8 / float8_e4m3fn)")
    return dtype


# --------------------------------------------------------------------------------------
# where the tensors are


def _shard_files(path: str) -> list[str]:
    """All shards of a `name-0000i-of-0000n.safetensors` path; a missing one is an error."""
    folder, name = os.path.split(path)
    m = SHARD_RX.match(name)
    total = int(m.group("total"))
    files = [os.path.join(folder, f"{m.group('stem')}-{i:05d}-of-{total:05d}.safetensors") for i in range(1, total + 1)]
    missing = [f for f in files if not os.path.exists(f)]
    if missing:
        raise UserInputError(f"{path}: shard {os.path.basename(missing[0])} of {total} is missing")
    return files


def resolve_transformer_files(path: str, what: str = "--ckpt_path") -> list[str]:
    """The .safetensors file(s) holding a FLUX transformer given as a file, shard or folder."""
    if not path:
        raise UserInputError(f"{what} is required (a FLUX.1 .safetensors file or a diffusers folder)")
    if not os.path.exists(path):
        raise UserInputError(f"{what} {path}: file or folder not found")
    if os.path.isdir(path):
        folder = os.path.join(path, "transformer") if os.path.isdir(os.path.join(path, "transformer")) else path
        index = os.path.join(folder, DIFFUSERS_INDEX)
        if os.path.exists(index):
            try:
                with open(index, encoding="utf-8") as f:
                    weight_map = json.load(f)["weight_map"]
            except (OSError, ValueError, KeyError) as e:
                raise UserInputError(f"{what} {index}: unreadable shard index ({e})") from None
            files = [os.path.join(folder, n) for n in dict.fromkeys(weight_map.values())]
            missing = [f for f in files if not os.path.exists(f)]
            if missing:
                raise UserInputError(f"{what} {path}: shard {os.path.basename(missing[0])} listed in {DIFFUSERS_INDEX} is missing")
            return files
        shards = sorted(glob.glob(os.path.join(glob.escape(folder), "diffusion_pytorch_model-*-of-*.safetensors")))
        if shards:
            return _shard_files(shards[0])
        single = os.path.join(folder, DIFFUSERS_WEIGHTS)
        if os.path.exists(single):
            return [single]
        found = sorted(glob.glob(os.path.join(glob.escape(folder), "*.safetensors")))
        if len(found) == 1:
            return found
        raise UserInputError(
            f"{what} {path}: no FLUX transformer weights found (expected {DIFFUSERS_WEIGHTS}, its shards with "
            f"{DIFFUSERS_INDEX}, or a transformer/ subfolder)"
        )
    if SHARD_RX.match(os.path.basename(path)):
        return _shard_files(path)
    if not path.lower().endswith((".safetensors", ".sft")):
        raise UserInputError(f"{what} {path}: expected a .safetensors (or .sft) file; pickled .ckpt/.pt FLUX files are not supported")
    return [path]


class FluxSource:
    """A FLUX transformer's tensors under BFL names, read on demand (stored dtype, CPU).

    `format` is 'bfl' or 'diffusers'; `shapes` / `dtypes` map BFL keys; `extra` lists stored
    keys that are not part of the transformer (ignored on load).
    """

    def __init__(self, path: str, what: str = "--ckpt_path"):
        from library.io.tensor_files import TensorFile

        self.path = path
        self.what = what
        self.files = resolve_transformer_files(path, what)
        self._tf: dict[str, TensorFile] = {}
        opened = []
        try:
            for f in self.files:
                tf = TensorFile(f, what)
                opened.append(tf)
                for k in tf.keys():
                    if k in self._tf:
                        raise UserInputError(f"{what} {path}: tensor '{k}' is stored in two shards")
                    self._tf[k] = tf
        except BaseException:
            for tf in opened:
                tf.close()
            raise
        self._opened = opened
        self.metadata = dict(opened[0].metadata) if opened else {}
        stored_shapes = {k: tf.shape(k) for k, tf in self._tf.items()}
        self.extra: list[str] = []
        if key_maps.is_diffusers_layout(stored_shapes):
            self.format = "diffusers"
            prefix = ""
            if key_maps.DIFFUSERS_MARKER not in stored_shapes:  # e.g. 'transformer.' or 'model.' prefixes
                marker = next(k for k in stored_shapes if k.endswith("." + key_maps.DIFFUSERS_MARKER))
                prefix = marker[: -len(key_maps.DIFFUSERS_MARKER)]
            view = {k[len(prefix):]: k for k in stored_shapes if k.startswith(prefix)}
            dshapes = {k: stored_shapes[v] for k, v in view.items()}
            rules = key_maps.diffusers_rules(dshapes, path)
            key_maps.check_complete(rules, dshapes, path)
            self._rules = {r.bfl: r for r in rules}
            self._dview = view
            self.shapes = {r.bfl: key_maps.bfl_shape(r, dshapes) for r in rules}
            self.dtypes = {r.bfl: self._tf[view[r.diffusers[0]]].dtype(view[r.diffusers[0]]) for r in rules}
            used = {view[d] for r in rules for d in r.diffusers}
            self.extra = [k for k in stored_shapes if k not in used]
        else:
            self.format = "bfl"
            self._rules = None
            names = cfgmod.strip_prefix(stored_shapes)
            if not cfgmod.looks_like_flux(names):
                hint = ""
                if any(k.startswith(("encoder.down.", "decoder.up.")) for k in names):
                    hint = " (this looks like an autoencoder: pass it with --ae)"
                elif any(k.startswith(("text_model.", "encoder.block.", "shared.")) for k in names):
                    hint = " (this looks like a text encoder: pass it with --clip_l / --t5xxl)"
                elif any(k.startswith(("model.diffusion_model.input_blocks", "joint_blocks.")) for k in stored_shapes):
                    hint = " (this is an SD/SDXL/SD3 checkpoint, not FLUX.1)"
                raise UserInputError(f"{what} {path}: not a FLUX.1 transformer (no img_in / double_blocks keys){hint}")
            # keep only transformer keys; a full checkpoint may bundle the AE or text encoders
            self._names = {k: v for k, v in names.items() if k.split(".", 1)[0] in _TRANSFORMER_ROOTS}
            self.extra = [v for k, v in names.items() if k not in self._names]
            self.shapes = {k: stored_shapes[v] for k, v in self._names.items()}
            self.dtypes = {k: self._tf[v].dtype(v) for k, v in self._names.items()}

    def keys(self) -> list[str]:
        return list(self.shapes)

    def get(self, key: str) -> torch.Tensor:
        if self._rules is None:
            stored = self._names[key]
            return self._tf[stored].get(stored)
        rule = self._rules[key]
        parts = [self._tf[self._dview[d]].get(self._dview[d]) for d in rule.diffusers]
        return key_maps.to_bfl_tensor(rule, parts)

    def config(self) -> cfgmod.FluxConfig:
        return cfgmod.infer_flux_config(self.shapes, self.path)

    def close(self) -> None:
        for tf in self._opened:
            tf.close()
        self._opened = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


_TRANSFORMER_ROOTS = {"img_in", "time_in", "vector_in", "guidance_in", "txt_in", "double_blocks", "single_blocks",
                      "final_layer"}


def analyze_checkpoint(path: str, what: str = "--ckpt_path") -> cfgmod.FluxConfig:
    """dev/schnell, block counts and widths of a FLUX transformer from its header(s) only."""
    with FluxSource(path, what) as src:
        return src.config()


# --------------------------------------------------------------------------------------
# building models from tensors


def build_empty(factory: Callable):
    from accelerate import init_empty_weights

    with init_empty_weights():
        return factory()


def assign_state_dict(model: torch.nn.Module, sd: dict, what: str, path: str) -> None:
    expected = model.state_dict(keep_vars=True)
    for k, v in sd.items():
        if k in expected and tuple(expected[k].shape) != tuple(v.shape):
            raise UserInputError(f"{path}: {what} tensor '{k}' has shape {tuple(v.shape)}, expected {tuple(expected[k].shape)}")
    result = model.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise UserInputError(
            f"{path}: {what} weights do not fit the inferred architecture "
            f"(missing {result.missing_keys[:3]}, unexpected {result.unexpected_keys[:3]})"
        )


def _target_dtype(key: str, shape: tuple, stored, dtype, fp8_base: bool):
    if fp8_base and key.endswith(".weight") and len(shape) == 2:
        return torch.float8_e4m3fn
    if dtype is None:
        return torch.bfloat16 if is_fp8(stored) else stored
    return dtype


def load_flux_transformer(path: str, dtype=None, device="cpu", fp8_base: bool = False,
                          what: str = "--ckpt_path", show_progress: bool = False):
    """A `Flux` model from a BFL file or diffusers transformer (see the module docstring).

    `dtype`: compute dtype (None: the stored dtype; fp8-stored tensors become bf16 unless
    `fp8_base`). With `fp8_base` Linear weights stay / become float8_e4m3fn and are upcast
    per call. The model is returned in eval mode with `source_path` / `source_format` set.
    """
    from library.models.flux.model import Flux

    dtype = parse_dtype(dtype, what, allow_fp8=True) if dtype is not None else None
    if dtype is not None and is_fp8(dtype):  # "--flux_dtype fp8" means fp8 storage, bf16 compute
        fp8_base, dtype = True, torch.bfloat16
    if fp8_base and not hasattr(torch, "float8_e4m3fn"):
        raise UserInputError("--fp8_base needs a PyTorch build with float8_e4m3fn")
    with FluxSource(path, what) as src:
        config = src.config()
        model = build_empty(lambda: Flux(config))
        names = list(model.state_dict().keys())
        missing = [k for k in names if k not in src.shapes]
        if missing:
            raise UserInputError(f"{what} {path}: FLUX.1 transformer is missing {len(missing)} tensors, e.g. '{missing[0]}'")
        keys: Iterable[str] = names
        if show_progress:
            from tqdm import tqdm

            keys = tqdm(names, desc="loading FLUX.1", unit="tensor", leave=False)
        sd = {}
        for k in keys:
            t = src.get(k)
            sd[k] = t.to(_target_dtype(k, tuple(t.shape), t.dtype, dtype, fp8_base))
        assign_state_dict(model, sd, "FLUX.1 transformer", path)
        del sd
        if src.extra:
            logger.info("%s: %d tensors that are not part of the transformer were ignored (e.g. '%s')",
                        path, len(src.extra), src.extra[0])
        fmt = src.format
    compute = dtype or (torch.bfloat16 if fp8_base else model.dtype)
    if fp8_base:
        from library.training.model_options import store_weights_in_fp8

        store_weights_in_fp8(model, compute)
    model.source_path = path
    model.source_format = fmt
    if device is not None and str(device) != "cpu":
        model.to(device)
    logger.info("loaded %s from %s (%s layout, %s%s)", config.describe(), path, fmt,
                str(compute).replace("torch.", ""), ", Linear weights in fp8" if fp8_base else "")
    return model.eval()


# --------------------------------------------------------------------------------------
# saving


def save_dtype_for(key: str, shape: tuple, tensor_dtype, save_dtype):
    """fp8 saving stores the Linear weights (2-D) in fp8 and everything else in bf16."""
    if save_dtype is None:
        return tensor_dtype
    if is_fp8(save_dtype):
        return save_dtype if (key.endswith(".weight") and len(shape) == 2) else torch.bfloat16
    return save_dtype


def write_tensors(path: str, items: list[tuple[str, tuple, torch.dtype, Callable[[], torch.Tensor]]],
                  metadata: Optional[dict] = None, show_progress: bool = False, desc: str = "saving") -> None:
    """Stream (name, shape, dtype, fetch) items into a .safetensors file; atomic."""
    from library.io.tensor_files import StreamingSafetensorsWriter

    specs = [(name, dtype, shape) for name, shape, dtype, _ in items]
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    it = items
    if show_progress:
        from tqdm import tqdm

        it = tqdm(items, desc=desc, unit="tensor", leave=False)
    with StreamingSafetensorsWriter(path, specs, meta or None) as w:
        for name, shape, dtype, fetch in it:
            w.write(name, fetch().to(dtype))


def save_flux_transformer(model_or_state_dict, path: str, dtype=None, metadata: Optional[dict] = None,
                          show_progress: bool = False) -> None:
    """Write the transformer as a BFL single file (keys without prefix), atomically.

    `dtype` None keeps each tensor's dtype; an fp8 dtype stores Linear weights in fp8 and
    the rest (biases, norm scales) in bf16.
    """
    if not str(path).lower().endswith(".safetensors"):
        raise UserInputError(f"{path}: FLUX.1 models are saved as .safetensors")
    sd = model_or_state_dict if isinstance(model_or_state_dict, dict) else model_or_state_dict.state_dict()
    items = []
    for k, v in sd.items():
        shape = tuple(v.shape)
        items.append((k, shape, save_dtype_for(k, shape, v.dtype, dtype), (lambda v=v: v.detach())))
    write_tensors(path, items, metadata, show_progress, "saving FLUX.1")
    logger.info("saved FLUX.1 transformer (%d tensors) to %s", len(items), path)


def convert_source_to_bfl(src: FluxSource, path: str, dtype=None, metadata: Optional[dict] = None,
                          show_progress: bool = True) -> int:
    """Stream any FluxSource into a BFL single file (one tensor in memory at a time)."""
    config = src.config()  # validates counts / gaps
    from library.models.flux.model import Flux

    order = list(build_empty(lambda: Flux(config)).state_dict().keys())
    missing = [k for k in order if k not in src.shapes]
    if missing:
        raise UserInputError(f"{src.path}: FLUX.1 transformer is missing {len(missing)} tensors, e.g. '{missing[0]}'")
    items = []
    for k in order:
        shape = tuple(src.shapes[k])
        items.append((k, shape, save_dtype_for(k, shape, src.dtypes[k], dtype), (lambda k=k: src.get(k))))
    write_tensors(path, items, metadata, show_progress, "converting")
    return len(items)


# --------------------------------------------------------------------------------------
# autoencoder


def ae_config(shapes: dict, path: str) -> dict:
    from library.models.sd.config import infer_vae_config

    if "encoder.conv_in.weight" not in shapes:
        raise UserInputError(f"--ae {path}: not a FLUX autoencoder (no 'encoder.conv_in.weight'; BFL ae.safetensors layout expected)")
    cfg = infer_vae_config(shapes, f"--ae {path}", prefix="")
    cfg.update(
        use_quant_conv="quant_conv.weight" in shapes,
        use_post_quant_conv="post_quant_conv.weight" in shapes,
        scaling_factor=cfgmod.AE_SCALE,
        shift_factor=cfgmod.AE_SHIFT,
        sample_size=1024,
        force_upcast=True,
        mid_block_add_attention=True,
    )
    return cfg


def load_ae(path: str, dtype=None, device="cpu", what: str = "--ae"):
    """diffusers AutoencoderKL (16 latent channels, scale 0.3611, shift 0.1159) from a BFL
    `ae.safetensors` (formats.md §c.4) or a diffusers VAE folder."""
    from diffusers import AutoencoderKL

    dtype = parse_dtype(dtype, what, allow_fp8=False) if dtype is not None else None
    if not path:
        raise UserInputError(f"{what} is required (the FLUX.1 autoencoder, ae.safetensors)")
    if not os.path.exists(path):
        raise UserInputError(f"{what} {path}: file or folder not found")
    if os.path.isdir(path):
        sub = "vae" if os.path.isdir(os.path.join(path, "vae")) else None
        if not os.path.exists(os.path.join(path, sub or "", "config.json")):
            raise UserInputError(f"{what} {path}: folder has no diffusers VAE (config.json) inside")
        ae = AutoencoderKL.from_pretrained(path, subfolder=sub, torch_dtype=dtype)
    else:
        from library.io.tensor_files import TensorFile
        from library.models.sd.key_maps import map_diffusers_keys_to_ldm, to_diffusers_tensor, vae_module_pairs

        with TensorFile(path, what) as tf:
            shapes = {k: tf.shape(k) for k in tf.keys()}
            prefix = next((p for p in ("vae.", "first_stage_model.") if f"{p}encoder.conv_in.weight" in shapes), "")
            if prefix:
                shapes = {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
            if any(k.startswith("encoder.down_blocks.") for k in shapes):
                raise UserInputError(f"{what} {path}: diffusers-named VAE file; pass its diffusers folder instead")
            cfg = ae_config(shapes, path)
            ae = build_empty(lambda: AutoencoderKL(**cfg))
            mapping = map_diffusers_keys_to_ldm(ae.state_dict().keys(), vae_module_pairs(cfg), "")
            missing = [m.ldm_key for m in mapping.values() if m.ldm_key not in shapes]
            if missing:
                raise UserInputError(f"{what} {path}: autoencoder is missing {len(missing)} tensors, e.g. '{missing[0]}'")
            sd = {}
            for k, m in mapping.items():
                t = to_diffusers_tensor(tf.get(prefix + m.ldm_key), m)
                target = dtype or (torch.float32 if is_fp8(t.dtype) else t.dtype)
                sd[k] = t.to(target) if t.is_floating_point() else t
            assign_state_dict(ae, sd, "autoencoder", path)
    if ae.config.latent_channels != cfgmod.AE_LATENT_CHANNELS:
        raise UserInputError(f"{what} {path}: autoencoder has {ae.config.latent_channels} latent channels; "
                             f"FLUX.1 uses {cfgmod.AE_LATENT_CHANNELS} (is this an SD/SDXL VAE?)")
    if device is not None and str(device) != "cpu":
        ae.to(device)
    logger.info("loaded FLUX.1 autoencoder from %s (widths %s)", path, list(ae.config.block_out_channels))
    return ae.eval()


def ae_state_dict(ae) -> dict:
    """The AE's tensors in the BFL ae.safetensors layout."""
    from library.models.sd.key_maps import map_diffusers_keys_to_ldm, to_ldm_tensor, vae_module_pairs

    sd = ae.state_dict()
    mapping = map_diffusers_keys_to_ldm(sd.keys(), vae_module_pairs(dict(ae.config)), "")
    return {m.ldm_key: to_ldm_tensor(sd[k], m) for k, m in mapping.items()}


def save_ae(ae, path: str, dtype=None, metadata: Optional[dict] = None) -> None:
    from library.io.safetensors_io import save_state_dict

    sd = ae_state_dict(ae)
    if dtype is not None:
        sd = {k: (v.to(dtype) if v.is_floating_point() else v) for k, v in sd.items()}
    save_state_dict(sd, path, metadata)
