"""LoRA training speed and memory: train_network.py vs a minimal diffusers+peft loop.

    .venv/bin/python benchmarks/bench_train_network.py [--workdir /tmp/bench_train] [--pairs 2]
        [--warmup 3] [--steps 10] [--mode lockstep|sequential] [--quiet_wait 120] [--threads N]

The job (issue 4, "Benchmark"): SD1.5-architecture U-Net at the released widths with
random weights (fp16 single file, made once with tools/make_tiny_model.py --full_size),
LoRA rank 16 / alpha 16 on the U-Net only, 256x256, batch 1, fp32 on the CPU, latents of
8 synthetic images cached before training, AdamW lr 1e-4, gradient clipping at 1.0.

Contenders, each in its own fresh process:

* ours: `train_network.py` in-process (train_network.main(argv)) with timing hooks wrapped
  around SDArchitecture.load_models, NetworkTrainer.cache_latents_if_requested,
  NetworkTrainer.create_network, NetworkTrainer.training_loss and NetworkTrainer.after_step
  (wrappers only: the code that runs is the trainer's own);
* diffusers+peft: benchmarks/_diffusers_peft_loop.py, the same work written directly
  against diffusers and peft.

Pairs run one after another, the order alternating (A B, B A, ...). Within a pair the
default `--mode lockstep` starts both processes and lets them take turns: A's setup
(imports, load, caching), B's setup, then step 1 of A, step 1 of B, step 2 of A, ... Only
one computes at a time, and same-numbered steps run back to back, so both see the same
machine load. (On 2 cores, another process taking one core slows torch's two threads
several-fold; the machine is shared, so this matters.) `--mode sequential` runs the
pair's processes one after the other instead (needs half the RAM).

Measured per run: model load call, latent caching of the 8 images, process start to
first training step, seconds, CPU time and page faults per step, peak RSS (ru_maxrss
of the process), and the CPU other processes used during each phase and step (from
/proc/stat minus the contender's own CPU time). Setup figures are medians over runs whose
setup had the machine to itself (other processes < 0.25 cores), s/step the median over
step pairs that both ran on an idle machine (when there are at least 5), otherwise
everything, labelled so. Results: <workdir>/results.json; child logs: <workdir>/logs/.
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

# The reference implementation (sd-scripts) on this kind of machine, from the issue.
REFERENCE = {"s_per_step": (5.1, 5.3), "peak_rss_mib": 7.1e9 / 2**20, "load_s": (9.0, 12.0), "cache_s": 20.0}

OURS_CHILD = r"""
import os, time

def turn():
    # lockstep with the other contender; see benchmarks/_diffusers_peft_loop.py
    w, r = os.environ.get("BENCH_SYNC_W"), os.environ.get("BENCH_SYNC_R")
    if w and r:
        if getattr(turn, "started", False):
            os.write(int(w), b"d")
        turn.started = True
        if os.read(int(r), 1) != b"g":
            raise SystemExit("benchmark driver went away")
    return time.perf_counter()

T_PROCESS = turn()
import json, resource, sys
sys.path.insert(0, ROOT_PLACEHOLDER)
import torch
import train_network
from library.arch.sd import SDArchitecture
from library.training.trainer import NetworkTrainer

def rss():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

def rusage():
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"user_s": r.ru_utime, "sys_s": r.ru_stime, "minflt": r.ru_minflt, "majflt": r.ru_majflt}

marks = {"imported": time.perf_counter() - T_PROCESS}
rss_mib = {"imported": rss()}
step_starts, step_ends, targets, ru_start, ru_end = [], [], [], [], []

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

t = {}
wrap(SDArchitecture, "load_models", lambda a, k: t.__setitem__("load", time.perf_counter()),
     lambda a, k, o: (marks.__setitem__("load_s", time.perf_counter() - t["load"]), rss_mib.__setitem__("loaded", rss()),
                      marks.__setitem__("loaded_at", time.perf_counter() - T_PROCESS)))
wrap(NetworkTrainer, "cache_latents_if_requested", lambda a, k: t.__setitem__("cache", time.perf_counter()),
     lambda a, k, o: (marks.__setitem__("cache_s", time.perf_counter() - t["cache"]), rss_mib.__setitem__("cached", rss())))
wrap(NetworkTrainer, "create_network", None,
     lambda a, k, o: targets.extend(l.lora_name for l in o.unet_loras))

def first_loss(a, k):  # the end of the setup phase (the first batch is already fetched)
    if not step_starts:
        marks["first_step_start"] = time.perf_counter() - T_PROCESS
        marks["after_cache_to_first_step_s"] = time.perf_counter() - t["cache"] - marks["cache_s"]
        step_starts.append(turn())
        ru_start.append(rusage())
wrap(NetworkTrainer, "training_loss", first_loss)

def step_end(a, k, o):  # after the optimizer step, progress bar and per-step bookkeeping
    step_ends.append(time.perf_counter())
    ru_end.append(rusage())
    if len(step_ends) == 1:
        rss_mib["first_step"] = rss()
    step_starts.append(turn())  # the next step (its batch fetch included) starts here
    ru_start.append(rusage())
wrap(NetworkTrainer, "after_step", None, step_end)

summary = train_network.main(sys.argv[1:])
out = dict(contender="ours", marks=marks, rss_mib=rss_mib, peak_rss_mib=rss(),
           step_s=[e - s for s, e in zip(step_starts, step_ends)],
           step_rusage=[{k: b[k] - a[k] for k in a} for a, b in zip(ru_start, ru_end)],
           losses=[v for _, v in summary["loss_history"]], lora_targets=sorted(targets),
           trainable_params=None, torch_threads=torch.get_num_threads(),
           summary={k: v for k, v in summary.items() if k != "loss_history"})
print("BENCH_RESULT " + json.dumps(out))
"""


def loadavg() -> str:
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


def prepare(workdir: str, resolution: int) -> dict:
    """Model file, diffusers config folder, tokenizer cache and dataset (made once, reused)."""
    os.makedirs(workdir, exist_ok=True)
    model = os.path.join(workdir, "sd15_random_fp16.safetensors")
    if not os.path.exists(model):
        print("creating a full-size random SD1.5 checkpoint (fp16, ~2 GB) ...", flush=True)
        subprocess.run([sys.executable, os.path.join(ROOT, "tools", "make_tiny_model.py"), "--arch", "sd1",
                        "--full_size", "--save_precision", "fp16", "--out", model], check=True)
    cfg = os.path.join(workdir, "sd15_config")
    if not os.path.exists(os.path.join(cfg, "model_index.json")):
        write_config_folder(model, cfg)
    from library.tokenizer_builder import ensure_tokenizer_cache

    tok = ensure_tokenizer_cache(os.path.join(workdir, "tok"), targets=None)
    data_root = os.path.join(workdir, f"data{resolution}")
    if not os.path.isdir(os.path.join(data_root, "1_sks")):
        from library.data.synthetic import make_color_dataset

        make_color_dataset(data_root, "sks", count=8, size=(resolution, resolution))
    return {"model": model, "config": cfg, "tok": tok, "data_root": data_root,
            "data": os.path.join(data_root, "1_sks"), "clip_tok": os.path.join(tok, "openai_clip-vit-large-patch14")}


def write_config_folder(model: str, cfg: str) -> None:
    """Configs only (no weights) for diffusers' from_single_file, from the file's own shapes."""
    from library.models.sd.loading import load_sd_models
    from library.models.sd.saving import scheduler_config

    m = load_sd_models(model)  # memory-mapped, nothing is read but the header
    for name, part in (("unet", m.unet), ("vae", m.vae)):
        part.save_config(os.path.join(cfg, name))
    os.makedirs(os.path.join(cfg, "text_encoder"), exist_ok=True)
    m.text_encoder.config.to_json_file(os.path.join(cfg, "text_encoder", "config.json"))
    os.makedirs(os.path.join(cfg, "scheduler"), exist_ok=True)
    with open(os.path.join(cfg, "scheduler", "scheduler_config.json"), "w") as f:
        json.dump(scheduler_config(False), f)
    with open(os.path.join(cfg, "model_index.json"), "w") as f:
        json.dump({"_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
                   "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
                   "scheduler": ["diffusers", "DDIMScheduler"], "tokenizer": [None, None],
                   "safety_checker": [None, None], "feature_extractor": [None, None],
                   "requires_safety_checker": False}, f)


def ours_cmd(inp: dict, out_dir: str, steps: int, resolution: int) -> list[str]:
    argv = [
        "--pretrained_model_name_or_path", inp["model"], "--tokenizer_cache_dir", inp["tok"],
        "--train_data_dir", inp["data_root"], "--caption_extension", ".txt", "--resolution", str(resolution),
        "--output_dir", out_dir, "--output_name", "bench", "--network_module", "networks.lora",
        "--network_dim", "16", "--network_alpha", "16", "--train_batch_size", "1",
        "--max_train_steps", str(steps), "--learning_rate", "1e-4", "--cache_latents",
        "--network_train_unet_only", "--max_data_loader_n_workers", "0", "--seed", "0",
    ]
    return [sys.executable, "-c", OURS_CHILD.replace("ROOT_PLACEHOLDER", repr(ROOT)), *argv]


def theirs_cmd(inp: dict, steps: int) -> list[str]:
    return [sys.executable, os.path.join(ROOT, "benchmarks", "_diffusers_peft_loop.py"), "--model", inp["model"],
            "--config", inp["config"], "--tokenizer", inp["clip_tok"], "--data", inp["data"], "--steps", str(steps)]


def cpu_busy_s() -> float:
    """Busy CPU seconds of the whole machine so far (all processes), from /proc/stat."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:]]
    idle = v[3] + v[4]  # idle + iowait
    return (sum(v[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def process_cpu_s(pid: int) -> float:
    """CPU seconds (all threads, user + system) of a running process."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, IndexError, ValueError):
        return 0.0


def wait_for_quiet(max_wait: float, threshold: float = 0.3, window: float = 5.0) -> float:
    """Wait (at most max_wait s) until other processes use less than `threshold` cores over
    `window` seconds; returns the last measured figure."""
    deadline = time.perf_counter() + max_wait
    while True:
        b0, t0 = cpu_busy_s(), time.perf_counter()
        time.sleep(window)
        busy = (cpu_busy_s() - b0) / (time.perf_counter() - t0)
        if busy < threshold or time.perf_counter() >= deadline:
            return busy
        print(f"  machine busy ({busy:.2f} cores used by other processes); waiting ...", flush=True)


def children_cpu_s() -> float:
    import resource

    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_group(cmds: list[tuple[str, list[str]]], lockstep: bool, logdir: str) -> list[dict]:
    """Run the commands as fresh processes: one after another, or all at once taking turns
    (setup phase, then one training step each, round robin; only one computes at a time).
    Also measures the CPU the rest of the machine used meanwhile (foreign load, in cores)."""
    results = []
    procs = []
    t0, busy0, kids0 = time.perf_counter(), cpu_busy_s(), children_cpu_s()
    loads = [loadavg()]
    env_base = dict(os.environ, HF_HUB_OFFLINE="1")
    for i, (label, cmd) in enumerate(cmds):
        out = open(os.path.join(logdir, f"{i}_{label.replace('+', '_')}.log"), "w")
        env, pass_fds, sync = dict(env_base), (), None
        if lockstep:
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            env.update(BENCH_SYNC_R=str(go_r), BENCH_SYNC_W=str(done_w))
            pass_fds, sync = (go_r, done_w), (go_w, done_r)
        if not lockstep and procs:  # sequential: wait for the previous one
            p_prev = procs[-1]
            p_prev["proc"].wait()
            loads.append(loadavg())
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT, env=env, pass_fds=pass_fds)
        if lockstep:
            os.close(pass_fds[0])
            os.close(pass_fds[1])
        procs.append({"label": label, "proc": proc, "out": out, "sync": sync, "alive": True,
                      "t_start": time.perf_counter(), "load_before": loadavg()})
    if lockstep:
        turns = 0
        while any(p["alive"] for p in procs):
            for p in procs:
                if not p["alive"]:
                    continue
                go_w, done_r = p["sync"]
                busy, own = cpu_busy_s(), process_cpu_s(p["proc"].pid)
                t = time.perf_counter()
                try:
                    os.write(go_w, b"g")
                except BrokenPipeError:
                    p["alive"] = False
                    continue
                if os.read(done_r, 1) != b"d":  # EOF: the process finished (or died)
                    p["alive"] = False
                    os.close(go_w)
                    os.close(done_r)
                    continue
                # CPU the rest of the machine used during this turn, in cores
                p.setdefault("turn_foreign", []).append(
                    (cpu_busy_s() - busy - (process_cpu_s(p["proc"].pid) - own)) / max(1e-3, time.perf_counter() - t))
                turns += 1
                if turns % 4 == 0:
                    loads.append(loadavg())
    for p in procs:
        rc = p["proc"].wait()
        p["out"].close()
        log = open(p["out"].name).read()
        if rc != 0:
            print(log[-5000:])
            raise SystemExit(f"{p['label']} failed (exit {rc}); log: {p['out'].name}")
        line = [x for x in log.splitlines() if x.startswith("BENCH_RESULT ")][-1]
        res = json.loads(line[len("BENCH_RESULT "):])
        res.update(label=p["label"], loadavg_before=p["load_before"], loadavg_after=loadavg(),
                   turn_foreign_cores=p.get("turn_foreign", []))
        results.append(res)
    loads.append(loadavg())
    wall = time.perf_counter() - t0
    foreign = (cpu_busy_s() - busy0 - (children_cpu_s() - kids0)) / wall
    for r in results:
        r.update(group_wall_s=wall, foreign_load_cores=foreign, loadavg_1min=[float(x.split()[0]) for x in loads])
    return results


def lora_name(diffusers_module_name: str) -> str:
    return "lora_unet_" + diffusers_module_name.replace(".", "_")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", default="/tmp/bench_train")
    ap.add_argument("--pairs", type=int, default=2, help="ours/theirs pairs (the order alternates between pairs)")
    ap.add_argument("--warmup", type=int, default=3, help="steps left out of the s/step figure")
    ap.add_argument("--steps", type=int, default=10, help="measured steps after the warm-up")
    ap.add_argument("--resolution", type=int, default=256)
    ap.add_argument("--mode", choices=("lockstep", "sequential"), default="lockstep",
                    help="lockstep: both processes of a pair live at once and take turns step by step, so both "
                         "see the same machine load (needs RAM for both, ~15 GB); sequential: one after the other")
    ap.add_argument("--quiet_wait", type=float, default=120,
                    help="before each pair, wait up to this many seconds for other processes to leave the CPUs "
                         "(< 0.3 cores busy); 0 starts at once")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads of both contenders (OMP_NUM_THREADS); default: torch's own choice")
    args = ap.parse_args()
    if args.threads:
        os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = str(args.threads)
    inp = prepare(args.workdir, args.resolution)
    with open(inp["model"], "rb") as f:  # page cache warm for both contenders
        while f.read(64 << 20):
            pass
    total = args.warmup + args.steps
    logdir = os.path.join(args.workdir, "logs")
    os.makedirs(logdir, exist_ok=True)
    print(f"uptime before: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}", flush=True)
    runs: dict[str, list[dict]] = {"ours": [], "diffusers+peft": []}
    for i in range(args.pairs):
        cmds = [("ours", ours_cmd(inp, os.path.join(args.workdir, "out", f"ours{i}"), total, args.resolution)),
                ("diffusers+peft", theirs_cmd(inp, total))]
        if i % 2:
            cmds.reverse()
        if args.quiet_wait > 0:
            print(f"pair {i + 1}: other processes use {wait_for_quiet(args.quiet_wait):.2f} cores", flush=True)
        for res in run_group(cmds, args.mode == "lockstep", logdir):
            meas = res["step_s"][args.warmup:]
            res["s_per_step"] = statistics.median(meas)
            res["s_per_step_after_first"] = statistics.mean(res["step_s"][1:])
            res["pair"] = i
            runs[res["label"]].append(res)
            la = res["loadavg_1min"]
            tf = res["turn_foreign_cores"][1 + args.warmup:] or [res["foreign_load_cores"]]
            print(f"pair {i + 1} {res['label']:<15} load {res['marks']['load_s']:6.2f} s  cache {res['marks']['cache_s']:6.2f} s  "
                  f"setup {res['marks']['first_step_start']:6.1f} s  {res['s_per_step']:.3f} s/step "
                  f"(steps: {' '.join(f'{s:.2f}' for s in res['step_s'])})  peak RSS {res['peak_rss_mib']:.0f} MiB  "
                  f"load avg {min(la):.2f}-{max(la):.2f}; other processes: {res['foreign_load_cores']:.2f} cores "
                  f"(setup {setup_foreign(res):.2f}, measured steps median {statistics.median(tf):.2f} "
                  f"max {max(tf):.2f})",
                  flush=True)
    print(f"uptime after: {subprocess.run(['uptime'], capture_output=True, text=True).stdout.strip()}")
    report(args, runs)


IDLE = 0.25  # other processes below this many cores: the phase counts as run on an idle machine


def setup_foreign(r: dict) -> float:
    """Cores other processes used during the run's setup (imports, load, caching)."""
    return r["turn_foreign_cores"][0] if r["turn_foreign_cores"] else r["foreign_load_cores"]


def report(args, runs) -> None:
    total = args.warmup + args.steps
    ours_t = set(runs["ours"][0]["lora_targets"])
    theirs_t = {lora_name(n) for n in runs["diffusers+peft"][0]["lora_targets"]}
    same = ours_t == theirs_t
    print(f"\nLoRA layers: ours {len(ours_t)}, diffusers+peft {len(theirs_t)}, same set: {same}")
    if not same:
        print("  only ours:", sorted(ours_t - theirs_t)[:5], " only peft:", sorted(theirs_t - ours_t)[:5])

    # Setup figures: runs whose setup phase had the machine to itself, when there are any.
    idle_runs = {k: [r for r in rs if setup_foreign(r) < IDLE] or rs for k, rs in runs.items()}
    setup_basis = {k: f"{len([r for r in rs if setup_foreign(r) < IDLE])}/{len(rs)} idle" for k, rs in runs.items()}

    def med(label, fn, pool=None):
        return statistics.median(fn(r) for r in (pool or runs)[label])

    # Steps: pairs of same-numbered steps (lockstep: back to back) with the machine idle.
    clean = {"ours": [], "diffusers+peft": []}
    paired, clean_paired = [], []
    for a, b in zip(runs["ours"], runs["diffusers+peft"]):
        fa, fb = a["turn_foreign_cores"][1:], b["turn_foreign_cores"][1:]
        for k in range(args.warmup, min(len(a["step_s"]), len(b["step_s"]))):
            paired.append(b["step_s"][k] / a["step_s"][k])
            if k < min(len(fa), len(fb)) and fa[k] < IDLE and fb[k] < IDLE:
                clean["ours"].append(a["step_s"][k])
                clean["diffusers+peft"].append(b["step_s"][k])
                clean_paired.append(b["step_s"][k] / a["step_s"][k])
    n_clean = len(clean["ours"])
    if n_clean >= 5:
        step_fig = {k: statistics.median(v) for k, v in clean.items()}
        step_basis = f"{n_clean} idle step pairs"
    else:
        step_fig = {k: med(k, lambda r: r["s_per_step"]) for k in runs}
        step_basis = ("all steps (machine busy)" if args.mode == "lockstep"
                      else "all steps (sequential mode: no per-step load figures)")

    def per_step(key):
        return lambda r: statistics.median(u[key] for u in r["step_rusage"][args.warmup:])

    rows = [
        ("model load call, s (1)", lambda r: r["marks"]["load_s"], "load_s", True),
        ("process start -> models loaded, s", lambda r: r["marks"]["loaded_at"], None, True),
        ("cache 8 latents, s", lambda r: r["marks"]["cache_s"], "cache_s", True),
        ("process start -> first step, s", lambda r: r["marks"]["first_step_start"], None, True),
        (f"s/step (steps {args.warmup + 1}-{total})", None, "s_per_step", False),
        ("CPU user s/step", per_step("user_s"), None, False),
        ("CPU system s/step", per_step("sys_s"), None, False),
        ("page faults/step, thousands", lambda r: per_step("minflt")(r) / 1000, None, False),
        ("peak RSS, MiB", lambda r: r["peak_rss_mib"], "peak_rss_mib", False),
        ("peak RSS after model load, MiB", lambda r: r["rss_mib"]["loaded"], None, False),
        ("peak RSS after latent caching, MiB", lambda r: r["rss_mib"]["cached"], None, False),
    ]
    n = len(runs["ours"])
    print(f"\n{'medians, ' + str(n) + ' runs each':<38}{'ours':>9}{'diff+peft':>11}{'ours/them':>11}{'reference':>11}  basis")
    table = {}
    for name, fn, ref_key, setup in rows:
        if fn is None:
            a, b, basis = step_fig["ours"], step_fig["diffusers+peft"], step_basis
        else:
            pool = idle_runs if setup else runs
            a, b = med("ours", fn, pool), med("diffusers+peft", fn, pool)
            basis = (f"ours {setup_basis['ours']}, theirs {setup_basis['diffusers+peft']}" if setup else "all runs")
        ref = REFERENCE.get(ref_key) if ref_key else None
        ref_s = "" if ref is None else (f"{ref[0]:g}-{ref[1]:g}" if isinstance(ref, tuple) else f"{ref:.0f}")
        print(f"{name:<38}{a:>9.2f}{b:>11.2f}{(a / b if b else float('nan')):>11.3f}{ref_s:>11}  {basis}")
        table[name] = {"ours": a, "diffusers+peft": b, "basis": basis}
    print("(1) ours: lazy (memory-mapped) load, imports of diffusers/transformers included, fp32 conversion "
          "later; theirs: fp32 load, imports before the timer")
    run_ratio = med("diffusers+peft", lambda r: r["s_per_step"]) / med("ours", lambda r: r["s_per_step"])
    speed_ratio = statistics.median(clean_paired if n_clean >= 5 else paired)
    paired_ratio = statistics.median(paired)
    rss_ratio = med("ours", lambda r: r["peak_rss_mib"]) / med("diffusers+peft", lambda r: r["peak_rss_mib"])
    ours_rss = med("ours", lambda r: r["peak_rss_mib"])
    ours_load = med("ours", lambda r: r["marks"]["load_s"], idle_runs)
    ours_cache = med("ours", lambda r: r["marks"]["cache_s"], idle_runs)
    checks = {
        f"speed ratio, ours steps/s over theirs, median of the step pairs ({step_basis}) >= 0.95":
            (speed_ratio, speed_ratio >= 0.95),
        "speed ratio, median of all step pairs >= 0.95": (paired_ratio, paired_ratio >= 0.95),
        "speed ratio, medians of the runs' medians >= 0.95": (run_ratio, run_ratio >= 0.95),
        "peak RSS ratio, ours over theirs <= 1.05": (rss_ratio, rss_ratio <= 1.05),
        "s/step below the reference's 5.1": (step_fig["ours"], step_fig["ours"] < REFERENCE["s_per_step"][0]),
        "peak RSS below the reference's 7.1 GB (6771 MiB)": (ours_rss, ours_rss < REFERENCE["peak_rss_mib"]),
        "model load below the reference's 9 s": (ours_load, ours_load < REFERENCE["load_s"][0]),
        "latent caching below the reference's 20 s": (ours_cache, ours_cache < REFERENCE["cache_s"]),
    }
    print()
    for k, (v, ok) in checks.items():
        print(f"{'MET ' if ok else 'MISS'}  {k}: {v:.3f}")
    threads = {r["torch_threads"] for rs in runs.values() for r in rs}
    foreign = [r["foreign_load_cores"] for r in runs["ours"]]
    print(f"\ntorch threads: {sorted(threads)}; CPUs: {os.cpu_count()}; mode: {args.mode}; other processes used "
          f"{min(foreign):.2f}-{max(foreign):.2f} cores on average per pair (idle: < {IDLE})")
    with open(os.path.join(args.workdir, "results.json"), "w") as f:
        json.dump({"args": vars(args), "runs": runs, "table": table, "same_lora_targets": same,
                   "paired_speed_ratio": paired_ratio, "idle_paired_speed_ratio": speed_ratio if n_clean >= 5 else None,
                   "idle_machine_steps": clean,
                   "checks": {k: {"value": v, "met": ok} for k, (v, ok) in checks.items()}}, f, indent=1)
    print(f"details: {os.path.join(args.workdir, 'results.json')}")


if __name__ == "__main__":
    main()
