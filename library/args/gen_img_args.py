"""The command line of gen_img.py (cli-options.md §6: G-LOG plus 91 own options).

Names, types, defaults and choices follow the reference's contract so existing command
lines keep working; the help texts are this project's own. One option is added:
`--ddim_eta` (DDIM's eta, 0 by default, which is what the reference always uses).

Only the standard library (and the torch-free sampler-name table) is imported here:
`python gen_img.py --help` answers without loading torch.
"""

from __future__ import annotations

import argparse

from library.args.groups import add_logging_arguments
from library.inference.samplers import SAMPLER_NAMES

DESCRIPTION = (
    "Generate images with a Stable Diffusion 1.x/2.x model, optionally with LoRA and other networks, "
    "prompt files, prompt weighting, img2img, inpainting and highres fix."
)

EPILOG = (
    "Per-prompt options (after the prompt, e.g. 'a cat --n blurry --w 768 --d 1,2'): "
    "--n negative prompt, --w/--h size, --s steps, --l guidance scale, --nl negative scale, --d seeds, "
    "--t img2img strength, --am network multipliers, --c clip prompt, --f output file name. "
    "See docs/generation.md."
)


def _flag(parser: argparse.ArgumentParser, name: str, help: str) -> None:
    parser.add_argument(name, action="store_true", help=help)


def gen_img_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="gen_img.py", description=DESCRIPTION, epilog=EPILOG)
    add_logging_arguments(p)

    g = p.add_argument_group("model")
    _flag(g, "--sdxl", "the model is SDXL (also recognised from the file or folder unless --v1/--v2 is given)")
    _flag(g, "--v1", "the model is SD 1.x (the default; the version is also read from the file)")
    _flag(g, "--v2", "the model is SD 2.x (the version is also read from the file)")
    _flag(g, "--v_parameterization", "the model predicts v (SD 2.x 768-v and other v-prediction models)")
    _flag(g, "--zero_terminal_snr", "rescale the sampler's noise schedule to zero terminal SNR")
    g.add_argument("--ckpt", type=str, default=None, help="model: .safetensors/.ckpt file or diffusers folder")
    g.add_argument("--vae", type=str, default=None, help="use this VAE instead of the model's (file or diffusers folder)")
    g.add_argument("--tokenizer_cache_dir", type=str, default=None,
                   help="folder with cached tokenizers (offline use); filled from the Hub when missing")
    g.add_argument("--clip_skip", type=int, default=None,
                   help="use the output of the k-th text-encoder layer from the end (default 1 for SD 1.x/2.x)")
    _flag(g, "--fp16", "run the models in float16")
    _flag(g, "--bf16", "run the models in bfloat16")
    _flag(g, "--no_half_vae", "keep the VAE in float32 with --fp16/--bf16")
    _flag(g, "--xformers", "use xformers attention (falls back to PyTorch SDPA when xformers is missing)")
    _flag(g, "--sdpa", "use PyTorch scaled-dot-product attention (the default here)")
    _flag(g, "--diffusers_xformers", "use diffusers' xformers attention processors (same as --xformers here)")
    _flag(g, "--opt_channels_last", "store the U-Net and VAE in channels-last memory format")

    g = p.add_argument_group("noise")
    g.add_argument("--pyramid_noise_prob", type=float, default=None,
                   help="probability of turning an image's starting noise into pyramid (multi-resolution) noise")
    g.add_argument("--pyramid_noise_discount_range", type=float, nargs=2, default=None,
                   help="MIN MAX: range the pyramid-noise discount is drawn from (default 0.4 0.4)")
    g.add_argument("--noise_offset_prob", type=float, default=None,
                   help="probability of adding a per-channel offset to an image's starting noise")
    g.add_argument("--noise_offset_range", type=float, nargs=2, default=None,
                   help="MIN MAX: range the noise offset is drawn from (default 0.1 0.1)")

    g = p.add_argument_group("prompts")
    g.add_argument("--prompt", type=str, default=None, help="the prompt, with optional per-prompt options")
    g.add_argument("--from_file", type=str, default=None,
                   help="prompt file: .txt (one prompt per line), .toml or .json (see docs/prompts.md)")
    g.add_argument("--from_module", type=str, default=None,
                   help="Python file whose get_prompter(args, pipe, networks) returns a prompt source")
    g.add_argument("--prompter_module_args", type=str, default=None, help="free-form text for the --from_module prompter")
    _flag(g, "--interactive", "read prompts from standard input, one per line, until end of input")
    _flag(g, "--no_preview", "interactive mode: do not try to show the images in a window")
    _flag(g, "--shuffle_prompts", "shuffle the prompt list at the start of every iteration")
    g.add_argument("--max_embeddings_multiples", type=int, default=None,
                   help="longest prompt in units of 75 tokens (default 1: longer prompts are cut)")
    g.add_argument("--emb_normalize_mode", type=str, default="original", choices=["original", "none", "abs"],
                   help="after prompt weighting, keep each prompt's mean (original), mean absolute value (abs) "
                        "or nothing (none)")
    g.add_argument("--textual_inversion_embeddings", type=str, default=None, nargs="*",
                   help="textual-inversion embedding files; the file name (without extension) is the token")

    g = p.add_argument_group("images")
    g.add_argument("--outdir", type=str, default="outputs", help="output folder (created when missing)")
    _flag(g, "--sequential_file_name", "name images im_000001.png, im_000002.png, ...")
    _flag(g, "--use_original_file_name", "img2img: name each image after its source image")
    g.add_argument("--images_per_prompt", type=int, default=1, help="images per prompt")
    g.add_argument("--n_iter", type=int, default=1, help="go through the whole prompt list this many times")
    g.add_argument("--batch_size", type=int, default=1, help="images generated together")
    g.add_argument("--W", type=int, default=None, help="image width in pixels (default 512)")
    g.add_argument("--H", type=int, default=None, help="image height in pixels (default 512)")
    g.add_argument("--steps", type=int, default=50, help="sampling steps")
    g.add_argument("--sampler", type=str, default="ddim", choices=list(SAMPLER_NAMES), help="sampler (scheduler)")
    g.add_argument("--ddim_eta", type=float, default=0.0,
                   help="eta of the ddim sampler (0: deterministic); an addition, not in sd-scripts")
    g.add_argument("--scale", type=float, default=7.5, help="classifier-free guidance scale")
    g.add_argument("--negative_scale", type=float, default=None,
                   help="separate guidance weight for the negative prompt (against an empty prompt)")
    g.add_argument("--seed", type=int, default=None,
                   help="seed: with one prompt and one image, that image's seed; otherwise it seeds the per-image seeds")
    _flag(g, "--iter_same_seed", "give every image of an iteration the same seed (unless the prompt sets --d)")
    _flag(g, "--force_scheduler_zero_steps_offset", "use steps_offset=0 instead of 1 in the sampler")
    g.add_argument("--vae_batch_size", type=float, default=None,
                   help="images decoded by the VAE at once; a value below 1 is a fraction of the batch")
    g.add_argument("--vae_slices", type=int, default=None,
                   help="save VAE memory on large images (uses tiled VAE decoding; the number is not used)")

    g = p.add_argument_group("SDXL conditioning (SDXL only)")
    g.add_argument("--original_height", type=int, default=None, help="SDXL original-size height")
    g.add_argument("--original_width", type=int, default=None, help="SDXL original-size width")
    g.add_argument("--original_height_negative", type=int, default=None, help="SDXL original-size height, negative prompt")
    g.add_argument("--original_width_negative", type=int, default=None, help="SDXL original-size width, negative prompt")
    g.add_argument("--crop_top", type=int, default=None, help="SDXL crop-top conditioning")
    g.add_argument("--crop_left", type=int, default=None, help="SDXL crop-left conditioning")

    g = p.add_argument_group("img2img and inpainting")
    g.add_argument("--image_path", type=str, default=None,
                   help="init image, or a folder of them (png/jpg/jpeg/webp, used in name order)")
    g.add_argument("--mask_path", type=str, default=None,
                   help="inpainting mask (or folder): white is regenerated, black kept")
    g.add_argument("--strength", type=float, default=None, help="img2img strength, 0..1 (default 0.8)")
    g.add_argument("--clip_vision_strength", type=float, default=None,
                   help="SDXL img2img: CLIP-Vision conditioning strength (not supported yet)")

    g = p.add_argument_group("networks")
    g.add_argument("--network_module", type=str, default=None, nargs="*",
                   help="network module per network, e.g. networks.lora or lycoris.kohya")
    g.add_argument("--network_weights", type=str, default=None, nargs="*", help="weights file per network")
    g.add_argument("--network_mul", type=float, default=None, nargs="*", help="multiplier per network (default 1.0)")
    g.add_argument("--network_args", type=str, default=None, nargs="*",
                   help="per network: key=value pairs joined by ';'")
    _flag(g, "--network_show_meta", "print the metadata of each network file")
    g.add_argument("--network_merge_n_models", type=int, default=None,
                   help="merge the first N networks into the model weights (faster; their multipliers are fixed)")
    _flag(g, "--network_merge", "merge every network into the model weights")
    _flag(g, "--network_pre_calc", "fold the networks into the weights for each batch (fast, --am still works)")
    g.add_argument("--network_regional_mask_max_color_codes", type=int, default=None,
                   help="regional networks from colour-coded masks (not supported yet)")

    g = p.add_argument_group("highres fix")
    g.add_argument("--highres_fix_scale", type=float, default=None,
                   help="enable highres fix: generate at this fraction of the size first, then refine at full size")
    g.add_argument("--highres_fix_steps", type=int, default=28, help="steps of the first (small) pass")
    g.add_argument("--highres_fix_strength", type=float, default=None,
                   help="img2img strength of the first pass when it starts from --image_path (default --strength)")
    _flag(g, "--highres_fix_save_1st", "also save the first-pass images")
    _flag(g, "--highres_fix_latents_upscaling", "upscale the first pass in latent space instead of pixels")
    g.add_argument("--highres_fix_upscaler", type=str, default=None,
                   help="module with create_upscaler(**kwargs) used to upscale the first pass")
    g.add_argument("--highres_fix_upscaler_args", type=str, default=None,
                   help="key=value pairs joined by ';' for the upscaler")
    _flag(g, "--highres_fix_disable_control_net", "ControlNet: leave it out of the second pass (not supported yet)")

    g = p.add_argument_group("ControlNet (not supported yet)")
    g.add_argument("--guide_image_path", type=str, default=None, nargs="*", help="ControlNet guide image(s)")
    g.add_argument("--control_net_lllite_models", type=str, default=None, nargs="*", help="ControlNet-LLLite files")
    g.add_argument("--control_net_models", type=str, default=None, nargs="*", help="ControlNet files")
    g.add_argument("--control_net_preps", type=str, default=None, nargs="*", help="ControlNet preprocessors")
    g.add_argument("--control_net_multipliers", type=float, default=None, nargs="*", help="ControlNet strengths")
    g.add_argument("--control_net_ratios", type=float, default=None, nargs="*",
                   help="fraction of the steps each ControlNet is applied")

    g = p.add_argument_group("Deep Shrink (not supported yet)")
    g.add_argument("--ds_depth_1", type=int, default=None, help="enable Deep Shrink at this U-Net depth (0-8)")
    g.add_argument("--ds_timesteps_1", type=int, default=650, help="Deep Shrink depth 1 is active until this timestep")
    g.add_argument("--ds_depth_2", type=int, default=None, help="second Deep Shrink depth")
    g.add_argument("--ds_timesteps_2", type=int, default=650, help="Deep Shrink depth 2 is active until this timestep")
    g.add_argument("--ds_ratio", type=float, default=0.5, help="Deep Shrink downsampling ratio")

    g = p.add_argument_group("Gradual Latent (not supported yet)")
    g.add_argument("--gradual_latent_timesteps", type=int, default=None, help="enable Gradual Latent from this timestep")
    g.add_argument("--gradual_latent_ratio", type=float, default=0.5, help="starting size ratio")
    g.add_argument("--gradual_latent_ratio_step", type=float, default=0.125, help="ratio added at each update")
    g.add_argument("--gradual_latent_every_n_steps", type=int, default=3, help="steps between updates")
    g.add_argument("--gradual_latent_s_noise", type=float, default=1.0, help="s_noise of the ancestral step")
    g.add_argument("--gradual_latent_unsharp_params", type=str, default=None,
                   help="unsharp mask: ksize,sigma,strength[,target-x]")
    return p


def parse_gen_img_args(argv=None) -> argparse.Namespace:
    """Parse the command line and set up console logging."""
    from library.log import setup_logging

    args = gen_img_parser().parse_args(argv)
    setup_logging(args)
    return args
