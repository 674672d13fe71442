"""Extract a LoRA approximating (tuned model - original model) by truncated SVD.

    python networks/extract_lora_from_models.py --model_org base.safetensors \\
        --model_tuned finetuned.safetensors --save_to extracted.safetensors --dim 32 --conv_dim 16

Every layer a LoRA can adapt (the U-Net's attention blocks; with --conv_dim also its ResNet
blocks and samplers; the text encoder's attention and MLP) gets up = U S and down = Vh of its
weight difference, truncated at --dim (3x3 convolutions at --conv_dim), alpha = rank. The text
encoder is extracted only when some layer differs by more than --min_diff (largest absolute
difference). Factor entries are clamped at their --clamp_quantile quantile; 1 turns the clamp
off (then the result is the best approximation of that rank of every difference).

SD1.x/2.x models (v1/v2 read from the files) give `lora_unet_*` / `lora_te_*` modules; SDXL
models (--sdxl) `lora_unet_*` in the LDM naming and `lora_te1_*` / `lora_te2_*`, exactly the
names networks.lora trains.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract a LoRA from the difference of two models by SVD.")
    p.add_argument("--v2", action="store_true", help="the models are SD 2.x (checked against the files)")
    p.add_argument("--v_parameterization", action="store_true",
                   help="note v-prediction in the metadata (default: yes for SD 2.x models)")
    p.add_argument("--sdxl", action="store_true", help="the models are SDXL")
    p.add_argument("--load_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype to load the models in (default: as stored)")
    p.add_argument("--save_precision", type=str, default=None, choices=["float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default: float)")
    p.add_argument("--model_org", type=str, required=True, help="the original (base) model")
    p.add_argument("--model_tuned", type=str, required=True,
                   help="the fine-tuned model; the LoRA approximates tuned minus original")
    p.add_argument("--save_to", type=str, required=True, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--conv_dim", type=int, default=None,
                   help="rank for 3x3 convolutions; without it the ResNet blocks are not extracted")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp factor entries to this quantile of their magnitudes (default 0.99; 1 = no clamp)")
    p.add_argument("--min_diff", type=float, default=0.01,
                   help="the text encoder is extracted only if a weight differs by more than this (default 0.01)")
    p.add_argument("--no_metadata", action="store_true", help="no modelspec.* metadata (the ss_* set is still written)")
    p.add_argument("--load_original_model_to", type=str, default=None,
                   help="device to load the original model to (SDXL; default cpu)")
    p.add_argument("--load_tuned_model_to", type=str, default=None,
                   help="device to load the tuned model to (SDXL; default cpu)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import logging

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_inputs_exist, check_output, file_size, summary

    setup_logging()
    logger = logging.getLogger("extract_lora")
    inputs = [("--model_org", args.model_org), ("--model_tuned", args.model_tuned)]
    check_output(args.save_to, inputs)
    check_inputs_exist(inputs)
    if args.clamp_quantile is not None and not 0 < args.clamp_quantile <= 1:
        raise UserInputError(f"--clamp_quantile {args.clamp_quantile}: expected a value in (0, 1] (1 = no clamping)")
    if args.dim < 1 or (args.conv_dim is not None and args.conv_dim < 1):
        raise UserInputError("--dim / --conv_dim must be at least 1")
    if args.sdxl and args.v2:
        raise UserInputError("--sdxl and --v2 contradict each other")
    if not args.sdxl and (args.load_original_model_to or args.load_tuned_model_to):
        logger.warning("--load_original_model_to / --load_tuned_model_to apply to SDXL only; ignored")
    if os.path.samefile(args.model_org, args.model_tuned):
        raise UserInputError("--model_org and --model_tuned are the same file: the difference is zero")
    clock = Stopwatch()

    import torch

    from library.lora_tools import metadata as mdmod
    from library.lora_tools import ops
    from library.lora_tools import sd as sdtools
    from library.models.dtypes import dtype_from_precision
    from library.models.sd.loading import load_sd_models

    load_dtype = dtype_from_precision(args.load_precision, "--load_precision")
    save_dtype = dtype_from_precision(args.save_precision or "float")
    if args.sdxl:
        org, tuned = _load_sdxl(args, load_dtype)
        family, v2, version = "sdxl", False, "SDXL"
    else:
        _refuse_sdxl_without_flag(args)
        v2_flag = True if args.v2 else None
        org = load_sd_models(args.model_org, v2=v2_flag, dtype=load_dtype)
        tuned = load_sd_models(args.model_tuned, v2=v2_flag, dtype=load_dtype)
        if org.v2 != tuned.v2:
            raise UserInputError(f"--model_org is {'SD2.x' if org.v2 else 'SD1.x'} but --model_tuned is "
                                 f"{'SD2.x' if tuned.v2 else 'SD1.x'}")
        family, v2 = "sd", org.v2
        version = "SD2.x" if v2 else "SD1.x"
    pairs = sdtools.weight_pairs(org, tuned, conv=args.conv_dim is not None)

    te_pairs = [p for p in pairs if p.part == "text_encoder"]
    largest = 0.0
    with torch.no_grad():
        for p in te_pairs:
            a, b = p.load()
            largest = max(largest, float((b.float() - a.float()).abs().max()))
            if largest > args.min_diff:
                break
    use_te = largest > args.min_diff
    if not use_te:
        logger.info("the text encoders differ by at most %.3g (<= --min_diff %g): extracting the U-Net only",
                    largest, args.min_diff)
        pairs = [p for p in pairs if p.part != "text_encoder"]
    res = ops.extract(pairs, args.dim, args.conv_dim, args.clamp_quantile, args.device, total=len(pairs))

    v_param = args.v_parameterization or v2
    info = mdmod.ArchInfo(family, v2, v_param, mdmod.base_model_version(family, v2, v_param))
    net_args = {"conv_dim": str(args.conv_dim), "conv_alpha": str(float(args.conv_dim))} if args.conv_dim else {}
    md = mdmod.minimum_network_metadata(info, "networks.lora", str(args.dim), str(float(args.dim)), None)
    md["ss_network_args"] = __import__("json").dumps(net_args)
    if not args.no_metadata:
        md.update(mdmod.lora_modelspec(info, mdmod.file_title(args.save_to)))
    mdmod.save_lora(res.modules, args.save_to, save_dtype, md)

    fros = [r.retention.fro_fraction for r in res.reports]
    te_count = sum(1 for p in pairs if p.part == "text_encoder")
    summary([
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} modules "
        f"({te_count} text encoder, {len(res.modules) - te_count} U-Net) at rank {args.dim}"
        + (f", conv rank {args.conv_dim}" if args.conv_dim else ", no 3x3 convolutions"),
        f"  {version}; text encoder {'included' if use_te else f'skipped (max difference {largest:.3g})'}; "
        f"clamp quantile {args.clamp_quantile:g}; SVDs {res.seconds():.1f} s, total {clock.seconds():.1f} s",
        (f"  Frobenius norm of the differences kept: mean {sum(fros) / len(fros):.2%}, lowest {min(fros):.2%}" if fros else
         "  no layers extracted"),
    ])
    return {"result": res, "use_text_encoder": use_te}


def _refuse_sdxl_without_flag(args):
    from library.errors import UserInputError
    from library.io.checkpoint_io import read_checkpoint_shapes
    from library.models.sdxl.config import detect_family

    for option, path in (("--model_org", args.model_org), ("--model_tuned", args.model_tuned)):
        shapes = None if os.path.isdir(path) else read_checkpoint_shapes(path)
        if shapes is not None and detect_family(shapes) == "sdxl":
            raise UserInputError(f"{option} {path}: an SDXL checkpoint; add --sdxl")


def _load_sdxl(args, dtype):
    from library.errors import UserInputError
    from library.models.sdxl.loading import load_sdxl_models

    loaded = []
    for option, path, device in (("--model_org", args.model_org, args.load_original_model_to),
                                 ("--model_tuned", args.model_tuned, args.load_tuned_model_to)):
        if not os.path.isdir(path):
            from library.io.checkpoint_io import read_checkpoint_shapes
            from library.models.sdxl.config import detect_family

            shapes = read_checkpoint_shapes(path)
            if shapes is not None and detect_family(shapes) != "sdxl":
                raise UserInputError(f"{option} {path}: not an SDXL checkpoint ({detect_family(shapes)}); drop --sdxl")
        models = load_sdxl_models(path, dtype=dtype)
        if device:
            models.unet.to(device)
            for te in models.text_encoders:
                te.to(device)
        loaded.append(models)
    return loaded


if __name__ == "__main__":
    run_main(main)
