"""Benchmark: resize_lora and svd_merge_lora on SDXL-size LoRAs, on the CPU.

    python benchmarks/bench_lora_tools.py                 # rank 128 fp16 inputs, resize to 32, merge to 64
    python benchmarks/bench_lora_tools.py --rank 32 --arch sd1 --merge_rank 32

The LoRA has every module networks.lora trains for the full-size model (SDXL: all U-Net
attention-block layers, both text encoders; layer names and shapes taken from the real
topology, built on the meta device so nothing is allocated), random fp16 factors. Each tool
runs in a fresh process (the real command line via its main()), which reports its wall time,
its peak RSS (ru_maxrss) and the RSS it had before the tool started (Python + torch), and
the per-module time breakdown by layer kind and shape. A dense-SVD reference (what a tool
that forms each delta would do) is timed on a sample of modules and extrapolated.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)


def lora_layout(arch: str) -> dict[str, tuple]:
    """{lora name: layer weight shape} of every module networks.lora trains on the full-size model."""
    from accelerate import init_empty_weights

    from library.lora_tools.sd import model_layers

    with init_empty_weights():
        if arch == "sdxl":
            from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

            from library.models.sdxl.loading import SDXLModels
            from library.models.sdxl.tiny import sdxl_configs
            from library.models.sdxl.unet import SDXLUNet

            unet_cfg, _vae, te1_cfg, te2_cfg = sdxl_configs(full_size=True)
            models = SDXLModels(CLIPTextModel(CLIPTextConfig(**te1_cfg)),
                                CLIPTextModelWithProjection(CLIPTextConfig(**te2_cfg)), None, SDXLUNet(unet_cfg), "", "")
        else:
            from diffusers import UNet2DConditionModel
            from transformers import CLIPTextConfig, CLIPTextModel

            from library.models.sd.loading import SDModels
            from library.models.sd.tiny import sd_configs

            unet_cfg, _vae, te_cfg = sd_configs("sd1", full_size=True)
            models = SDModels(CLIPTextModel(CLIPTextConfig(**te_cfg)), None, UNet2DConditionModel(**unet_cfg), False, "", "")
    return {name: tuple(t.module.weight.shape) for name, (_part, t) in model_layers(models, conv=False).items()}


def write_lora(path: str, layout: dict, rank: int, seed: int) -> int:
    import torch

    from library.io.safetensors_io import save_state_dict

    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, shape in layout.items():
        out, inp = shape[0], shape[1]
        extra = shape[2:]
        sd[f"{name}.lora_down.weight"] = (torch.randn(rank, inp, *extra, generator=g) / inp ** 0.5).half()
        sd[f"{name}.lora_up.weight"] = (torch.randn(out, rank, *([1] * len(extra)), generator=g) * 0.01).half()
        sd[f"{name}.alpha"] = torch.tensor(rank / 2, dtype=torch.float16)
    save_state_dict(sd, path, {"ss_network_module": "networks.lora", "ss_network_dim": str(rank),
                               "ss_network_alpha": str(rank / 2)})
    return os.path.getsize(path)


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process. ru_maxrss is not used: Linux carries the
    parent's resident size over fork and exec into it, so a child started by a big parent
    would report the parent's peak."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(tool: str, argv: list[str]) -> None:
    """Run one tool's main() in this (fresh) process and print a JSON report."""
    import torch  # noqa: F401  (baseline RSS includes torch, as any run of the tool does)

    if tool == "resize":
        import networks.resize_lora as mod
    else:
        import networks.svd_merge_lora as mod
    from library.lora_tools.ops import kind_breakdown

    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = mod.main(argv)
    wall = time.perf_counter() - t0
    res = out["result"]
    print("@@" + json.dumps({
        "wall_s": wall, "svd_s": res.seconds(), "peak_rss_kib": _status_kib("VmHWM"),
        "baseline_rss_kib": base, "modules": len(res.modules), "breakdown": kind_breakdown(res.reports),
        "min_fro": min(r.retention.fro_fraction for r in res.reports),
    }))


def run_child(tool: str, argv: list[str]) -> dict:
    env = dict(os.environ, SD_TOOLS_PROGRESS="0")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tool, "--"] + argv, capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{r.stdout}\n{r.stderr}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def dense_reference(path: str, samples: int = 6) -> tuple[float, int]:
    """Seconds a dense SVD of the full delta would take for the whole file, extrapolated from
    the largest and smallest modules (by m*n*min(m, n))."""
    import torch

    from library.lora_tools.lorafile import read_lora

    lf = read_lora(path)
    mods = sorted(lf.modules.values(), key=lambda m: m.flat_shape[0] * m.flat_shape[1] * min(m.flat_shape))
    picks = mods[:: max(1, len(mods) // samples)][:samples] + [mods[-1]]
    cost = lambda m: m.flat_shape[0] * m.flat_shape[1] * min(m.flat_shape)  # noqa: E731
    rate = []
    for m in picks:
        w = m.delta()
        t0 = time.perf_counter()
        torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        rate.append((time.perf_counter() - t0) / cost(m))
    lf.close()
    per_cost = sum(rate) / len(rate)
    return per_cost * sum(cost(m) for m in mods), len(mods)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", choices=["sdxl", "sd1"], default="sdxl")
    p.add_argument("--rank", type=int, default=128, help="rank of the input LoRAs")
    p.add_argument("--new_rank", type=int, default=32, help="resize target")
    p.add_argument("--merge_rank", type=int, default=64, help="svd_merge target")
    p.add_argument("--threads", type=int, default=None, help="torch threads for the dense reference (default: torch's)")
    p.add_argument("--no_dense", action="store_true", help="skip the dense-SVD reference")
    p.add_argument("--workdir", type=str, default=None, help="where the LoRAs go (default: a new temporary folder)")
    p.add_argument("--reuse", action="store_true", help="keep input LoRAs already in --workdir")
    args = p.parse_args()

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    work = args.workdir or tempfile.mkdtemp(prefix="bench_lora_tools_")
    os.makedirs(work, exist_ok=True)
    layout = lora_layout(args.arch)
    a, b = os.path.join(work, "a.safetensors"), os.path.join(work, "b.safetensors")
    t0 = time.perf_counter()
    if args.reuse and os.path.exists(a) and os.path.exists(b):
        size_a, size_b = os.path.getsize(a), os.path.getsize(b)
    else:
        size_a = write_lora(a, layout, args.rank, 1)
        size_b = write_lora(b, layout, args.rank, 2)
    print(f"{args.arch} LoRA: {len(layout)} modules, rank {args.rank}, fp16: {size_a / 2**20:.0f} MiB per file "
          f"(written in {time.perf_counter() - t0:.0f} s); {os.cpu_count()} CPU cores, load average "
          f"{os.getloadavg()[0]:.1f}")

    runs = [
        ("resize", f"resize_lora --new_rank {args.new_rank}", size_a,
         ["--model", a, "--save_to", os.path.join(work, "resized.safetensors"), "--new_rank", str(args.new_rank)]),
        ("svd_merge", f"svd_merge_lora of 2 files --new_rank {args.merge_rank}", size_a + size_b,
         ["--models", a, b, "--ratios", "0.7", "0.5", "--new_rank", str(args.merge_rank),
          "--save_to", os.path.join(work, "merged.safetensors")]),
    ]
    for tool, label, in_size, argv in runs:
        rep = run_child(tool, argv)
        peak = rep["peak_rss_kib"] * 1024
        over = (rep["peak_rss_kib"] - rep["baseline_rss_kib"]) * 1024
        print(f"\n{label}: wall {rep['wall_s']:.1f} s (SVDs {rep['svd_s']:.1f} s), {rep['modules']} modules")
        print(f"  peak RSS {peak / 2**20:.0f} MiB = {peak / in_size:.2f}x the input size ({in_size / 2**20:.0f} MiB); "
              f"above the Python+torch baseline of {rep['baseline_rss_kib'] / 1024:.0f} MiB: {over / 2**20:.0f} MiB "
              f"= {over / in_size:.2f}x")
        print(f"  lowest Frobenius norm kept: {rep['min_fro']:.2%}")
        print("  per-module time by kind and shape:")
        for line in rep["breakdown"]:
            print("    " + line)
    if not args.no_dense:
        est, n = dense_reference(a)
        print(f"\ndense-SVD reference (forming each delta): about {est:.0f} s for the {n} modules of one file "
              f"(extrapolated from 7 modules)")


if __name__ == "__main__":
    main()
