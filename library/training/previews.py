"""Sample images during training (--sample_prompts, --sample_every_n_steps/epochs).

Uses the same prompt-file reader and samplers as gen_img.py. Sampling runs on forked RNG
states, so previews never change what training does next (exact resume stays exact).
File names: `<output_dir>/sample/[<output_name>_]<e{epoch:06d} | {step:06d}>_<index:02d>_<seed>.png`
(the reference adds a timestamp; we leave it out so repeated runs give the same names).
"""

from __future__ import annotations

import logging
import os
import random

logger = logging.getLogger(__name__)


def preview_name(output_name: str | None, epoch: int | None, step: int, index: int, seed: int | None) -> str:
    when = f"e{epoch:06d}" if epoch is not None else f"{step:06d}"
    prefix = f"{output_name}_" if output_name else ""
    return f"{prefix}{when}_{index:02d}" + (f"_{seed}" if seed is not None else "") + ".png"


def sample_images(trainer, ctx, epoch: int | None, step: int) -> list[str]:
    import torch
    from PIL.PngImagePlugin import PngInfo

    from library.inference.prompt_file import read_prompt_file, resolve_sample_spec
    from library.inference.sd_sampling import create_sampler, generate_from_spec
    from library.training.optimizers import optimizer_eval_context

    a, acc = ctx.args, ctx.accelerator
    if not acc.is_main_process:
        acc.wait_for_everyone()
        return []
    specs = read_prompt_file(a.sample_prompts, "sample")
    out_dir = os.path.join(a.output_dir, "sample")
    os.makedirs(out_dir, exist_ok=True)
    net = acc.unwrap_model(ctx.network)
    was_training = net.training
    net.eval()
    vae = ctx.vae
    vae_device = next(vae.parameters()).device
    vae.to(acc.device)
    written = []
    py_state = random.getstate()
    try:
        with torch.random.fork_rng(devices=[]), optimizer_eval_context(ctx.optimizer), torch.no_grad():
            sampler = create_sampler(ctx.arch, ctx.text_encoders, vae, ctx.unet, ctx.tokenizers,
                                     clip_skip=a.clip_skip, device=acc.device)
            for i, spec in enumerate(specs):
                spec = resolve_sample_spec(spec, sampler=a.sample_sampler)
                image, seed = generate_from_spec(sampler, spec, v_parameterization=ctx.arch.v_parameterization,
                                                 zero_terminal_snr=bool(a.zero_terminal_snr))
                info = PngInfo()
                info.add_text("parameters", f"{spec.prompt}\nNegative prompt: {spec.negative_prompt or ''}\n"
                                            f"Steps: {spec.sample_steps}, Sampler: {spec.sample_sampler}, CFG scale: {spec.scale}, "
                                            f"Seed: {seed}, Size: {spec.width}x{spec.height}")
                path = os.path.join(out_dir, preview_name(a.output_name, epoch, step, i, spec.seed))
                image.save(path, pnginfo=info)
                written.append(path)
    finally:
        random.setstate(py_state)
        vae.to(vae_device)
        net.train(was_training)
    logger.info("wrote %d sample image(s) to %s", len(written), out_dir)
    acc.wait_for_everyone()
    return written
