"""Merge FLUX.1 LoRAs into the model files (transformer, CLIP-L, T5-XXL), or into one LoRA.

    # into the transformer (lora_unet_*), CLIP-L (lora_te1_*) and T5-XXL (lora_te3_*) files
    python networks/flux_merge_lora.py --flux_model flux1-dev.safetensors --clip_l clip_l.safetensors \\
        --t5xxl t5xxl_fp16.safetensors --models style.safetensors detail.safetensors --ratios 1 0.6 \\
        --save_to flux-merged.safetensors --clip_l_save_to clip_l-merged.safetensors \\
        --t5xxl_save_to t5xxl-merged.safetensors --save_precision bf16 --mem_eff_load_save
    # LoRAs into one LoRA (factors added; equal ranks), or stacked along the rank (--concat: exact sum)
    python networks/flux_merge_lora.py --models a.safetensors b.safetensors --ratios 1 0.5 --concat \\
        --save_to ab.safetensors

Every LoRA is checked against the model files before anything is loaded: a module naming no
layer, or a layer of another shape, stops the run with the module and weight named; an
SD/SDXL LoRA is named as such. LoRA modules for a model file that is not given (e.g. CLIP-L
modules without --clip_l) are reported and left out. Diffusers / ai-toolkit LoRAs
(`lora_A`/`lora_B` keys) are converted on reading (--diffusers says so; they are also
recognised without it). The arithmetic: library/lora_tools/flux.py.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Merge FLUX.1 LoRAs into the FLUX / CLIP-L / T5-XXL files, or into one LoRA.")
    p.add_argument("--save_precision", type=str, default=None,
                   help="dtype of the saved files: float, fp16, bf16, fp8 (float8_e4m3fn), fp8_e5m2 (fp8: Linear "
                        "weights in fp8, the rest bf16); default: --precision")
    p.add_argument("--precision", type=str, default="float",
                   help="dtype the weights are held and rounded to while merging: float, fp16, bf16 (default float; "
                        "each W + delta is summed in float32)")
    p.add_argument("--flux_model", type=str, default=None,
                   help="FLUX.1 transformer to merge lora_unet modules into (BFL .safetensors or a diffusers "
                        "folder/shard); without it and without --clip_l/--t5xxl the LoRAs are merged into one LoRA")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L .safetensors to merge lora_te1 modules into")
    p.add_argument("--t5xxl", type=str, default=None, help="T5-XXL .safetensors to merge lora_te3 modules into")
    p.add_argument("--mem_eff_load_save", action="store_true",
                   help="read, merge and write one tensor at a time instead of loading whole models (same result, "
                        "memory of one tensor)")
    p.add_argument("--loading_device", type=str, default="cpu", help="device the model tensors are loaded to (default cpu)")
    p.add_argument("--working_device", type=str, default="cpu", help="device the merge arithmetic runs on (default cpu)")
    p.add_argument("--save_to", type=str, default=None,
                   help="output file: the merged FLUX.1 model, or the merged LoRA (.safetensors, .ckpt, .pt)")
    p.add_argument("--clip_l_save_to", type=str, default=None, help="output file of the merged CLIP-L")
    p.add_argument("--t5xxl_save_to", type=str, default=None, help="output file of the merged T5-XXL")
    p.add_argument("--models", type=str, nargs="*", help="LoRA files")
    p.add_argument("--ratios", type=float, nargs="*", help="multiplier per LoRA (default 1.0 each)")
    p.add_argument("--no_metadata", action="store_true",
                   help="no modelspec.* metadata (a merged LoRA still gets the minimum ss_* set)")
    p.add_argument("--concat", action="store_true",
                   help="LoRA merge: stack the LoRAs along the rank (exact sum of the deltas, rank = sum of ranks) "
                        "instead of adding factors of equal rank")
    p.add_argument("--shuffle", action="store_true",
                   help="LoRA merge: randomly permute the rank components of the result (the deltas do not change)")
    p.add_argument("--diffusers", action="store_true",
                   help="the LoRAs are in the diffusers / ai-toolkit layout (lora_A / lora_B); recognised anyway")
    return p


def _device(text: str, option: str):
    import torch

    from library.errors import UserInputError

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError):
        raise UserInputError(f"{option} {text}: not a device name (cpu, cuda, cuda:1, mps ...)") from None
    if dev.type == "cuda" and (not torch.cuda.is_available() or (dev.index or 0) >= torch.cuda.device_count()):
        raise UserInputError(f"{option} {text}: no CUDA device {'of that index ' if torch.cuda.is_available() else ''}"
                             "is available")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise UserInputError(f"{option} {text}: no MPS device is available")
    return dev


def _check_paths(args, logger):
    """Every output decided and checked against every input before any model is read."""
    from library.errors import UserInputError
    from library.lora_tools.cli import LORA_EXTENSIONS, check_inputs_exist, check_output, same_file

    into_models = bool(args.flux_model or args.clip_l or args.t5xxl)
    inputs = [(o, p) for o, p in (("--flux_model", args.flux_model), ("--clip_l", args.clip_l), ("--t5xxl", args.t5xxl))
              if p] + [("--models", m) for m in args.models]
    outputs = []
    if into_models:
        for model_opt, save_opt in (("--flux_model", "--save_to"), ("--clip_l", "--clip_l_save_to"),
                                    ("--t5xxl", "--t5xxl_save_to")):
            model, save = getattr(args, model_opt[2:]), getattr(args, save_opt[2:])
            if model and not save:
                raise UserInputError(f"{model_opt} is given but {save_opt} is not: name the merged file to write")
            if save and not model:
                if save_opt == "--save_to":
                    logger.warning("--save_to is ignored: without --flux_model only the text encoders are merged")
                    continue
                raise UserInputError(f"{save_opt} is given without {model_opt}")
            if model:
                check_output(save, inputs, save_opt, extensions=(".safetensors",))
                outputs.append((save_opt, save))
        if args.concat or args.shuffle:
            logger.warning("--concat / --shuffle only apply when merging LoRAs together; ignored")
    else:
        for opt in ("--clip_l_save_to", "--t5xxl_save_to"):
            if getattr(args, opt[2:]):
                raise UserInputError(f"{opt} is given without {opt[:-len('_save_to')]}")
        check_output(args.save_to, inputs, "--save_to", extensions=LORA_EXTENSIONS)
        outputs.append(("--save_to", args.save_to))
    for i, (oa, a) in enumerate(outputs):
        for ob, b in outputs[i + 1:]:
            if same_file(a, b):
                raise UserInputError(f"{oa} and {ob} are the same file {a}")
    check_inputs_exist(inputs)
    return into_models


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import logging

    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, file_size, ratios_for, summary

    setup_logging()
    logger = logging.getLogger("flux_merge_lora")
    ratios = ratios_for(args.models, args.ratios)
    into_models = _check_paths(args, logger)

    from library.models.flux.loading import parse_dtype

    precision = parse_dtype(args.precision or "float", "--precision", allow_fp8=False)
    save_dtype = parse_dtype(args.save_precision, "--save_precision", allow_fp8=True, any_fp8=True)
    if not into_models and save_dtype is not None and save_dtype.itemsize == 1:
        from library.errors import UserInputError

        raise UserInputError(f"--save_precision {args.save_precision}: fp8 applies to model files; a LoRA is saved in "
                             "float, fp16 or bf16")
    loading_device = _device(args.loading_device, "--loading_device")
    working_device = _device(args.working_device, "--working_device")
    clock = Stopwatch()

    from library.lora_tools import flux as fl

    loras, parts = [], {}
    try:
        for path in args.models:
            lf, layout = fl.read_flux_lora(path, "--models")
            loras.append(lf)
            if layout == "diffusers" and not args.diffusers:
                logger.info("%s: diffusers / ai-toolkit layout, converted to kohya modules", path)
            elif layout == "kohya" and args.diffusers:
                logger.warning("--diffusers: %s is a kohya-format LoRA; read as such", path)
            fl.check_flux_family(lf)
        if not into_models:
            res, written = fl.merge_loras(loras, ratios, args.save_to, precision, save_dtype, args.concat, args.shuffle,
                                          args.no_metadata)
            mode = "stacked along the rank (--concat)" if args.concat else "added factor-wise"
            lines = [
                f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype or precision).replace('torch.', '')}): "
                f"{len(res.modules)} modules, {mode}, rank {written.get('ss_network_dim', '?')}, alpha "
                f"{written.get('ss_network_alpha', '?')}" + (" (rank components shuffled)" if args.shuffle else ""),
                "  from " + ", ".join(f"{lf.path} x{r:g}" for lf, r in zip(loras, ratios)) + f"; {clock.seconds():.1f} s",
            ]
            if not args.concat and len(loras) > 1:
                lines.append("  note: added factors give up_i @ down_j cross terms; --concat merges the deltas exactly")
            summary(lines)
            return {"result": res, "metadata": written}

        for opt, opener, save in (("--flux_model", fl.open_flux_part, args.save_to),
                                  ("--clip_l", fl.open_clip_l_part, args.clip_l_save_to),
                                  ("--t5xxl", fl.open_t5_part, args.t5xxl_save_to)):
            path = getattr(args, opt[2:])
            if path:
                part = opener(path, opt)
                parts[part.prefix] = part
        unused: dict[str, int] = {}
        for lf in loras:
            for prefix, n in fl.check_against(lf, parts).items():
                unused[prefix] = unused.get(prefix, 0) + n
        for prefix, n in unused.items():
            opt = {"lora_unet": "--flux_model", "lora_te1": "--clip_l", "lora_te3": "--t5xxl"}[prefix]
            logger.warning("%d %s modules (%s_*) are not merged: no %s given", n, fl.PART_LABELS[prefix], prefix, opt)
        pairs = list(zip(loras, ratios))
        reports = []
        for prefix, save in (("lora_unet", args.save_to), ("lora_te1", args.clip_l_save_to),
                             ("lora_te3", args.t5xxl_save_to)):
            part = parts.get(prefix)
            if part is None:
                continue
            md = None
            if prefix == "lora_unet" and not args.no_metadata:
                md = _flux_modelspec(part, save, loras)
            reports.append(fl.merge_into_part(part, pairs, save, precision, save_dtype, loading_device, working_device,
                                              args.mem_eff_load_save, md))
    finally:
        for lf in loras:
            lf.close()
        for part in parts.values():
            part.close()
    dtype_name = str(save_dtype or precision).replace("torch.", "")
    lines = []
    for r in reports:
        lines.append(f"wrote {r.save_to} ({file_size(r.save_to)}, {dtype_name}): {r.part} {r.path} with {r.modules} "
                     f"LoRA modules merged into {r.merged_layers} layers ({r.tensors} tensors, {r.seconds:.1f} s)")
    lines.append("  LoRAs: " + ", ".join(f"{lf.path} x{r:g}" for lf, r in zip(loras, ratios))
                 + f"; {'streamed tensor by tensor' if args.mem_eff_load_save else 'whole models in memory'}; "
                 f"total {clock.seconds():.1f} s")
    summary(lines)
    return {"reports": reports}


def _flux_modelspec(part, save_to, loras) -> dict:
    import time

    from library.io import modelspec
    from library.lora_tools import metadata as mdmod

    title = part.metadata.get("modelspec.title") or mdmod.file_title(part.path)
    return modelspec.build_metadata(flux=part.variant, lora=False, timestamp=time.time(), title=mdmod.file_title(save_to),
                                    merged_from=mdmod.merged_from([title] + [lf.title for lf in loras]))


if __name__ == "__main__":
    run_main(main)
