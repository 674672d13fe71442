"""Peak memory of one sdxl_train.py step: plain vs --fused_backward_pass vs --fused_optimizer_groups.

    .venv/bin/python benchmarks/bench_sdxl_train.py [--workdir /tmp/bench_sdxl_train]
        [--resolution 512] [--variants plain,fused_backward,fused_groups4] [--no_checkpointing]
        [--optimizer Adafactor|AdamW] [--mixed_precision no|bf16] [--threads N]
        [--width_divisor 2] [--full_bf16]

`--width_divisor 1 --full_bf16` measures the released SDXL size instead (2.6B U-Net parameters
stored, trained and stepped in bfloat16, as in the usual 24 GB GPU recipe); its model file is
written in bf16 (~7 GiB) and a plain step needs ~13 GiB of RAM.

The job (issue 6, "Benchmark"): a reduced SDXL with the real topology (3 U-Net levels,
transformer depths 0/2/10, CLIP-L 12 layers, bigG 32 layers) and every width halved,
random weights (made once with `tools/make_tiny_model.py --arch sdxl --full_size
--width_divisor 2`: 643M U-Net parameters, 894M in all, 3.4 GiB fp32), trained for one
step on the CPU, batch 1, U-Net only, latents and text-encoder outputs cached before
training, float32, gradient checkpointing, Adafactor (relative_step=False, lr 1e-5) in all
variants so only the way the optimizer steps differs:

* plain: backward, then one optimizer step over all gradients;
* fused_backward: `--fused_backward_pass` (each tensor stepped in its gradient hook);
* fused_groups4: `--fused_optimizer_groups 4` (4 optimizers, each stepped when its
  gradients are complete).

Each variant runs `sdxl_train.main(argv)` in its own fresh Python process. A wrapper around
the trainer's loop resets the kernel's peak-RSS counter (VmHWM, via /proc/self/clear_refs)
when training starts and reads it when the step is done: that is "peak RSS of the step"
(weights, gradients, optimizer state, activations, everything resident). The
whole-process peak (ru_maxrss: loading, caching, saving included) is printed too.
Results: <workdir>/results.json; logs: <workdir>/logs/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

VARIANTS = {
    "plain": [],
    "fused_backward": ["--fused_backward_pass"],
    "fused_groups4": ["--fused_optimizer_groups", "4"],
}

CHILD = r"""
import json, os, resource, sys, time
sys.path.insert(0, os.environ["BENCH_ROOT"])
from benchmarks.process_memory import reset_peak_rss, status_mib as status

from library.training.finetune_trainer import FineTuneTrainer
record = {}
original_loop = FineTuneTrainer.loop

def loop(self, ctx):
    record["rss_before_step_mib"] = status("VmRSS")
    record["peak_before_step_mib"] = status("VmHWM")
    reset_peak_rss()
    t0 = time.time()
    original_loop(self, ctx)
    record["step_seconds"] = time.time() - t0
    record["step_peak_rss_mib"] = status("VmHWM")
    record["rss_after_step_mib"] = status("VmRSS")

FineTuneTrainer.loop = loop
import sdxl_train
summary = sdxl_train.main(json.loads(os.environ["BENCH_ARGV"]))
record["process_peak_rss_mib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
record["final_loss"] = summary.get("final_loss")
print("BENCH_RESULT " + json.dumps(record), flush=True)
"""


def prepare(workdir: str, resolution: int, width_divisor: int) -> dict:
    from library.data.synthetic import make_color_dataset
    from library.tokenizer_builder import ensure_tokenizer_cache

    os.makedirs(workdir, exist_ok=True)
    if width_divisor == 2:
        model, extra = os.path.join(workdir, "sdxl_half.safetensors"), []
    else:  # other sizes are stored in bf16: the released size would be 13 GiB in float32
        model = os.path.join(workdir, f"sdxl_div{width_divisor}_bf16.safetensors")
        extra = ["--save_precision", "bf16"]
    if not os.path.exists(model):
        print(f"making the SDXL with widths divided by {width_divisor} (once) ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", "sdxl",
                        "--full_size", "--width_divisor", str(width_divisor), "--out", model] + extra,
                       check=True, cwd=ROOT)
    data = os.path.join(workdir, f"data_{resolution}")
    if not os.path.isdir(data):
        make_color_dataset(data, count=1, size=(resolution, resolution))
    tok = ensure_tokenizer_cache(os.path.join(workdir, "tokenizers"))
    return {"model": model, "data": data, "tok": tok}


def common_argv(files: dict, out: str, args) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", files["model"], "--tokenizer_cache_dir", files["tok"],
        "--train_data_dir", files["data"], "--caption_extension", ".txt", "--resolution", str(args.resolution),
        "--output_dir", out, "--output_name", "bench", "--seed", "1", "--max_data_loader_n_workers", "0",
        "--train_batch_size", "1", "--max_train_steps", "1", "--cache_latents", "--cache_text_encoder_outputs",
        "--mixed_precision", args.mixed_precision, "--learning_rate", "1e-5", "--console_log_level", "WARNING",
    ]
    if args.optimizer == "Adafactor":
        argv += ["--optimizer_type", "Adafactor", "--optimizer_args", "relative_step=False", "scale_parameter=False",
                 "warmup_init=False"]
    else:
        argv += ["--optimizer_type", args.optimizer]
    if not args.no_checkpointing:
        argv.append("--gradient_checkpointing")
    if args.full_bf16:
        argv.append("--full_bf16")
    return argv


def run_variant(name: str, files: dict, args) -> dict:
    out = os.path.join(args.workdir, "out", name)
    os.makedirs(out, exist_ok=True)
    argv = common_argv(files, out, args) + VARIANTS[name]
    env = dict(os.environ, BENCH_ROOT=ROOT, BENCH_ARGV=json.dumps(argv), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    if args.threads:
        env["OMP_NUM_THREADS"] = str(args.threads)
    os.makedirs(os.path.join(args.workdir, "logs"), exist_ok=True)
    log = os.path.join(args.workdir, "logs", f"{name}.log")
    t0 = time.time()
    with open(log, "w") as f:
        r = subprocess.run([sys.executable, "-c", CHILD], env=env, cwd=ROOT, stdout=subprocess.PIPE, stderr=f,
                           text=True)
    if r.returncode != 0:
        raise SystemExit(f"{name}: exit {r.returncode}; see {log}")
    line = next(x for x in r.stdout.splitlines() if x.startswith("BENCH_RESULT "))
    result = json.loads(line[len("BENCH_RESULT "):])
    result["wall_seconds"] = time.time() - t0
    return result


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", default="/tmp/bench_sdxl_train")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--optimizer", default="Adafactor", help="Adafactor (default) or another name for all variants "
                   "(fused_backward needs Adafactor)")
    p.add_argument("--mixed_precision", default="no", choices=["no", "bf16"])
    p.add_argument("--no_checkpointing", action="store_true", help="train without --gradient_checkpointing")
    p.add_argument("--threads", type=int, default=None, help="OMP_NUM_THREADS for the children")
    p.add_argument("--width_divisor", type=int, default=2, help="1: the released SDXL widths; 2 (default): halved")
    p.add_argument("--full_bf16", action="store_true", help="weights, gradients and steps in bfloat16 "
                   "(sets --mixed_precision bf16; the fused backward pass then rounds stochastically)")
    args = p.parse_args()
    if args.full_bf16:
        args.mixed_precision = "bf16"

    files = prepare(args.workdir, args.resolution, args.width_divisor)
    names = [v for v in args.variants.split(",") if v]
    results = {}
    for name in names:
        print(f"running {name} ...", flush=True)
        results[name] = run_variant(name, files, args)
        r = results[name]
        print(f"  step peak RSS {r['step_peak_rss_mib']:.0f} MiB (RSS before the step {r['rss_before_step_mib']:.0f}), "
              f"process peak {r['process_peak_rss_mib']:.0f} MiB, step {r['step_seconds']:.1f} s, "
              f"loss {r['final_loss']}", flush=True)

    size = "released SDXL widths" if args.width_divisor == 1 else f"SDXL widths divided by {args.width_divisor}"
    size += ", full bf16" if args.full_bf16 else ""
    print(f"\n{size}, {args.resolution}x{args.resolution}, batch 1, {args.optimizer}, "
          f"mixed precision {args.mixed_precision}, gradient checkpointing {'off' if args.no_checkpointing else 'on'}")
    print(f"{'variant':16s} {'step peak MiB':>14s} {'vs plain':>9s} {'process peak MiB':>17s} {'step s':>7s}")
    base = results.get("plain", {}).get("step_peak_rss_mib")
    for name in names:
        r = results[name]
        rel = f"{(r['step_peak_rss_mib'] / base - 1) * 100:+.1f}%" if base else "-"
        print(f"{name:16s} {r['step_peak_rss_mib']:14.0f} {rel:>9s} {r['process_peak_rss_mib']:17.0f} "
              f"{r['step_seconds']:7.1f}")
    if base and "fused_backward" in results:
        cut = 1 - results["fused_backward"]["step_peak_rss_mib"] / base
        print(f"fused backward pass: step peak {cut:.1%} lower than plain (target: at least 40%)")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"settings": vars(args), "results": results}, f, indent=2)


if __name__ == "__main__":
    main()
