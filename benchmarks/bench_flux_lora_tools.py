"""Benchmark: flux_merge_lora and flux_extract_lora on a compact real-width FLUX.1, on the CPU.

    python benchmarks/bench_flux_lora_tools.py                         # hidden 3072, 2 double + 4 single blocks, bf16
    python benchmarks/bench_flux_lora_tools.py --workdir /tmp/bflux --reuse --dense_reference

The model is `tools/make_tiny_model.py --arch flux-dev --full_size --depth 2 --depth_single 4
--save_precision bf16` (random weights at the released widths: every layer of a real FLUX.1
block, 2.5 GiB). The LoRA (rank --rank, bf16) adapts every layer networks.lora_flux trains
by default; the "tuned" model is the base plus random rank-32 deltas and a little full-rank
noise on those layers. Each run is a fresh process calling the tool's main(); it reports its
wall time, peak RSS (VmHWM) and the RSS of Python + torch before the tool started:

* flux_merge_lora --precision bf16 --save_precision bf16, with and without --mem_eff_load_save;
* flux_merge_lora with the defaults (--precision float): the model is held in float32;
* flux_extract_lora --dim --extract_dim, with and without --mem_eff_safe_open.

--dense_reference also times a dense SVD of one layer of each shape (what a tool that takes
the full SVD of every difference spends) and extrapolates to the model.
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


def _status_kib(field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of this process (ru_maxrss would carry the parent's peak)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def child(tool: str, argv: list[str]) -> None:
    __import__("torch")  # the baseline includes torch, as any run of the tool does

    if tool == "merge":
        import networks.flux_merge_lora as mod
    else:
        import networks.flux_extract_lora as mod
    base = _status_kib("VmRSS")
    t0 = time.perf_counter()
    out = mod.main(argv)
    wall = time.perf_counter() - t0
    rep = {"wall_s": wall, "peak_rss_kib": _status_kib("VmHWM"), "baseline_rss_kib": base}
    if tool == "extract":
        res = out["result"]
        rep["svd_s"] = res.seconds()
        rep["modules"] = len(res.modules)
        rep["min_fro"] = min(r.retention.fro_fraction for r in res.reports)
    print("@@" + json.dumps(rep))


def run_child(tool: str, argv: list[str]) -> dict:
    env = dict(os.environ, SD_TOOLS_PROGRESS="0")
    r = subprocess.run([sys.executable, os.path.abspath(__file__), "--child", tool, "--"] + argv, capture_output=True,
                       text=True, env=env, cwd=ROOT)
    if r.returncode != 0:
        raise SystemExit(f"{tool} failed:\n{r.stdout}\n{r.stderr}")
    line = [ln for ln in r.stdout.splitlines() if ln.startswith("@@")][-1]
    return json.loads(line[2:])


def make_model(work: str) -> str:
    folder = os.path.join(work, "model")
    path = os.path.join(folder, "flux1-dev.safetensors")
    if not os.path.exists(path):
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", "flux-dev",
                        "--full_size", "--depth", "2", "--depth_single", "4", "--save_precision", "bf16", "--out", folder,
                        "--force"], check=True, cwd=ROOT, stdout=subprocess.DEVNULL)
    return path


def make_tuned(base: str, out: str, seed: int = 1) -> None:
    """base + random rank-32 deltas + 1e-4 full-rank noise on the default targets (streamed)."""
    import torch

    from library.io.tensor_files import TensorFile
    from library.lora_tools.flux import default_targets
    from library.models.flux.loading import write_tensors

    g = torch.Generator().manual_seed(seed)
    with TensorFile(base) as tf:
        keys = tf.keys()
        targets = set(default_targets(keys))

        def fetch(k):
            t = tf.get(k)
            if k not in targets:
                return t
            out_f, in_f = t.shape
            d = (torch.randn(out_f, 32, generator=g) @ torch.randn(32, in_f, generator=g)) * (0.02 / 32 ** 0.5)
            d += torch.randn(out_f, in_f, generator=g) * 1e-4
            return (t.float() + d).to(t.dtype)

        write_tensors(out, [(k, tf.shape(k), tf.dtype(k), (lambda k=k: fetch(k))) for k in keys])


def make_lora(base: str, out: str, rank: int, seed: int = 2) -> int:
    import torch

    from library.io.safetensors_io import save_state_dict
    from library.io.tensor_files import TensorFile
    from library.lora_tools.flux import PREFIX_UNET, default_targets, lora_name

    g = torch.Generator().manual_seed(seed)
    sd = {}
    with TensorFile(base) as tf:
        for k in default_targets(tf.keys()):
            out_f, in_f = tf.shape(k)
            name = lora_name(PREFIX_UNET, k[: -len(".weight")])
            sd[f"{name}.lora_down.weight"] = (torch.randn(rank, in_f, generator=g) / in_f ** 0.5).bfloat16()
            sd[f"{name}.lora_up.weight"] = (torch.randn(out_f, rank, generator=g) * 0.01).bfloat16()
            sd[f"{name}.alpha"] = torch.tensor(float(rank) / 2).bfloat16()
    save_state_dict(sd, out, {"ss_network_module": "networks.lora_flux", "ss_network_dim": str(rank)})
    return len(sd) // 3


def dense_reference(base: str) -> tuple[float, int]:
    """Seconds of dense SVDs for every default target, from one timed SVD per distinct shape."""
    import torch

    from library.io.tensor_files import TensorFile
    from library.lora_tools.flux import default_targets

    with TensorFile(base) as tf:
        shapes = [tuple(tf.shape(k)) for k in default_targets(tf.keys())]
    per_shape = {}
    for shape in sorted(set(shapes)):
        w = torch.randn(*shape)
        t0 = time.perf_counter()
        torch.linalg.svd(w, full_matrices=False)
        per_shape[shape] = time.perf_counter() - t0
        print(f"  dense SVD {shape[0]}x{shape[1]}: {per_shape[shape]:.1f} s", flush=True)
    return sum(per_shape[s] for s in shapes), len(shapes)


def main() -> None:
    if "--child" in sys.argv:
        i = sys.argv.index("--child")
        child(sys.argv[i + 1], sys.argv[sys.argv.index("--") + 1:])
        return
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rank", type=int, default=16, help="rank of the LoRA merged (default 16)")
    p.add_argument("--extract_dim", type=int, default=16, help="--dim of the extraction (default 16)")
    p.add_argument("--workdir", type=str, default=None, help="where the files go (default: a new temporary folder)")
    p.add_argument("--reuse", action="store_true", help="keep the model, tuned model and LoRA already in --workdir")
    p.add_argument("--dense_reference", action="store_true", help="also time dense SVDs (slow: minutes per layer shape)")
    p.add_argument("--only", choices=["merge", "extract"], default=None, help="run only one tool")
    args = p.parse_args()

    work = args.workdir or tempfile.mkdtemp(prefix="bench_flux_lora_tools_")
    os.makedirs(work, exist_ok=True)
    t0 = time.perf_counter()
    base = make_model(work)
    tuned = os.path.join(work, "tuned.safetensors")
    lora = os.path.join(work, f"lora_r{args.rank}.safetensors")
    if not (args.reuse and os.path.exists(tuned)):
        make_tuned(base, tuned)
    if not (args.reuse and os.path.exists(lora)):
        make_lora(base, lora, args.rank)
    gib = os.path.getsize(base) / 2**30
    print(f"compact FLUX.1 dev (hidden 3072, 2 double + 4 single blocks, bf16): {gib:.2f} GiB; LoRA rank {args.rank}: "
          f"{os.path.getsize(lora) / 2**20:.0f} MiB; inputs ready in {time.perf_counter() - t0:.0f} s; "
          f"{os.cpu_count()} CPU cores, load average {os.getloadavg()[0]:.1f}", flush=True)

    out = os.path.join(work, "out.safetensors")
    runs = []
    if args.only in (None, "merge"):
        common = ["--flux_model", base, "--models", lora, "--save_to", out]
        runs += [
            ("merge", "flux_merge_lora --precision bf16 --save_precision bf16", common + ["--precision", "bf16",
                                                                                         "--save_precision", "bf16"]),
            ("merge", "  same + --mem_eff_load_save", common + ["--precision", "bf16", "--save_precision", "bf16",
                                                                "--mem_eff_load_save"]),
            ("merge", "flux_merge_lora (defaults: held in float32, saved float32)", common),
            ("merge", "  same + --mem_eff_load_save", common + ["--mem_eff_load_save"]),
        ]
    if args.only in (None, "extract"):
        common = ["--model_org", base, "--model_tuned", tuned, "--save_to", out, "--dim", str(args.extract_dim)]
        runs += [
            ("extract", f"flux_extract_lora --dim {args.extract_dim}", common),
            ("extract", "  same + --mem_eff_safe_open", common + ["--mem_eff_safe_open"]),
        ]
    for tool, label, argv in runs:
        rep = run_child(tool, argv)
        peak, basel = rep["peak_rss_kib"] / 2**20, rep["baseline_rss_kib"] / 2**20
        extra = ""
        if tool == "extract":
            extra = f"; SVDs {rep['svd_s']:.1f} s for {rep['modules']} layers, lowest Frobenius kept {rep['min_fro']:.2%}"
        print(f"{label}: wall {rep['wall_s']:.1f} s, peak RSS {peak:.2f} GiB ({peak / gib:.2f}x the model file; "
              f"{peak - basel:.2f} GiB above the {basel:.2f} GiB of Python+torch){extra}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
    if os.path.exists(out):
        os.remove(out)
    if args.dense_reference:
        est, n = dense_reference(base)
        print(f"dense-SVD reference: about {est:.0f} s for the {n} layers (one timed SVD per shape)")


if __name__ == "__main__":
    main()
