"""Generate images with Stable Diffusion 1.x/2.x models, LoRA and other networks.

    python gen_img.py --ckpt model.safetensors --outdir out --prompt "a cat --n blurry" \
        --network_module networks.lora --network_weights my_lora.safetensors --network_mul 0.8

Every option and the prompt syntax: docs/generation.md (and `--help`).
"""

from library.args.gen_img_args import gen_img_parser as setup_parser  # noqa: F401  (the parser, for tools)


def main(argv=None):
    from library.args.gen_img_args import parse_gen_img_args
    from library.inference.gen_img_runner import run

    return run(parse_gen_img_args(argv))


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
