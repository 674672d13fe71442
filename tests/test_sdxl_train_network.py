"""sdxl_train_network.py end to end on a tiny SDXL model: real command lines (plain folders and
dataset TOML, with and without cached text-encoder outputs), LoRA keys and metadata, per-encoder
learning rates, SDXL block-wise ranks/learning rates, DyLoRA/OFT/LyCORIS, size conditioning from
the batch, and bad input refused before any model loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAPTION = "a (red:1.5) square, [blue] background"
BLOCK_DIMS = [4] * 23
BLOCK_DIMS[8] = 2  # input_blocks.7 at rank 2


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_sdxl_files, tokenizer_cache):
    from library.data.synthetic import make_color_dataset

    root = tmp_path_factory.mktemp("sdxl_train")
    data = root / "data"
    make_color_dataset(str(data), count=4, size=(64, 64))
    for txt in (data / "1_sks").glob("*.txt"):  # emphasis, so --weighted_captions has something to do
        txt.write_text(CAPTION)
    prompts = root / "prompts.txt"
    prompts.write_text("a red square --w 64 --h 64 --s 2 --d 3 --n blue\n")
    return {"root": root, "data": str(data), "model": tiny_sdxl_files.path, "tok": tokenizer_cache,
            "prompts": str(prompts), "sd1": None}


def base_argv(ws, out, *extra):
    return [
        "--pretrained_model_name_or_path", ws["model"], "--tokenizer_cache_dir", ws["tok"],
        "--train_data_dir", ws["data"], "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "lora", "--network_module", "networks.lora",
        "--network_dim", "4", "--network_alpha", "2", "--learning_rate", "1e-3", "--seed", "7",
        "--max_data_loader_n_workers", "0", "--train_batch_size", "2", *extra,
    ]


def run_cli(argv):
    r = subprocess.run([sys.executable, os.path.join(ROOT, "sdxl_train_network.py"), *argv], capture_output=True,
                       text=True, timeout=600, env=dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1"))
    assert r.returncode == 0, r.stderr[-3000:]
    return r


def run_in_process(argv):
    import sdxl_train_network

    return sdxl_train_network.main(argv)


def prefixes(sd):
    out = {}
    for k in sd:
        name = k.split(".", 1)[0]
        p = name.split("_")[0] + "_" + name.split("_")[1]
        out.setdefault(p, set()).add(name)
    return out


# ---------------------------------------------------------------------------------- command lines
def test_parser_has_the_spec_options_and_help_is_fast():
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "sdxl_train_network.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--cache_text_encoder_outputs_to_disk" in r.stdout
    assert " torch" not in r.stderr.replace("torch_", ""), "--help imported torch"
    import sdxl_train_network
    from library.args.parsers import train_network_parser

    ours = {a.dest for a in sdxl_train_network.setup_parser()._actions if a.option_strings and a.dest != "help"}
    base = {a.dest for a in train_network_parser()._actions if a.option_strings and a.dest != "help"}
    assert len(ours) == 196  # cli-options.md §5: train_network.py's 193 + G-SDXL's 3
    assert ours - base == {"cache_text_encoder_outputs", "cache_text_encoder_outputs_to_disk", "disable_mmap_load_safetensors"}


def test_command_line_plain_folders_with_previews(ws, tmp_path):
    """Both text encoders and the U-Net get LoRA modules under the SDXL key names; previews use
    the SDXL sampler; two --text_encoder_lr values are recorded."""
    out = tmp_path / "out"
    run_cli(base_argv(ws, out, "--max_train_steps", "2", "--text_encoder_lr", "1e-4", "5e-5", "--sample_prompts",
                      ws["prompts"], "--sample_every_n_steps", "2", "--network_args", "conv_dim=2", "conv_alpha=1"))
    sd = safetensors_io.load_state_dict(out / "lora.safetensors")
    groups = prefixes(sd)
    assert set(groups) == {"lora_te1", "lora_te2", "lora_unet"}
    assert len(groups["lora_te1"]) == 12 * 6 and len(groups["lora_te2"]) == 32 * 6  # q k v out fc1 fc2 per layer
    assert "lora_te1_text_model_encoder_layers_0_self_attn_k_proj" in groups["lora_te1"]
    assert "lora_te2_text_model_encoder_layers_31_mlp_fc2" in groups["lora_te2"]
    unet = groups["lora_unet"]
    assert all(n.startswith(("lora_unet_input_blocks_", "lora_unet_middle_block_", "lora_unet_output_blocks_")) for n in unet)
    for name in ("lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q", "lora_unet_middle_block_1_proj_in",
                 "lora_unet_output_blocks_2_2_conv", "lora_unet_input_blocks_1_0_in_layers_2",
                 "lora_unet_input_blocks_1_0_out_layers_3", "lora_unet_input_blocks_1_0_emb_layers_1",
                 "lora_unet_input_blocks_4_0_skip_connection", "lora_unet_input_blocks_3_0_op"):
        assert name in unet, name
    md = safetensors_io.read_metadata(out / "lora.safetensors")
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base/lora"
    assert json.loads(md["ss_text_encoder_lr"]) == [1e-4, 5e-5]
    samples = sorted(os.listdir(out / "sample"))
    assert samples == ["lora_000002_00_3.png"]
    from PIL import Image

    img = np.asarray(Image.open(out / "sample" / samples[0]))
    assert img.shape == (64, 64, 3) and img.std() > 1


def test_dataset_toml_with_text_encoder_outputs_cached_on_disk(ws, tmp_path, tokenizer_cache):
    """_te_outputs.npz files with the formats.md §d.2 keys, holding exactly what the encoders give."""
    data = tmp_path / "data"
    import shutil

    shutil.copytree(ws["data"], data)
    toml_path = tmp_path / "dataset.toml"
    toml_path.write_text(
        '[general]\ncaption_extension = ".txt"\nenable_bucket = true\nbucket_reso_steps = 32\nmin_bucket_reso = 32\nmax_bucket_reso = 128\n\n'
        '[[datasets]]\nresolution = 64\nbatch_size = 2\n\n'
        f'  [[datasets.subsets]]\n  image_dir = "{data}/1_sks"\n  num_repeats = 2\n'
    )
    out = tmp_path / "out"
    argv = base_argv(ws, out, "--max_train_steps", "2", "--network_train_unet_only", "--cache_text_encoder_outputs_to_disk",
                     "--cache_latents_to_disk")
    i = argv.index("--train_data_dir")
    del argv[i:i + 2]
    run_cli(argv + ["--dataset_config", str(toml_path)])
    sd = safetensors_io.load_state_dict(out / "lora.safetensors")
    assert set(prefixes(sd)) == {"lora_unet"}
    npz = sorted(p.name for p in (data / "1_sks").glob("*_te_outputs.npz"))
    assert npz == [f"img_{i:03d}_te_outputs.npz" for i in range(4)]
    assert len(list((data / "1_sks").glob("*_0064x0064_sdxl.npz"))) == 4
    with np.load(data / "1_sks" / npz[0]) as z:
        cached = {k: z[k] for k in z.files}
    assert set(cached) == {"hidden_state1", "hidden_state2", "pool2"}
    assert cached["hidden_state1"].shape == (77, 32) and cached["hidden_state2"].shape == (77, 64)
    assert cached["pool2"].shape == (64,)

    from library.arch.sdxl import SDXLArchitecture
    from library.models.sdxl.loading import load_sdxl_models
    from library.tokenizers import load_sdxl_tokenizers

    arch = SDXLArchitecture()
    models = load_sdxl_models(ws["model"])
    toks = list(load_sdxl_tokenizers(tokenizer_cache))
    with torch.no_grad():
        cond = arch.encode_tokens(models.text_encoders, arch.tokenize(toks, [CAPTION]), toks)
    h1, h2, pool = cond.split(32)
    for key, want in (("hidden_state1", h1), ("hidden_state2", h2), ("pool2", pool)):
        np.testing.assert_allclose(cached[key], want[0].numpy(), atol=1e-6, rtol=0)


def test_cached_text_encoder_outputs_train_exactly_like_live_encoding(ws, tmp_path, monkeypatch):
    """U-Net-only training: outputs cached in memory give the same LoRA as encoding every step;
    --weighted_captions reaches the encoding on both paths (and changes the result)."""
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    # Plain SGD: an update is proportional to its gradient, so rounding-level differences in the
    # encoder outputs (the cache encodes in other batches) stay rounding-level in the weights.
    # Adam normalises each update to about the learning rate, which turns a near-zero gradient
    # that differs in its last bits into a full-size difference.
    sgd = ("--optimizer_type", "torch.optim.SGD", "--learning_rate", "10")
    common = ("--max_train_steps", "2", "--network_train_unet_only", *sgd)
    run_in_process(base_argv(ws, tmp_path / "live", *common, "--weighted_captions"))
    run_in_process(base_argv(ws, tmp_path / "cached", *common, "--weighted_captions", "--cache_text_encoder_outputs"))
    run_in_process(base_argv(ws, tmp_path / "plain", *common))
    live = safetensors_io.load_state_dict(tmp_path / "live" / "lora.safetensors")
    cached = safetensors_io.load_state_dict(tmp_path / "cached" / "lora.safetensors")
    plain = safetensors_io.load_state_dict(tmp_path / "plain" / "lora.safetensors")
    assert set(live) == set(cached) == set(plain)
    worst = max((live[k] - cached[k]).abs().max().item() for k in live)
    effect = max((live[k] - plain[k]).abs().max().item() for k in live)
    print(f"cached vs live {worst:.2e}; weighted vs plain captions {effect:.2e}")
    assert worst <= 1e-6, f"cached vs live: max abs diff {worst}"
    assert effect > 100 * max(worst, 1e-7), "--weighted_captions changed nothing"


def test_text_encoder_lrs_and_sdxl_block_lr_and_dims(ws, tmp_path, monkeypatch):
    """--text_encoder_lr a b: CLIP-L modules at a, bigG at b; block_dims (23 values) and
    down/mid/up_lr_weight (9/3/9 values) follow the SDXL block layout of network-args.md."""
    from library.training import optimizers

    seen = {}
    real = optimizers.get_optimizer

    def spy(args, param_groups):
        seen["groups"] = [(len(g["params"]), g["lr"]) for g in param_groups]
        return real(args, param_groups)

    monkeypatch.setattr(optimizers, "get_optimizer", spy)
    out = tmp_path / "blocks"
    run_in_process(base_argv(
        ws, out, "--max_train_steps", "1", "--text_encoder_lr", "1e-4", "5e-5", "--unet_lr", "2e-3", "--network_args",
        "block_dims=" + ",".join(map(str, BLOCK_DIMS)), "down_lr_weight=1,1,1,1,1,0,0,0,0", "mid_lr_weight=0.5,0.5,0.5",
        "up_lr_weight=1,1,1,1,1,0.25,1,1,1"))
    sd = safetensors_io.load_state_dict(out / "lora.safetensors")
    names = {k.split(".", 1)[0] for k in sd}
    # lr weight 0 drops input blocks 5..8 (indices 6..9) from the network
    assert not [n for n in names if n.startswith(tuple(f"lora_unet_input_blocks_{i}_" for i in (5, 6, 7, 8)))]
    assert sd["lora_unet_input_blocks_4_1_proj_in.lora_down.weight"].shape[0] == 4
    assert any(n.startswith("lora_unet_output_blocks_5_") for n in names)  # (6..8: no attention in the tiny model)
    lrs = sorted({lr for _, lr in seen["groups"]})
    assert lrs == pytest.approx(sorted({1e-4, 5e-5, 2e-3, 2e-3 * 0.5, 2e-3 * 0.25}))


def test_block_dims_set_the_rank_per_block(ws, tmp_path):
    import networks.lora as lora
    from library.models.sdxl.tiny import make_sdxl_models

    m = make_sdxl_models(seed=0)
    net = lora.create_network(1.0, 4, 2, None, m.text_encoders, m.unet, block_dims=",".join(map(str, BLOCK_DIMS)))
    ranks = {x.lora_name: x.lora_dim for x in net.unet_loras}
    assert {r for n, r in ranks.items() if n.startswith("lora_unet_input_blocks_7_")} == {2}
    assert {r for n, r in ranks.items() if n.startswith("lora_unet_input_blocks_4_")} == {4}
    assert {x.te_index for x in net.text_encoder_loras} == {0, 1}


@pytest.mark.parametrize("module, args, expect", [
    ("networks.dylora", ["unit=2"], ("lora_te1_", "lora_te2_", "lora_unet_input_blocks_")),
    ("networks.oft", ["enable_conv=1"], ("oft_unet_input_blocks_", "oft_unet_output_blocks_")),
    ("lycoris.kohya", ["algo=loha"], ("lora_te1_text_model_encoder_layers_0_", "lora_te2_", "lora_unet_")),
])
def test_other_network_modules_train_on_sdxl(ws, tmp_path, monkeypatch, module, args, expect):
    if module.startswith("lycoris"):
        pytest.importorskip("lycoris", reason="lycoris-lora is not installed")
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    out = tmp_path / "o"
    argv = base_argv(ws, out, "--max_train_steps", "1", "--network_args", *args)
    argv[argv.index("networks.lora")] = module
    if module == "networks.oft":
        argv[argv.index("--network_alpha") + 1] = "1e-3"
    run_in_process(argv)
    keys = list(safetensors_io.load_state_dict(out / "lora.safetensors"))
    for p in expect:
        assert any(k.startswith(p) for k in keys), (p, sorted(keys)[:5])


# ---------------------------------------------------------------------------------- conditioning from the batch
def test_size_conditioning_comes_from_the_bucket_and_crop_record(tmp_path):
    """A 112x64 image in the 128x64 bucket: crop_top_left (0, 8) by dataset-config.md §6.5
    (bw/bh = 2 > 1.75: rw = 112, left = (128 - 112) // 2). The U-Net's y holds (original h, w),
    that crop and the bucket size, exactly as conditioning_vector builds them."""
    from PIL import Image

    from library.arch.sdxl import SDXLArchitecture, SDXLCondition, conditioning_vector
    from library.data.datasets import build_from_args
    from library.args.parsers import train_network_parser

    folder = tmp_path / "1_x"
    folder.mkdir()
    Image.new("RGB", (112, 64), (200, 10, 10)).save(folder / "a.png")
    (folder / "a.txt").write_text("x")
    args = train_network_parser().parse_args([
        "--train_data_dir", str(tmp_path), "--resolution", "96", "--enable_bucket", "--min_bucket_reso", "32",
        "--max_bucket_reso", "192", "--bucket_reso_steps", "32", "--caption_extension", ".txt"])
    group, _ = build_from_args(args, seed=1)
    batch = group[0]
    assert batch["original_sizes_hw"].tolist() == [[64, 112]]
    bh, bw = batch["target_sizes_hw"][0].tolist()
    assert (bw, bh) == (128, 64)
    top, left = batch["crop_top_lefts"][0].tolist()
    assert (top, left) == (0, 8)

    seen = {}

    class Recorder(torch.nn.Module):
        def forward(self, x, t, context, y):
            seen["y"], seen["context"] = y, context
            return x

    arch = SDXLArchitecture()
    pooled = torch.randn(1, 64)
    cond = SDXLCondition(torch.randn(1, 77, 96), pooled)
    arch.call_denoiser(Recorder(), torch.zeros(1, 4, bh // 8, bw // 8), torch.tensor([10]), cond, batch)
    want = conditioning_vector(pooled, batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])
    torch.testing.assert_close(seen["y"], want)
    assert seen["y"].shape == (1, 64 + 6 * 256)


# ---------------------------------------------------------------------------------- bad input
@pytest.fixture
def no_model_loading(monkeypatch):
    from library.arch.sd import SDArchitecture
    from library.arch.sdxl import SDXLArchitecture

    def refuse(*a, **k):
        raise AssertionError("models were loaded before the bad input was reported")

    monkeypatch.setattr(SDArchitecture, "load_models", refuse)
    monkeypatch.setattr(SDXLArchitecture, "load_models", refuse)


@pytest.mark.parametrize("extra, message", [
    (["--cache_text_encoder_outputs"], "needs --network_train_unet_only"),
    (["--cache_text_encoder_outputs", "--network_train_unet_only", "--shuffle_caption"], "shuffle_caption"),
    (["--v2"], "--v2 is for SD 2.x"),
    (["--enable_bucket", "--bucket_reso_steps", "48", "--min_bucket_reso", "48", "--max_bucket_reso", "96"], "bucket_reso_steps 48 must be a multiple of 32"),
])
def test_bad_input_fails_before_models_load(ws, tmp_path, no_model_loading, extra, message):
    with pytest.raises(UserInputError, match=message):
        run_in_process(base_argv(ws, tmp_path / "o", "--max_train_steps", "1", *extra))


def test_sd1_checkpoint_is_refused_clearly(ws, tmp_path, tiny_sd, no_model_loading):
    argv = base_argv(ws, tmp_path / "o", "--max_train_steps", "1")
    argv[argv.index(ws["model"])] = tiny_sd("sd1").path
    with pytest.raises(UserInputError, match=r"SD1\.x/2\.x checkpoint, not SDXL; use train_network\.py"):
        run_in_process(argv)
    # and the other way round: train_network.py names the SDXL scripts
    import train_network

    argv = base_argv(ws, tmp_path / "o2", "--max_train_steps", "1")
    with pytest.raises(UserInputError, match="SDXL checkpoint, not SD1.x/2.x; use sdxl_train_network.py"):
        train_network.main(argv)
