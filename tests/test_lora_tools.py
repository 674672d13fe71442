"""LoRA tools: resize, SVD merge, merge (into a checkpoint and LoRA-LoRA), extraction, DyLoRA
split, checks, model merge -- the arithmetic against independent references (dense SVDs,
diffusers' fuse_lora), the metadata written, and refusals of bad input.

Tolerances (float32): reconstructions are compared by relative Frobenius error; measured
about 1e-7 for full-rank resizes and 1e-6 for truncations, allowed 1e-5. Merged checkpoint vs
diffusers fuse_lora: outputs of magnitude ~1 agree to ~1e-6, allowed 1e-4.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from library.errors import UserInputError
from library.io.hashing import model_hash_of_file, sshs_hashes

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REL = 1e-5


@pytest.fixture(scope="module", autouse=True)
def _quiet_single_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    old = os.environ.get("SD_TOOLS_PROGRESS")
    os.environ["SD_TOOLS_PROGRESS"] = "0"
    yield
    torch.set_num_threads(n)
    if old is None:
        os.environ.pop("SD_TOOLS_PROGRESS", None)
    else:
        os.environ["SD_TOOLS_PROGRESS"] = old


# -- synthetic LoRA files ------------------------------------------------------------------
TE = "lora_te_text_model_encoder_layers_0_mlp_fc1"  # LBW BASE
ATTN = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q"  # IN01
PROJ = "lora_unet_mid_block_attentions_0_proj_in"  # MID, 1x1 conv
CONV = "lora_unet_up_blocks_1_resnets_0_conv1"  # OUT03, 3x3 conv

SHAPES = {TE: (40, 24), ATTN: (32, 32), PROJ: (48, 48, 1, 1), CONV: (16, 12, 3, 3)}


def make_lora(path, ranks, alphas=None, seed=0, dtype=torch.float32, metadata=None, names=None, shapes=None):
    """A LoRA with random factors; ranks/alphas: {name: value} (alpha None: no alpha key)."""
    shapes = shapes or SHAPES
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in names or list(shapes):
        shape, r = shapes[name], ranks[name]
        if len(shape) == 2:
            down, up = torch.randn(r, shape[1], generator=g), torch.randn(shape[0], r, generator=g)
        else:
            down, up = torch.randn(r, *shape[1:], generator=g), torch.randn(shape[0], r, 1, 1, generator=g)
        sd[f"{name}.lora_down.weight"] = (down * 0.2).to(dtype)
        sd[f"{name}.lora_up.weight"] = (up * 0.2).to(dtype)
        a = (alphas or {}).get(name, "rank")
        if a == "rank":
            a = float(r)
        if a is not None:
            sd[f"{name}.alpha"] = torch.tensor(a)
    from library.networks.weights_io import save_weights_file

    save_weights_file(sd, str(path), None, metadata or {})
    return sd


def delta_of(sd, name, multiplier=1.0):
    down = sd[f"{name}.lora_down.weight"].float()
    up = sd[f"{name}.lora_up.weight"].float()
    r = down.shape[0]
    alpha = float(sd[f"{name}.alpha"]) if f"{name}.alpha" in sd else r
    alpha = r if alpha == 0 else alpha
    mat = up.reshape(up.shape[0], r) @ down.reshape(r, -1)
    return (mat * (alpha / r * multiplier)).reshape(up.shape[0], *down.shape[1:])


def best_rank(w, r):
    mat = w.reshape(w.shape[0], -1).double()
    u, s, vh = torch.linalg.svd(mat, full_matrices=False)
    return ((u[:, :r] * s[:r]) @ vh[:r]).float().reshape(w.shape)


def rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm())


def file_digest(path):
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def assert_fresh_hashes(path):
    with safe_open(str(path), "pt") as f:
        md = f.metadata()
    tensors = load_file(str(path))
    assert md["sshs_model_hash"] == model_hash_of_file(path)
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == sshs_hashes(tensors, md)
    return md, tensors


# -- linear algebra ------------------------------------------------------------------------
def test_svd_of_product_equals_dense_svd():
    from library.lora_tools.linalg import svd_of_product

    g = torch.Generator().manual_seed(0)
    a, b = torch.randn(300, 7, generator=g), torch.randn(7, 200, generator=g)
    u, s, vh = svd_of_product(a, b)
    ref = torch.linalg.svdvals((a @ b).double())[:7]
    assert torch.allclose(s.double(), ref, rtol=1e-5)
    assert rel((u * s) @ vh, a @ b) < 1e-6
    assert torch.allclose(u.T @ u, torch.eye(7), atol=1e-5) and torch.allclose(vh @ vh.T, torch.eye(7), atol=1e-5)


def test_rank_selection_rules():
    from library.lora_tools.linalg import select_rank

    s = torch.tensor([8.0, 4.0, 2.0, 1.0, 0.5])
    assert select_rank(s, 3) == 3 and select_rank(s, 9) == 5
    assert select_rank(s, 9, "sv_ratio", 5.0) == 3  # values > 8/5
    assert select_rank(s, 9, "sv_cumulative", 12 / 15.5) == 2  # 8+4 of 15.5
    fro = torch.sqrt(torch.cumsum(s * s, 0) / (s * s).sum())
    for p in (0.5, 0.9, float(fro[1]), 0.99, 1.0):
        r = select_rank(s, 9, "sv_fro", p)
        assert fro[r - 1] >= p - 1e-9 and (r == 1 or fro[r - 2] < p)
    assert select_rank(s, 2, "sv_fro", 0.999) == 2  # capped by the maximum rank
    assert select_rank(torch.zeros(4), 4) == 1  # zero delta


# -- resize --------------------------------------------------------------------------------
RANKS = {TE: 6, ATTN: 6, PROJ: 6, CONV: 5}
ALPHAS = {TE: 1, ATTN: 3.5, PROJ: None, CONV: 2.5}  # int alpha, float alpha, missing alpha


@pytest.fixture(scope="module")
def lora_a(tmp_path_factory):
    path = tmp_path_factory.mktemp("loras") / "a.safetensors"
    md = {"ss_network_module": "networks.lora", "ss_network_dim": "6", "ss_network_alpha": "Dynamic",
          "ss_network_args": json.dumps({"conv_dim": "5", "conv_alpha": "2.5", "dropout": None}),
          "ss_training_comment": "my LoRA", "ss_v2": "False", "ss_base_model_version": "sd_v1",
          "modelspec.title": "Alpha", "sshs_model_hash": "stale", "sshs_legacy_hash": "stale"}
    sd = make_lora(path, RANKS, ALPHAS, seed=1, metadata=md)
    return path, sd


def test_resize_to_full_rank_reproduces_every_delta(lora_a, tmp_path):
    import networks.resize_lora as tool

    path, sd = lora_a
    out = tmp_path / "full.safetensors"
    tool.main(["--model", str(path), "--save_to", str(out), "--new_rank", "6", "--new_conv_rank", "5"])
    got = load_file(str(out))
    for name in SHAPES:
        assert got[f"{name}.lora_down.weight"].shape == sd[f"{name}.lora_down.weight"].shape
        assert rel(delta_of(got, name), delta_of(sd, name)) < REL, name


def test_resize_lower_rank_is_the_best_approximation(lora_a, tmp_path):
    import networks.resize_lora as tool

    path, sd = lora_a
    out = tmp_path / "r3.safetensors"
    tool.main(["--model", str(path), "--save_to", str(out), "--new_rank", "3", "--new_conv_rank", "2",
               "--save_precision", "fp16"])
    md, got = assert_fresh_hashes(out)  # hashes computed on the fp16 tensors actually saved
    assert all(t.dtype == torch.float16 for t in got.values())
    for name in SHAPES:
        r = 2 if name == CONV else 3
        assert got[f"{name}.lora_down.weight"].shape[0] == r
        d_old = delta_of(sd, name)
        want = best_rank(d_old, r)
        assert rel(delta_of(got, name), want) < 2e-3, name  # fp16 storage
        old_alpha = ALPHAS[name] if ALPHAS[name] is not None else RANKS[name]
        assert float(got[f"{name}.alpha"]) / r == pytest.approx(old_alpha / RANKS[name], rel=1e-3)  # scale kept
    assert md["ss_network_dim"] == "3"
    assert md["ss_network_alpha"] == "Dynamic"  # Linear/1x1 alphas differ per module
    args = json.loads(md["ss_network_args"])
    assert args["conv_dim"] == "2" and float(args["conv_alpha"]) == pytest.approx(1.0) and "dropout" in args
    assert md["ss_training_comment"].endswith("; my LoRA") and "from rank 6 to 3" in md["ss_training_comment"]
    assert md["modelspec.title"] == "Alpha" and md["sshs_model_hash"] != "stale"


def test_resize_in_float32_matches_best_approximation_tightly(lora_a, tmp_path):
    from library.lora_tools import ops
    from library.lora_tools.lorafile import read_lora, to_state_dict

    path, sd = lora_a
    lf = read_lora(path)
    res = ops.resize(lf, 4, 3, show_progress=False)
    got = to_state_dict(res.modules)
    for name in SHAPES:
        r = 3 if name == CONV else 4
        assert rel(delta_of(got, name), best_rank(delta_of(sd, name), r)) < REL, name
        assert res.reports[[x.name for x in res.reports].index(name)].retention.fro_fraction < 1


def test_resize_sv_fro_keeps_requested_energy(lora_a, tmp_path):
    import networks.resize_lora as tool

    path, sd = lora_a
    out = tmp_path / "fro.safetensors"
    tool.main(["--model", str(path), "--save_to", str(out), "--new_rank", "64",
               "--dynamic_method", "sv_fro", "--dynamic_param", "0.8", "--verbose"])
    md, got = assert_fresh_hashes(out)
    assert md["ss_network_dim"] == "Dynamic" and md["ss_network_alpha"] == "Dynamic"
    for name in SHAPES:
        d_old, d_new = delta_of(sd, name), delta_of(got, name)
        r = got[f"{name}.lora_down.weight"].shape[0]
        assert float(d_new.norm() / d_old.norm()) >= 0.8 - 1e-6, name
        if r > 1:  # and the rank is the smallest that does it
            assert float(best_rank(d_old, r - 1).norm() / d_old.norm()) < 0.8, name


def test_resize_refuses_bad_dynamic_options_and_input_as_output(lora_a):
    import networks.resize_lora as tool

    path, _ = lora_a
    before = file_digest(path)
    with pytest.raises(UserInputError, match="refusing to overwrite an input"):
        tool.main(["--model", str(path), "--save_to", str(path), "--new_rank", "2"])
    with pytest.raises(UserInputError, match="needs --dynamic_param"):
        tool.main(["--model", str(path), "--save_to", str(path) + ".x.safetensors", "--dynamic_method", "sv_fro"])
    with pytest.raises(UserInputError, match="fraction"):
        tool.main(["--model", str(path), "--save_to", str(path) + ".x.safetensors", "--dynamic_method", "sv_fro",
                   "--dynamic_param", "1.5"])
    assert file_digest(path) == before and not os.path.exists(str(path) + ".x.safetensors")


# -- SVD merge -----------------------------------------------------------------------------
@pytest.fixture(scope="module")
def lora_b(tmp_path_factory):
    path = tmp_path_factory.mktemp("loras") / "b.safetensors"
    ranks = {TE: 3, ATTN: 4, CONV: 2}  # no PROJ module
    sd = make_lora(path, ranks, {TE: 2.0, ATTN: 1.0, CONV: 1.0}, seed=2, names=[TE, ATTN, CONV],
                   metadata={"modelspec.title": "Beta"})
    return path, sd


def test_svd_merge_is_best_approximation_of_summed_deltas(lora_a, lora_b, tmp_path):
    import networks.svd_merge_lora as tool

    (pa, sda), (pb, sdb) = lora_a, lora_b
    out = tmp_path / "svd.safetensors"
    tool.main(["--models", str(pa), str(pb), "--ratios", "0.7", "-0.4", "--new_rank", "5", "--new_conv_rank", "3",
               "--save_to", str(out)])
    md, got = assert_fresh_hashes(out)
    for name in SHAPES:
        total = delta_of(sda, name, 0.7) + (delta_of(sdb, name, -0.4) if f"{name}.alpha" in sdb else 0)
        r = 3 if name == CONV else 5
        assert got[f"{name}.lora_down.weight"].shape[0] == r and float(got[f"{name}.alpha"]) == r
        assert rel(delta_of(got, name), best_rank(total, r)) < REL, name
    assert md["ss_network_dim"] == "5" and md["ss_network_alpha"] == "5.0"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "3", "conv_alpha": "3.0"}
    assert md["ss_network_module"] == "networks.lora" and md["ss_base_model_version"] == "sd_v1"
    assert md["modelspec.merged_from"] == "Alpha, Beta" and md["modelspec.title"] == "svd"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/lora"


def test_svd_merge_with_block_weights(lora_a, lora_b, tmp_path):
    import networks.svd_merge_lora as tool

    (pa, sda), (pb, sdb) = lora_a, lora_b
    out = tmp_path / "lbw.safetensors"
    # 17-entry SD list: BASE IN01 IN02 IN04 IN05 IN07 IN08 MID OUT03..OUT11
    lbw_b = [0.5, 0, 1, 1, 1, 1, 1, 1, 2] + [1] * 8  # TE x0.5, IN01 off, OUT03 x2
    tool.main(["--models", str(pa), str(pb), "--ratios", "1", "1", "--new_rank", "10", "--new_conv_rank", "8",
               "--lbws", "[" + ",".join(["1"] * 17) + "]", json.dumps(lbw_b), "--save_to", str(out), "--no_metadata"])
    got = load_file(str(out))
    want = {TE: delta_of(sda, TE) + delta_of(sdb, TE, 0.5), ATTN: delta_of(sda, ATTN),
            CONV: delta_of(sda, CONV) + delta_of(sdb, CONV, 2.0), PROJ: delta_of(sda, PROJ)}
    for name, w in want.items():
        assert rel(delta_of(got, name), w) < REL, name
    with safe_open(str(out), "pt") as f:
        assert not any(k.startswith("modelspec.") for k in f.metadata())
    with pytest.raises(UserInputError, match="SDXL"):  # a 12-value list is for SDXL
        tool.main(["--models", str(pa), "--lbws", "[" + ",".join(["1"] * 12) + "]", "--save_to", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserInputError, match="17 or 26"):
        tool.main(["--models", str(pa), "--lbws", "[1,1,1]", "--save_to", str(tmp_path / "x.safetensors")])


def test_lbw_block_names():
    from library.lora_tools.arch import lbw_block

    assert lbw_block("lora_unet_down_blocks_0_resnets_0_conv1", "sd") == "IN01"
    assert lbw_block("lora_unet_down_blocks_1_attentions_1_proj_in", "sd") == "IN05"
    assert lbw_block("lora_unet_down_blocks_2_downsamplers_0_conv", "sd") == "IN09"
    assert lbw_block("lora_unet_down_blocks_3_resnets_1_conv2", "sd") == "IN11"
    assert lbw_block("lora_unet_mid_block_resnets_1_conv1", "sd") == "MID"
    assert lbw_block("lora_unet_up_blocks_0_resnets_2_conv1", "sd") == "OUT02"
    assert lbw_block("lora_unet_up_blocks_1_upsamplers_0_conv", "sd") == "OUT05"
    assert lbw_block("lora_unet_up_blocks_3_attentions_2_proj_out", "sd") == "OUT11"
    assert lbw_block("lora_te_text_model_encoder_layers_3_mlp_fc2", "sd") == "BASE"
    assert lbw_block("lora_unet_input_blocks_4_1_proj_in", "sdxl") == "IN04"
    assert lbw_block("lora_unet_middle_block_1_proj_in", "sdxl") == "MID"
    assert lbw_block("lora_unet_output_blocks_5_0_in_layers_2", "sdxl") == "OUT05"
    assert lbw_block("lora_te2_text_model_encoder_layers_3_mlp_fc2", "sdxl") == "BASE"


# -- LoRA + LoRA without SVD ---------------------------------------------------------------
def test_merge_loras_concat_is_exact_and_sum_needs_equal_ranks(lora_a, lora_b, tmp_path):
    import networks.merge_lora as tool

    (pa, sda), (pb, sdb) = lora_a, lora_b
    out = tmp_path / "cat.safetensors"
    tool.main(["--models", str(pa), str(pb), "--ratios", "0.6", "-1.5", "--concat", "--shuffle", "--save_to", str(out)])
    md, got = assert_fresh_hashes(out)
    for name in SHAPES:
        want = delta_of(sda, name, 0.6) + (delta_of(sdb, name, -1.5) if f"{name}.alpha" in sdb else 0)
        assert rel(delta_of(got, name), want) < REL, name
    assert got[f"{ATTN}.lora_down.weight"].shape[0] == 10 and md["ss_network_dim"] == "Dynamic"
    with pytest.raises(UserInputError, match="--concat"):
        tool.main(["--models", str(pa), str(pb), "--save_to", str(tmp_path / "sum.safetensors")])

    # same ranks: factors added; one LoRA alone comes out as exactly ratio x its delta
    pc = tmp_path / "c.safetensors"
    sdc = make_lora(pc, RANKS, {n: 2 for n in SHAPES}, seed=3)
    out2 = tmp_path / "sum.safetensors"
    tool.main(["--models", str(pa), str(pc), "--ratios", "1", "0.5", "--save_to", str(out2), "--save_precision", "bf16"])
    md2, got2 = assert_fresh_hashes(out2)
    assert got2[f"{ATTN}.lora_up.weight"].dtype == torch.bfloat16
    c = (0.5 * 2 / 3.5) ** 0.5  # sqrt(ratio * scale_c / scale_a)
    up = sda[f"{ATTN}.lora_up.weight"] + c * sdc[f"{ATTN}.lora_up.weight"]
    down = sda[f"{ATTN}.lora_down.weight"] + c * sdc[f"{ATTN}.lora_down.weight"]
    assert rel(delta_of(got2, ATTN), (up @ down) * (3.5 / 6)) < 1e-2  # bf16 storage
    single = tmp_path / "single.safetensors"
    tool.main(["--models", str(pa), "--ratios", "-0.3", "--save_to", str(single)])
    got3 = load_file(str(single))
    for name in SHAPES:
        assert rel(delta_of(got3, name), delta_of(sda, name, -0.3)) < REL


# -- merge into a checkpoint vs diffusers ------------------------------------------------
def _c3lier_lora(te, unet, path, seed, dim=4, alpha=2.0, conv="3", scale=0.1):
    import networks.lora as lora

    net = lora.create_network(1.0, dim, alpha, None, te, unet, conv_dim=conv, conv_alpha="1")
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * scale)
    net.save_weights(str(path), None, {"ss_network_module": "networks.lora"})
    return net


@torch.no_grad()
def _outputs(te, unet):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(1, 4, 8, 8, generator=g), torch.tensor([700])
    ctx = torch.randn(1, 77, te.config.hidden_size, generator=g)
    ids = torch.randint(0, 49408, (1, 77), generator=g)
    return te(ids).last_hidden_state, unet(x, t, ctx).sample


def test_merged_checkpoint_equals_diffusers_fuse_lora(tiny_sd, tmp_path):
    from diffusers import StableDiffusionPipeline

    import networks.merge_lora as tool
    from library.models.sd.loading import load_sd_models

    model = tiny_sd("sd1")
    base = load_sd_models(model.path)
    lora_path = tmp_path / "c3lier.safetensors"
    _c3lier_lora(base.text_encoder, base.unet, lora_path, seed=4)
    out = tmp_path / "merged.safetensors"
    tool.main(["--sd_model", model.path, "--models", str(lora_path), "--ratios", "0.7", "--save_to", str(out)])
    merged = load_sd_models(str(out))
    ours = _outputs(merged.text_encoder, merged.unet)

    pipe = StableDiffusionPipeline.from_pretrained(model.reference_folder, safety_checker=None, feature_extractor=None,
                                                   tokenizer=None, requires_safety_checker=False)
    before = _outputs(pipe.text_encoder, pipe.unet)
    pipe.load_lora_weights(str(lora_path))
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    theirs = _outputs(pipe.text_encoder, pipe.unet)
    for what, o, t, b in zip(("text encoder", "U-Net"), ours, theirs, before):
        assert float((t - b).abs().max()) > 1e-2, f"{what}: the LoRA changes nothing"
        print(f"{what}: max |ours - diffusers fused| = {float((o - t).abs().max()):.3g}")
        assert float((o - t).abs().max()) < 1e-4, what
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["modelspec.architecture"] == "stable-diffusion-v1"
    assert md["modelspec.merged_from"].endswith(", c3lier") and md["modelspec.title"] == "merged"


def test_merge_into_checkpoint_refuses_foreign_loras(tiny_sd, tmp_path):
    import networks.merge_lora as tool

    model = tiny_sd("sd1")
    out = tmp_path / "out.safetensors"
    sdxl = tmp_path / "sdxl_lora.safetensors"
    names = ["lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_te1_text_model_encoder_layers_0_mlp_fc1"]
    make_lora(sdxl, {n: 2 for n in names}, names=names, shapes={names[0]: (32, 32), names[1]: (40, 24)})
    with pytest.raises(UserInputError, match="SDXL.*sdxl_merge_lora"):
        tool.main(["--sd_model", model.path, "--models", str(sdxl), "--save_to", str(out)])
    wrong = tmp_path / "wrong.safetensors"  # SD names but layers this model does not have / other widths
    names = ["lora_te_text_model_encoder_layers_20_mlp_fc1", "lora_unet_mid_block_attentions_0_proj_in"]
    make_lora(wrong, {n: 2 for n in names}, names=names, shapes={names[0]: (64, 32), names[1]: (128, 128)})
    with pytest.raises(UserInputError, match="do not fit the layer shapes.*name no layer"):
        tool.main(["--sd_model", model.path, "--models", str(wrong), "--save_to", str(out)])
    lyco = tmp_path / "loha.safetensors"
    from safetensors.torch import save_file

    save_file({"lora_unet_mid_block_attentions_0_proj_in.hada_w1_a": torch.zeros(2, 2)}, str(lyco))
    with pytest.raises(UserInputError, match="LyCORIS"):
        tool.main(["--sd_model", model.path, "--models", str(lyco), "--save_to", str(out)])
    with pytest.raises(UserInputError, match="2 values for 1 --models"):
        tool.main(["--sd_model", model.path, "--models", str(wrong), "--ratios", "1", "1", "--save_to", str(out)])
    before = file_digest(model.path)
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        tool.main(["--sd_model", model.path, "--models", str(wrong), "--save_to", model.path])
    assert file_digest(model.path) == before and not out.exists()


def test_cli_error_is_one_line_and_help_is_light():
    scripts = ["networks/merge_lora.py", "networks/svd_merge_lora.py", "networks/resize_lora.py",
               "networks/extract_lora_from_models.py", "networks/extract_lora_from_dylora.py",
               "networks/check_lora_weights.py", "tools/merge_models.py"]
    for s in scripts:
        r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, s), "--help"], capture_output=True,
                           text=True, cwd=ROOT)
        assert r.returncode == 0 and "usage:" in r.stdout, s
        imported = {line.rsplit("|", 1)[-1].strip() for line in r.stderr.splitlines() if line.startswith("import time:")}
        assert "torch" not in imported, f"{s} imports torch for --help"
    r = subprocess.run([sys.executable, os.path.join(ROOT, "networks/merge_lora.py"), "--models", "a.safetensors",
                        "b.safetensors", "--ratios", "1", "--save_to", "c.safetensors"], capture_output=True, text=True, cwd=ROOT)
    assert r.returncode == 2 and r.stderr.strip().splitlines()[-1].startswith("error: --ratios: 1 values for 2 --models")


# -- extraction ----------------------------------------------------------------------------
def test_extract_recovers_known_low_rank_deltas(tiny_sd, tmp_path):
    import networks.extract_lora_from_models as tool
    import networks.merge_lora as merge
    from library.models.sd.loading import load_sd_models

    model = tiny_sd("sd1")
    base = load_sd_models(model.path)
    known = tmp_path / "known.safetensors"
    _c3lier_lora(base.text_encoder, base.unet, known, seed=5, dim=3, alpha=3.0, conv="2", scale=0.15)
    tuned = tmp_path / "tuned.safetensors"
    merge.main(["--sd_model", model.path, "--models", str(known), "--save_to", str(tuned), "--no_metadata"])

    out = tmp_path / "extracted.safetensors"
    res = tool.main(["--model_org", model.path, "--model_tuned", str(tuned), "--save_to", str(out), "--dim", "3",
                     "--conv_dim", "2", "--clamp_quantile", "1", "--min_diff", "0.001"])
    assert res["use_text_encoder"]
    want, got = load_file(str(known)), load_file(str(out))
    names = {k.split(".")[0] for k in want}
    assert names == {k.split(".")[0] for k in got}
    worst = max(rel(delta_of(got, n), delta_of(want, n)) for n in names)
    print(f"SD1 extraction: worst relative error of a recovered delta {worst:.3g}")
    assert worst < 1e-3, worst
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["ss_network_dim"] == "3" and md["ss_network_alpha"] == "3.0" and md["ss_v2"] == "False"
    assert json.loads(md["ss_network_args"]) == {"conv_dim": "2", "conv_alpha": "2.0"}
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert float(got[f"{sorted(names)[0]}.alpha"]) == got[f"{sorted(names)[0]}.lora_down.weight"].shape[0]

    # text encoder below --min_diff: U-Net only; no --conv_dim: no 3x3 modules; clamping on
    out2 = tmp_path / "unet_only.safetensors"
    res2 = tool.main(["--model_org", model.path, "--model_tuned", str(tuned), "--save_to", str(out2), "--dim", "2",
                      "--min_diff", "1e9"])
    got2 = load_file(str(out2))
    assert not res2["use_text_encoder"] and not any(k.startswith("lora_te") for k in got2)
    assert not any(got2[k].dim() == 4 and got2[k].shape[-1] == 3 for k in got2)


# -- DyLoRA, checks ------------------------------------------------------------------------
def test_extract_from_dylora_writes_each_rank(tmp_path):
    import networks.extract_lora_from_dylora as tool

    src = tmp_path / "dy.safetensors"
    sd = make_lora(src, {n: 8 for n in SHAPES}, {n: 4.0 for n in SHAPES}, seed=6, dtype=torch.float16,
                   metadata={"ss_network_dim": "8", "ss_training_comment": "dylora", "sshs_model_hash": "stale"})
    written = tool.main(["--model", str(src), "--unit", "2", "--save_to", str(tmp_path / "cut.safetensors")])
    assert [os.path.basename(p) for p in written] == ["cut-0002.safetensors", "cut-0004.safetensors", "cut-0006.safetensors"]
    for path, k in zip(written, (2, 4, 6)):
        md, got = assert_fresh_hashes(path)
        assert md["ss_network_dim"] == str(k) and md["ss_training_comment"].endswith("; dylora")
        for n in SHAPES:
            assert torch.equal(got[f"{n}.lora_down.weight"], sd[f"{n}.lora_down.weight"][:k])
            assert torch.equal(got[f"{n}.lora_up.weight"], sd[f"{n}.lora_up.weight"][:, :k])
            assert float(got[f"{n}.alpha"]) == 4.0
    with pytest.raises(UserInputError, match="smaller than 8"):
        tool.main(["--model", str(src), "--unit", "8", "--save_to", str(tmp_path / "x.safetensors")])


def test_check_lora_weights_reports_untrained_modules(tmp_path, capsys):
    import networks.check_lora_weights as tool

    path = tmp_path / "new.safetensors"
    sd = make_lora(path, RANKS, ALPHAS, seed=7)
    sd[f"{ATTN}.lora_up.weight"].zero_()
    from safetensors.torch import save_file

    save_file(sd, str(path))
    res = tool.main([str(path)])
    text = capsys.readouterr().out
    assert f"{ATTN}.lora_up.weight,(32-6),0,0,0" in text
    assert "LoRA for SD1.x/2.x" in text and "1 tensors are all zero" in text and res["zero"] == [f"{ATTN}.lora_up.weight"]
    assert f"{ATTN}.alpha" not in text
    tool.main([str(path), "-s"])
    assert f"{ATTN}.alpha" in capsys.readouterr().out


# -- model merge ---------------------------------------------------------------------------
def test_merge_models_weighted_average(tiny_sd, tmp_path):
    from library.models.sd.loading import load_sd_models
    from library.models.sd.saving import save_ldm_checkpoint

    sys.path.insert(0, os.path.join(ROOT, "tools"))
    import merge_models as tool

    model = tiny_sd("sd1")
    other = load_sd_models(model.path)
    with torch.no_grad():
        for p in list(other.unet.parameters()) + list(other.text_encoder.parameters()):
            p.add_(0.5)
    b = tmp_path / "b.safetensors"
    save_ldm_checkpoint(other, str(b), metadata={"modelspec.title": "B"})
    a_sd, b_sd = load_file(model.path), load_file(str(b))
    dropped = "model.diffusion_model.out.2.bias"
    del b_sd[dropped]
    b_sd["extra.key"] = torch.ones(2)
    from safetensors.torch import save_file

    save_file(b_sd, str(b))

    out = tmp_path / "ab"
    res = tool.main(["--models", model.path, str(b), "--ratios", "0.25", "0.75", "--output", str(out),
                     "--saving_precision", "fp16", "--show_skipped"])
    got = load_file(str(out) + ".safetensors")
    assert set(got) == set(a_sd) and res["skipped"] == ["extra.key"]
    for k in ("model.diffusion_model.input_blocks.1.1.proj_in.weight", "cond_stage_model.transformer.text_model.final_layer_norm.weight"):
        want = 0.25 * a_sd[k] + 0.75 * b_sd[k]
        assert got[k].dtype == torch.float16 and torch.allclose(got[k].float(), want, atol=2e-3)
    assert torch.allclose(got[dropped].float(), a_sd[dropped], atol=2e-3)  # first model stands in

    out2 = tmp_path / "unet_only.safetensors"
    tool.main(["--models", model.path, str(b), "--unet_only", "--output", str(out2)])
    got2 = load_file(str(out2))
    te = "cond_stage_model.transformer.text_model.final_layer_norm.weight"
    unet = "model.diffusion_model.input_blocks.1.1.proj_in.weight"
    assert torch.equal(got2[te], a_sd[te]) and torch.allclose(got2[unet], 0.5 * (a_sd[unet] + b_sd[unet]))
    with pytest.raises(UserInputError, match="1 values for 2"):
        tool.main(["--models", model.path, str(b), "--ratios", "1", "--output", str(tmp_path / "x.safetensors")])
    with pytest.raises(UserInputError, match="refusing to overwrite"):
        tool.main(["--models", model.path, str(b), "--output", str(b)])


def test_extract_sdxl_recovers_known_deltas(tmp_path):
    import networks.extract_lora_from_models as tool
    import networks.lora as lora
    from library.models.sdxl.saving import save_sdxl_checkpoint
    from library.models.sdxl.tiny import make_sdxl_models

    models = make_sdxl_models(seed=3)
    org = tmp_path / "org.safetensors"
    save_sdxl_checkpoint(models, str(org))
    net = lora.create_network(1.0, 2, 2.0, None, models.text_encoders, models.unet)
    g = torch.Generator().manual_seed(8)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.15)
    known = tmp_path / "known.safetensors"
    net.save_weights(str(known), None, {})
    merger, weights = lora.create_network_from_weights(1.0, str(known), None, models.text_encoders, models.unet,
                                                       for_inference=True)
    merger.merge_to(models.text_encoders, models.unet, weights)
    tuned = tmp_path / "tuned.safetensors"
    save_sdxl_checkpoint(models, str(tuned))

    out = tmp_path / "x.safetensors"
    with pytest.raises(UserInputError, match="add --sdxl"):
        tool.main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out)])
    tool.main(["--model_org", str(org), "--model_tuned", str(tuned), "--save_to", str(out), "--sdxl", "--dim", "2",
               "--clamp_quantile", "1", "--min_diff", "0.001"])
    want, got = load_file(str(known)), load_file(str(out))
    names = {k.split(".")[0] for k in want}
    assert names == {k.split(".")[0] for k in got}
    assert any(n.startswith("lora_te1_") for n in names) and any(n.startswith("lora_te2_") for n in names)
    assert any(n.startswith("lora_unet_input_blocks_") for n in names)
    worst = max(rel(delta_of(got, n), delta_of(want, n)) for n in names)
    print(f"SDXL extraction: worst relative error of a recovered delta {worst:.3g}")
    assert worst < 1e-3, worst
    with safe_open(str(out), "pt") as f:
        md = f.metadata()
    assert md["ss_base_model_version"] == "sdxl_base_v1-0" and md["ss_v2"] == "False"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"


SPEC_OPTIONS = {  # cli-options.md sections 7-8: every option, with the defaults that matter
    "networks/merge_lora.py": {"v2": False, "save_precision": None, "precision": "float", "sd_model": None, "save_to": None,
                               "models": None, "ratios": None, "no_metadata": False, "concat": False, "shuffle": False},
    "networks/svd_merge_lora.py": {"save_precision": None, "precision": "float", "save_to": None, "models": None,
                                   "ratios": None, "lbws": None, "new_rank": 4, "new_conv_rank": None, "device": None,
                                   "no_metadata": False},
    "networks/resize_lora.py": {"save_precision": None, "new_rank": 4, "new_conv_rank": None, "save_to": None, "model": None,
                                "device": None, "verbose": False, "dynamic_method": None, "dynamic_param": None},
    "networks/extract_lora_from_models.py": {
        "v2": False, "v_parameterization": False, "sdxl": False, "load_precision": None, "save_precision": None,
        "model_org": None, "model_tuned": None, "save_to": None, "dim": 4, "conv_dim": None, "device": None,
        "clamp_quantile": 0.99, "min_diff": 0.01, "no_metadata": False, "load_original_model_to": None,
        "load_tuned_model_to": None},
    "networks/extract_lora_from_dylora.py": {"unit": None, "save_to": None, "model": None},
    "networks/check_lora_weights.py": {"file": None, "show_all_keys": False},
    "tools/merge_models.py": {"models": None, "output": None, "ratios": None, "unet_only": False, "device": "cpu",
                              "precision": "float", "saving_precision": "float", "show_skipped": False},
}


@pytest.mark.parametrize("script", list(SPEC_OPTIONS))
def test_every_spec_option_with_its_default(script):
    import importlib.util

    spec = importlib.util.spec_from_file_location("tool_" + os.path.basename(script)[:-3], os.path.join(ROOT, script))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    actions = [a for a in mod.setup_parser()._actions if a.dest != "help"]
    assert {a.dest: a.default for a in actions} == SPEC_OPTIONS[script]


def test_merge_into_checkpoint_takes_layers_outside_networks_lora(tiny_sd, tmp_path):
    """Kohya-format LoRAs from other trainers (LyCORIS LoCon) also adapt conv_in, the time
    embedding, ...: those modules are merged directly as W + ratio * delta."""
    import networks.merge_lora as tool
    from library.models.sd.loading import load_sd_models

    model = tiny_sd("sd1")
    base = load_sd_models(model.path)
    names = {"lora_unet_conv_in": tuple(base.unet.conv_in.weight.shape),
             "lora_unet_time_embedding_linear_1": tuple(base.unet.time_embedding.linear_1.weight.shape),
             ATTN: tuple(base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.weight.shape)}
    path = tmp_path / "locon.safetensors"
    sd = make_lora(path, {n: 2 for n in names}, {n: 1.0 for n in names}, names=list(names), shapes=names, seed=9)
    out = tmp_path / "merged.safetensors"
    tool.main(["--sd_model", model.path, "--models", str(path), "--ratios", "-0.6", "--save_to", str(out)])
    merged = load_sd_models(str(out))
    pairs = [(base.unet.conv_in, merged.unet.conv_in, "lora_unet_conv_in"),
             (base.unet.time_embedding.linear_1, merged.unet.time_embedding.linear_1, "lora_unet_time_embedding_linear_1"),
             (base.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q,
              merged.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q, ATTN)]
    for before, after, name in pairs:
        assert rel(after.weight.detach() - before.weight.detach(), delta_of(sd, name, -0.6)) < REL, name


def test_streaming_writer_and_on_demand_reader(tmp_path):
    from library.io.tensor_files import StreamingSafetensorsWriter, TensorFile, save_with_sshs

    g = torch.Generator().manual_seed(0)
    tensors = {"a": torch.randn(3, 5, generator=g).to(torch.bfloat16), "b": torch.randn(7, generator=g).half(),
               "c": torch.arange(6).reshape(2, 3), "d": torch.tensor(2.5), "e": torch.zeros(0, 4)}
    path = tmp_path / "s.safetensors"
    specs = [(k, v.dtype, tuple(v.shape)) for k, v in tensors.items()]
    with StreamingSafetensorsWriter(path, specs, {"x": "1"}) as w:
        for k, v in tensors.items():
            w.write(k, v)
    back = load_file(str(path))
    with TensorFile(path) as tf:
        assert tf.metadata == {"x": "1"}
        for k, v in tensors.items():
            assert torch.equal(back[k], v) and torch.equal(tf.get(k), v) and tf.dtype(k) == v.dtype
    # an interrupted write leaves nothing behind, the old file stays
    before = file_digest(path)
    with pytest.raises(RuntimeError, match="only 1 of 5"):
        with StreamingSafetensorsWriter(path, specs) as w:
            w.write("a", tensors["a"])
    assert file_digest(path) == before and os.listdir(tmp_path) == ["s.safetensors"]
    # hashes written without in-memory serialisations equal the reference definition
    md = save_with_sshs({k: v for k, v in tensors.items() if k != "e"}, tmp_path / "h.safetensors", {"ss_a": "1", "z": "2"})
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == sshs_hashes({k: v for k, v in tensors.items() if k != "e"},
                                                                          {"ss_a": "1", "z": "2"})
    assert_fresh_hashes(tmp_path / "h.safetensors")
    big = {"w": torch.randn(700, 1000, generator=g), "v": torch.randn(3, generator=g).half()}  # > 1 MiB: real legacy hash
    md = save_with_sshs(big, tmp_path / "big.safetensors", {"ss_network_dim": "4"})
    assert (md["sshs_model_hash"], md["sshs_legacy_hash"]) == sshs_hashes(big, {"ss_network_dim": "4"})
    assert md["sshs_legacy_hash"] != hashlib.sha256(b"").hexdigest()[:8]
    assert sorted(os.listdir(tmp_path)) == ["big.safetensors", "h.safetensors", "s.safetensors"]
