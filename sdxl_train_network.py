"""Train a LoRA / DyLoRA / OFT / plug-in network for SDXL.

    accelerate launch sdxl_train_network.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir data --output_dir out --network_module networks.lora --network_dim 16 \
        [--network_train_unet_only --cache_text_encoder_outputs] [--text_encoder_lr 1e-5 5e-6]

The options of train_network.py plus --cache_text_encoder_outputs(_to_disk) and
--disable_mmap_load_safetensors; the trainer is train_network.py's with the SDXL
architecture object (library/arch/sdxl.py). Every option: docs/training.md (and `--help`).
"""

import argparse


def setup_parser() -> argparse.ArgumentParser:
    """train_network.py's options and G-SDXL (cli-options.md §5: 196 options)."""
    from library.args import groups
    from library.args.parsers import train_network_parser

    parser = train_network_parser()
    parser.description = "Train a LoRA (or another network module) for SDXL."
    groups.add_sdxl_training_arguments(parser, True)
    return parser


def main(argv=None):
    from library.args.parsers import parse_training_args
    from library.arch.sdxl import SDXLArchitecture
    from library.training.trainer import NetworkTrainer

    class SDXLNetworkTrainer(NetworkTrainer):
        architecture_class = SDXLArchitecture

    args = parse_training_args(setup_parser(), argv)
    return SDXLNetworkTrainer().train(args)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
