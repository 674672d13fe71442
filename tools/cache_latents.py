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
    from library.args import groups

    p = argparse.ArgumentParser(description="Pre-compute latent .npz caches for a dataset.")
    groups.add_logging_arguments(p)
    groups.add_sd_models_arguments(p)
    groups.add_model_spec_arguments(p)
    groups.add_training_arguments(p, True)
    groups.add_dataset_arguments(p, True, True, True)
    groups.add_masked_loss_arguments(p)
    groups.add_config_arguments(p)
    groups.add_dit_training_arguments(p)
    groups.add_flux_train_arguments(p)
    p.add_argument("--sdxl", action="store_true", help="write SDXL caches (_sdxl.npz)")
    p.add_argument("--flux", action="store_true", help="write FLUX caches (_flux.npz)")
    p.add_argument("--no_half_vae", action="store_true", help="run the VAE in float32")
    p.add_argument("--skip_existing", action="store_true", help="no effect; valid caches are always kept")
    return p


def main(argv=None) -> None:
    parser = setup_parser()
    args = parser.parse_args(argv)
    from library.args.config_file import read_config_from_file
    from library.log import setup_logging

    args = read_config_from_file(args, parser, argv)
    setup_logging(args, reset=True)
    if args.sdxl and args.flux:
        from library.errors import UserInputError

        raise UserInputError("--sdxl and --flux cannot be used together")
    name = "flux" if args.flux else "sdxl" if args.sdxl else "sd"
    if args.skip_existing:
        logger.warning("--skip_existing has no effect: valid cache files are always kept")

    # everything the user can get wrong in the dataset is checked before any model loads
    from library.data.config_schema import SchemaSupport
    from library.data.datasets import build_from_args, check_caching_compatibility

    train, val = build_from_args(args, SchemaSupport(controlnet=bool(args.masked_loss)))
    groups_ = [g for g in (train, val) if g is not None]
    for g in groups_:
        check_caching_compatibility(g, cache_latents=True)

    from library.data import cache_tools

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
