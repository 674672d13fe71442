"""Speed and peak memory of sdxl_train_network.py (LoRA) on a full-topology SDXL.

    # on a CUDA machine: the issue's setting (full-size SDXL, 1024x1024, batch 1, bf16, checkpointing)
    .venv/bin/python benchmarks/bench_sdxl_train_network.py --resolution 1024 --mixed_precision bf16
    # on a CPU: widths halved, 256x256, float32
    .venv/bin/python benchmarks/bench_sdxl_train_network.py --width_divisor 2 --resolution 256 --steps 3

The model is random (`tools/make_tiny_model.py --arch sdxl --full_size [--width_divisor N]`,
written once into --workdir), the dataset 4 synthetic images. The run is the real script
in a fresh process: networks.lora rank --dim on both text encoders and the U-Net (or
`--unet_only`: U-Net only with the text-encoder outputs cached), latents cached, gradient
checkpointing, AdamW, --steps optimizer steps. Printed: seconds per step (after the first,
which includes warm-up), peak GPU memory (torch.cuda.max_memory_allocated / reserved) or
peak RSS on a CPU (of the whole run, and of the training steps alone: the kernel's VmHWM
is reset through /proc/self/clear_refs when the first step starts). Results also go to
<workdir>/results.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

RUNNER = r"""
import json, os, sys, time
sys.path.insert(0, os.environ["BENCH_ROOT"])
import torch
from library.training import trainer as trainer_mod
from benchmarks.process_memory import reset_peak_rss, status_mib

times = []
real_loss = trainer_mod.NetworkTrainer.training_loss

def timed(self, ctx, batch):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    if not times:  # training starts: from here on VmHWM is the peak of the steps alone
        reset_peak_rss()
    times.append(time.perf_counter())
    return real_loss(self, ctx, batch)

trainer_mod.NetworkTrainer.training_loss = timed
if torch.cuda.is_available():
    torch.cuda.reset_peak_memory_stats()
import sdxl_train_network
summary = sdxl_train_network.main(sys.argv[1:])
out = {"step_starts": times, "summary": {k: v for k, v in summary.items() if k != "loss_history"},
       "steps_peak_rss_mib": status_mib("VmHWM")}
if torch.cuda.is_available():
    out["max_allocated_gib"] = torch.cuda.max_memory_allocated() / 2**30
    out["max_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    out["device"] = torch.cuda.get_device_name()
print("BENCH_RESULT " + json.dumps(out))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_sdxl_train_network")
    p.add_argument("--width_divisor", type=int, default=1, help="1 = real SDXL widths")
    p.add_argument("--resolution", type=int, default=1024)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--dim", type=int, default=16)
    p.add_argument("--mixed_precision", default="no", choices=["no", "fp16", "bf16"])
    p.add_argument("--unet_only", action="store_true", help="train the U-Net only, text-encoder outputs cached")
    p.add_argument("--no_checkpointing", action="store_true")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (OMP_NUM_THREADS)")
    a = p.parse_args()

    os.makedirs(a.workdir, exist_ok=True)
    model = os.path.join(a.workdir, f"sdxl_w{a.width_divisor}.safetensors")
    py = sys.executable
    if not os.path.exists(model):
        cmd = [py, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", "sdxl", "--full_size", "--out", model]
        if a.width_divisor != 1:
            cmd += ["--width_divisor", str(a.width_divisor)]
        subprocess.run(cmd, check=True)
    tok = os.path.join(a.workdir, "tokenizers")
    if not os.path.isdir(tok):
        subprocess.run([py, os.path.join(ROOT, "tools", "make_tokenizers.py"), "--out", tok, "--only", "clip-l", "clip-g"],
                       check=True)
    data = os.path.join(a.workdir, f"data_{a.resolution}")
    if not os.path.isdir(data):
        sys.path.insert(0, ROOT)
        from library.data.synthetic import make_color_dataset

        make_color_dataset(data, count=4, size=(a.resolution, a.resolution))
    out = os.path.join(a.workdir, "out")
    argv = [
        "--pretrained_model_name_or_path", model, "--tokenizer_cache_dir", tok, "--train_data_dir", data,
        "--caption_extension", ".txt", "--resolution", str(a.resolution), "--output_dir", out, "--output_name", "bench",
        "--network_module", "networks.lora", "--network_dim", str(a.dim), "--network_alpha", str(a.dim),
        "--learning_rate", "1e-4", "--train_batch_size", "1", "--max_train_steps", str(a.steps), "--seed", "1",
        "--max_data_loader_n_workers", "0", "--cache_latents", "--mixed_precision", a.mixed_precision,
        "--optimizer_type", "AdamW",
    ]
    if not a.no_checkpointing:
        argv.append("--gradient_checkpointing")
    if a.unet_only:
        argv += ["--network_train_unet_only", "--cache_text_encoder_outputs"]
    env = dict(os.environ, BENCH_ROOT=ROOT, HF_HUB_OFFLINE="1")
    if a.threads:
        env["OMP_NUM_THREADS"] = str(a.threads)
    t0 = time.time()
    r = subprocess.run([py, "-c", RUNNER, *argv], capture_output=True, text=True, env=env)
    if r.returncode != 0:
        sys.stderr.write(r.stderr[-4000:])
        raise SystemExit(r.returncode)
    line = next(ln for ln in r.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    res = json.loads(line[len("BENCH_RESULT "):])
    starts = res.pop("step_starts")
    per_step = [b - a_ for a_, b in zip(starts, starts[1:])]
    steady = per_step[1:] or per_step
    res.update(settings=vars(a), wall_seconds=round(time.time() - t0, 1),
               seconds_per_step_after_first=round(sum(steady) / max(1, len(steady)), 3) if steady else None)
    with open(os.path.join(a.workdir, "results.json"), "w") as f:
        json.dump(res, f, indent=2)
    s = res["summary"]
    print(f"sdxl_train_network LoRA rank {a.dim}, width 1/{a.width_divisor}, {a.resolution}x{a.resolution}, batch 1, "
          f"{a.mixed_precision}, checkpointing {'off' if a.no_checkpointing else 'on'}"
          f"{', U-Net only (TE outputs cached)' if a.unet_only else ''}:")
    print(f"  {s['steps']} steps, {res['seconds_per_step_after_first']} s/step after the first "
          f"({1 / res['seconds_per_step_after_first']:.2f} it/s)" if res["seconds_per_step_after_first"] else "")
    if "max_allocated_gib" in res:
        print(f"  peak GPU memory {res['max_allocated_gib']:.2f} GiB allocated, {res['max_reserved_gib']:.2f} GiB reserved "
              f"({res['device']})")
    print(f"  peak RSS {s['peak_rss_mib']} MiB (whole run: loading and caching included); "
          f"training steps alone {res['steps_peak_rss_mib']:.0f} MiB")


if __name__ == "__main__":
    main()
