"""Pre-compute text-encoder output caches (.npz next to each image) for SDXL or FLUX.

    python tools/cache_text_encoder_outputs.py --sdxl --pretrained_model_name_or_path sdxl.safetensors \\
        --dataset_config dataset.toml [--text_encoder_batch_size 8]

Uses the same dataset options as training; captions get the fixed processing a cached
run uses (prefix/suffix, secondary separator). Options that change captions every step
(``shuffle_caption``, ``token_warmup_step``, ``caption_tag_dropout_rate``) are refused.
Always writes to disk; valid files are kept.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from library.cli import run_main  # noqa: E402

logger = logging.getLogger("cache_text_encoder_outputs")


def setup_parser() -> argparse.ArgumentParser:
    from library.data.cache_tools import add_cache_tool_arguments

    p = argparse.ArgumentParser(description="Pre-compute text-encoder output .npz caches (SDXL / FLUX).")
    add_cache_tool_arguments(p)
    p.add_argument("--sdxl", action="store_true", help="cache SDXL text-encoder outputs (_te_outputs.npz)")
    p.add_argument("--flux", action="store_true", help="cache FLUX text-encoder outputs (_flux_te.npz)")
    p.add_argument("--t5xxl_dtype", type=str, default=None, help="dtype for T5-XXL while caching")
    p.add_argument("--weighted_captions", action="store_true", help="apply (word:1.2) caption weights (SDXL)")
    return p


def main(argv=None) -> None:
    from library.data import cache_tools
    from library.errors import UserInputError

    args = cache_tools.parse_tool_args(setup_parser(), argv)
    if args.sdxl == args.flux:
        raise UserInputError("give exactly one of --sdxl or --flux")
    name = "flux" if args.flux else "sdxl"
    groups_ = cache_tools.build_dataset_groups(args, cache_text_encoder_outputs=True)

    arch = cache_tools.resolve_architecture(name, args)
    if not hasattr(arch, "text_encoder_cache_strategy"):
        raise UserInputError(f"--{name}: text-encoder caching is not available for this architecture yet")
    strategy = arch.text_encoder_cache_strategy(args)
    batch = args.text_encoder_batch_size or args.train_batch_size or 1
    total = 0
    for g in groups_:
        total += g.cache_text_encoder_outputs(strategy, to_disk=True, batch_size=batch,
                                              skip_cache_check=args.skip_cache_check)
    logger.info("encoded %d caption(s); text-encoder caches are up to date", total)


if __name__ == "__main__":
    run_main(main)
