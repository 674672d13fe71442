"""The work behind flux_minimal_inference.py: check the options, load the four FLUX.1 files,
apply LoRA/OFT files, sample, decode and save PNGs.

Every check that can fail on user input (files, dtypes, sizes, adapters' paths, the output
folder, the checkpoint's block layout) runs before any model is loaded. Models are loaded
on the compute device, or on the CPU with `--offload` and moved there only for their stage
(text encoders, transformer, AE). Noise is drawn on the CPU in float32 from `--seed`, so a
seed gives the same image on any device type up to arithmetic differences.
"""

from __future__ import annotations

import logging
import os
import random
import time
from dataclasses import dataclass
from typing import Optional

import torch

from library.errors import UserInputError

logger = logging.getLogger(__name__)


@dataclass
class Context:
    args: object
    device: torch.device
    flux: object
    clip_l: object
    t5: object
    ae: object
    tok_l: object
    tok_t5: object
    dtypes: dict
    is_schnell: bool
    t5_max_length: int
    adapters: object = None


def choose_device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def check_args(args) -> dict:
    """Validate options without loading models; returns the resolved dtypes."""
    from library.inference.flux_adapters import check_entries
    from library.models.flux.loading import is_fp8, parse_dtype

    if args.model_type == "chroma":
        raise UserInputError("--model_type chroma is not implemented yet in this project (FLUX.1 dev/schnell only)")
    if args.model_type != "flux":
        raise UserInputError(f"--model_type {args.model_type}: expected flux or chroma")
    for opt in ("clip_l", "t5xxl", "ae"):
        value = getattr(args, opt)
        if not value:
            raise UserInputError(f"--{opt} is required")
        if not os.path.exists(value):
            raise UserInputError(f"--{opt} {value}: file not found")
    if not os.path.exists(args.ckpt_path):
        raise UserInputError(f"--ckpt_path {args.ckpt_path}: file or folder not found")
    for opt in ("width", "height"):
        v = getattr(args, opt)
        if v is None or v < 16:
            raise UserInputError(f"--{opt} {v}: must be at least 16")
    if args.steps is not None and args.steps < 1:
        raise UserInputError(f"--steps {args.steps}: must be at least 1")
    base = parse_dtype(args.dtype, "--dtype", allow_fp8=True)
    if base is None:
        raise UserInputError("--dtype must name a dtype (bfloat16, float16, float32)")
    dtypes = {
        "clip_l": parse_dtype(args.clip_l_dtype, "--clip_l_dtype", base),
        "t5xxl": parse_dtype(args.t5xxl_dtype, "--t5xxl_dtype", base),
        "ae": parse_dtype(args.ae_dtype, "--ae_dtype", base),
        "flux": parse_dtype(args.flux_dtype, "--flux_dtype", base),
    }
    if is_fp8(dtypes["ae"]):
        logger.warning("--ae_dtype / --dtype fp8: the autoencoder runs in bfloat16 (fp8 storage is for the transformer "
                       "and the text encoders)")
        dtypes["ae"] = torch.bfloat16
    dtypes["compute"] = torch.bfloat16 if is_fp8(dtypes["flux"]) else dtypes["flux"]
    args._lora_entries = check_entries(args.lora_weights)
    out = args.output_dir or "."
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserInputError(f"--output_dir {out}: exists and is not a folder")
    try:
        os.makedirs(out, exist_ok=True)
    except OSError as e:
        raise UserInputError(f"--output_dir {out}: cannot create it ({e.strerror or e})") from None
    if not os.access(out, os.W_OK):
        raise UserInputError(f"--output_dir {out}: not writable")
    return dtypes


def load(args, dtypes: dict, device: torch.device) -> Context:
    from library.models.flux.loading import analyze_checkpoint, load_ae, load_flux_transformer
    from library.models.flux.text_encoders import default_t5_max_length, load_clip_l, load_t5xxl
    from library.tokenizers import load_flux_tokenizers

    config = analyze_checkpoint(args.ckpt_path)  # header only: variant and block layout errors first
    logger.info("%s: %s", args.ckpt_path, config.describe())
    tok_l, tok_t5 = load_flux_tokenizers(getattr(args, "tokenizer_cache_dir", None))
    loading_device = torch.device("cpu") if args.offload else device
    clip_l = load_clip_l(args.clip_l, dtypes["clip_l"], loading_device).requires_grad_(False)
    t5 = load_t5xxl(args.t5xxl, dtypes["t5xxl"], loading_device).requires_grad_(False)
    flux = load_flux_transformer(args.ckpt_path, dtypes["flux"], loading_device, show_progress=True).requires_grad_(False)
    ae = load_ae(args.ae, dtypes["ae"], loading_device).requires_grad_(False)
    if t5.config.d_model != flux.config.context_in_dim:
        raise UserInputError(f"--t5xxl {args.t5xxl}: width {t5.config.d_model} does not fit the transformer's T5 input "
                             f"({flux.config.context_in_dim})")
    if clip_l.config.hidden_size != flux.config.vec_in_dim:
        raise UserInputError(f"--clip_l {args.clip_l}: width {clip_l.config.hidden_size} does not fit the transformer's "
                             f"pooled input ({flux.config.vec_in_dim})")
    ctx = Context(args, device, flux, clip_l, t5, ae, tok_l, tok_t5, dtypes, config.is_schnell,
                  default_t5_max_length(config.is_schnell))
    if args._lora_entries:
        from library.inference.flux_adapters import load_adapters

        ctx.adapters = load_adapters(args._lora_entries, flux, clip_l, t5, merge=args.merge_lora_weights)
    return ctx


def _to(model, device):
    return model.to(device) if model is not None else None


def encode(ctx: Context, prompt: str):
    from library.inference.flux_sampling import FluxCondition
    from library.models.flux.text_encoders import encode_prompts

    l_pooled, t5_out, txt_ids, mask = encode_prompts(
        ctx.clip_l, ctx.t5, ctx.tok_l, ctx.tok_t5, [prompt], ctx.t5_max_length, ctx.args.apply_t5_attn_mask)
    if torch.isnan(l_pooled).any() or torch.isnan(t5_out).any():
        raise UserInputError("the text encoders produced NaN (try --t5xxl_dtype bf16 or float32 instead of fp16)")
    return FluxCondition(l_pooled, t5_out, txt_ids, mask if ctx.args.apply_t5_attn_mask else None)


def generate_image(ctx: Context, prompt: str, seed: Optional[int], width: int, height: int, steps: Optional[int],
                   guidance: float, negative_prompt: Optional[str], cfg_scale: float, save: bool = True):
    """One image; returns (path or None, image tensor (1, 3, H, W) in [-1, 1], seed)."""
    from library.inference.flux_sampling import decode_latents, denoise, flux_schedule
    from library.models.flux.packing import packed_size, prepare_img_ids

    args = ctx.args
    started = time.perf_counter()
    seed = seed if seed is not None else random.randint(0, 2**32 - 1)
    steps = steps if steps is not None else (4 if ctx.is_schnell else 50)
    ph, pw = packed_size(height, width)
    if (ph * 16, pw * 16) != (height, width):
        logger.warning("image size %dx%d is not a multiple of 16: generating %dx%d", width, height, pw * 16, ph * 16)
    compute = ctx.dtypes["compute"]
    device = ctx.device
    noise = torch.randn(1, ph * pw, 64, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)
    img = noise.to(device=device, dtype=compute)
    img_ids = prepare_img_ids(1, ph, pw, device=device)

    # text encoders
    if args.offload:
        _to(ctx.clip_l, device), _to(ctx.t5, device)
    use_cfg = cfg_scale != 1.0
    if negative_prompt and not use_cfg:
        logger.warning("--negative_prompt is used only with --cfg_scale other than 1.0; ignored")
    cond = encode(ctx, prompt)
    neg = encode(ctx, negative_prompt or "") if use_cfg else None
    if args.offload:
        _to(ctx.clip_l, "cpu"), _to(ctx.t5, "cpu")
        _empty_cache(device)

    # transformer
    if args.offload:
        _to(ctx.flux, device)
    timesteps = flux_schedule(steps, ph * pw, shift=not ctx.is_schnell)
    logger.info("seed %d, %d steps, %dx%d, %s%s", seed, steps, pw * 16, ph * 16,
                "schnell" if ctx.is_schnell else f"guidance {guidance}",
                f", true CFG {cfg_scale}" if use_cfg else "")
    with _autocast(device, compute):
        x = denoise(ctx.flux, img, img_ids, cond.to(device, compute), timesteps, guidance, cfg_scale,
                    neg.to(device, compute) if neg is not None else None)
    if args.offload:
        _to(ctx.flux, "cpu")
        _empty_cache(device)

    # decode
    if args.offload:
        _to(ctx.ae, device)
    image = decode_latents(ctx.ae, x, ph * 2, pw * 2)
    if args.offload:
        _to(ctx.ae, "cpu")
        _empty_cache(device)
    path = None
    if save:
        path = save_png(image, args.output_dir or ".", {
            "prompt": prompt, "negative-prompt": negative_prompt or "", "seed": str(seed), "steps": str(steps),
            "guidance": str(guidance), "cfg-scale": str(cfg_scale), "size": f"{pw * 16}x{ph * 16}",
            "model": os.path.basename(os.path.normpath(args.ckpt_path)),
        })
        logger.info("saved %s (%.1f s)", path, time.perf_counter() - started)
    return path, image, seed


def _autocast(device: torch.device, dtype):
    import contextlib

    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def _empty_cache(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()


def save_png(image: torch.Tensor, folder: str, text: dict) -> str:
    """`<YYYYmmdd_HHMMSS>.png` in `folder` (first free `_<n>` suffix when taken), atomically,
    with the generation settings as PNG text chunks."""
    from PIL.PngImagePlugin import PngInfo

    from library.inference.flux_sampling import to_pil_images
    from library.inference.gen_img_output import first_available_filename
    from library.io.atomic import atomic_output

    name = first_available_filename(folder, time.strftime("%Y%m%d_%H%M%S") + ".png")
    path = os.path.join(folder, name)
    info = PngInfo()
    for k, v in text.items():
        info.add_text(k, v)
    pil = to_pil_images(image)[0]
    with atomic_output(path) as tmp:
        pil.save(tmp, format="PNG", pnginfo=info)
    return path


INTERACTIVE_HELP = ("Enter a prompt (empty line to quit). Options after the prompt: --w <width> --h <height> "
                    "--s <steps> --d <seed> --g <guidance> --m <LoRA multipliers, comma separated> "
                    "--n <negative prompt> ('-' for empty) --c <cfg scale>")


def parse_interactive(line: str, state: dict, adapters) -> tuple[str, dict]:
    """Split an interactive line into the prompt and per-image settings; sticky settings
    (size, steps, guidance, cfg) update `state`."""
    parts = line.split("--")
    prompt = parts[0].strip()
    per = {"seed": None, "negative_prompt": None}
    for opt in parts[1:]:
        opt = opt.strip()
        if not opt:
            continue
        key, value = opt[0], opt[1:].strip()
        try:
            if key == "w":
                state["width"] = int(value)
            elif key == "h":
                state["height"] = int(value)
            elif key == "s":
                state["steps"] = int(value)
            elif key == "d":
                per["seed"] = int(value)
            elif key == "g":
                state["guidance"] = float(value)
            elif key == "c":
                state["cfg_scale"] = float(value)
            elif key == "n":
                per["negative_prompt"] = "" if value == "-" else value
            elif key == "m":
                if adapters is None:
                    logger.error("--m: no --lora_weights were loaded")
                else:
                    adapters.set_multipliers([float(v) for v in value.split(",")])
            else:
                logger.error("unknown option --%s", opt)
        except (ValueError, UserInputError) as e:
            logger.error("invalid option --%s (%s)", opt, e)
    return prompt, per


def run(args) -> list[str]:
    started = time.perf_counter()
    dtypes = check_args(args)
    device = choose_device()
    logger.info("device %s; dtypes: CLIP-L %s, T5 %s, FLUX %s, AE %s", device,
                *(str(dtypes[k]).replace("torch.", "") for k in ("clip_l", "t5xxl", "flux", "ae")))
    ctx = load(args, dtypes, device)
    written = []
    if not args.interactive:
        path, _, seed = generate_image(ctx, args.prompt, args.seed, args.width, args.height, args.steps, args.guidance,
                                       args.negative_prompt, args.cfg_scale)
        written.append(path)
    else:
        state = dict(width=args.width, height=args.height, steps=args.steps, guidance=args.guidance,
                     cfg_scale=args.cfg_scale)
        while True:
            print(INTERACTIVE_HELP, flush=True)
            try:
                line = input()
            except EOFError:
                break
            if not line.strip():
                break
            prompt, per = parse_interactive(line, state, ctx.adapters)
            try:
                path, _, seed = generate_image(ctx, prompt, per["seed"], state["width"], state["height"], state["steps"],
                                               state["guidance"], per["negative_prompt"], state["cfg_scale"])
                written.append(path)
            except UserInputError as e:
                logger.error("%s", e)
    elapsed = time.perf_counter() - started
    print(f"flux_minimal_inference: {len(written)} image(s) in {elapsed:.1f} s" +
          "".join(f"\n  {p}" for p in written), flush=True)
    return written
