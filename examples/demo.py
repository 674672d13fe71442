"""Built-in demo (`make demo`): everything runs offline on tiny generated models.

1. builds the tokenizers offline (tools/make_tokenizers.py),
2. writes a tiny random SD 1.5-layout checkpoint (tools/make_tiny_model.py),
3. loads it with our loader (sizes inferred from the file) and encodes a prompt,
4. converts it to a diffusers folder and generates an image with diffusers'
   StableDiffusionPipeline from that folder (random weights: the image is noise, the point
   is that the files interoperate),
5. prints where everything was written.

The training demo (a LoRA on the built-in images) joins this script with train_network.py.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "demo_output")


def main() -> None:
    from library.log import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)

    from library.tokenizer_builder import ensure_tokenizer_cache

    tok_dir = ensure_tokenizer_cache(os.path.join(OUT, "tokenizers"))
    print(f"[1/4] tokenizers in {tok_dir}")

    import torch

    from library.arch.sd import SDArchitecture
    from library.models.sd.loading import load_sd_models
    from library.models.sd.saving import save_diffusers, save_ldm_checkpoint
    from library.models.sd.tiny import make_sd_models

    ckpt = os.path.join(OUT, "tiny_sd1.safetensors")
    save_ldm_checkpoint(make_sd_models("sd1", seed=0), ckpt)
    print(f"[2/4] tiny SD1.5-layout checkpoint: {ckpt} ({os.path.getsize(ckpt) / 2**20:.1f} MiB)")

    arch = SDArchitecture()
    models = load_sd_models(ckpt)
    (tokenizer,) = arch.load_tokenizers(type("Args", (), {"tokenizer_cache_dir": tok_dir})())
    prompt = "a photo of a cat"
    ids = arch.tokenize(tokenizer, [prompt])
    with torch.no_grad():
        context = arch.encode_tokens(models.text_encoder, ids, tokenizer, clip_skip=2)
    print(f"[3/4] loaded {'SD2.x' if models.v2 else 'SD1.x'}: U-Net widths {list(models.unet.config.block_out_channels)}; "
          f"'{prompt}' -> ids {ids[0, :7].tolist()} -> context {tuple(context.shape)}")

    folder = os.path.join(OUT, "tiny_sd1_diffusers")
    save_diffusers(models, folder, safe_serialization=True, tokenizer=tokenizer)
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe(prompt, num_inference_steps=4, height=64, width=64, generator=torch.Generator().manual_seed(0)).images[0]
    png = os.path.join(OUT, "demo.png")
    image.save(png)
    print(f"[4/4] diffusers loaded {folder} and generated {png} ({image.size[0]}x{image.size[1]})")
    print(f"demo finished in {time.time() - t0:.1f} s; outputs in {OUT}")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
