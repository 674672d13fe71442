"""Fine-tune a whole SDXL model (U-Net, optionally both text encoders).

    accelerate launch sdxl_train.py --pretrained_model_name_or_path sdxl.safetensors \
        --train_data_dir data --output_dir out --resolution 1024 --mixed_precision bf16 \
        --optimizer_type Adafactor --optimizer_args relative_step=False scale_parameter=False \
        --learning_rate 1e-5 --fused_backward_pass --full_bf16 --gradient_checkpointing

Every option, the memory features and a runnable example: docs/fine-tuning.md (and `--help`).
"""

from library.args.finetune_args import sdxl_train_parser as setup_parser


def main(argv=None):
    from library.args.parsers import parse_training_args
    from library.training.finetune_trainer import FineTuneTrainer

    args = parse_training_args(setup_parser(), argv)
    return FineTuneTrainer().train(args)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
