"""flux_minimal_inference's path vs diffusers' FluxPipeline on a compact FLUX.1 of real width.

    .venv/bin/python benchmarks/bench_flux_inference.py                  # CPU: 256x256, 4 steps, schnell, float32
    .venv/bin/python benchmarks/bench_flux_inference.py --dtype bf16 --size 1024 --depth 19 --depth_single 38   # GPU

The model set is random (tools/make_tiny_model.py --full_size): transformer hidden 3072 with
--depth double + --depth_single single blocks, AE and CLIP-L at released widths, T5 at
4096 width with 2 layers; written once into --workdir in bf16. Each side runs in its own
process (so peak RSS is its own):
- ours: flux_minimal_inference's check/load/generate functions (header analysis, private
  per-tensor loading, Euler loop, decode, PNG write);
- diffusers: FluxTransformer2DModel.from_single_file and AutoencoderKL.from_single_file on
  the same files (local configs), our CLIP-L/T5 (the text encoders are the same modules
  either way), FluxPipeline with the matching scheduler, output saved as PNG.
Each round starts one process per side, alternating (so load from other processes on a
shared machine hits both sides alike); a process loads, makes a warm-up image and a timed
one. Printed per side: median load seconds, best and median seconds per timed image, the
CPU seconds it took (all threads; steadier than wall time when other processes compete
for the cores), median peak RSS; with CUDA also peak VRAM.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

PROMPT = "a photo of a red fox in the snow, highly detailed"


def make_inputs(workdir: str, variant: str, depth: int, depth_single: int) -> dict:
    from library.models.flux.tiny import FILE_NAMES

    folder = os.path.join(workdir, f"{variant}_{depth}x{depth_single}")
    names = [FILE_NAMES[k] for k in (variant, "ae", "clip_l", "t5xxl")]
    if not all(os.path.exists(os.path.join(folder, n)) for n in names):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", variant,
                        "--full_size", "--depth", str(depth), "--depth_single", str(depth_single),
                        "--save_precision", "bf16", "--out", folder, "--force"], check=True)
    paths = dict(zip(("flux", "ae", "clip_l", "t5xxl"), (os.path.join(folder, n) for n in names)))
    from library.tokenizer_builder import ensure_tokenizer_cache

    paths["tokenizers"] = ensure_tokenizer_cache(os.path.join(workdir, "tokenizers"), targets=["clip-l", "t5"])
    return paths


def _peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def build_side(side: str, opts, paths: dict):
    """(generate-one-image callable, load seconds, device) for 'ours' or 'diffusers'."""
    import torch

    from library.inference import flux_minimal

    import flux_minimal_inference as script

    out = os.path.join(opts.workdir, f"out_{side}")
    argv = ["--ckpt_path", paths["flux"], "--clip_l", paths["clip_l"], "--t5xxl", paths["t5xxl"], "--ae", paths["ae"],
            "--tokenizer_cache_dir", paths["tokenizers"], "--output_dir", out, "--dtype", opts.dtype,
            "--width", str(opts.size), "--height", str(opts.size), "--steps", str(opts.steps), "--seed", "1",
            "--prompt", PROMPT]
    args = script.setup_parser().parse_args(argv)
    dtypes = flux_minimal.check_args(args)
    device = flux_minimal.choose_device()
    t0 = time.perf_counter()
    if side == "ours":
        ctx = flux_minimal.load(args, dtypes, device)
        load_s = time.perf_counter() - t0

        def once():
            flux_minimal.generate_image(ctx, PROMPT, 1, opts.size, opts.size, opts.steps, 3.5, None, 1.0)
    else:
        from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

        from library.models.flux.loading import analyze_checkpoint
        from library.models.flux.text_encoders import default_t5_max_length, load_clip_l, load_t5xxl
        from library.tokenizers import load_flux_tokenizers

        config = analyze_checkpoint(paths["flux"])
        cfg_dir = os.path.join(opts.workdir, "diffusers_cfg")
        os.makedirs(os.path.join(cfg_dir, "transformer"), exist_ok=True)
        os.makedirs(os.path.join(cfg_dir, "vae"), exist_ok=True)
        with open(os.path.join(cfg_dir, "transformer", "config.json"), "w") as f:
            json.dump(dict(_class_name="FluxTransformer2DModel", **config.diffusers_config()), f)
        ae_cfg = dict(build_ae_config(paths["ae"]))
        with open(os.path.join(cfg_dir, "vae", "config.json"), "w") as f:
            json.dump(dict(_class_name="AutoencoderKL", **ae_cfg), f)
        dt = dtypes["flux"]
        transformer = FluxTransformer2DModel.from_single_file(paths["flux"], config=cfg_dir, subfolder="transformer",
                                                              torch_dtype=dt).to(device)
        vae = AutoencoderKL.from_single_file(paths["ae"], config=cfg_dir, subfolder="vae", torch_dtype=dt).to(device)
        clip_l = load_clip_l(paths["clip_l"], dt, device)
        t5 = load_t5xxl(paths["t5xxl"], dt, device)
        tok_l, tok_t5 = load_flux_tokenizers(paths["tokenizers"])
        scheduler = FlowMatchEulerDiscreteScheduler(
            num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=not config.is_schnell, base_shift=0.5,
            max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
        pipe = FluxPipeline(scheduler=scheduler, vae=vae, text_encoder=clip_l, tokenizer=tok_l, text_encoder_2=t5,
                            tokenizer_2=tok_t5, transformer=transformer)
        pipe.set_progress_bar_config(disable=True)
        load_s = time.perf_counter() - t0
        os.makedirs(out, exist_ok=True)

        def once():
            image = pipe(prompt=PROMPT, height=opts.size, width=opts.size, num_inference_steps=opts.steps,
                         guidance_scale=3.5, max_sequence_length=default_t5_max_length(config.is_schnell),
                         generator=torch.Generator("cpu").manual_seed(1)).images[0]
            image.save(os.path.join(out, f"{time.time():.3f}.png"))
    return once, load_s, device


def _timed(fn, device) -> tuple[float, float]:
    """(wall seconds, CPU seconds of this process: all threads, user + system)."""
    import torch

    t, c = time.perf_counter(), time.process_time()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t, time.process_time() - c


def run_process(opts, paths: dict) -> dict:
    """One side in this process: load, a warm-up image, a timed image, peak memory."""
    import torch

    if opts.threads:
        torch.set_num_threads(opts.threads)
    once, load_s, device = build_side(opts.side, opts, paths)
    warm_s, _ = _timed(once, device)
    image_s, image_cpu_s = _timed(once, device)
    result = dict(side=opts.side, load_s=load_s, warmup_s=warm_s, image_s=image_s, image_cpu_s=image_cpu_s,
                  peak_rss_mib=_peak_rss_mib())
    if device.type == "cuda":
        result["peak_vram_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def build_ae_config(path: str) -> dict:
    from library.io.tensor_files import TensorFile
    from library.models.flux.loading import ae_config

    with TensorFile(path) as tf:
        return ae_config({k: tf.shape(k) for k in tf.keys()}, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_flux")
    ap.add_argument("--variant", default="flux-schnell", choices=("flux-dev", "flux-schnell"))
    ap.add_argument("--depth", type=int, default=1)
    ap.add_argument("--depth_single", type=int, default=2)
    ap.add_argument("--size", type=int, default=256)
    ap.add_argument("--steps", type=int, default=4)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--side", choices=("ours", "diffusers"), default=None, help=argparse.SUPPRESS)
    opts = ap.parse_args()

    os.makedirs(opts.workdir, exist_ok=True)
    paths = make_inputs(opts.workdir, opts.variant, opts.depth, opts.depth_single)
    if opts.side:
        from library.log import setup_logging

        setup_logging()
        import logging

        logging.getLogger().setLevel(logging.WARNING)
        print("RESULT " + json.dumps(run_process(opts, paths)), flush=True)
        return

    runs = {"ours": [], "diffusers": []}
    for _ in range(opts.rounds):  # the sides alternate, so load from other processes hits both alike
        for side in runs:
            cmd = [sys.executable, os.path.abspath(__file__), "--side", side] + sys.argv[1:]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if proc.returncode or line is None:
                print(proc.stdout[-3000:], proc.stderr[-3000:])
                raise SystemExit(f"{side} run failed (exit status {proc.returncode})")
            runs[side].append(json.loads(line[7:]))
    print(f"compact FLUX.1 {opts.variant[5:]} (hidden 3072, {opts.depth} double + {opts.depth_single} single blocks), "
          f"{opts.size}x{opts.size}, {opts.steps} steps, {opts.dtype}, {os.cpu_count()} CPUs, {opts.rounds} rounds")
    print(f"{'side':<10}{'load s (med)':>13}{'best s/img':>12}{'median s/img':>14}{'CPU s/img (med)':>17}"
          f"{'peak RSS MiB':>14}")
    summary = {}
    for side, rs in runs.items():
        times = [r["image_s"] for r in rs]
        summary[side] = dict(best=min(times), median=statistics.median(times),
                             cpu=statistics.median(r["image_cpu_s"] for r in rs),
                             rss=statistics.median(r["peak_rss_mib"] for r in rs))
        vram = [r["peak_vram_mib"] for r in rs if "peak_vram_mib" in r]
        print(f"{side:<10}{statistics.median(r['load_s'] for r in rs):>13.1f}{summary[side]['best']:>12.2f}"
              f"{summary[side]['median']:>14.2f}{summary[side]['cpu']:>17.1f}{summary[side]['rss']:>14.0f}" + (f"  VRAM {max(vram):.0f} MiB" if vram else ""))
    ours, ref = summary["ours"], summary["diffusers"]
    print(f"speed ratio diffusers/ours: best {ref['best'] / ours['best']:.3f}, median {ref['median'] / ours['median']:.3f}, "
          f"CPU time {ref['cpu'] / ours['cpu']:.3f}; "
          f"peak RSS ratio ours/diffusers: {ours['rss'] / ref['rss']:.3f}")


if __name__ == "__main__":
    main()
