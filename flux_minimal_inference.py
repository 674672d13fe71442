"""Text-to-image with a FLUX.1 dev / schnell model (transformer + AE + CLIP-L + T5-XXL files).

    python flux_minimal_inference.py --ckpt_path flux1-dev.safetensors --clip_l clip_l.safetensors \
        --t5xxl t5xxl_fp16.safetensors --ae ae.safetensors --prompt "a cat" --seed 1 --output_dir out

Options, LoRA/OFT files and the interactive mode: docs/flux.md (and `--help`).
"""

import argparse


def setup_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description="Minimal FLUX.1 text-to-image generation (Euler, flow matching).")
    p.add_argument("--ckpt_path", type=str, required=True,
                   help="FLUX.1 transformer: BFL .safetensors file or diffusers transformer folder / shard")
    p.add_argument("--model_type", type=str, default="flux", choices=("flux", "chroma"),
                   help="flux (FLUX.1 dev/schnell, detected from the weights) or chroma (not implemented yet)")
    p.add_argument("--clip_l", type=str, default=None, help="CLIP-L text encoder .safetensors")
    p.add_argument("--t5xxl", type=str, default=None, help="T5-XXL encoder .safetensors (fp32/fp16/bf16/fp8 e4m3fn)")
    p.add_argument("--ae", type=str, default=None, help="FLUX autoencoder (ae.safetensors)")
    p.add_argument("--apply_t5_attn_mask", action="store_true", help="mask T5 padding in the encoder and the transformer")
    p.add_argument("--prompt", type=str, default="A photo of a cat", help="prompt")
    p.add_argument("--output_dir", type=str, default=".", help="folder for the PNG (named <date>_<time>.png)")
    p.add_argument("--dtype", type=str, default="bfloat16",
                   help="base dtype: bfloat16, float16, float32; fp8 (float8_e4m3fn) = fp8 weights, bf16 compute")
    p.add_argument("--clip_l_dtype", type=str, default=None, help="dtype for CLIP-L (default: --dtype)")
    p.add_argument("--ae_dtype", type=str, default=None, help="dtype for the autoencoder (default: --dtype)")
    p.add_argument("--t5xxl_dtype", type=str, default=None, help="dtype for T5-XXL (default: --dtype)")
    p.add_argument("--flux_dtype", type=str, default=None, help="dtype for the transformer (default: --dtype)")
    p.add_argument("--seed", type=int, default=None, help="random seed (default: random)")
    p.add_argument("--steps", type=int, default=None, help="sampling steps; default 4 for schnell, 50 for dev")
    p.add_argument("--guidance", type=float, default=3.5, help="embedded guidance value (dev models)")
    p.add_argument("--negative_prompt", type=str, default=None, help="negative prompt (used with --cfg_scale != 1)")
    p.add_argument("--cfg_scale", type=float, default=1.0, help="true classifier-free guidance scale; 1.0 disables")
    p.add_argument("--offload", action="store_true", help="keep models on the CPU, move each to the GPU for its stage")
    p.add_argument("--lora_weights", type=str, nargs="*", default=[],
                   help="LoRA / OFT files as 'path;multiplier' (multiplier optional, default 1.0)")
    p.add_argument("--merge_lora_weights", action="store_true", help="merge the LoRA/OFT weights into the model")
    p.add_argument("--width", type=int, default=1360, help="image width (rounded up to a multiple of 16)")
    p.add_argument("--height", type=int, default=768, help="image height (rounded up to a multiple of 16)")
    p.add_argument("--interactive", action="store_true", help="read prompts from the console, one image each")
    p.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="(this project) folder with cached tokenizers for offline use (tools/make_tokenizers.py)")
    return p


def main(argv=None):
    args = setup_parser().parse_args(argv)
    from library.log import setup_logging

    setup_logging()
    from library.inference.flux_minimal import run

    return run(args)


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
