"""Load a full-size SD1.5-architecture checkpoint: our loader vs diffusers from_single_file.

    .venv/bin/python benchmarks/bench_load_sd.py [--workdir /tmp/bench_sd] [--repeats 3]

Makes (once) a random-weight SD1.5 file in fp16 with the released widths, plus a diffusers
config folder (configs only). Each measurement runs in a fresh process with the page cache
warm (the file is read once beforehand), timing only the load call, and reports wall time
and peak RSS (whole process, and the increase over the process after its imports).
The "_touched" rows also read every weight once after loading: both loaders map the file
lazily, so only then are all pages resident and counted.
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

CHILD = r"""
import json, resource, sys, time
sys.path.insert(0, ROOT_PLACEHOLDER)
import torch, diffusers, transformers
from library.models.sd.loading import load_sd_models
from diffusers import StableDiffusionPipeline
def rss_mib():  # peak RSS so far
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
import psutil
base = psutil.Process().memory_info().rss / 2**20
mode, path, cfg = sys.argv[1], sys.argv[2], sys.argv[3]
t = time.perf_counter()
if mode.startswith("ours"):
    m = load_sd_models(path)
    models = (m.unet, m.vae, m.text_encoder)
else:
    p = StableDiffusionPipeline.from_single_file(path, config=cfg, torch_dtype=torch.float16, local_files_only=True,
                                                 tokenizer=None, safety_checker=None, feature_extractor=None)
    models = (p.unet, p.vae, p.text_encoder)
if mode.endswith("_touched"):
    s = 0.0
    for mod in models:
        for q in mod.parameters():
            s += float(q.view(-1)[:: max(1, q.numel() // 1024)].float().sum()) + float(q.sum())
elapsed = time.perf_counter() - t
dtypes = sorted({str(q.dtype) for mod in models for q in mod.parameters()})
print(json.dumps(dict(mode=mode, seconds=elapsed, peak_rss_mib=rss_mib(), base_rss_mib=base, dtypes=dtypes)))
"""


def make_inputs(workdir: str) -> tuple[str, str]:
    import torch

    from library.models.sd.tiny import make_sd_models

    path = os.path.join(workdir, "sd15_random_fp16.safetensors")
    cfg = os.path.join(workdir, "sd15_config")
    if os.path.exists(path) and os.path.exists(os.path.join(cfg, "model_index.json")):
        return path, cfg
    os.makedirs(workdir, exist_ok=True)
    print("creating a full-size random SD1.5 checkpoint (fp16) ...", flush=True)
    models = make_sd_models("sd1", seed=0, full_size=True, dtype=torch.float16)
    from library.models.sd.saving import save_ldm_checkpoint, scheduler_config

    save_ldm_checkpoint(models, path)
    for name, model in (("unet", models.unet), ("vae", models.vae), ("text_encoder", models.text_encoder)):
        os.makedirs(os.path.join(cfg, name), exist_ok=True)
        if name == "text_encoder":
            model.config.to_json_file(os.path.join(cfg, name, "config.json"))
        else:
            model.save_config(os.path.join(cfg, name))
    os.makedirs(os.path.join(cfg, "scheduler"), exist_ok=True)
    with open(os.path.join(cfg, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(False), f)
    with open(os.path.join(cfg, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": [None, None],
                   "safety_checker": [None, None], "feature_extractor": [None, None], "requires_safety_checker": False}, f)
    return path, cfg


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_sd")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    path, cfg = make_inputs(args.workdir)
    size_mib = os.path.getsize(path) / 2**20
    with open(path, "rb") as f:  # warm the page cache so both loaders read from memory
        while f.read(64 << 20):
            pass
    code = CHILD.replace("ROOT_PLACEHOLDER", repr(ROOT))
    results: dict[str, list[dict]] = {}
    for _ in range(args.repeats):
        for mode in ("diffusers", "ours", "diffusers_touched", "ours_touched"):
            out = subprocess.run([sys.executable, "-c", code, mode, path, cfg], capture_output=True, text=True)
            if out.returncode != 0:
                print(out.stderr[-3000:])
                raise SystemExit(f"{mode} failed")
            results.setdefault(mode, []).append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"\nfile: {path} ({size_mib:.0f} MiB, fp16)  repeats: {args.repeats}")
    print(f"{'loader':<14}{'median s':>10}{'peak RSS MiB':>14}{'RSS increase':>14}{'increase/file':>15}  dtypes")
    best = {}
    for mode, runs in results.items():
        secs = sorted(r["seconds"] for r in runs)[len(runs) // 2]
        peak = max(r["peak_rss_mib"] for r in runs)
        inc = max(r["peak_rss_mib"] - r["base_rss_mib"] for r in runs)
        best[mode] = secs
        print(f"{mode:<14}{secs:>10.2f}{peak:>14.0f}{inc:>14.0f}{inc / size_mib:>15.2f}  {','.join(runs[0]['dtypes'])}")
    print(f"\ntime ratio ours/diffusers: lazy {best['ours'] / best['diffusers']:.3f}, "
          f"all weights read {best['ours_touched'] / best['diffusers_touched']:.3f}")


if __name__ == "__main__":
    main()
