"""Merge LoRAs (and OFT networks) into an SDXL checkpoint, or merge SDXL LoRAs into one LoRA.

    # into a checkpoint: W += ratio * lbw(block) * alpha/r * up @ down (OFT: W <- R^T W)
    python networks/sdxl_merge_lora.py --sd_model sdxl.safetensors --models a.safetensors oft.safetensors \\
        --ratios 0.8 1.0 --lbws "[1,1,1,1,1,0,0,0,0,0,0,0]" "" --save_to merged.safetensors --save_precision fp16
    # LoRAs into one LoRA (factors added; --concat stacks the ranks: exact sum of the deltas)
    python networks/sdxl_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors

LoRA Block Weight (`--lbws`, one list per model, 12 or 20 values: see docs/lora-tools.md)
multiplies each module's ratio by its block's weight; BASE is both text encoders. The
arithmetic is library/lora_tools' (shared with merge_lora.py): every LoRA is checked
against the model before anything is merged, and a LoRA for another model (SD1.x/2.x by
its key names, FLUX, SD3) is refused with what it is for. OFT files (`oft_unet_*`) are
merged through networks.oft (the rotation of every adapted layer, at ratio x block weight).
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge LoRAs / OFT into an SDXL checkpoint, or SDXL LoRAs into one LoRA.")
    p.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved tensors (default: --precision)")
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype the model (or merged LoRA) is held in while merging; default float")
    p.add_argument("--sd_model", type=str, default=None,
                   help="SDXL checkpoint (.safetensors/.ckpt or diffusers folder) to merge into; without it the LoRAs are "
                        "merged into one LoRA")
    p.add_argument("--save_to", type=str, default=None, help="output file (.safetensors or .ckpt)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA (or, with --sd_model, OFT) files")
    p.add_argument("--ratios", type=float, nargs="*", help="multiplier per model (default 1.0 each)")
    p.add_argument("--lbws", type=str, nargs="*",
                   help="LoRA block weights per model: 12 or 20 values, '[1,0,0.5,...]' or '1,0,0.5,...'; '' for none")
    p.add_argument("--no_metadata", action="store_true",
                   help="no modelspec.* metadata (a merged LoRA still gets the minimum ss_* set)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA merge: stack the LoRAs along the rank (output rank = sum of ranks; exact sum of the deltas)")
    p.add_argument("--shuffle", action="store_true",
                   help="LoRA merge: randomly permute the rank components of the result (the deltas do not change)")
    return p


# ---------------------------------------------------------------------------------- inputs
class OftFile:
    """An OFT weights file (networks.oft): read whole (they are small), named by its path."""

    family = "sdxl"

    def __init__(self, path: str):
        from library.networks.weights_io import load_weights_file

        self.path = path
        self.weights = load_weights_file(path)
        self.names = sorted({k.split(".", 1)[0] for k in self.weights})

    @property
    def title(self) -> str:
        from library.lora_tools import metadata as mdmod

        return mdmod.file_title(self.path)

    def close(self) -> None:
        pass


def is_oft_file(path: str) -> bool:
    from library.io.safetensors_io import is_safetensors_path, read_header

    if is_safetensors_path(path):
        keys = read_header(path).shapes()
    else:
        from library.networks.weights_io import load_weights_file

        keys = load_weights_file(path)
    return any(k.startswith("oft_") or ".oft_blocks" in k for k in keys)


def read_inputs(paths):
    from library.lora_tools import arch
    from library.lora_tools.lorafile import read_lora

    files = []
    try:
        for p in paths:
            if is_oft_file(p):
                files.append(OftFile(p))
            else:
                lf = read_lora(p, "--models")
                arch.require_family(lf.path, lf.family, "sdxl")
                files.append(lf)
    except BaseException:
        for f in files:
            f.close()
        raise
    return files


def lbw_tables(args, files) -> list:
    """One {block: weight} table (or None) per model."""
    from library.errors import UserInputError
    from library.lora_tools.arch import lbw_weights, parse_lbw

    lbws = list(args.lbws or [])
    if len(lbws) > len(files):
        raise UserInputError(f"--lbws: {len(lbws)} lists for {len(files)} --models")
    tables = []
    for i, f in enumerate(files):
        text = lbws[i] if i < len(lbws) else ""
        tables.append(lbw_weights(parse_lbw(text), "sdxl", f.path) if text and text.strip() else None)
    return tables


def weight_fn(ratios, tables):
    """(model index, module name) -> ratio x LBW block weight (OFT names use their U-Net block)."""
    from library.lora_tools.arch import lbw_block

    def weight(i: int, name: str) -> float:
        w = ratios[i]
        if tables[i]:
            block = lbw_block("lora_unet_" + name[len("oft_unet_"):] if name.startswith("oft_unet_") else name, "sdxl")
            if block is not None:
                w *= tables[i].get(block, 1.0)
        return w

    return weight


# ---------------------------------------------------------------------------------- merging
def _merge_oft(models, oft: OftFile, weight, index: int, device=None) -> int:
    import torch

    import networks.oft as oft_net
    from library.errors import UserInputError
    from library.lora_tools.cli import progress
    from library.networks.network import split_by_module

    with torch.no_grad():
        net, weights = oft_net.create_network_from_weights(1.0, None, None, models.text_encoders, models.unet,
                                                           weights_sd=oft.weights, for_inference=True)
        own = {m.lora_name for m in net.all_loras}
        missing = [n for n in oft.names if n not in own]
        if missing:
            raise UserInputError(f"--models {oft.path}: {len(missing)} OFT modules name no layer of the SDXL model "
                                 f"(e.g. {missing[0]}); an OFT file for another model?")
        per_module = split_by_module(weights)
        for m in progress(net.all_loras, desc=f"merging {oft.title}"):
            m.load_state_dict(per_module[m.lora_name], strict=False)
            m.merge_into_layer(weight(index, m.lora_name), None, device)
    return len(net.all_loras)


def _merge_into_model(args, files, ratios, tables):
    from library.io.safetensors_io import is_safetensors_path, read_metadata
    from library.lora_tools import metadata as mdmod
    from library.lora_tools import sd as sdtools
    from library.models.dtypes import dtype_from_precision
    from library.models.sdxl.loading import load_sdxl_models
    from library.models.sdxl.saving import save_sdxl_checkpoint

    merge_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.save_precision) or merge_dtype
    models = load_sdxl_models(args.sd_model, dtype=merge_dtype)
    layers = sdtools.all_layers(models)
    for f in files:
        if not isinstance(f, OftFile):
            sdtools.check_against(f, layers, models)
    weight = weight_fn(ratios, tables)
    merged = 0
    for i, f in enumerate(files):  # in the order given: an OFT rotation acts on what the LoRAs before it made
        if isinstance(f, OftFile):
            merged += _merge_oft(models, f, weight, i)
        else:
            n, _direct = sdtools.merge_into(models, [(f, ratios[i])], weights_for=lambda _i, name, i=i: weight(i, name))
            merged += n
    md = None
    if not args.no_metadata:
        src_md = read_metadata(args.sd_model) if is_safetensors_path(args.sd_model) and os.path.isfile(args.sd_model) else {}
        v_param = src_md.get("modelspec.prediction_type") == "v"
        sources = [src_md.get("modelspec.title") or mdmod.file_title(args.sd_model)] + [f.title for f in files]
        md = mdmod.checkpoint_modelspec(False, v_param, mdmod.file_title(args.save_to), mdmod.merged_from(sources),
                                        sdxl=True)
    save_sdxl_checkpoint(models, args.save_to, save_dtype, md)
    return merged, save_dtype


def _merge_loras(args, loras, ratios, tables):
    import torch

    from library.lora_tools import metadata as mdmod
    from library.lora_tools import ops
    from library.lora_tools.lorafile import LoraModule
    from library.models.dtypes import dtype_from_precision

    merge_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.save_precision) or merge_dtype
    weights_for = weight_fn(ratios, tables) if any(tables) else None
    res = ops.merge_factors(loras, ratios, concat=args.concat, shuffle=args.shuffle, weights_for=weights_for,
                            generator=torch.Generator().manual_seed(int.from_bytes(os.urandom(4), "little")))
    info = mdmod.arch_info(loras[0].metadata, "sdxl")
    dim, alpha, conv = mdmod.dims_for(res.modules)
    md = mdmod.minimum_network_metadata(info, "networks.lora", dim, alpha, conv)
    if not args.no_metadata:
        md.update(mdmod.lora_modelspec(info, mdmod.file_title(args.save_to), mdmod.merged_from(lf.title for lf in loras)))
    out = [LoraModule(m.name, m.down.to(merge_dtype), m.up.to(merge_dtype), m.alpha, m.alpha_int) for m in res.modules.values()]
    written = mdmod.save_lora(out, args.save_to, save_dtype, md)
    return res, written, save_dtype


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import logging

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import (LORA_EXTENSIONS, Stopwatch, check_inputs_exist, check_output, file_size,
                                        ratios_for, summary)

    setup_logging()
    logger = logging.getLogger("sdxl_merge_lora")
    if not args.models:
        raise UserInputError("--models: give at least one LoRA file")
    ratios = ratios_for(args.models, args.ratios)
    inputs = ([("--sd_model", args.sd_model)] if args.sd_model else []) + [("--models", m) for m in args.models]
    check_output(args.save_to, inputs, extensions=(".safetensors", ".ckpt") if args.sd_model else LORA_EXTENSIONS)
    check_inputs_exist(inputs)
    if args.sd_model and (args.concat or args.shuffle):
        logger.warning("--concat / --shuffle only apply when merging LoRAs together; ignored with --sd_model")
    if args.sd_model and not os.path.isdir(args.sd_model):
        from library.io.safetensors_io import is_safetensors_path, read_header
        from library.models.sdxl.config import detect_family

        if is_safetensors_path(args.sd_model):
            family = detect_family(read_header(args.sd_model).shapes())
            if family not in ("sdxl", "unknown"):
                label = {"sd": "SD1.x/2.x (use networks/merge_lora.py)", "flux": "FLUX.1 (use networks/flux_merge_lora.py)",
                         "sd3": "SD3"}[family]
                raise UserInputError(f"--sd_model {args.sd_model}: not an SDXL checkpoint but {label}")
    clock = Stopwatch()

    files = read_inputs(args.models)
    try:
        tables = lbw_tables(args, files)
        if args.sd_model:
            merged, save_dtype = _merge_into_model(args, files, ratios, tables)
            summary([
                f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): SDXL "
                f"checkpoint {args.sd_model} with {len(files)} network(s) merged ({merged} modules) in {clock.seconds():.1f} s",
                "  " + ", ".join(f"{f.path} x{r:g}" + (" (LBW)" if t else "") for f, r, t in zip(files, ratios, tables)),
            ])
            return {"modules": merged}
        ofts = [f.path for f in files if isinstance(f, OftFile)]
        if ofts:
            raise UserInputError(f"--models {ofts[0]}: an OFT file can only be merged into a checkpoint (--sd_model)")
        res, written, save_dtype = _merge_loras(args, files, ratios, tables)
    finally:
        for f in files:
            f.close()
    mode = "concatenated" if args.concat else "added factor-wise"
    lines = [
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} modules, "
        f"{mode}, rank {written.get('ss_network_dim', '?')}, alpha {written.get('ss_network_alpha', '?')}"
        + (" (rank components shuffled)" if args.shuffle else ""),
        "  from " + ", ".join(f"{lf.path} x{r:g}" for lf, r in zip(files, ratios)) + f"; {clock.seconds():.1f} s",
    ]
    if not args.concat and len(files) > 1:
        lines.append("  note: added factors give up_i @ down_j cross terms; --concat (or svd_merge_lora.py) merges the "
                     "deltas exactly")
    summary(lines)
    return {"result": res, "metadata": written}


if __name__ == "__main__":
    run_main(main)
