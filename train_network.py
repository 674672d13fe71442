"""Train a LoRA / DyLoRA / OFT / plug-in network for Stable Diffusion 1.x/2.x.

    accelerate launch train_network.py --pretrained_model_name_or_path model.safetensors \
        --train_data_dir data --output_dir out --network_module networks.lora --network_dim 16

Every option: docs/training.md (and `--help`).
"""

from library.args.parsers import train_network_parser as setup_parser


def main(argv=None):
    from library.args.parsers import parse_training_args
    from library.training.trainer import NetworkTrainer

    args = parse_training_args(setup_parser(), argv)
    return NetworkTrainer().train(args)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
