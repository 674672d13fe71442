"""Built-in demo (`make demo`): train a LoRA on CPU, offline, in a few minutes.

1. builds the tokenizers offline and a tiny random model in the SD 1.5 single-file layout;
2. writes a small synthetic dataset: 8 red images captioned "a photo of sks" (plus the
   same images with red and blue swapped, as decoys that are never trained on);
3. runs train_network.py's trainer (LoRA rank 8, latents cached, previews before/after);
4. measures what was learned: the denoising loss on fixed (noise, timestep) pairs, with
   and without the LoRA, on the training images and on the decoys;
5. draws the loss curve and loads the LoRA into diffusers' StableDiffusionPipeline.

The model is random, so preview images are noise: the loss figures show the learning.
Everything lands in demo_output/.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
OUT = os.path.join(ROOT, "demo_output")
STEPS = int(os.environ.get("DEMO_STEPS", "200"))


def _swap_red_blue(src: str, dst: str) -> None:
    import numpy as np
    from PIL import Image

    os.makedirs(dst, exist_ok=True)
    for name in sorted(os.listdir(src)):
        if name.endswith(".png"):
            rgb = np.asarray(Image.open(os.path.join(src, name)).convert("RGB"))
            Image.fromarray(rgb[..., ::-1].copy()).save(os.path.join(dst, name))


def draw_loss_curve(history, path: str) -> None:
    """A small PNG line chart (raw loss and a moving average) drawn with Pillow."""
    from PIL import Image, ImageDraw

    w, h, pad = 640, 360, 40
    img = Image.new("RGB", (w, h), "white")
    d = ImageDraw.Draw(img)
    steps = [s for s, _ in history]
    values = [v for _, v in history]
    lo, hi = min(values), max(values)
    span = (hi - lo) or 1.0

    def xy(step, value):
        x = pad + (step - steps[0]) / max(1, steps[-1] - steps[0]) * (w - 2 * pad)
        return x, h - pad - (value - lo) / span * (h - 2 * pad)

    d.rectangle([pad, pad, w - pad, h - pad], outline="black")
    d.line([xy(s, v) for s, v in history], fill=(170, 170, 230), width=1)
    window = max(1, len(values) // 20)
    avg = [(steps[i], sum(values[max(0, i - window + 1): i + 1]) / len(values[max(0, i - window + 1): i + 1])) for i in range(len(values))]
    d.line([xy(s, v) for s, v in avg], fill=(200, 30, 30), width=2)
    d.text((pad, 10), f"training loss (red: moving average of {window}); steps {steps[0]}-{steps[-1]}", fill="black")
    d.text((5, pad), f"{hi:.3f}", fill="black")
    d.text((5, h - pad - 10), f"{lo:.3f}", fill="black")
    img.save(path)


def main() -> None:
    from library.log import setup_logging

    setup_logging()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    t0 = time.time()
    os.makedirs(OUT, exist_ok=True)

    from library.data.synthetic import make_color_dataset
    from library.tokenizer_builder import ensure_tokenizer_cache

    tok_dir = ensure_tokenizer_cache(os.path.join(OUT, "tokenizers"))
    ckpt = os.path.join(OUT, "tiny_sd15.safetensors")
    if not os.path.exists(ckpt):
        from library.models.sd.saving import save_ldm_checkpoint
        from library.models.sd.tiny import make_sd_models

        save_ldm_checkpoint(make_sd_models("sd1", seed=0), ckpt)
    data = os.path.join(OUT, "dataset")
    train_dir = make_color_dataset(data, "sks", count=8, repeats=1, color=(220, 40, 40), seed=1)
    decoys = os.path.join(OUT, "decoys")
    _swap_red_blue(train_dir, decoys)
    prompts = os.path.join(OUT, "prompts.txt")
    with open(prompts, "w") as f:
        f.write("a photo of sks --w 64 --h 64 --s 12 --d 1\n")
        f.write("a photo of sks, outdoors --w 64 --h 64 --s 12 --d 2 --n blurry\n")
    print(f"[1/5] tokenizers {tok_dir}; model {ckpt}; dataset {train_dir} (8 images)")

    import train_network

    run_dir = os.path.join(OUT, "lora")
    argv = [
        "--pretrained_model_name_or_path", ckpt, "--tokenizer_cache_dir", tok_dir,
        "--train_data_dir", data, "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", run_dir, "--output_name", "demo_lora",
        "--network_module", "networks.lora", "--network_dim", "8", "--network_alpha", "8",
        "--learning_rate", "1e-2", "--optimizer_type", "AdamW", "--lr_scheduler", "constant",
        "--max_train_steps", str(STEPS), "--train_batch_size", "8", "--seed", "42", "--cache_latents",
        "--max_data_loader_n_workers", "0", "--sample_prompts", prompts, "--sample_at_first",
        "--sample_every_n_steps", str(STEPS), "--console_log_level", "WARNING",
    ]
    print(f"[2/5] training {STEPS} steps: python train_network.py {' '.join(argv)}")
    summary = train_network.main(argv)
    setup_logging(reset=True)
    lora_file = os.path.join(run_dir, "demo_lora.safetensors")
    print(f"      {summary['steps']} steps in {summary['seconds']} s ({summary['seconds_per_step']} s/step), "
          f"peak RSS {summary['peak_rss_mib']} MiB -> {lora_file}")

    import networks.lora as lora
    from library.arch.sd import SDArchitecture
    from library.models.sd.loading import load_sd_models
    from library.tokenizers import load_sd_tokenizer
    from library.training.evaluation import encode_images, fixed_pair_loss

    arch = SDArchitecture()
    models = load_sd_models(ckpt)
    tok = load_sd_tokenizer(False, tok_dir)
    targets = encode_images(models.vae, train_dir, 64, arch.latent_scale)
    others = encode_images(models.vae, decoys, 64, arch.latent_scale)
    caps = ["a photo of sks"] * len(targets)

    def losses():  # low timesteps: where knowing the clean image matters most
        return tuple(fixed_pair_loss(arch, models.unet, models.text_encoder, tok, x, caps, timesteps=(50, 100, 200))
                     for x in (targets, others))

    base_t, base_d = losses()
    net, weights = lora.create_network_from_weights(1.0, lora_file, models.vae, models.text_encoder, models.unet)
    net.apply_to(models.text_encoder, models.unet)
    net.load_weights(lora_file)
    lora_t, lora_d = losses()
    print(f"[3/5] denoising loss on fixed (noise, timestep) pairs, base -> with LoRA:\n"
          f"      training images {base_t:.4f} -> {lora_t:.4f} ({lora_t / base_t:.2f}x)\n"
          f"      decoy images    {base_d:.4f} -> {lora_d:.4f} ({lora_d / base_d:.2f}x)")

    curve = os.path.join(run_dir, "loss_curve.png")
    draw_loss_curve(summary["loss_history"], curve)
    samples = sorted(os.listdir(os.path.join(run_dir, "sample")))
    print(f"[4/5] loss curve {curve}; previews before/after in {os.path.join(run_dir, 'sample')}: {', '.join(samples)}")

    import torch
    from diffusers import StableDiffusionPipeline

    from library.models.sd.saving import save_diffusers

    folder = os.path.join(OUT, "tiny_sd15_diffusers")
    save_diffusers(load_sd_models(ckpt), folder, safe_serialization=True, tokenizer=tok)
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, feature_extractor=None, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    pipe.load_lora_weights(lora_file)
    image = pipe("a photo of sks", num_inference_steps=8, height=64, width=64,
                 generator=torch.Generator().manual_seed(0)).images[0]
    png = os.path.join(OUT, "diffusers_with_lora.png")
    image.save(png)
    print(f"[5/5] diffusers loaded the LoRA into {folder} and generated {png}")
    print(f"demo finished in {time.time() - t0:.0f} s; everything is in {OUT}")


if __name__ == "__main__":
    from library.cli import run_main

    run_main(main)
