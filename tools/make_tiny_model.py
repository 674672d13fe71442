"""Write a tiny random model in the original single-file layout (for tests and the demo).

    python tools/make_tiny_model.py --arch sd1 --out tiny_sd1.safetensors
    python tools/make_tiny_model.py --arch sd2-v --out tiny_sd2v.safetensors --diffusers_config tiny_sd2v_config
    python tools/make_tiny_model.py --arch sd1 --full_size --save_precision fp16 --out sd15_random.safetensors
    python tools/make_tiny_model.py --arch sdxl --out tiny_sdxl.safetensors --diffusers_config tiny_sdxl_config
    python tools/make_tiny_model.py --arch sdxl --full_size --width_divisor 2 --out sdxl_half.safetensors  # benchmarks
    python tools/make_tiny_model.py --arch flux-dev --out tiny_flux_dev/      # four files in a folder
    python tools/make_tiny_model.py --arch flux-schnell --full_size --depth 2 --depth_single 4 --save_precision bf16 --out flux_compact/

The models have the real topology with narrow widths (or the released widths with
--full_size), random weights fixed by --seed. FLUX (--arch flux-dev / flux-schnell) writes
four files into the --out folder: flux1-dev.safetensors (or flux1-schnell), ae.safetensors,
clip_l.safetensors and t5xxl.safetensors, as the released models are distributed.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

ARCHES = ("sd1", "sd2", "sd2-v", "sdxl", "flux-dev", "flux-schnell")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Write a tiny random diffusion model in its original file layout.")
    p.add_argument("--arch", required=True, choices=ARCHES, help="model family and variant to imitate")
    p.add_argument("--out", required=True, help="output file (.safetensors or .ckpt); a folder for FLUX")
    p.add_argument("--seed", type=int, default=0, help="random seed for the weights (default 0)")
    p.add_argument("--full_size", action="store_true", help="use the released model widths instead of tiny ones")
    p.add_argument("--save_precision", choices=("float", "fp16", "bf16"), default="float", help="dtype of the stored weights")
    p.add_argument("--diffusers_config", default=None,
                   help="also write a diffusers folder with the true configuration (a reference for diffusers' from_single_file)")
    p.add_argument("--tokenizer_cache_dir", default=None,
                   help="tokenizer cache (see tools/make_tokenizers.py); puts the tokenizer into --diffusers_config")
    p.add_argument("--depth", type=int, default=None, help="FLUX only: number of double blocks (default 2)")
    p.add_argument("--depth_single", type=int, default=None, help="FLUX only: number of single blocks (default 4)")
    p.add_argument("--width_divisor", type=int, default=1,
                   help="SDXL with --full_size only: divide every released width by this (2: the widths-halved "
                        "model of benchmarks/bench_sdxl_train.py); depths stay those of the real model")
    p.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    return p


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)

    from library.errors import UserInputError
    from library.log import setup_logging

    setup_logging()
    if args.arch.startswith("flux"):
        _make_flux(args)
        return
    if args.depth is not None or args.depth_single is not None:
        raise UserInputError("--depth / --depth_single apply to FLUX only")
    if args.width_divisor != 1 and (args.arch != "sdxl" or not args.full_size or args.width_divisor != 2):
        raise UserInputError("--width_divisor: only 2, and only with --arch sdxl --full_size")
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

    models = make_sdxl_models(seed=args.seed, full_size=args.full_size, width_divisor=args.width_divisor)
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


def _make_flux(args) -> None:
    from library.errors import UserInputError
    from library.models.dtypes import dtype_from_precision
    from library.models.flux.tiny import FILE_NAMES, make_flux_models, save_flux_model_set

    if args.out.lower().endswith((".safetensors", ".ckpt")):
        raise UserInputError(f"--out {args.out}: FLUX writes four files; give a folder name")
    if args.diffusers_config:
        raise UserInputError("--diffusers_config is not available for FLUX (diffusers converts BFL files itself)")
    for n in (args.depth, args.depth_single):
        if n is not None and n < 0:
            raise UserInputError("--depth / --depth_single must be >= 0")
    targets = [os.path.join(args.out, FILE_NAMES[k]) for k in (args.arch, "ae", "clip_l", "t5xxl")]
    existing = [t for t in targets if os.path.exists(t)]
    if existing and not args.force:
        raise UserInputError(f"--out {args.out}: {existing[0]} already exists (pass --force to overwrite)")
    dtype = None if args.save_precision == "float" else dtype_from_precision(args.save_precision)
    models = make_flux_models(args.arch, seed=args.seed, full_size=args.full_size, depth=args.depth,
                              depth_single=args.depth_single)
    paths = save_flux_model_set(models, args.out, args.arch, dtype=dtype)
    cfg = models.flux.config
    for key, path in paths.items():
        print(f"wrote {path} ({os.path.getsize(path) / 2**20:.1f} MiB)")
    print(f"{args.arch}: {cfg.describe()}; T5 d_model {models.t5xxl.config.d_model}, CLIP-L width "
          f"{models.clip_l.config.hidden_size}")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
