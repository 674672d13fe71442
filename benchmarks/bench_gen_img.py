"""gen_img.py vs diffusers' StableDiffusionPipeline: seconds per image on the same models.

    .venv/bin/python benchmarks/bench_gen_img.py                     # CPU: 256x256, 20 Euler steps
    .venv/bin/python benchmarks/bench_gen_img.py --size 512 --fp16   # GPU: also reports it/s

Uses (making it once) the random-weight full-width SD1.5 checkpoint of bench_load_sd.py.
Our side is gen_img's own generation path (prompt parsing, weighting, sampler loop, VAE,
PNG with metadata written); diffusers' pipeline is built from the very same module objects
(same weights, dtype, device and attention) and its image is saved as a PNG too. Both
use classifier-free guidance (scale 7.5, empty negative prompt). After one short warm-up
run each, the two are timed in interleaved rounds; the table shows the best and the
median round.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

PROMPT = "a photo of a (red:1.2) fox in the snow, highly detailed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_sd")
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--sampler", default="euler")
    ap.add_argument("--fp16", action="store_true", help="half precision (GPU)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    opts = ap.parse_args()

    import torch
    from diffusers import StableDiffusionPipeline

    from bench_load_sd import make_inputs
    from library.args.gen_img_args import gen_img_parser
    from library.inference import gen_img_runner as runner
    from library.inference.samplers import get_scheduler
    from library.tokenizer_builder import ensure_tokenizer_cache

    if opts.threads:
        torch.set_num_threads(opts.threads)
    path, _ = make_inputs(opts.workdir)
    tokenizers = ensure_tokenizer_cache(os.path.join(opts.workdir, "tokenizers"))
    out = os.path.join(opts.workdir, "gen_img_out")
    argv = ["--ckpt", path, "--tokenizer_cache_dir", tokenizers, "--outdir", out, "--W", str(opts.size), "--H",
            str(opts.size), "--steps", str(opts.steps), "--sampler", opts.sampler, "--prompt", PROMPT, "--seed", "1",
            "--sdpa", "--console_log_level", "WARNING"] + (["--fp16"] if opts.fp16 else [])
    args = gen_img_parser().parse_args(argv)
    checked = runner.check_inputs(args)
    t0 = time.perf_counter()
    pipe = runner.GenerationPipeline.load(args, checked)
    print(f"models loaded in {time.perf_counter() - t0:.1f} s on {pipe.device} ({pipe.dtype}), "
          f"torch threads {torch.get_num_threads()}")
    ref = StableDiffusionPipeline(
        vae=pipe.vae, text_encoder=pipe.text_encoders[0], tokenizer=pipe.tokenizers[0], unet=pipe.unet,
        scheduler=get_scheduler(opts.sampler), safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    ref.set_progress_bar_config(disable=True)
    sync = torch.cuda.synchronize if pipe.device.type == "cuda" else (lambda: None)

    def ours(steps: int) -> float:
        args.steps = steps
        sync()
        t = time.perf_counter()
        runner.Generator(args, pipe).run(checked)
        sync()
        return time.perf_counter() - t

    def theirs(steps: int) -> float:
        sync()
        t = time.perf_counter()
        image = ref(PROMPT, negative_prompt="", height=opts.size, width=opts.size, num_inference_steps=steps,
                    guidance_scale=7.5, generator=torch.Generator("cpu").manual_seed(1)).images[0]
        image.save(os.path.join(out, "diffusers.png"))
        sync()
        return time.perf_counter() - t

    ours(2), theirs(2)  # warm-up
    times: dict[str, list[float]] = {"gen_img": [], "diffusers": []}
    for r in range(opts.rounds):
        times["gen_img"].append(ours(opts.steps))
        times["diffusers"].append(theirs(opts.steps))
        print(f"round {r + 1}: gen_img {times['gen_img'][-1]:.2f} s, diffusers {times['diffusers'][-1]:.2f} s", flush=True)
    print(f"\n{opts.size}x{opts.size}, {opts.steps} {opts.sampler} steps, CFG, {pipe.device} {pipe.dtype}")
    print(f"{'':<10}{'best s/img':>12}{'median s/img':>14}{'best it/s':>11}")
    for name, ts in times.items():
        print(f"{name:<10}{min(ts):>12.2f}{statistics.median(ts):>14.2f}{opts.steps / min(ts):>11.2f}")
    print(f"\nratio gen_img/diffusers: best {min(times['gen_img']) / min(times['diffusers']):.3f}, "
          f"median {statistics.median(times['gen_img']) / statistics.median(times['diffusers']):.3f}")


if __name__ == "__main__":
    main()
