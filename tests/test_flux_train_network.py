"""flux_train_network.py end to end on the tiny FLUX.1-dev model: the real command line (two
resolutions, disk caches, previews), CLIP-L/T5/split_qkv LoRA, OFT, memory options,
Differential Output Preservation (FLUX and SD1), bad input before anything loads."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from flux_helpers import tiny_flux_files, tokenizer_dir
from library.errors import UserInputError
from library.io import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    from library.data.synthetic import make_color_dataset

    root = tmp_path_factory.mktemp("flux_train")
    make_color_dataset(str(root / "data"), count=2, size=(64, 64))
    make_color_dataset(str(root / "reg"), name="person", count=2, size=(64, 64), color=(40, 40, 220))
    return {"root": root, "data": str(root / "data"), "files": tiny_flux_files("flux-dev"), "tok": tokenizer_dir()}


def argv(ws, out, *extra, data=True):
    f = ws["files"]
    a = ["--pretrained_model_name_or_path", f["flux"], "--ae", f["ae"], "--clip_l", f["clip_l"], "--t5xxl", f["t5xxl"],
         "--tokenizer_cache_dir", ws["tok"], "--output_dir", str(out), "--output_name", "lora",
         "--network_module", "networks.lora_flux", "--network_dim", "4", "--network_alpha", "2",
         "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0", "--train_batch_size", "2",
         "--t5xxl_max_token_length", "32", "--max_train_steps", "2"]
    if data:
        a += ["--train_data_dir", ws["data"], "--caption_extension", ".txt", "--resolution", "64"]
    return a + list(extra)


def run(argv_):
    import flux_train_network

    return flux_train_network.main(argv_)


def test_command_line_two_resolutions_disk_caches_and_previews(ws, tmp_path):
    """The script in a subprocess: a dataset TOML with the same images at 64 and 128 pixels, latents
    and text-encoder outputs cached to disk (one FLUX latent file holds both sizes), a preview."""
    toml = tmp_path / "dataset.toml"
    folder = os.path.join(ws["data"], "1_sks")
    toml.write_text(
        '[general]\ncaption_extension = ".txt"\nbatch_size = 2\n\n'
        f'[[datasets]]\nresolution = 64\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  class_tokens = "sks"\n\n'
        f'[[datasets]]\nresolution = 128\n  [[datasets.subsets]]\n  image_dir = "{folder}"\n  class_tokens = "sks"\n'
    )
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 96 --s 2 --d 5\n")
    out = tmp_path / "out"
    cmd = [sys.executable, os.path.join(ROOT, "flux_train_network.py"),
           *argv(ws, out, "--dataset_config", str(toml), "--cache_latents_to_disk",
                 "--cache_text_encoder_outputs_to_disk", "--network_train_unet_only", "--max_train_steps", "4",
                 "--sample_prompts", str(prompts), "--sample_every_n_steps", "4", "--timestep_sampling", "flux_shift",
                 "--model_prediction_type", "raw", data=False)]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    sd = safetensors_io.load_state_dict(str(out / "lora.safetensors"))
    assert sd and all(k.startswith("lora_unet_") for k in sd)
    assert "lora_unet_double_blocks_1_txt_attn_qkv.lora_up.weight" in sd
    md = safetensors_io.read_metadata(str(out / "lora.safetensors"))
    assert md["ss_base_model_version"] == "flux1" and md["modelspec.architecture"] == "flux-1-dev/lora"
    assert md["modelspec.implementation"] == "https://github.com/black-forest-labs/flux"
    assert md["ss_timestep_sampling"] == "flux_shift" and md["ss_model_prediction_type"] == "raw"
    assert md["ss_guidance_scale"] == "3.5" and md["ss_model_type"] == "flux" and md["ss_steps"] == "4"
    assert "modelspec.prediction_type" not in md
    with np.load(os.path.join(folder, "img_000_0064x0064_flux.npz")) as z:
        assert z["latents_8x8"].shape == (16, 8, 8) and z["latents_16x16"].shape == (16, 16, 16)
    with np.load(os.path.join(folder, "img_000_flux_te.npz")) as z:
        assert z["t5_out"].shape == (32, 64) and z["l_pooled"].shape == (32,) and z["txt_ids"].shape == (32, 3)
        assert z["t5_attn_mask"].shape == (32,) and not bool(z["apply_t5_attn_mask"])
    samples = os.listdir(out / "sample")
    assert samples == ["lora_000004_00_5.png"], samples
    from PIL import Image

    assert Image.open(out / "sample" / samples[0]).size == (64, 96)
    summary = json.loads((out / "training_summary.json").read_text())
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])


def test_text_encoder_lora_split_qkv_and_network_weights(ws, tmp_path):
    """CLIP-L and T5 LoRA (lora_te1_/lora_te3_) with one learning rate per encoder, split_qkv
    saved fused; the file is the starting point of a second run (--network_weights)."""
    out = tmp_path / "a"
    summary = run(argv(ws, out, "--network_args", "train_t5xxl=True", "split_qkv=True", "--text_encoder_lr", "1e-4",
                       "5e-5", "--weighted_captions", "--apply_t5_attn_mask"))
    sd = safetensors_io.load_state_dict(str(out / "lora.safetensors"))
    assert any(k.startswith("lora_te1_text_model_encoder_layers_") for k in sd)
    assert any(k.startswith("lora_te3_encoder_block_") for k in sd)
    assert float(sd["lora_unet_double_blocks_0_img_attn_qkv.alpha"]) == 6.0  # 3 parts x alpha 2
    assert sd["lora_unet_single_blocks_0_linear1.lora_down.weight"].shape[0] == 16
    up = sd["lora_unet_double_blocks_0_img_attn_qkv.lora_up.weight"]
    assert up.abs().sum() > 0 and torch.count_nonzero(up[:256, 4:]) == 0  # trained, block-diagonal
    md = safetensors_io.read_metadata(str(out / "lora.safetensors"))
    assert md["ss_apply_t5_attn_mask"] == "True" and md["ss_text_encoder_lr"] == "[0.0001, 5e-05]"
    assert np.isfinite(summary["final_loss"])
    # cached text-encoder outputs with a trained CLIP-L LoRA: CLIP-L runs live, T5 comes from the cache
    out3 = tmp_path / "c"
    run(argv(ws, out3, "--cache_text_encoder_outputs"))
    te = safetensors_io.load_state_dict(str(out3 / "lora.safetensors"))
    ups = [v for k, v in te.items() if k.startswith("lora_te1_") and k.endswith("lora_up.weight")]
    assert ups and all(u.abs().sum() > 0 for u in ups)
    out2 = tmp_path / "b"
    run(argv(ws, out2, "--network_args", "train_t5xxl=True", "split_qkv=True", "--network_weights",
             str(out / "lora.safetensors"), "--max_train_steps", "1", "--learning_rate", "1e-30"))
    again = safetensors_io.load_state_dict(str(out2 / "lora.safetensors"))
    for k, v in sd.items():
        assert torch.equal(again[k], v), k


def test_memory_options_oft_and_cpu_fallbacks(ws, tmp_path, caplog):
    """--fp8_base with bf16, gradient checkpointing with CPU offload, oft_flux; --blocks_to_swap
    trains unchanged: swapping on a CUDA machine, ignored with a warning on a CPU."""
    import logging

    out = tmp_path / "fp8"
    s = run(argv(ws, out, "--mixed_precision", "bf16", "--fp8_base", "--gradient_checkpointing",
                 "--cpu_offload_checkpointing", "--network_train_unet_only", "--weighting_scheme", "logit_normal"))
    assert np.isfinite(s["final_loss"])
    md = safetensors_io.read_metadata(str(out / "lora.safetensors"))
    assert md["ss_fp8_base"] == "True" and md["ss_weighting_scheme"] == "logit_normal"
    out = tmp_path / "oft"
    s = run(argv(ws, out, "--network_module", "networks.oft_flux", "--network_dim", "4", "--network_alpha", "0.01",
                 "--network_args", "enable_all_linear=True"))
    sd = safetensors_io.load_state_dict(str(out / "lora.safetensors"))
    assert "oft_unet_single_blocks_0_linear1.oft_blocks.3" in sd and np.isfinite(s["final_loss"])
    plain = run(argv(ws, tmp_path / "plain", "--network_train_unet_only", "--gradient_checkpointing"))
    with caplog.at_level(logging.INFO):
        swapped = run(argv(ws, tmp_path / "swap", "--network_train_unet_only", "--gradient_checkpointing",
                           "--blocks_to_swap", "2"))
    if torch.cuda.is_available():
        assert "live in CPU memory and visit the device" in caplog.text
    else:
        assert "has no effect" in caplog.text
    assert plain["loss_history"] == swapped["loss_history"]


def _dop_toml(tmp_path, ws, dop: bool, reg_weight_note=""):
    attrs = "  custom_attributes = { diff_output_preservation = true }\n" if dop else ""
    path = tmp_path / f"dop_{dop}.toml"
    path.write_text(
        '[general]\ncaption_extension = ".txt"\n\n[[datasets]]\nresolution = 64\nbatch_size = 4\n'
        f'  [[datasets.subsets]]\n  image_dir = "{os.path.join(ws["data"], "1_sks")}"\n  class_tokens = "sks"\n'
        f'  [[datasets.subsets]]\n  image_dir = "{os.path.join(str(ws["root"]), "reg", "1_person")}"\n'
        f'  class_tokens = "person"\n  is_reg = true\n{attrs}'
    )
    return str(path)


def test_differential_output_preservation_flux(ws, tmp_path):
    """Reg images with diff_output_preservation: at the first step (LoRA up weights zero) their
    target is the base model's own prediction, so they add exactly nothing -- the loss equals
    that of the same batch with prior_loss_weight 0; afterwards they pull the LoRA back."""
    common = ["--max_train_steps", "3", "--network_train_unet_only", "--learning_rate", "1e-2"]
    dop = run(argv(ws, tmp_path / "dop", "--dataset_config", _dop_toml(tmp_path, ws, True), *common, data=False))
    zero = run(argv(ws, tmp_path / "zero", "--dataset_config", _dop_toml(tmp_path, ws, False), "--prior_loss_weight",
                    "0", *common, data=False))
    plain = run(argv(ws, tmp_path / "plain", "--dataset_config", _dop_toml(tmp_path, ws, False), *common, data=False))
    d, z, p = ([v for _, v in s["loss_history"]] for s in (dop, zero, plain))
    assert d[0] == pytest.approx(z[0], rel=1e-6, abs=1e-7)
    assert p[0] > z[0] * 1.05  # the reg images do contribute without DOP
    assert d[1:] != z[1:]  # once the LoRA moved, the DOP rows have a loss of their own


@pytest.mark.parametrize("variant", ["sd1", "sdxl"])
def test_differential_output_preservation_sd1_sdxl(variant, request, tokenizer_cache, ws, tmp_path):
    """The same rule through train_network.py and sdxl_train_network.py (the DOP code is the
    shared trainer's; SDXL's size conditioning follows the selected rows)."""
    if variant == "sd1":
        import train_network as script

        model = request.getfixturevalue("tiny_sd")("sd1").path
    else:
        import sdxl_train_network as script

        model = request.getfixturevalue("tiny_sdxl_files").path

    def sd_argv(out, *extra):
        return ["--pretrained_model_name_or_path", model, "--tokenizer_cache_dir", tokenizer_cache,
                "--output_dir", str(out), "--network_module", "networks.lora", "--network_dim", "4",
                "--learning_rate", "1e-2", "--seed", "3", "--max_data_loader_n_workers", "0", "--max_train_steps",
                "2", *extra]

    dop = script.main(sd_argv(tmp_path / "dop", "--dataset_config", _dop_toml(tmp_path, ws, True)))
    zero = script.main(sd_argv(tmp_path / "zero", "--dataset_config", _dop_toml(tmp_path, ws, False),
                               "--prior_loss_weight", "0"))
    plain = script.main(sd_argv(tmp_path / "plain", "--dataset_config", _dop_toml(tmp_path, ws, False),
                                "--max_train_steps", "1"))
    assert dop["loss_history"][0][1] == pytest.approx(zero["loss_history"][0][1], rel=1e-6, abs=1e-7)
    assert plain["loss_history"][0][1] > zero["loss_history"][0][1] * 1.05


def test_bad_input_is_reported_before_models_load(ws, tmp_path, monkeypatch):
    from library.arch.flux import FluxArchitecture

    def no_loading(*a, **k):
        raise AssertionError("models were loaded before the bad input was reported")

    monkeypatch.setattr(FluxArchitecture, "load_models", no_loading)
    cases = [
        (["--network_args", "spilt_qkv=True"], "unknown --network_args key 'spilt_qkv'"),
        (["--network_args", "train_double_block_indices=0-19"], "valid indices are 0-18"),
        (["--network_args", "train_single_block_indices=40"], "valid indices are 0-37"),
        (["--network_module", "networks.oft_flux", "--network_dim", "3"], "does not divide"),
        (["--blocks_to_swap", "2", "--cpu_offload_checkpointing", "--gradient_checkpointing"],
         "cannot be combined with --cpu_offload_checkpointing"),
        (["--blocks_to_swap", "5"], "at most 4"),
        (["--split_mode"], "at most 4"),  # deprecated: means --blocks_to_swap 18, too many for this model
        (["--network_args", "train_t5xxl=True", "--cache_text_encoder_outputs"], "train_t5xxl"),
        (["--model_type", "chroma"], "Chroma"),
        (["--fp8_base_unet"], "--mixed_precision"),
    ]
    for extra, message in cases:
        with pytest.raises(UserInputError, match=message):
            run(argv(ws, tmp_path / "bad", *extra))
    missing = argv(ws, tmp_path / "bad")
    missing[missing.index("--ae") + 1] = str(tmp_path / "nope.safetensors")
    with pytest.raises(UserInputError, match="--ae"):
        run(missing)
    sd_file = tmp_path / "not_flux.safetensors"
    from safetensors.torch import save_file

    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3)}, str(sd_file))
    wrong = argv(ws, tmp_path / "bad")
    wrong[wrong.index("--pretrained_model_name_or_path") + 1] = str(sd_file)
    with pytest.raises(UserInputError, match="--pretrained_model_name_or_path"):
        run(wrong)


def test_help_is_fast_and_lists_the_flux_options():
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "flux_train_network.py"), "--help"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0
    for opt in ("--blocks_to_swap", "--split_mode", "--timestep_sampling", "--cache_text_encoder_outputs_to_disk",
                "--cpu_offload_checkpointing", "--t5xxl_max_token_length", "--model_prediction_type"):
        assert opt in r.stdout
    assert " torch" not in r.stderr.replace("torch_", "")  # no torch import before parsing
