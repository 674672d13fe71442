"""Argument parsers of the full fine-tuning scripts (cli-options.md §5), from the shared groups.

Standard library only, so `sdxl_train.py --help` answers at once.
"""

from __future__ import annotations

import argparse

from library.args import groups

SDXL_BLOCK_LR_COUNT = 23  # time/label embedding, 9 input blocks, 3 middle parts, 9 output blocks, out


def add_sdxl_finetune_arguments(parser: argparse.ArgumentParser) -> None:
    """The 7 own options of sdxl_train.py."""
    parser.add_argument(
        "--learning_rate_te1",
        type=float,
        default=None,
        help="learning rate of text encoder 1 (CLIP ViT-L) with --train_text_encoder (default --learning_rate; "
        "0 or below: not trained)",
    )
    parser.add_argument(
        "--learning_rate_te2",
        type=float,
        default=None,
        help="learning rate of text encoder 2 (OpenCLIP bigG) with --train_text_encoder (default --learning_rate; "
        "0 or below: not trained)",
    )
    parser.add_argument(
        "--diffusers_xformers",
        action="store_true",
        help="use xformers attention through diffusers (U-Net and VAE); needs a working xformers",
    )
    parser.add_argument("--train_text_encoder", action="store_true", help="also fine-tune both text encoders")
    parser.add_argument(
        "--no_half_vae",
        action="store_true",
        help="run the VAE in float32 under mixed precision (the SDXL VAE overflows in fp16)",
    )
    parser.add_argument(
        "--block_lr",
        type=str,
        default=None,
        help=f"{SDXL_BLOCK_LR_COUNT} comma-separated U-Net learning rates: time/label embedding, input blocks 0-8, "
        "middle block parts 0-2, output blocks 0-8, final out layer; 0 (or below) freezes that block",
    )
    parser.add_argument(
        "--fused_optimizer_groups",
        type=int,
        default=None,
        help="split the parameters into N optimizers, each stepped during the backward pass as soon as its "
        "gradients are complete (saves the memory of most gradients; any optimizer without automatic "
        "learning rate; not with --fused_backward_pass or gradient accumulation)",
    )


def sdxl_train_parser() -> argparse.ArgumentParser:
    """sdxl_train.py: 176 options (cli-options.md §5)."""
    parser = argparse.ArgumentParser(
        description="Fine-tune a whole SDXL model (U-Net, optionally both text encoders)."
    )
    groups.add_logging_arguments(parser)
    groups.add_sd_models_arguments(parser)
    groups.add_model_spec_arguments(parser)
    groups.add_dataset_arguments(parser, True, True, True)
    groups.add_training_arguments(parser, False)
    groups.add_masked_loss_arguments(parser)
    groups.add_deepspeed_arguments(parser)
    groups.add_sd_saving_arguments(parser)
    groups.add_optimizer_arguments(parser)
    groups.add_config_arguments(parser)
    groups.add_custom_train_arguments(parser, True)
    groups.add_sdxl_training_arguments(parser, True)
    add_sdxl_finetune_arguments(parser)
    return parser


__all__ = ["SDXL_BLOCK_LR_COUNT", "add_sdxl_finetune_arguments", "sdxl_train_parser"]
