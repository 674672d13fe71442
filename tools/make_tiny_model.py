"""Write a tiny random model in the original single-file layout (for tests and the demo).

    python tools/make_tiny_model.py --arch sd1 --out tiny_sd1.safetensors
    python tools/make_tiny_model.py --arch sd2-v --out tiny_sd2v.safetensors --diffusers_config tiny_sd2v_config
    python tools/make_tiny_model.py --arch sd1 --full_size --save_precision fp16 --out sd15_random.safetensors
    python tools/make_tiny_model.py --arch sdxl --out tiny_sdxl.safetensors --diffusers_config tiny_sdxl_config

The models have the real topology with narrow widths (or the released widths with
--full_size), random weights fixed by --seed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHES = ("sd1", "sd2", "sd2-v", "sdxl")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a tiny random diffusion model in its original file layout.")
    p.add_argument("--arch", required=True, choices=ARCHES, help="model family and variant to imitate")
    p.add_argument("--out", required=True, help="output file (.safetensors or .ckpt)")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    p.add_argument("--full_size", action="store_true", help="use the released model widths instead of tiny ones")
    p.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="float", help="dtype of the stored weights")
    p.add_argument("--diffusers_config", default=None,
                   help="also write a diffusers folder with the true configuration (a reference for diffusers' from_single_file)")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="tokenizer cache (see tools/make_tokenizers.py); puts the tokenizer into --diffusers_config")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging

    setup_logging()
    if os.path.exists(args.out) and not args.force:
        raise UserInputError(f"--out {args.out}: already exists (pass --force to overwrite)")
    if not args.out.lower().endswith((".safetensors", ".ckpt")):
        raise UserInputError(f"--out {args.out}: expected a .safetensors or .ckpt file name")

    from library.models.dtypes import dtype_from_precision

    dtype = None if args.save_precision == "float" else dtype_from_precision(args.save_precision)
    if args.arch == "sdxl":
        _make_sdxl(args, dtype)
        return

    from library.models.sd.saving import save_diffusers, save_ldm_checkpoint
    from library.models.sd.tiny import make_sd_models

    models = make_sd_models(args.arch, seed=args.seed, full_size=args.full_size)
    save_ldm_checkpoint(models, args.out, save_dtype=dtype)
    n_params = sum(p.numel() for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())
    print(f"wrote {args.out}: {args.arch}, {n_params / 1e6:.1f}M parameters, {os.path.getsize(args.out) / 2**20:.1f} MiB")
    if args.diffusers_config:
        tokenizer = None
        if args.tokenizer_cache_dir:
            from library.tokenizers import load_sd_tokenizer

            tokenizer = load_sd_tokenizer(args.arch != "sd1", args.tokenizer_cache_dir)
        save_diffusers(models, args.diffusers_config, save_dtype=dtype, v_parameterization=args.arch == "sd2-v", tokenizer=tokenizer)
        print(f"wrote diffusers reference folder {args.diffusers_config}")


def _make_sdxl(args, dtype) -> None:
    from library.models.sdxl.saving import save_sdxl_checkpoint, save_sdxl_diffusers
    from library.models.sdxl.tiny import make_sdxl_models

    models = make_sdxl_models(seed=args.seed, full_size=args.full_size)
    save_sdxl_checkpoint(models, args.out, save_dtype=dtype)
    n_params = sum(p.numel() for m in (models.unet, models.vae, *models.text_encoders) for p in m.parameters())
    print(f"wrote {args.out}: sdxl, {n_params / 1e6:.1f}M parameters, {os.path.getsize(args.out) / 2**20:.1f} MiB")
    if args.diffusers_config:
        tokenizers = None
        if args.tokenizer_cache_dir:
            from library.tokenizers import load_sdxl_tokenizers

            tokenizers = load_sdxl_tokenizers(args.tokenizer_cache_dir)
        save_sdxl_diffusers(models, args.diffusers_config, save_dtype=dtype, tokenizers=tokenizers)
        print(f"wrote diffusers reference folder {args.diffusers_config}")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
