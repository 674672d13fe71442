"""Pre-compute latent caches (.npz next to each image) for a dataset.

    python tools/cache_latents.py --pretrained_model_name_or_path model.safetensors \\
        --dataset_config dataset.toml [--sdxl | --flux] [--vae_batch_size 4]

Takes the same dataset options as the training scripts (``--dataset_config`` or
``--train_data_dir``/``--resolution``/...), so the files it writes are exactly the ones a
training run with ``--cache_latents_to_disk`` would find valid. Existing valid caches are
kept (``--skip_cache_check`` trusts any existing file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

logger = logging.getLogger("cache_latents")


def setup_parser() -> argparse.ArgumentParser:
    from library.data.cache_tools import add_cache_tool_arguments

    p = argparse.ArgumentParser(description="Pre-compute latent .npz caches for a dataset.")
    add_cache_tool_arguments(p)
    p.add_argument("--sdxl", action="store_true", help="write SDXL caches (_sdxl.npz)")
    p.add_argument("--flux", action="store_true", help="write FLUX caches (_flux.npz)")
    p.add_argument("--no_half_vae", action="store_true", help="run the VAE in float32")
    return p


def main(argv=None) -> None:
    from library.data import cache_tools

    args = cache_tools.parse_tool_args(setup_parser(), argv)
    if args.sdxl and args.flux:
        from library.errors import UserInputError

        raise UserInputError("--sdxl and --flux cannot be used together")
    name = "flux" if args.flux else "sdxl" if args.sdxl else "sd"
    # everything the user can get wrong in the dataset is checked before any model loads
    groups_ = cache_tools.build_dataset_groups(args, cache_latents=True)

    arch = cache_tools.resolve_architecture(name, args)
    fmt = cache_tools.latent_format_for(arch, name)
    device, dtype = cache_tools.torch_device_and_dtype(args.mixed_precision, args.no_half_vae)
    vae = cache_tools.load_vae(arch, args, dtype)
    vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
    if args.seed is not None:
        import torch

        torch.manual_seed(args.seed)
    encode = cache_tools.vae_encoder(arch, vae, device, dtype)
    total = 0
    for g in groups_:
        total += g.cache_latents(encode, fmt, to_disk=True, batch_size=args.vae_batch_size,
                                 skip_cache_check=args.skip_cache_check)
    logger.info("encoded %d image(s); latent caches are up to date", total)


if __name__ == "__main__":
    run_main(main)
