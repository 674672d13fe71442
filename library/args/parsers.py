"""Complete argument parsers of the training scripts, assembled from the shared groups.

Only the standard library is imported here, so `script.py --help` answers at once.
"""

from __future__ import annotations

import argparse

from library.args import groups


def train_network_parser() -> argparse.ArgumentParser:
    """train_network.py: the groups and own options of cli-options.md §5 (193 options)."""
    parser = argparse.ArgumentParser(description="Train a LoRA (or another network module) for Stable Diffusion 1.x/2.x.")
    groups.add_logging_arguments(parser)
    groups.add_sd_models_arguments(parser)
    groups.add_model_spec_arguments(parser)
    groups.add_dataset_arguments(parser, True, True, True)
    groups.add_training_arguments(parser, True)
    groups.add_masked_loss_arguments(parser)
    groups.add_deepspeed_arguments(parser)
    groups.add_optimizer_arguments(parser)
    groups.add_config_arguments(parser)
    groups.add_custom_train_arguments(parser)
    groups.add_train_network_arguments(parser)
    return parser


def parse_training_args(parser: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    """Parse the command line, apply --config_file / --output_config, set up logging."""
    import sys

    from library.args.config_file import read_config_from_file, warn_secrets_on_command_line
    from library.log import setup_logging

    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser.parse_args(argv)
    setup_logging(args)
    warn_secrets_on_command_line(argv, args)
    args = read_config_from_file(args, parser, argv)
    setup_logging(args, reset=True)
    return args
