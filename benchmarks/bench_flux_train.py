"""FLUX.1 LoRA training on the CPU: peak memory and speed of each memory option.

    .venv/bin/python benchmarks/bench_flux_train.py [--workdir /tmp/bench_flux_train] [--steps 3]
        [--resolution 256] [--configs baseline,checkpointing,...] [--threads 2]

The job (issue 7, "Benchmark"): a compact FLUX.1-dev at the released width (hidden 3072,
24 heads; 2 double + 4 single blocks, random weights, made once with
`tools/make_tiny_model.py --arch flux-dev --full_size --depth 2 --depth_single 4
--save_precision bf16` (the same functions, built directly in bf16 to need half the RAM);
its T5 has the real width with 2 layers), LoRA rank 16 on the
transformer (`networks.lora_flux`, `--network_train_unet_only`), 256x256, batch 1, bf16
mixed precision, AdamW lr 1e-4, latents and text-encoder outputs cached to disk first
(not timed; the T5 is released afterwards), `--t5xxl_max_token_length 128`.

Configurations, each in its own fresh process, one after the other:

    baseline                 bf16 weights
    checkpointing            + --gradient_checkpointing
    cpu_offload              + --gradient_checkpointing --cpu_offload_checkpointing
    fp8                      + --fp8_base
    fp8_checkpointing        + --fp8_base --gradient_checkpointing
    blocks_to_swap           + --gradient_checkpointing --blocks_to_swap 4

Measured per run (in the training process, by wrappers around the trainer's own methods):
peak RSS of the whole run (VmHWM: loading and caching included), peak RSS of the training
steps alone (VmHWM reset through /proc/self/clear_refs just before the first step, after
the caches were made and the T5 released), RSS after loading, seconds per step (median of
the timed steps after one warm-up step).

On a CPU, `--blocks_to_swap` and `--cpu_offload_checkpointing` cannot lower RSS: they move
weights / saved activations from GPU memory into CPU memory, which is where everything
already is. The script therefore also prints what each would keep off a GPU, computed from
the tensors: the swapped blocks' weight bytes, and the checkpointed block inputs per step.
The machine is shared with other jobs: RSS figures are robust, s/step is not (the load
average during each run is recorded next to it).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {
    "baseline": [],
    "checkpointing": ["--gradient_checkpointing"],
    "cpu_offload": ["--gradient_checkpointing", "--cpu_offload_checkpointing"],
    "fp8": ["--fp8_base"],
    "fp8_checkpointing": ["--fp8_base", "--gradient_checkpointing"],
    "blocks_to_swap": ["--gradient_checkpointing", "--blocks_to_swap", "4"],
}

CHILD = r"""
import json, os, statistics, sys, time
sys.path.insert(0, ROOT_PLACEHOLDER)
import torch
torch.set_num_threads(int(os.environ.get("BENCH_THREADS", "2")))
import flux_train_network
from library.arch.flux import FluxArchitecture
from library.training.trainer import NetworkTrainer
from benchmarks.process_memory import reset_peak_rss, status_mib as status

def loadavg():
    with open("/proc/loadavg") as f:
        return float(f.read().split()[0])

marks, steps, loads = {}, [], []
t = {}

def wrap(cls, name, before=None, after=None):
    orig = getattr(cls, name)
    def wrapper(*a, **k):
        if before:
            before(a, k)
        out = orig(*a, **k)
        if after:
            after(a, k, out)
        return out
    setattr(cls, name, wrapper)

wrap(FluxArchitecture, "load_models", lambda a, k: t.__setitem__("load", time.perf_counter()),
     lambda a, k, o: (marks.__setitem__("load_s", time.perf_counter() - t["load"]),
                      marks.__setitem__("rss_loaded_mib", status("VmRSS"))))

def before_loss(a, k):
    if "first" not in t:
        t["first"] = True
        marks["rss_before_steps_mib"] = status("VmRSS")
        marks["peak_before_steps_mib"] = status("VmHWM")  # loading and caching
        marks["hwm_reset"] = reset_peak_rss()  # from here on VmHWM is the training steps' peak
        t["step"] = time.perf_counter()
wrap(NetworkTrainer, "training_loss", before_loss)

def after_step(a, k, o):
    now = time.perf_counter()
    steps.append(now - t["step"])
    loads.append(loadavg())
    t["step"] = now
wrap(NetworkTrainer, "after_step", None, after_step)

summary = flux_train_network.main(sys.argv[1:])
train_peak = status("VmHWM")
out = dict(marks=marks, step_s=steps, loadavg=loads, peak_rss_mib=max(train_peak, marks.get("peak_before_steps_mib", 0)),
           train_peak_rss_mib=train_peak, losses=[v for _, v in summary["loss_history"]])
print("BENCH_RESULT " + json.dumps(out))
"""


def prepare(workdir: str, resolution: int) -> dict:
    os.makedirs(workdir, exist_ok=True)
    model = os.path.join(workdir, "flux_compact")
    if not os.path.exists(os.path.join(model, "t5xxl.safetensors")):
        # What `tools/make_tiny_model.py --arch flux-dev --full_size --depth 2 --depth_single 4
        # --save_precision bf16 --out <model>` writes, made with the same functions but built in
        # bf16 from the start: the tool builds float32 models first (~7.5 GB of RAM).
        print("creating the compact full-width FLUX.1-dev set (bf16, ~3 GB) ...", flush=True)
        import torch

        from library.models.flux.tiny import make_flux_models, save_flux_model_set

        torch.set_default_dtype(torch.bfloat16)
        try:
            models = make_flux_models("flux-dev", seed=0, full_size=True, depth=2, depth_single=4)
        finally:
            torch.set_default_dtype(torch.float32)
        save_flux_model_set(models, model, "flux-dev", dtype=torch.bfloat16)
        del models
    from library.tokenizer_builder import ensure_tokenizer_cache

    tok = ensure_tokenizer_cache(os.path.join(workdir, "tok"), targets=["clip-l", "t5"])
    data_root = os.path.join(workdir, f"data{resolution}")
    if not os.path.isdir(os.path.join(data_root, "1_sks")):
        from library.data.synthetic import make_color_dataset

        make_color_dataset(data_root, "sks", count=4, size=(resolution, resolution))
    return {"model": model, "tok": str(tok), "data_root": data_root}


def argv_for(inp: dict, out_dir: str, steps: int, resolution: int, extra: list[str]) -> list[str]:
    m = inp["model"]
    return [
        "--pretrained_model_name_or_path", os.path.join(m, "flux1-dev.safetensors"),
        "--ae", os.path.join(m, "ae.safetensors"), "--clip_l", os.path.join(m, "clip_l.safetensors"),
        "--t5xxl", os.path.join(m, "t5xxl.safetensors"), "--tokenizer_cache_dir", inp["tok"],
        "--train_data_dir", inp["data_root"], "--caption_extension", ".txt", "--resolution", str(resolution),
        "--output_dir", out_dir, "--output_name", "bench", "--network_module", "networks.lora_flux",
        "--network_dim", "16", "--network_alpha", "16", "--network_train_unet_only", "--train_batch_size", "1",
        "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--mixed_precision", "bf16",
        "--cache_latents_to_disk", "--cache_text_encoder_outputs_to_disk", "--t5xxl_max_token_length", "128",
        "--max_data_loader_n_workers", "0", "--seed", "0", "--save_model_as", "safetensors", *extra,
    ]


def run(inp, workdir, name, steps, resolution, threads) -> dict:
    out_dir = os.path.join(workdir, "out", name)
    os.makedirs(out_dir, exist_ok=True)
    cmd = [sys.executable, "-c", CHILD.replace("ROOT_PLACEHOLDER", repr(ROOT)),
           *argv_for(inp, out_dir, steps, resolution, CONFIGS[name])]
    env = dict(os.environ, BENCH_THREADS=str(threads), OMP_NUM_THREADS=str(threads), HF_HUB_OFFLINE="1",
               TOKENIZERS_PARALLELISM="false")
    log = os.path.join(workdir, "logs", f"{name}.log")
    os.makedirs(os.path.dirname(log), exist_ok=True)
    t0 = time.time()
    with open(log, "w") as f:
        p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=f, text=True, env=env)
    if p.returncode != 0:
        raise SystemExit(f"{name}: failed (see {log})")
    line = next(ln for ln in p.stdout.splitlines() if ln.startswith("BENCH_RESULT "))
    res = json.loads(line[len("BENCH_RESULT "):])
    res["wall_s"] = time.time() - t0
    timed = res["step_s"][1:] or res["step_s"]
    res["s_per_step"] = statistics.median(timed)
    res["loadavg_mean"] = statistics.mean(res["loadavg"]) if res["loadavg"] else None
    return res


def device_savings(inp, resolution: int) -> dict:
    """What --blocks_to_swap 4 and --cpu_offload_checkpointing keep off a GPU, from tensor sizes."""
    import torch

    from library.models.flux.loading import analyze_checkpoint
    from library.models.flux.model import DoubleStreamBlock, SingleStreamBlock
    from library.training.block_swap import flux_swap_counts

    cfg = analyze_checkpoint(os.path.join(inp["model"], "flux1-dev.safetensors"))
    with torch.device("meta"):
        d = DoubleStreamBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio, cfg.qkv_bias)
        s = SingleStreamBlock(cfg.hidden_size, cfg.num_heads, cfg.mlp_ratio)
    nb = lambda m, b: sum(p.numel() for p in m.parameters()) * b  # noqa: E731
    nd, ns = flux_swap_counts(4, cfg.depth, cfg.depth_single_blocks)
    tokens_img = (resolution // 16) ** 2
    tokens = tokens_img + 128
    # checkpointed inputs of each block: double (img, txt, vec), single (x, vec); bf16
    per_step = (cfg.depth * (tokens * cfg.hidden_size) + cfg.depth_single_blocks * tokens * cfg.hidden_size) * 2
    return {
        "swap_bf16_mib": (nd * nb(d, 2) + ns * nb(s, 2)) / 2**20,
        "swap_fp8_mib": (nd * nb(d, 1) + ns * nb(s, 1)) / 2**20,
        "swapped": f"{nd} double + {ns} single",
        "offloaded_activations_mib": per_step / 2**20,
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", default="/tmp/bench_flux_train")
    p.add_argument("--steps", type=int, default=3, help="steps per run (the first is a warm-up)")
    p.add_argument("--resolution", type=int, default=256)
    p.add_argument("--configs", default=",".join(CONFIGS))
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    inp = prepare(args.workdir, args.resolution)
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        raise SystemExit(f"unknown configs {unknown}; known: {list(CONFIGS)}")
    results = {}
    for name in names:
        print(f"running {name} ({' '.join(CONFIGS[name]) or 'bf16'}) ...", flush=True)
        results[name] = run(inp, args.workdir, name, args.steps, args.resolution, args.threads)
        r = results[name]
        print(f"  peak RSS {r['peak_rss_mib']:.0f} MiB, training-steps peak {r['train_peak_rss_mib']:.0f} MiB, "
              f"after load {r['marks'].get('rss_loaded_mib', float('nan')):.0f} MiB, {r['s_per_step']:.1f} s/step "
              f"(load avg {r['loadavg_mean']:.1f})", flush=True)
    dev = device_savings(inp, args.resolution)
    base = results.get("baseline")
    print()
    print("| configuration | peak RSS (MiB) | training-steps peak RSS (MiB) | vs baseline | s/step | load avg |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        delta = "" if base is None else f"{r['train_peak_rss_mib'] - base['train_peak_rss_mib']:+.0f}"
        print(f"| {name} ({' '.join(CONFIGS[name]) or 'bf16'}) | {r['peak_rss_mib']:.0f} | "
              f"{r['train_peak_rss_mib']:.0f} | {delta} | {r['s_per_step']:.1f} | {r['loadavg_mean']:.1f} |")
    print()
    print(f"GPU memory these options would keep off the device (from tensor sizes): --blocks_to_swap 4 moves "
          f"{dev['swapped']} blocks = {dev['swap_bf16_mib']:.0f} MiB of bf16 weights ({dev['swap_fp8_mib']:.0f} MiB "
          f"with --fp8_base); --cpu_offload_checkpointing moves {dev['offloaded_activations_mib']:.1f} MiB of "
          f"checkpointed block inputs per step at {args.resolution}x{args.resolution}.")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"results": results, "device_savings": dev, "configs": CONFIGS}, f, indent=2)


if __name__ == "__main__":
    main()
