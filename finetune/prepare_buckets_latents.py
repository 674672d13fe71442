"""Assign buckets and pre-encode latents for a fine-tuning (metadata) dataset.

    python finetune/prepare_buckets_latents.py images/ meta.json meta_lat.json model.safetensors \\
        --max_resolution 512,512 --batch_size 4

For every image listed in the metadata: its bucket goes to ``train_resolution`` and its
size to ``image_size`` in the output JSON, and its latents to
``<image stem>_<W>x<H>_sd.npz`` -- the cache a fine-tuning run with the same bucket
settings and ``--cache_latents_to_disk`` uses without re-encoding. Images that the
metadata does not list are skipped with a warning.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

logger = logging.getLogger("prepare_buckets_latents")


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Assign buckets and cache latents for a metadata dataset.")
    p.add_argument("train_data_dir", type=str, help="image folder")
    p.add_argument("in_json", type=str, help="input metadata JSON")
    p.add_argument("out_json", type=str, help="output metadata JSON")
    p.add_argument("model_name_or_path", type=str, help="model (or VAE) used for encoding")
    p.add_argument("--v2", action="store_true", help="ignored; the model version is detected from the file")
    p.add_argument("--batch_size", type=int, default=1, help="VAE batch size")
    p.add_argument("--max_data_loader_n_workers", type=int, default=None, help="image-loading threads")
    p.add_argument("--max_resolution", type=str, default="512,512", help="training area as 'W,H'")
    p.add_argument("--min_bucket_reso", type=int, default=256, help="smallest bucket side")
    p.add_argument("--max_bucket_reso", type=int, default=1024, help="largest bucket side")
    p.add_argument("--bucket_reso_steps", type=int, default=64, help="bucket sides are multiples of this")
    p.add_argument("--bucket_no_upscale", action="store_true", help="never enlarge images")
    p.add_argument("--mixed_precision", type=str, default="no", choices=["no", "fp16", "bf16"], help="VAE dtype")
    p.add_argument("--full_path", action="store_true", help="metadata keys are full image paths")
    p.add_argument("--flip_aug", action="store_true", help="also encode horizontally flipped images")
    p.add_argument("--alpha_mask", type=str, default="", help="any non-empty value also stores alpha masks")
    p.add_argument("--skip_existing", action="store_true", help="keep images whose cache file is already valid")
    p.add_argument("--recursive", action="store_true", help="search sub-folders (needs --full_path)")
    return p


def main(argv=None) -> None:
    from library.args.types import parse_resolution
    from library.data import cache_tools, discovery
    from library.data.buckets import BucketManager
    from library.data.latent_cache import LATENT_FORMATS, LatentJob, is_latent_cache_valid, latent_cache_path
    from library.data.metadata_tools import image_key, list_images, save_metadata
    from library.errors import UserInputError
    from library.log import setup_logging

    args = setup_parser().parse_args(argv)
    setup_logging(args)
    if args.recursive and not args.full_path:
        raise UserInputError("--recursive needs --full_path")
    resolution = parse_resolution(args.max_resolution, "--max_resolution")
    alpha = bool(args.alpha_mask)
    metadata = discovery.read_metadata_file(args.in_json)
    images = list_images(args.train_data_dir, args.recursive)
    bm = BucketManager(resolution, True, args.min_bucket_reso, args.max_bucket_reso, args.bucket_reso_steps,
                       args.bucket_no_upscale)
    fmt = LATENT_FORMATS["sd"]
    jobs, unlisted = [], []
    for path in images:
        key = image_key(path, args.full_path)
        if key not in metadata:
            unlisted.append(path)
            continue
        size = discovery.probe_image(path)
        try:
            bucket, resized, _ = bm.select(*size)
        except ValueError as e:
            raise UserInputError(f"{path}: {e}") from None
        bm.add(bucket, key)
        metadata[key]["train_resolution"] = [bucket[0], bucket[1]]
        metadata[key]["image_size"] = [size[0], size[1]]
        npz = latent_cache_path(path, size, fmt, frozenset())
        if args.skip_existing and is_latent_cache_valid(npz, bucket, fmt, args.flip_aug, alpha):
            continue
        jobs.append(LatentJob(path, bucket, resized, size, args.flip_aug, alpha, None, npz))
    if unlisted:
        logger.warning("%d image(s) are not in %s and were skipped, e.g. %s", len(unlisted), args.in_json,
                       ", ".join(os.path.basename(p) for p in unlisted[:3]))
    logger.info("%s", bm.table())

    if jobs:
        ns = argparse.Namespace(pretrained_model_name_or_path=args.model_name_or_path, v2=args.v2,
                                v_parameterization=False, vae=None, disable_mmap_load_safetensors=False)
        arch = cache_tools.resolve_architecture("sd", ns)
        device, dtype = cache_tools.torch_device_and_dtype(args.mixed_precision, False)
        vae = cache_tools.load_vae(arch, ns, dtype)
        vae.to(device=device, dtype=dtype).eval().requires_grad_(False)
        from library.data.latent_cache import run_latent_caching

        workers = args.max_data_loader_n_workers if args.max_data_loader_n_workers is not None else 2
        n = run_latent_caching(jobs, cache_tools.vae_encoder(arch, vae, device, dtype), fmt,
                               max(1, args.batch_size), workers, progress=True)
        logger.info("encoded %d image(s)", n)
    save_metadata(args.out_json, metadata)


if __name__ == "__main__":
    run_main(main)
