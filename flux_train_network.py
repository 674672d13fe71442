"""Train a LoRA / OFT / plug-in network for FLUX.1 (dev or schnell).

    accelerate launch flux_train_network.py --pretrained_model_name_or_path flux1-dev.safetensors \
        --ae ae.safetensors --clip_l clip_l.safetensors --t5xxl t5xxl_fp16.safetensors \
        --dataset_config dataset.toml --output_dir out --network_module networks.lora_flux \
        --network_dim 16 --mixed_precision bf16 --fp8_base --gradient_checkpointing \
        --cache_latents_to_disk --cache_text_encoder_outputs_to_disk --network_train_unet_only

The options of train_network.py plus the DiT group (text-encoder caching, weighting schemes,
--blocks_to_swap) and the FLUX group (model files, timestep sampling, prediction type,
guidance), and the deprecated --split_mode. The trainer is train_network.py's with the FLUX
architecture object (library/arch/flux.py, library/training/flux_trainer.py). Every option:
docs/flux.md (and `--help`).
"""

import argparse


def setup_parser() -> argparse.ArgumentParser:
    """train_network.py's options, G-DIT, G-FLUX and --split_mode (cli-options.md §5: 215 options)."""
    from library.args import groups
    from library.args.parsers import train_network_parser

    parser = train_network_parser()
    parser.description = "Train a LoRA (or another network module) for FLUX.1."
    groups.add_dit_training_arguments(parser)
    groups.add_flux_train_arguments(parser)
    parser.add_argument(
        "--split_mode",
        action="store_true",
        help="deprecated: same as --blocks_to_swap 18 (used when --blocks_to_swap is not given)",
    )
    return parser


def main(argv=None):
    from library.args.parsers import parse_training_args
    from library.training.flux_trainer import FluxNetworkTrainer

    args = parse_training_args(setup_parser(), argv)
    return FluxNetworkTrainer().train(args)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
