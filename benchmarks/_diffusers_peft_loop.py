"""The comparison point of bench_train_network.py: a minimal LoRA training loop written
directly against diffusers + peft (no code of this project in the timed path).

    python benchmarks/_diffusers_peft_loop.py --model F --config DIR --tokenizer DIR \
        --data DIR --steps 13 [--seed 0]

It does the work `train_network.py ... --cache_latents --network_train_unet_only
--network_dim 16 --network_alpha 16 --learning_rate 1e-4` does with the defaults
(fp32, AdamW, constant LR, --max_grad_norm 1.0):

* load U-Net, VAE and CLIP text encoder from the single file (`from_single_file` with a
  local config folder), fp32;
* encode every image once with the VAE (latent_dist.sample(), one image per call);
* LoRA rank 16 / alpha 16 with peft on the U-Net's Transformer2DModel layers
  (to_q/to_k/to_v/to_out.0 of attn1/attn2, proj_in/proj_out, ff.net.0.proj, ff.net.2);
* every step: one image (batch 1, shuffled each epoch), the caption through the frozen
  text encoder (no grad, as our trainer does with --network_train_unet_only), DDPM noise
  and a uniform timestep, epsilon-prediction MSE, backward, clip to norm 1, AdamW step.

Prints one JSON line with the timings (perf_counter, seconds from process start),
per-step durations, CPU time and page faults per step, and peak RSS (ru_maxrss).
With BENCH_SYNC_R/BENCH_SYNC_W set (file descriptors, by bench_train_network.py) it runs
in lockstep with the other contender: setup, then one step at a time, taking turns.
"""

from __future__ import annotations

import os
import time


def turn() -> float:
    """Lockstep with the other contender (bench_train_network.py --mode lockstep): hand the
    CPU back to the driver and wait until it is this process's turn again. A no-op when run
    on its own. Returns the time the turn began."""
    w, r = os.environ.get("BENCH_SYNC_W"), os.environ.get("BENCH_SYNC_R")
    if w and r:
        if getattr(turn, "started", False):
            os.write(int(w), b"d")
        turn.started = True
        if os.read(int(r), 1) != b"g":
            raise SystemExit("benchmark driver went away")
    return time.perf_counter()


T_PROCESS = turn()  # in lockstep mode, the setup phase starts when the driver says so

import argparse  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import resource  # noqa: E402

# LoRA targets: the Linear / 1x1-conv layers inside the U-Net's Transformer2DModel blocks,
# the same set networks.lora wraps for the U-Net (192 layers in SD1.5).
TARGET_MODULES = (r".*attentions\.\d+\.(proj_in|proj_out|transformer_blocks\.\d+\."
                  r"(attn[12]\.(to_q|to_k|to_v|to_out\.0)|ff\.net\.(0\.proj|2)))")


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rusage() -> dict:
    """CPU seconds (user, system) and page faults so far: page faults separate allocator cost from compute."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minflt": r.ru_minflt, "majflt": r.ru_majflt}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--config", required=True, help="diffusers config folder (configs only)")
    ap.add_argument("--tokenizer", required=True, help="CLIP tokenizer folder")
    ap.add_argument("--data", required=True, help="folder of .png images with .txt captions")
    ap.add_argument("--steps", type=int, default=13)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--alpha", type=float, default=16)
    ap.add_argument("--lr", type=float, default=1e-4)
    args = ap.parse_args()

    import numpy as np
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler, StableDiffusionPipeline
    from peft import LoraConfig
    from PIL import Image
    from transformers import CLIPTokenizer

    marks = {"imported": time.perf_counter() - T_PROCESS}
    rss = {"imported": peak_rss_mib()}
    torch.manual_seed(args.seed)
    random.seed(args.seed)

    # ---- models
    t = time.perf_counter()
    pipe = StableDiffusionPipeline.from_single_file(
        args.model, config=args.config, torch_dtype=torch.float32, local_files_only=True,
        tokenizer=None, safety_checker=None, feature_extractor=None)
    unet, vae, text_encoder = pipe.unet, pipe.vae, pipe.text_encoder
    del pipe
    tokenizer = CLIPTokenizer.from_pretrained(args.tokenizer)
    marks["load_s"] = time.perf_counter() - t
    marks["loaded_at"] = time.perf_counter() - T_PROCESS
    rss["loaded"] = peak_rss_mib()
    for m in (unet, vae, text_encoder):
        m.requires_grad_(False)
        m.eval()

    # ---- data and latent cache
    names = sorted(f for f in os.listdir(args.data) if f.endswith(".png"))
    captions = []
    for n in names:
        with open(os.path.join(args.data, n[:-4] + ".txt"), encoding="utf-8") as fh:
            captions.append(fh.read().strip())
    t = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    latents = []
    with torch.no_grad():
        for n in names:
            img = np.asarray(Image.open(os.path.join(args.data, n)).convert("RGB"), dtype=np.float32)
            x = torch.from_numpy(img).permute(2, 0, 1)[None] / 127.5 - 1.0
            latents.append(vae.encode(x).latent_dist.sample(generator=gen))
    marks["cache_s"] = time.perf_counter() - t
    rss["cached"] = peak_rss_mib()
    del vae
    scale = 0.18215
    input_ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                          return_tensors="pt").input_ids

    # ---- LoRA, optimizer, schedule
    t = time.perf_counter()
    unet.add_adapter(LoraConfig(r=args.rank, lora_alpha=args.alpha, init_lora_weights=True, target_modules=TARGET_MODULES))
    params = [p for p in unet.parameters() if p.requires_grad]
    targets = sorted(n for n, m in unet.named_modules() if hasattr(m, "lora_A") and n)
    optimizer = torch.optim.AdamW(params, lr=args.lr)
    noise_scheduler = DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                                    num_train_timesteps=1000)
    unet.train()  # peft layers in training mode (no dropout configured, so the same maths)
    marks["network_s"] = time.perf_counter() - t

    # ---- loop
    marks["first_step_start"] = time.perf_counter() - T_PROCESS
    step_starts, step_ends = [], []
    ru = []
    losses = []
    order: list[int] = []
    for step in range(args.steps):
        step_starts.append(turn())
        ru.append(rusage())
        if not order:
            order = list(range(len(names)))
            random.shuffle(order)
        i = order.pop()
        lat = latents[i] * scale
        with torch.no_grad():
            context = text_encoder(input_ids[i:i + 1])[0]
        noise = torch.randn_like(lat)
        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (1,), dtype=torch.long)
        noisy = noise_scheduler.add_noise(lat, noise, timesteps)
        pred = unet(noisy, timesteps, context).sample
        loss = F.mse_loss(pred.float(), noise.float(), reduction="mean")
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        losses.append(float(loss.detach()))
        step_ends.append(time.perf_counter())
        ru.append(rusage())
        if step == 0:
            rss["first_step"] = peak_rss_mib()
    out = dict(
        contender="diffusers+peft", marks=marks, rss_mib=rss, peak_rss_mib=peak_rss_mib(),
        step_s=[e - s for s, e in zip(step_starts, step_ends)], losses=losses,
        step_rusage=[{k: b[k] - a[k] for k in a} for a, b in zip(ru[::2], ru[1::2])],
        lora_targets=targets, trainable_params=sum(p.numel() for p in params),
        torch_threads=torch.get_num_threads(),
    )
    print("BENCH_RESULT " + json.dumps(out))


if __name__ == "__main__":
    main()
