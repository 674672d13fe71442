"""FLUX.1 LoRA tools: networks/flux_merge_lora.py, flux_extract_lora.py, convert_flux_lora.py.

References: the LoRA applied at runtime (forward hooks adding ratio * alpha/r * up(down(x)) to
each adapted Linear of our transformer / CLIP-L / T5) for merged models; diffusers'
FluxTransformer2DModel with its own kohya converter, `load_lora_weights` and `fuse_lora` for
the merge and the converted files; the known deltas for extraction; the summed deltas for
LoRA + LoRA merges. Synthetic LoRAs follow formats.md (lora_unet_double_blocks_N_img_attn_qkv,
split_qkv stored block-diagonal, lora_te1_ CLIP-L, lora_te3_ T5).

Tolerances (float32, measured values printed): merged model vs runtime LoRA, outputs ~1e-6
(allowed 1e-4); vs diffusers fuse_lora ~1e-6 (allowed 1e-4); extraction relative error ~1e-6
(allowed 1e-3); converted deltas bit-exact for power-of-two alpha/rank, ~1e-7 otherwise.
"""

from __future__ import annotations

import hashlib
import inspect
import math
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from library.errors import UserInputError

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from flux_helpers import diffusers_flux_from_bfl, random_inputs, tiny_flux_files  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module", autouse=True)
def _quiet():
    old = os.environ.get("SD_TOOLS_PROGRESS")
    os.environ["SD_TOOLS_PROGRESS"] = "0"
    yield
    if old is None:
        os.environ.pop("SD_TOOLS_PROGRESS", None)
    else:
        os.environ["SD_TOOLS_PROGRESS"] = old


@pytest.fixture(scope="module")
def tiny():
    paths = tiny_flux_files("flux-dev")
    with safe_open(paths["flux"], "pt") as f:
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return paths, shapes


def digest(path) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


# -- synthetic kohya FLUX LoRAs -----------------------------------------------------------------
def kname(prefix: str, path: str) -> str:
    return f"{prefix}_{path.replace('.', '_')}"


def add_module(sd, name, out_f, in_f, rank, alpha, g, parts=None, scale=0.05):
    """A module of `rank` (per part when `parts` lists the part rows: a split_qkv module stored
    block-diagonal, formats.md a.2)."""
    if parts:
        downs = [torch.randn(rank, in_f, generator=g) * scale for _ in parts]
        up = torch.zeros(out_f, rank * len(parts))
        row = 0
        for j, rows in enumerate(parts):
            up[row:row + rows, j * rank:(j + 1) * rank] = torch.randn(rows, rank, generator=g) * scale
            row += rows
        sd[f"{name}.lora_down.weight"] = torch.cat(downs, 0)
        sd[f"{name}.lora_up.weight"] = up
    else:
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, in_f, generator=g) * scale
        sd[f"{name}.lora_up.weight"] = torch.randn(out_f, rank, generator=g) * scale
    if alpha is not None:
        sd[f"{name}.alpha"] = torch.tensor(float(alpha))


UNET_MODULES = ["double_blocks.0.img_attn.qkv", "double_blocks.0.img_mod.lin", "double_blocks.1.txt_mlp.0",
                "double_blocks.1.txt_attn.proj", "double_blocks.0.img_mlp.2", "single_blocks.0.linear1",
                "single_blocks.3.modulation.lin", "single_blocks.1.linear2", "img_in", "txt_in",
                "guidance_in.in_layer", "time_in.out_layer", "vector_in.in_layer", "final_layer.adaLN_modulation.1",
                "final_layer.linear"]
SPLIT_MODULES = ["double_blocks.1.img_attn.qkv", "single_blocks.2.linear1"]  # split_qkv layout
CLIP_MODULES = ["text_model.encoder.layers.0.self_attn.q_proj", "text_model.encoder.layers.3.mlp.fc1"]
T5_MODULES = ["encoder.block.0.layer.0.SelfAttention.v", "encoder.block.1.layer.1.DenseReluDense.wi_0"]


def te_shapes(paths):
    from library.models.flux.text_encoders import load_clip_l, load_t5xxl

    clip, t5 = load_clip_l(paths["clip_l"]), load_t5xxl(paths["t5xxl"])
    out = {}
    for prefix, model, names in (("lora_te1", clip, CLIP_MODULES), ("lora_te3", t5, T5_MODULES)):
        mods = dict(model.named_modules())
        for n in names:
            key = n if n in mods else n[len("text_model."):]
            out[kname(prefix, n)] = tuple(mods[key].weight.shape)
    return out


def make_flux_lora(path, shapes, rank=4, alpha=2.0, seed=0, unet=UNET_MODULES, split=SPLIT_MODULES,
                   te=None, metadata=None):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for m in unet:
        out_f, in_f = shapes[m + ".weight"]
        add_module(sd, kname("lora_unet", m), out_f, in_f, rank, alpha, g)
    for m in split:
        out_f, in_f = shapes[m + ".weight"]
        parts = [out_f // 3] * 3 if m.endswith("qkv") else [out_f // 7] * 3 + [4 * out_f // 7]
        add_module(sd, kname("lora_unet", m), out_f, in_f, rank, alpha, g, parts)
    for name, (out_f, in_f) in (te or {}).items():
        add_module(sd, name, out_f, in_f, rank, alpha, g)
    save_file(sd, str(path), metadata)
    return sd


def module_deltas(sd, ratio=1.0):
    """{module name: ratio * alpha / rank * up @ down} (rank = rows of lora_down)."""
    out = {}
    for k in sd:
        if k.endswith(".lora_down.weight"):
            name = k[: -len(".lora_down.weight")]
            down, up = sd[k].double(), sd[f"{name}.lora_up.weight"].double()
            alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
            out[name] = ratio * alpha / down.shape[0] * (up @ down)
    return out


class RuntimeLoRA:
    """LoRAs applied at runtime: each adapted Linear's output gets + ratio * scale * up(down(x))."""

    def __init__(self, model, prefix, loras, root=""):
        self.handles = []
        for path, module in model.named_modules():
            if not isinstance(module, torch.nn.Linear):
                continue
            name = kname(prefix, root + path)
            terms = []
            for sd, ratio in loras:
                if f"{name}.lora_down.weight" in sd:
                    down, up = sd[f"{name}.lora_down.weight"], sd[f"{name}.lora_up.weight"]
                    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else down.shape[0]
                    terms.append((down, up, ratio * alpha / down.shape[0]))
            if terms:
                self.handles.append(module.register_forward_hook(
                    lambda _m, inp, out, terms=terms: out + sum(s * ((inp[0] @ d.T) @ u.T) for d, u, s in terms)))


def run_tool(module, argv):
    import importlib

    return importlib.import_module(module).main(argv)


# -- merge into the model files ----------------------------------------------------------------
@pytest.fixture(scope="module")
def merged(tiny, tmp_path_factory):
    paths, shapes = tiny
    d = tmp_path_factory.mktemp("flux_merge")
    tes = te_shapes(paths)
    a = make_flux_lora(d / "a.safetensors", shapes, rank=4, alpha=2.0, seed=1, te=tes,
                       metadata={"modelspec.title": "Alpha"})
    b = make_flux_lora(d / "b.safetensors", shapes, rank=3, alpha=None, seed=2, unet=UNET_MODULES[:4], split=[],
                       te={kname("lora_te3", T5_MODULES[0]): tes[kname("lora_te3", T5_MODULES[0])]})
    outs = {}
    for mode in ("whole", "mem_eff"):
        o = {k: str(d / f"{mode}_{k}.safetensors") for k in ("flux", "clip_l", "t5xxl")}
        run_tool("networks.flux_merge_lora", [
            "--flux_model", paths["flux"], "--clip_l", paths["clip_l"], "--t5xxl", paths["t5xxl"],
            "--models", str(d / "a.safetensors"), str(d / "b.safetensors"), "--ratios", "0.7", "-0.4",
            "--save_to", o["flux"], "--clip_l_save_to", o["clip_l"], "--t5xxl_save_to", o["t5xxl"],
        ] + (["--mem_eff_load_save"] if mode == "mem_eff" else []))
        outs[mode] = o
    return paths, shapes, [(a, 0.7), (b, -0.4)], outs, d


def test_merged_model_equals_runtime_lora(merged):
    from library.models.flux.loading import load_flux_transformer
    from library.models.flux.text_encoders import load_clip_l, load_t5xxl

    paths, _shapes, loras, outs, _d = merged
    base = load_flux_transformer(paths["flux"])
    before_hooks = None
    inp = random_inputs(base.config, seed=3)
    with torch.no_grad():
        before_hooks = base(**inp)
        RuntimeLoRA(base, "lora_unet", loras)
        runtime = base(**inp)
        ours = load_flux_transformer(outs["whole"]["flux"])(**inp)
    diff = float((ours - runtime).abs().max())
    print(f"transformer: max |merged - runtime LoRA| = {diff:.3g} (LoRA changes outputs by "
          f"{float((runtime - before_hooks).abs().max()):.3g})")
    assert float((runtime - before_hooks).abs().max()) > 1e-2
    assert diff < 1e-4

    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(0))
    for loader, prefix, key, root in ((load_clip_l, "lora_te1", "clip_l", "text_model."), (load_t5xxl, "lora_te3", "t5xxl", "")):
        te = loader(paths[key])
        root = root if not any(n.startswith("text_model.") for n, _ in te.named_modules()) else ""
        with torch.no_grad():
            plain = te(ids).last_hidden_state
            RuntimeLoRA(te, prefix, loras, root)
            runtime = te(ids).last_hidden_state
            ours = loader(outs["whole"][key])(ids).last_hidden_state
        diff = float((ours - runtime).abs().max())
        print(f"{key}: max |merged - runtime LoRA| = {diff:.3g}")
        assert float((runtime - plain).abs().max()) > 1e-3 and diff < 1e-4


def test_merged_weights_and_mem_eff_identical(merged):
    paths, _shapes, loras, outs, _d = merged
    deltas = {}
    for sd, ratio in loras:
        for name, dl in module_deltas(sd, ratio).items():
            deltas[name] = deltas.get(name, 0) + dl
    for key in ("flux", "clip_l", "t5xxl"):
        base, whole, eff = load_file(paths[key]), load_file(outs["whole"][key]), load_file(outs["mem_eff"][key])
        assert list(whole) == list(base) and list(eff) == list(base)
        prefix = {"flux": "lora_unet", "clip_l": "lora_te1", "t5xxl": "lora_te3"}[key]
        changed = 0
        for k, w in base.items():
            assert torch.equal(whole[k], eff[k]), f"{key} {k}: --mem_eff_load_save differs"
            name = kname(prefix, k[: -len(".weight")]) if k.endswith(".weight") else None
            if name in deltas:
                expect = w.double() + deltas[name]
                assert float((whole[k].double() - expect).abs().max()) < 1e-6, k
                changed += 1
            else:
                assert torch.equal(whole[k], w), f"{key} {k} changed without a LoRA module"
        assert changed == sum(1 for n in deltas if n.startswith(prefix + "_"))
    with safe_open(outs["whole"]["flux"], "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "flux-1-dev"
    assert md["modelspec.merged_from"] == "flux1-dev, Alpha, b" and md["modelspec.title"] == "whole_flux"


def _diffusers_kohya_converter_any_width(monkeypatch, hidden):
    """diffusers' own kohya FLUX LoRA converter with the single blocks' linear1 split sizes taken
    from the model (diffusers 0.42.1 writes 3072 there; ENVIRONMENT.md)."""
    import diffusers.loaders.lora_conversion_utils as lcu
    import diffusers.loaders.lora_pipeline as lp

    src = inspect.getsource(lcu._convert_kohya_flux_lora_to_diffusers)
    assert "dims=[3072, 3072, 3072, 12288]" in src
    src = src.replace("dims=[3072, 3072, 3072, 12288]", f"dims=[{hidden}, {hidden}, {hidden}, {4 * hidden}]")
    ns = dict(vars(lcu))
    exec(compile(src, lcu.__file__, "exec"), ns)
    monkeypatch.setattr(lp, "_convert_kohya_flux_lora_to_diffusers", ns["_convert_kohya_flux_lora_to_diffusers"])


def _diffusers_pipe(paths, config):
    from diffusers import FluxPipeline

    from library.models.flux.text_encoders import load_clip_l

    transformer = diffusers_flux_from_bfl(paths["flux"], config)
    clip = load_clip_l(paths["clip_l"])
    return FluxPipeline(scheduler=None, vae=None, text_encoder=clip, tokenizer=None, text_encoder_2=None,
                        tokenizer_2=None, transformer=transformer)


def _diffusers_forward(tr, inp):
    return tr(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
              timestep=inp["timesteps"], img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0],
              guidance=inp["guidance"], return_dict=False)[0]


def _peft_layers(model) -> int:
    return sum(1 for _n, m in model.named_modules() if hasattr(m, "lora_A") and len(getattr(m, "lora_A", {})) > 0)


def test_merged_model_equals_diffusers_fuse_lora(merged, monkeypatch):
    """A kohya file through diffusers' own converter, load_lora_weights and fuse_lora.

    diffusers 0.42.1's kohya FLUX converter writes the input/output layers (x_embedder,
    context_embedder, time_text_embed.*, norm_out, proj_out) without the `transformer.` prefix,
    so load_lora_weights never applies them, turns CLIP attention modules into old-style
    `to_q_lora` keys that a transformers-5 CLIP does not take, and drops T5 modules. The LoRA
    here has the modules it does apply: every block layer (fused, split_qkv) and CLIP MLPs."""
    from library.models.flux.loading import load_flux_transformer
    from library.models.flux.text_encoders import load_clip_l

    paths, shapes, _loras, _outs, d = merged
    blocks = [m for m in UNET_MODULES if m.startswith(("double_blocks", "single_blocks"))]
    clip_mlp = kname("lora_te1", CLIP_MODULES[1])
    lora = d / "blocks.safetensors"
    make_flux_lora(lora, shapes, rank=4, alpha=2.0, seed=4, unet=blocks, te={clip_mlp: te_shapes(paths)[clip_mlp]})
    single_out = str(d / "single_flux.safetensors")
    run_tool("networks.flux_merge_lora", ["--flux_model", paths["flux"], "--clip_l", paths["clip_l"],
                                          "--models", str(lora), "--ratios", "0.7", "--save_to", single_out,
                                          "--clip_l_save_to", str(d / "single_clip.safetensors")])
    ours = load_flux_transformer(single_out)
    _diffusers_kohya_converter_any_width(monkeypatch, ours.config.hidden_size)
    pipe = _diffusers_pipe(paths, ours.config)
    pipe.load_lora_weights(str(lora))
    n_unet = sum(3 if m.endswith("qkv") else 4 if m.endswith("linear1") else 1 for m in blocks + SPLIT_MODULES)
    assert _peft_layers(pipe.transformer) == n_unet  # every module of the file is applied
    assert _peft_layers(pipe.text_encoder) == 1
    pipe.fuse_lora(lora_scale=0.7, components=["transformer", "text_encoder"])
    inp = random_inputs(ours.config, seed=5)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        a = ours(**inp)
        b = _diffusers_forward(pipe.transformer, inp)
        ta = load_clip_l(str(d / "single_clip.safetensors"))(ids).last_hidden_state
        tb = pipe.text_encoder(ids).last_hidden_state
    print(f"max |ours merged - diffusers fused|: transformer {float((a - b).abs().max()):.3g}, "
          f"CLIP-L {float((ta - tb).abs().max()):.3g}")
    assert float((a - b).abs().max()) < 1e-4 and float((ta - tb).abs().max()) < 1e-4


# -- LoRA + LoRA --------------------------------------------------------------------------------
def test_merge_loras_together_concat_and_same_rank(tiny, tmp_path):
    paths, shapes = tiny
    md = {"modelspec.architecture": "flux-1-dev/lora", "modelspec.title": "A", "ss_base_model_version": "flux1"}
    a = make_flux_lora(tmp_path / "a.safetensors", shapes, rank=4, alpha=2.0, seed=1, metadata=md)
    b = make_flux_lora(tmp_path / "b.safetensors", shapes, rank=4, alpha=4.0, seed=2, unet=UNET_MODULES[:6],
                       split=SPLIT_MODULES[:1])
    c = make_flux_lora(tmp_path / "c.safetensors", shapes, rank=2, alpha=1.0, seed=3, unet=UNET_MODULES[6:], split=[])
    da, db, dc = module_deltas(a, 0.8), module_deltas(b, -0.5), module_deltas(c, 1.5)

    out = tmp_path / "concat.safetensors"
    run_tool("networks.flux_merge_lora", ["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                          str(tmp_path / "c.safetensors"), "--ratios", "0.8", "-0.5", "1.5", "--concat",
                                          "--save_to", str(out)])
    got = module_deltas(load_file(str(out)))
    assert set(got) == set(da) | set(db) | set(dc)
    worst = 0.0
    for name, dl in got.items():
        expect = da.get(name, 0) + db.get(name, 0) + dc.get(name, 0)
        worst = max(worst, float((dl - expect).norm() / expect.norm()))
    print(f"--concat: largest relative error vs summed deltas {worst:.2e}")
    assert worst < 1e-6
    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_module"] == "networks.lora" and meta["ss_base_model_version"] == "flux1"
    assert meta["ss_network_dim"] == "Dynamic" and meta["modelspec.architecture"] == "flux-1-dev/lora"
    assert meta["modelspec.merged_from"] == "A, b, c"

    # equal ranks without --concat: factors added. Modules one LoRA has are that LoRA's
    # ratio * delta exactly; shared ones are (sum c_i up_i) @ (sum c_i' down_i) * scale_0
    out = tmp_path / "sum.safetensors"
    run_tool("networks.flux_merge_lora", ["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"),
                                          "--ratios", "0.8", "-0.5", "--save_to", str(out)])
    got = module_deltas(load_file(str(out)))
    for name, dl in got.items():
        if name not in db:
            assert float((dl - da[name]).norm() / da[name].norm()) < 1e-6
            continue
        sa, sb = 2.0 / 4, 4.0 / 4
        ka, kb = 0.8 * sa / sa, -0.5 * sb / sa
        up = a[f"{name}.lora_up.weight"].double() * abs(ka) ** 0.5 + b[f"{name}.lora_up.weight"].double() * abs(kb) ** 0.5
        down = (a[f"{name}.lora_down.weight"].double() * abs(ka) ** 0.5
                - b[f"{name}.lora_down.weight"].double() * abs(kb) ** 0.5)
        down_rows = down.shape[0]
        expect = (up @ down) * (2.0 / down_rows)
        assert float((dl - expect).norm() / expect.norm()) < 1e-6, name
    # different ranks need --concat
    with pytest.raises(UserInputError, match="ranks differ.*--concat"):
        run_tool("networks.flux_merge_lora", ["--models", str(tmp_path / "a.safetensors"), str(tmp_path / "c.safetensors"),
                                              "--save_to", str(tmp_path / "x.safetensors")])
    # also a diffusers / ai-toolkit input is merged (converted on reading)
    aitk = tmp_path / "a_aitk.safetensors"
    run_tool("networks.convert_flux_lora", ["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path",
                                            str(tmp_path / "a.safetensors"), "--dst_path", str(aitk)])
    out = tmp_path / "from_aitk.safetensors"
    run_tool("networks.flux_merge_lora", ["--models", str(aitk), "--diffusers", "--ratios", "0.8", "--save_to", str(out)])
    got = module_deltas(load_file(str(out)))
    assert set(got) == set(da)
    assert max(float((got[n] - da[n]).norm() / da[n].norm()) for n in da) < 1e-6


# -- extraction -----------------------------------------------------------------------------------
def test_extract_recovers_known_deltas(tiny, tmp_path, monkeypatch):
    from library.lora_tools.flux import default_targets

    paths, shapes = tiny
    base = load_file(paths["flux"])
    g = torch.Generator().manual_seed(7)
    targets = default_targets(base)
    assert len(targets) == 2 * 10 + 4 * 3
    tuned, deltas = dict(base), {}
    for k in targets:
        out_f, in_f = base[k].shape
        dl = (torch.randn(out_f, 3, generator=g) @ torch.randn(3, in_f, generator=g)) * 0.02
        tuned[k] = base[k] + dl
        deltas[kname("lora_unet", k[: -len(".weight")])] = (tuned[k].double() - base[k].double())
    tuned_path = tmp_path / "tuned.safetensors"
    save_file(tuned, str(tuned_path))
    results = {}
    for mode in ("whole", "mem_eff"):
        out = tmp_path / f"{mode}.safetensors"
        run_tool("networks.flux_extract_lora", ["--model_org", paths["flux"], "--model_tuned", str(tuned_path),
                                                "--save_to", str(out), "--dim", "3", "--clamp_quantile", "1"]
                 + (["--mem_eff_safe_open"] if mode == "mem_eff" else []))
        results[mode] = load_file(str(out))
    assert results["whole"].keys() == results["mem_eff"].keys()
    assert all(torch.equal(results["whole"][k], results["mem_eff"][k]) for k in results["whole"])
    got = module_deltas(results["whole"])
    assert set(got) == set(deltas)
    worst = max(float((got[n] - deltas[n]).norm() / deltas[n].norm()) for n in deltas)
    print(f"extraction: largest relative error of the recovered deltas {worst:.2e}")
    assert worst < 1e-3
    # the randomized top-k SVD that real-width layers get (forced here on the tiny layers)
    from library.lora_tools import linalg

    monkeypatch.setattr(linalg, "DENSE_SVD_LIMIT", 8)
    run_tool("networks.flux_extract_lora", ["--model_org", paths["flux"], "--model_tuned", str(tuned_path),
                                            "--save_to", str(tmp_path / "randomized.safetensors"), "--dim", "3",
                                            "--clamp_quantile", "1", "--mem_eff_safe_open"])
    got_r = module_deltas(load_file(str(tmp_path / "randomized.safetensors")))
    worst_r = max(float((got_r[n] - deltas[n]).norm() / deltas[n].norm()) for n in deltas)
    print(f"extraction with the randomized SVD: largest relative error {worst_r:.2e}")
    assert worst_r < 1e-3
    monkeypatch.undo()
    with safe_open(str(tmp_path / "whole.safetensors"), "pt") as f:
        md = f.metadata()
    assert md["ss_network_module"] == "networks.lora_flux" and md["ss_network_dim"] == "3"
    assert md["ss_network_alpha"] == "3.0" and md["ss_network_args"] == "{}"
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"

    # the extracted LoRA merged back into the base gives the tuned model
    back = tmp_path / "back.safetensors"
    run_tool("networks.flux_merge_lora", ["--flux_model", paths["flux"], "--models", str(tmp_path / "whole.safetensors"),
                                          "--save_to", str(back), "--mem_eff_load_save"])
    merged = load_file(str(back))
    assert max(float((merged[k] - tuned[k]).abs().max()) for k in targets) < 1e-5

    # default clamp (0.99) changes little but is applied
    run_tool("networks.flux_extract_lora", ["--model_org", paths["flux"], "--model_tuned", str(tuned_path),
                                            "--save_to", str(tmp_path / "clamped.safetensors"), "--dim", "3",
                                            "--save_precision", "bf16", "--no_metadata"])
    clamped = load_file(str(tmp_path / "clamped.safetensors"))
    assert all(t.dtype == torch.bfloat16 for t in clamped.values())
    with safe_open(str(tmp_path / "clamped.safetensors"), "pt") as f:
        assert not any(k.startswith("modelspec.") for k in f.metadata())


def test_svd_top_is_near_optimal():
    """linalg.svd_top on a 2048 x 1280 matrix (randomized path) with a slowly decaying spectrum:
    the rank-r truncation's Frobenius error is within 1e-3 of the optimum (the dense SVD's), and
    a matrix of rank <= r comes back exactly."""
    from library.lora_tools import linalg

    g = torch.Generator().manual_seed(0)
    m, n = 2048, 1280
    u, _ = torch.linalg.qr(torch.randn(m, n, generator=g))
    v, _ = torch.linalg.qr(torch.randn(n, n, generator=g))
    s = 1 / torch.arange(1, n + 1, dtype=torch.float32) ** 0.5
    w = (u * s) @ v.T
    for r in (4, 32):
        U, S, Vh = linalg.svd_top(w, r)
        assert U.shape[1] < n  # the randomized path, not a dense SVD
        err = float(torch.linalg.norm(w - (U[:, :r] * S[:r]) @ Vh[:r]))
        ud, sd, vd = torch.linalg.svd(w, full_matrices=False)
        best = float(torch.linalg.norm(w - (ud[:, :r] * sd[:r]) @ vd[:r]))
        print(f"svd_top rank {r}: Frobenius error {err / best - 1:+.2e} relative to the dense SVD's")
        assert err <= best * (1 + 1e-3)
    low = (torch.randn(m, 6, generator=g) @ torch.randn(6, n, generator=g))
    U, S, Vh = linalg.svd_top(low, 6)
    assert float(torch.linalg.norm(low - (U[:, :6] * S[:6]) @ Vh[:6]) / torch.linalg.norm(low)) < 1e-5


# -- conversion -----------------------------------------------------------------------------------
# PEFT targets layers by name suffix: a LoRA on the top-level proj_out also wraps the single
# blocks' proj_out layers it has no weights for (zero delta), and says so.
@pytest.mark.filterwarnings("ignore:While injecting the PEFT adapters:RuntimeWarning")
def test_convert_round_trip_and_diffusers_loads_it(tiny, tmp_path, monkeypatch):
    from library.models.flux.loading import load_flux_transformer
    from library.models.flux.text_encoders import load_clip_l

    paths, shapes = tiny
    tes = te_shapes(paths)
    # alpha/rank 1/4 or 1/16 (powers of two: folding is exact) for most modules; 1/12 for the
    # split double-block qkv (rank 3 x 4), 3/4 for one module
    src = make_flux_lora(tmp_path / "kohya.safetensors", shapes, rank=4, alpha=1.0, seed=11, te=tes,
                         metadata={"ss_network_module": "networks.lora_flux"})
    src["lora_unet_single_blocks_1_linear2.alpha"] = torch.tensor(3.0)
    save_file(src, str(tmp_path / "kohya.safetensors"), {"ss_network_module": "networks.lora_flux"})
    k1, a1 = tmp_path / "kohya.safetensors", tmp_path / "aitk.safetensors"
    k2, a2 = tmp_path / "kohya2.safetensors", tmp_path / "aitk2.safetensors"
    run_tool("networks.convert_flux_lora", ["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", str(k1),
                                            "--dst_path", str(a1)])
    run_tool("networks.convert_flux_lora", ["--src_path", str(a1), "--dst_path", str(k2)])  # defaults: ai-toolkit -> sd-scripts
    run_tool("networks.convert_flux_lora", ["--src", "kohya", "--dst", "diffusers", "--src_path", str(k2),
                                            "--dst_path", str(a2)])
    aitk, back, aitk2 = load_file(str(a1)), load_file(str(k2)), load_file(str(a2))
    assert all(k.endswith((".lora_A.weight", ".lora_B.weight")) for k in aitk)
    assert "transformer.transformer_blocks.0.attn.to_q.lora_A.weight" in aitk
    assert "transformer.single_transformer_blocks.2.proj_mlp.lora_B.weight" in aitk
    assert "text_encoder.text_model.encoder.layers.0.self_attn.q_proj.lora_A.weight" in aitk
    assert "text_encoder_2.encoder.block.1.layer.1.DenseReluDense.wi_0.lora_B.weight" in aitk
    # ai-toolkit -> kohya -> ai-toolkit is the identity, bit for bit
    assert aitk.keys() == aitk2.keys() and all(torch.equal(aitk[k], aitk2[k]) for k in aitk)
    # kohya -> ai-toolkit -> kohya: same modules, same ranks (split and unsplit), same deltas
    ds, db = module_deltas(src), module_deltas(back)
    assert ds.keys() == db.keys()
    for name in ds:
        assert back[f"{name}.lora_down.weight"].shape == src[f"{name}.lora_down.weight"].shape, name
        scale = float(src.get(f"{name}.alpha", src[f"{name}.lora_down.weight"].shape[0])) / \
            src[f"{name}.lora_down.weight"].shape[0]
        exact = math.log2(scale).is_integer()  # folding a power of two into the factors is exact
        err = float((db[name] - ds[name]).abs().max() / ds[name].abs().max())
        assert (torch.equal(db[name], ds[name]) if exact else err < 1e-6), (name, err)
    # split_qkv modules stay block-diagonal
    up = back["lora_unet_double_blocks_1_img_attn_qkv.lora_up.weight"]
    h = up.shape[0] // 3
    assert up[:h, 4:].count_nonzero() == 0 and up[h:2 * h, :4].count_nonzero() == 0

    # the ai-toolkit file loads in diffusers and every transformer / CLIP-L key is consumed
    no_t5 = {k: v for k, v in aitk.items() if not k.startswith("text_encoder_2.")}
    save_file(no_t5, str(tmp_path / "aitk_no_t5.safetensors"))
    base = load_flux_transformer(paths["flux"])
    pipe = _diffusers_pipe(paths, base.config)
    pipe.load_lora_weights(str(tmp_path / "aitk_no_t5.safetensors"))
    n_modules = len({k.rsplit(".lora_", 1)[0] for k in no_t5})
    assert _peft_layers(pipe.transformer) + _peft_layers(pipe.text_encoder) == n_modules
    pipe.fuse_lora(lora_scale=1.0, components=["transformer", "text_encoder"])
    merged_path = tmp_path / "merged.safetensors"
    run_tool("networks.flux_merge_lora", ["--flux_model", paths["flux"], "--clip_l", paths["clip_l"], "--models", str(k1),
                                          "--save_to", str(merged_path), "--clip_l_save_to", str(tmp_path / "clip.safetensors")])
    inp = random_inputs(base.config, seed=9)
    ids = torch.randint(0, 1000, (2, 77), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        a = load_flux_transformer(str(merged_path))(**inp)
        b = _diffusers_forward(pipe.transformer, inp)
        c = base(**inp)
        ta = load_clip_l(str(tmp_path / "clip.safetensors"))(ids).last_hidden_state
        tb = pipe.text_encoder(ids).last_hidden_state
    print(f"converted file in diffusers vs our merge: transformer {float((a - b).abs().max()):.3g} "
          f"(LoRA effect {float((a - c).abs().max()):.3g}), CLIP-L {float((ta - tb).abs().max()):.3g}")
    assert float((a - c).abs().max()) > 1e-3
    assert float((a - b).abs().max()) < 1e-4 and float((ta - tb).abs().max()) < 1e-4


# -- bad input --------------------------------------------------------------------------------------
def test_bad_input_is_refused_before_anything_is_written(tiny, tmp_path):
    paths, shapes = tiny
    merge = "networks.flux_merge_lora"
    sd_lora = tmp_path / "sd.safetensors"
    save_file({"lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_down.weight": torch.zeros(2, 32),
               "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q.lora_up.weight": torch.zeros(32, 2),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(2, 32),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(64, 2)}, str(sd_lora))
    out = tmp_path / "out.safetensors"
    with pytest.raises(UserInputError, match=r"sd\.safetensors.*SD1\.x/2\.x.*networks/merge_lora\.py"):
        run_tool(merge, ["--flux_model", paths["flux"], "--models", str(sd_lora), "--save_to", str(out)])
    with pytest.raises(UserInputError, match=r"SD1\.x/2\.x"):
        run_tool(merge, ["--models", str(sd_lora), "--save_to", str(out)])

    good = tmp_path / "good.safetensors"
    make_flux_lora(good, shapes, unet=UNET_MODULES[:2], split=[])
    before = digest(paths["flux"]), digest(good)
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        run_tool(merge, ["--flux_model", paths["flux"], "--models", str(good), "--save_to", paths["flux"]])
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        run_tool(merge, ["--models", str(good), "--save_to", str(good)])
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        run_tool("networks.convert_flux_lora", ["--src", "sd-scripts", "--dst", "ai-toolkit", "--src_path", str(good),
                                                "--dst_path", str(good)])
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        run_tool("networks.flux_extract_lora", ["--model_org", paths["flux"], "--model_tuned", str(good),
                                                "--save_to", paths["flux"]])
    assert (digest(paths["flux"]), digest(good)) == before

    wide = tmp_path / "wide.safetensors"  # a LoRA for the real 3072-wide FLUX.1
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4)}, str(wide))
    with pytest.raises(UserInputError, match=r"lora_unet_double_blocks_0_img_attn_proj is for a 3072x3072 layer, "
                                             r"but double_blocks\.0\.img_attn\.proj\.weight .* is 256x256"):
        run_tool(merge, ["--flux_model", paths["flux"], "--models", str(wide), "--save_to", str(out)])
    deep = tmp_path / "deep.safetensors"  # block 18 on a 2-block model
    save_file({"lora_unet_double_blocks_18_img_attn_proj.lora_down.weight": torch.zeros(4, 256),
               "lora_unet_double_blocks_18_img_attn_proj.lora_up.weight": torch.zeros(256, 4)}, str(deep))
    with pytest.raises(UserInputError, match="lora_unet_double_blocks_18_img_attn_proj names no layer.*2 double"):
        run_tool(merge, ["--flux_model", paths["flux"], "--models", str(deep), "--save_to", str(out)])
    with pytest.raises(UserInputError, match="--clip_l is given but --clip_l_save_to is not"):
        run_tool(merge, ["--clip_l", paths["clip_l"], "--models", str(good), "--save_to", str(out)])
    with pytest.raises(UserInputError, match="--flux_model and --clip_l_save_to|are the same file"):
        run_tool(merge, ["--flux_model", paths["flux"], "--clip_l", paths["clip_l"], "--models", str(good),
                         "--save_to", str(out), "--clip_l_save_to", str(out)])
    with pytest.raises(UserInputError, match="--clip_l .*t5xxl.safetensors: not a CLIP text encoder"):
        run_tool(merge, ["--clip_l", paths["t5xxl"], "--models", str(good), "--clip_l_save_to", str(out)])
    with pytest.raises(UserInputError, match="--working_device cuda:7: no CUDA device"):
        run_tool(merge, ["--flux_model", paths["flux"], "--models", str(good), "--save_to", str(out),
                         "--working_device", "cuda:7"])
    with pytest.raises(UserInputError, match="keys are in the sd-scripts layout.*--src sd-scripts"):
        run_tool("networks.convert_flux_lora", ["--src_path", str(good), "--dst_path", str(out)])
    with pytest.raises(UserInputError, match="ranks? (differ|disagree)|lora_B|not a LoRA weight"):
        save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64),
                   "transformer.x_embedder.lora_B.weight": torch.zeros(256, 3)}, str(tmp_path / "badaitk.safetensors"))
        run_tool("networks.convert_flux_lora", ["--src_path", str(tmp_path / "badaitk.safetensors"), "--dst_path", str(out)])
    shorter = tmp_path / "three_single_blocks.safetensors"
    save_file({k: v for k, v in load_file(paths["flux"]).items() if not k.startswith("single_blocks.3.")}, str(shorter))
    with pytest.raises(UserInputError, match="--model_org is .*4 single blocks.* but --model_tuned is .*3 single blocks"):
        run_tool("networks.flux_extract_lora", ["--model_org", paths["flux"], "--model_tuned", str(shorter),
                                                "--save_to", str(out)])
    assert not out.exists()


def test_help_is_light_and_errors_are_one_line(tiny, tmp_path):
    for s in ("networks/flux_merge_lora.py", "networks/flux_extract_lora.py", "networks/convert_flux_lora.py"):
        r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, s), "--help"], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0 and "usage:" in r.stdout, s
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported, f"{s} imports torch for --help"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "networks/flux_merge_lora.py"), "--models", "a.safetensors",
                        "--ratios", "1", "2", "--save_to", "c.safetensors"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1] == \
        "error: --ratios: 2 values for 1 --models; give one ratio per model"


SPEC_OPTIONS = {  # cli-options.md section 7: every option with its default
    "networks/flux_extract_lora.py": {"save_precision": None, "model_org": None, "model_tuned": None,
                                      "mem_eff_safe_open": False, "save_to": None, "dim": 4, "device": None,
                                      "clamp_quantile": 0.99, "no_metadata": False},
    "networks/flux_merge_lora.py": {"save_precision": None, "precision": "float", "flux_model": None, "clip_l": None,
                                    "t5xxl": None, "mem_eff_load_save": False, "loading_device": "cpu",
                                    "working_device": "cpu", "save_to": None, "clip_l_save_to": None,
                                    "t5xxl_save_to": None, "models": None, "ratios": None, "no_metadata": False,
                                    "concat": False, "shuffle": False, "diffusers": False},
    "networks/convert_flux_lora.py": {"src": "ai-toolkit", "dst": "sd-scripts", "src_path": None, "dst_path": None},
}


@pytest.mark.parametrize("script", list(SPEC_OPTIONS))
def test_every_spec_option_with_its_default(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_" + os.path.basename(script)[:-3], os.path.join(ROOT, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    actions = [a for a in mod.setup_parser()._actions if a.dest != "help"]
    assert {a.dest: a.default for a in actions} == SPEC_OPTIONS[script]


def test_fp8_save_precision_and_shuffle(tiny, tmp_path):
    """--save_precision fp8: Linear weights float8_e4m3fn, the rest bf16, and the file loads as a
    FLUX model; --shuffle permutes the rank components without changing any delta."""
    from library.models.flux.loading import load_flux_transformer

    paths, shapes = tiny
    lora = tmp_path / "l.safetensors"
    sd = make_flux_lora(lora, shapes, unet=UNET_MODULES[:3], split=[])
    out = tmp_path / "fp8.safetensors"
    run_tool("networks.flux_merge_lora", ["--flux_model", paths["flux"], "--models", str(lora), "--save_to", str(out),
                                          "--save_precision", "fp8", "--precision", "bf16", "--mem_eff_load_save",
                                          "--no_metadata"])
    got = load_file(str(out))
    assert got["double_blocks.0.img_attn.qkv.weight"].dtype == torch.float8_e4m3fn
    assert got["double_blocks.0.img_attn.qkv.bias"].dtype == torch.bfloat16
    assert got["double_blocks.0.img_attn.norm.query_norm.scale"].dtype == torch.bfloat16
    load_flux_transformer(str(out), dtype="bf16")
    with safe_open(str(out), "pt") as f:
        assert not any(k.startswith("modelspec.") for k in (f.metadata() or {}))
    shuffled = tmp_path / "shuffled.safetensors"
    run_tool("networks.flux_merge_lora", ["--models", str(lora), "--shuffle", "--save_to", str(shuffled)])
    got = load_file(str(shuffled))
    d0, d1 = module_deltas(sd), module_deltas(got)
    assert max(float((d1[n] - d0[n]).abs().max()) for n in d0) < 1e-9
    assert any(not torch.equal(got[k], sd[k]) for k in sd if k.endswith("lora_down.weight"))
