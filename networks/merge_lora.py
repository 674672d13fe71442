"""Merge LoRAs into an SD1.x/2.x checkpoint, or merge LoRAs into one LoRA.

    # into a checkpoint: W += ratio * alpha/r * up @ down for every module (conv LoRAs too)
    python networks/merge_lora.py --sd_model model.safetensors --models a.safetensors b.safetensors \\
        --ratios 0.8 0.5 --save_to merged_model.safetensors --save_precision fp16
    # LoRAs of the same rank into one (factors added), or any ranks with --concat (exact sum)
    python networks/merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --save_to ab.safetensors
    python networks/merge_lora.py --models a.safetensors b.safetensors --concat --save_to ab.safetensors

Every LoRA is checked against the model before anything is merged: a module that names no
layer of the model, or a layer of another shape, stops the run with a message saying what the
LoRA is for (an SDXL LoRA given here is recognised by its key names). The merge itself is
networks.lora's (float32 arithmetic; the result takes the model's --precision). The version
(v1/v2) is read from the checkpoint; --v2 is checked against it.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge LoRAs into an SD1.x/2.x checkpoint, or into one LoRA.")
    p.add_argument("--v2", action="store_true", help="the model is SD 2.x (checked against the file, which is what counts)")
    p.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved tensors (default: --precision)")
    p.add_argument("--precision", type=str, default="float", choices=["float", "fp16", "bf16"],
                   help="dtype the model (or merged LoRA) is held in while merging; default float")
    p.add_argument("--sd_model", type=str, default=None,
                   help="checkpoint (.safetensors/.ckpt or diffusers folder) to merge into; without it the LoRAs are "
                        "merged into one LoRA")
    p.add_argument("--save_to", type=str, default=None, help="output file (.safetensors or .ckpt)")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files")
    p.add_argument("--ratios", type=float, nargs="*", help="multiplier per LoRA (default 1.0 each)")
    p.add_argument("--no_metadata", action="store_true",
                   help="no modelspec.* metadata (a merged LoRA still gets the minimum ss_* set)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA merge: stack the LoRAs along the rank (output rank = sum of ranks; exact sum of the "
                        "deltas) instead of adding factors of equal rank")
    p.add_argument("--shuffle", action="store_true",
                   help="LoRA merge: randomly permute the rank components of the result (the deltas do not change)")
    return p


def _merge_into_model(args, loras, ratios, logger):
    from library.io.safetensors_io import is_safetensors_path, read_metadata
    from library.lora_tools import metadata as mdmod
    from library.lora_tools import sd as sdtools
    from library.models.dtypes import dtype_from_precision
    from library.models.sd.loading import load_sd_models
    from library.models.sd.saving import save_ldm_checkpoint

    merge_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.save_precision) or merge_dtype
    models = load_sd_models(args.sd_model, v2=True if args.v2 else None, dtype=merge_dtype)
    layers = sdtools.all_layers(models)
    for lf in loras:
        sdtools.check_against(lf, layers, models)
    merged, _direct = sdtools.merge_into(models, list(zip(loras, ratios)))

    md = None
    if not args.no_metadata:
        src_md = read_metadata(args.sd_model) if is_safetensors_path(args.sd_model) and os.path.isfile(args.sd_model) else {}
        pred = src_md.get("modelspec.prediction_type")
        v_param = pred == "v" if pred else models.v2  # unknown: SD2.x files are mostly v-prediction
        sources = [src_md.get("modelspec.title") or mdmod.file_title(args.sd_model)] + [lf.title for lf in loras]
        md = mdmod.checkpoint_modelspec(models.v2, v_param, mdmod.file_title(args.save_to), mdmod.merged_from(sources))
    save_ldm_checkpoint(models, args.save_to, save_dtype, md)
    return merged, "SD2.x" if models.v2 else "SD1.x", save_dtype


def _merge_loras(args, loras, ratios, family):
    import torch

    from library.lora_tools import arch, ops
    from library.lora_tools import metadata as mdmod
    from library.lora_tools.lorafile import LoraModule
    from library.models.dtypes import dtype_from_precision

    merge_dtype = dtype_from_precision(args.precision, "--precision")
    save_dtype = dtype_from_precision(args.save_precision) or merge_dtype
    res = ops.merge_factors(loras, ratios, concat=args.concat, shuffle=args.shuffle, generator=torch.Generator().manual_seed(
        int.from_bytes(os.urandom(4), "little")))
    first = loras[0]
    info = mdmod.arch_info(first.metadata, family, arch.sd_version_hint(first.modules) if family == "sd" else None)
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

    from library.log import setup_logging
    from library.lora_tools.cli import (LORA_EXTENSIONS, Stopwatch, check_inputs_exist, check_output, file_size,
                                        ratios_for, summary)

    setup_logging()
    logger = logging.getLogger("merge_lora")
    ratios = ratios_for(args.models, args.ratios)
    inputs = ([("--sd_model", args.sd_model)] if args.sd_model else []) + [("--models", m) for m in args.models]
    check_output(args.save_to, inputs, extensions=(".safetensors", ".ckpt") if args.sd_model else LORA_EXTENSIONS)
    check_inputs_exist(inputs)
    if args.sd_model and (args.concat or args.shuffle):
        logger.warning("--concat / --shuffle only apply when merging LoRAs together; ignored with --sd_model")
    clock = Stopwatch()

    from library.lora_tools import arch
    from library.lora_tools.lorafile import read_lora

    loras = [read_lora(m, "--models") for m in args.models]
    try:
        families = [lf.family for lf in loras]
        for lf, fam in zip(loras, families):
            arch.require_family(lf.path, fam, "sd")
        if args.sd_model:
            merged, version, save_dtype = _merge_into_model(args, loras, ratios, logger)
            summary([
                f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {version} "
                f"checkpoint {args.sd_model} with {len(loras)} LoRA(s) merged ({merged} modules) in {clock.seconds():.1f} s",
                "  " + ", ".join(f"{lf.path} x{r:g}" for lf, r in zip(loras, ratios)),
            ])
            return {"modules": merged}
        res, written, save_dtype = _merge_loras(args, loras, ratios, "sd")
    finally:
        for lf in loras:
            lf.close()
    mode = "concatenated" if args.concat else "added factor-wise"
    lines = [
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} modules, "
        f"{mode}, rank {written.get('ss_network_dim', '?')}, alpha {written.get('ss_network_alpha', '?')}"
        + (" (rank components shuffled)" if args.shuffle else ""),
        "  from " + ", ".join(f"{lf.path} x{r:g}" for lf, r in zip(loras, ratios)) + f"; {clock.seconds():.1f} s",
    ]
    if not args.concat and len(loras) > 1:
        lines.append("  note: added factors give up_i @ down_j cross terms; --concat (or svd_merge_lora.py) merges the "
                     "deltas exactly")
    summary(lines)
    return {"result": res, "metadata": written}


if __name__ == "__main__":
    run_main(main)
