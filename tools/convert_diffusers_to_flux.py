"""Convert a diffusers-format FLUX.1 transformer to a BFL single file.

    python tools/convert_diffusers_to_flux.py --diffusers_path FLUX.1-dev/ --save_to flux1-dev.safetensors
    python tools/convert_diffusers_to_flux.py --diffusers_path FLUX.1-dev/transformer/diffusion_pytorch_model-00001-of-00003.safetensors \
        --save_to flux1-dev-fp8.safetensors --save_precision fp8

--diffusers_path is a pipeline folder (with transformer/), a transformer folder, one shard
(all shards are read) or a diffusers-named .safetensors file. q/k/v (and the single blocks'
MLP input) are fused, the final adaLN halves swapped, block counts read from the keys.
Tensors are read and written one at a time, so memory stays at one tensor whatever
--mem_eff_load_save says. --save_precision float/fp16/bf16 converts every tensor; fp8
(float8_e4m3fn) / fp8_e5m2 store the Linear weights in fp8 and biases / norm scales in bf16.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Convert a diffusers FLUX.1 transformer to a BFL single .safetensors file.")
    p.add_argument("--diffusers_path", type=str, required=True,
                   help="diffusers FLUX folder (pipeline or transformer/) or the first shard file")
    p.add_argument("--save_to", type=str, required=True, help="output BFL-format .safetensors file")
    p.add_argument("--mem_eff_load_save", action="store_true",
                   help="low-memory load/save (always the case here: tensors are streamed one at a time)")
    p.add_argument("--save_precision", type=str, default=None,
                   help="output dtype: float, fp16, bf16, fp8 (float8_e4m3fn), fp8_e5m2; default: as stored")
    return p


def main(argv=None) -> None:
    args = setup_parser().parse_args(argv)

    from library.log import setup_logging

    setup_logging()
    import logging
    import time

    from library.errors import UserInputError
    from library.models.flux.loading import FluxSource, convert_source_to_bfl, parse_dtype

    log = logging.getLogger("convert_diffusers_to_flux")
    dtype = parse_dtype(args.save_precision, "--save_precision", allow_fp8=True, any_fp8=True)
    if not args.save_to.lower().endswith(".safetensors"):
        raise UserInputError(f"--save_to {args.save_to}: expected a .safetensors file name")
    if os.path.isdir(args.save_to):
        raise UserInputError(f"--save_to {args.save_to}: is a folder")
    started = time.perf_counter()
    with FluxSource(args.diffusers_path, "--diffusers_path") as src:
        if os.path.abspath(args.save_to) in {os.path.abspath(f) for f in src.files}:
            raise UserInputError(f"--save_to {args.save_to}: would overwrite the input")
        if src.format == "bfl":
            log.warning("%s is already in the BFL layout; writing a copy%s", args.diffusers_path,
                        " in the requested precision" if dtype is not None else "")
        config = src.config()
        if args.mem_eff_load_save:
            log.info("--mem_eff_load_save: tensors are streamed one at a time in every mode")
        n = convert_source_to_bfl(src, args.save_to, dtype=dtype)
        files = len(src.files)
    size = os.path.getsize(args.save_to) / 2**30
    print(f"converted {args.diffusers_path} ({files} file(s), {config.describe()}) -> {args.save_to}: "
          f"{n} tensors, {size:.2f} GiB, {time.perf_counter() - started:.1f} s")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
