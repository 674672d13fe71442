"""Extract a FLUX.1 LoRA approximating (tuned transformer - original transformer) by truncated SVD.

    python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned my-finetune.safetensors \\
        --save_to extracted.safetensors --dim 16 --mem_eff_safe_open
    python networks/flux_extract_lora.py --model_org flux1-dev.safetensors --model_tuned my-finetune.safetensors \\
        --save_to extracted.safetensors --dim 64 --device cuda --save_precision bf16

Every layer networks.lora_flux trains by default (all Linear layers of the double blocks: img/txt
mod.lin, attn.qkv, attn.proj, mlp.0, mlp.2; and of the single blocks: linear1, linear2,
modulation.lin) gets up = U S, down = Vh of its weight difference truncated at --dim, alpha =
rank, under the kohya names `lora_unet_double_blocks_N_img_attn_qkv` ... Factor entries are
clamped at their --clamp_quantile quantile (1 turns the clamp off; then each module is the
best approximation of its difference at that rank). The models may be BFL files (bf16, fp16,
fp8, float32) or diffusers folders; compact models with fewer blocks work.

Without --mem_eff_safe_open both models are read into memory first; with it each pair of
weights is read when its SVD runs (memory: two layers). The result is the same.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Extract a FLUX.1 LoRA from the difference of two transformers by SVD.")
    p.add_argument("--save_precision", type=str, default=None, choices=[None, "float", "fp16", "bf16"],
                   help="dtype of the saved LoRA (default float)")
    p.add_argument("--model_org", type=str, required=True, help="the original FLUX.1 transformer")
    p.add_argument("--model_tuned", type=str, required=True,
                   help="the fine-tuned FLUX.1 transformer; the LoRA approximates tuned minus original")
    p.add_argument("--mem_eff_safe_open", action="store_true",
                   help="read each pair of weights when it is needed instead of both models up front (low memory)")
    p.add_argument("--save_to", type=str, required=True, help="output file (.safetensors, .ckpt, .pt)")
    p.add_argument("--dim", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--device", type=str, default=None, help="device for the SVDs, e.g. cuda (default: cpu)")
    p.add_argument("--clamp_quantile", type=float, default=0.99,
                   help="clamp factor entries to this quantile of their magnitudes (default 0.99; 1 = no clamp)")
    p.add_argument("--no_metadata", action="store_true", help="no modelspec.* metadata (the ss_* set is still written)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)

    import logging

    from library.errors import UserInputError
    from library.log import setup_logging
    from library.lora_tools.cli import Stopwatch, check_inputs_exist, check_output, file_size, summary

    setup_logging()
    logger = logging.getLogger("flux_extract_lora")
    inputs = [("--model_org", args.model_org), ("--model_tuned", args.model_tuned)]
    check_output(args.save_to, inputs)
    check_inputs_exist(inputs)
    if args.clamp_quantile is not None and not 0 < args.clamp_quantile <= 1:
        raise UserInputError(f"--clamp_quantile {args.clamp_quantile}: expected a value in (0, 1] (1 = no clamping)")
    if args.dim < 1:
        raise UserInputError("--dim must be at least 1")
    if os.path.samefile(args.model_org, args.model_tuned):
        raise UserInputError("--model_org and --model_tuned are the same file: the difference is zero")
    clock = Stopwatch()

    import torch

    from library.lora_tools import flux as fl
    from library.lora_tools import metadata as mdmod
    from library.lora_tools import ops
    from library.models.dtypes import dtype_from_precision
    from library.models.flux.loading import FluxSource

    if args.device is not None:
        dev = torch.device(args.device)
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise UserInputError(f"--device {args.device}: no CUDA device is available")
    save_dtype = dtype_from_precision(args.save_precision or "float")
    org = FluxSource(args.model_org, "--model_org")
    tuned = FluxSource(args.model_tuned, "--model_tuned")
    try:
        cfg_org, cfg_tuned = org.config(), tuned.config()
        keys = fl.default_targets(org.keys())
        missing = [k for k in keys if k not in tuned.shapes]
        if missing or len(fl.default_targets(tuned.keys())) != len(keys):
            raise UserInputError(f"--model_org is {cfg_org.describe()} but --model_tuned is {cfg_tuned.describe()}: "
                                 "the models must have the same layers")
        for k in keys:
            if tuple(org.shapes[k]) != tuple(tuned.shapes[k]):
                raise UserInputError(f"--model_org and --model_tuned differ at {k}: {tuple(org.shapes[k])} vs "
                                     f"{tuple(tuned.shapes[k])}")
        if not keys:
            raise UserInputError(f"--model_org {args.model_org}: no double or single blocks to extract")
        if args.mem_eff_safe_open:
            def loader(k):
                return lambda: (org.get(k), tuned.get(k))
        else:
            from library.lora_tools.cli import progress

            loaded_org = {k: org.get(k) for k in progress(keys, desc="reading --model_org", unit="tensor")}
            loaded_tuned = {k: tuned.get(k) for k in progress(keys, desc="reading --model_tuned", unit="tensor")}

            def loader(k):
                return lambda: (loaded_org.pop(k), loaded_tuned.pop(k))
        pairs = (ops.WeightPair(fl.lora_name(fl.PREFIX_UNET, k[: -len(".weight")]), "linear", tuple(org.shapes[k]),
                                loader(k)) for k in keys)
        res = ops.extract(pairs, args.dim, None, args.clamp_quantile, args.device, total=len(keys), svd="top")
    finally:
        org.close()
        tuned.close()

    variant = "dev" if cfg_org.guidance_embed else "schnell"
    info = mdmod.ArchInfo("flux", False, False, mdmod.base_model_version("flux", False, False), flux_variant=variant)
    md = mdmod.minimum_network_metadata(info, "networks.lora_flux", str(args.dim), str(float(args.dim)), None)
    md["ss_network_args"] = "{}"
    if not args.no_metadata:
        md.update(mdmod.lora_modelspec(info, mdmod.file_title(args.save_to)))
    mdmod.save_lora(res.modules, args.save_to, save_dtype, md)

    fros = [r.retention.fro_fraction for r in res.reports]
    if cfg_org.guidance_embed != cfg_tuned.guidance_embed:
        logger.warning("--model_org is %s, --model_tuned %s", cfg_org.variant, cfg_tuned.variant)
    summary([
        f"wrote {args.save_to} ({file_size(args.save_to)}, {str(save_dtype).replace('torch.', '')}): {len(res.modules)} "
        f"modules at rank {args.dim} from {cfg_org.describe()}",
        f"  clamp quantile {args.clamp_quantile:g}; {'per-layer reads' if args.mem_eff_safe_open else 'models read first'}; "
        f"SVDs {res.seconds():.1f} s, total {clock.seconds():.1f} s",
        (f"  Frobenius norm of the differences kept: mean {sum(fros) / len(fros):.2%}, lowest {min(fros):.2%}" if fros else
         "  no layers extracted"),
    ])
    return {"result": res}


if __name__ == "__main__":
    run_main(main)
