"""train_network.py options, each exercised for a couple of steps on the tiny SD1 model."""

from __future__ import annotations

import json
import os

import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io


@pytest.fixture(scope="module")
def ws(tmp_path_factory, tiny_sd, tokenizer_cache):
    from library.data.synthetic import make_color_dataset

    root = tmp_path_factory.mktemp("opts")
    make_color_dataset(str(root / "data"), count=4, size=(64, 64))
    prompts = root / "prompts.txt"
    prompts.write_text("a photo of sks --w 64 --h 64 --s 3 --d 5\n# a comment\na red thing --w 64 --h 64 --s 3 --d 6 --l 4\n")
    return {"data": str(root / "data"), "model": tiny_sd("sd1").path, "tok": tokenizer_cache, "prompts": str(prompts)}


def train(ws, out, *extra, module="networks.lora", steps=2):
    import train_network

    argv = [
        "--pretrained_model_name_or_path", ws["model"], "--tokenizer_cache_dir", ws["tok"],
        "--train_data_dir", ws["data"], "--caption_extension", ".txt", "--resolution", "64",
        "--output_dir", str(out), "--output_name", "net", "--network_module", module,
        "--network_dim", "4", "--learning_rate", "1e-3", "--seed", "3", "--max_data_loader_n_workers", "0",
        "--train_batch_size", "2", "--max_train_steps", str(steps), *extra,
    ]
    return train_network.main(argv)


def tensors(path):
    return safetensors_io.load_state_dict(str(path))


def test_bf16_mixed_precision_full_bf16(ws, tmp_path):
    summary = train(ws, tmp_path, "--mixed_precision", "bf16", "--full_bf16")
    assert summary["final_loss"] == summary["final_loss"]  # not NaN
    sd = tensors(tmp_path / "net.safetensors")
    assert {v.dtype for k, v in sd.items() if k.endswith("weight")} == {torch.bfloat16}


def test_fp8_base_stores_frozen_weights_in_fp8(ws, tmp_path, monkeypatch):
    from library.training import model_options

    seen = {}
    original = model_options.store_weights_in_fp8

    def spy(model, dtype):
        n = original(model, dtype)
        seen[type(model).__name__] = {p.dtype for name, p in model.named_parameters() if name.endswith("to_q.weight")}
        return n

    monkeypatch.setattr(model_options, "store_weights_in_fp8", spy)
    summary = train(ws, tmp_path, "--mixed_precision", "bf16", "--fp8_base")
    assert seen["UNet2DConditionModel"] == {torch.float8_e4m3fn}
    assert summary["final_loss"] == summary["final_loss"]
    md = safetensors_io.read_metadata(tmp_path / "net.safetensors")
    assert md["ss_fp8_base"] == "True"


def test_fp8_base_needs_mixed_precision(ws, tmp_path):
    with pytest.raises(UserInputError, match="fp8_base"):
        train(ws, tmp_path, "--fp8_base")


def test_gradient_checkpointing_and_sliced_attention_train(ws, tmp_path):
    train(ws, tmp_path / "a", "--gradient_checkpointing", "--mem_eff_attn", "--sdpa")
    sd = tensors(tmp_path / "a" / "net.safetensors")
    assert any(v.abs().sum() > 0 for k, v in sd.items() if k.endswith("lora_up.weight"))


def test_xformers_unavailable_is_a_clear_error(ws, tmp_path):
    try:
        import xformers.ops  # noqa: F401

        pytest.skip("xformers imports here; the error path cannot be shown")
    except Exception:
        pass
    with pytest.raises(UserInputError, match="--xformers"):
        train(ws, tmp_path, "--xformers")


def test_previews_at_first_and_every_step_are_deterministic(ws, tmp_path):
    for run in ("a", "b"):
        train(ws, tmp_path / run, "--sample_prompts", ws["prompts"], "--sample_at_first", "--sample_every_n_steps", "2")
    names = sorted(os.listdir(tmp_path / "a" / "sample"))
    assert names == ["net_000002_00_5.png", "net_000002_01_6.png", "net_e000000_00_5.png", "net_e000000_01_6.png"]
    from PIL import Image

    for n in names:
        a, b = Image.open(tmp_path / "a" / "sample" / n), Image.open(tmp_path / "b" / "sample" / n)
        assert a.size == (64, 64) and list(a.getdata()) == list(b.getdata())
        assert "a photo of sks" in a.text["parameters"] or "a red thing" in a.text["parameters"]


def test_previews_do_not_change_training(ws, tmp_path):
    """Sampling runs on forked RNG: the trained weights are the same with and without previews."""
    train(ws, tmp_path / "plain", steps=3)
    train(ws, tmp_path / "sampled", "--sample_prompts", ws["prompts"], "--sample_every_n_steps", "1", steps=3)
    a, b = tensors(tmp_path / "plain" / "net.safetensors"), tensors(tmp_path / "sampled" / "net.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_validation_loss_logged_to_tensorboard(ws, tmp_path, caplog):
    import logging

    with caplog.at_level(logging.INFO):
        train(ws, tmp_path, "--validation_split", "0.5", "--validate_every_n_steps", "1", "--logging_dir",
              str(tmp_path / "logs"), "--log_with", "tensorboard", "--log_config")
    assert any("validation loss" in r.getMessage() for r in caplog.records)
    events = [f for _, _, files in os.walk(tmp_path / "logs") for f in files if f.startswith("events.out")]
    assert events
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    folder = os.path.dirname(next(os.path.join(d, f) for d, _, fs in os.walk(tmp_path / "logs") for f in fs if f.startswith("events.out")))
    acc = EventAccumulator(folder)
    acc.Reload()
    tags = acc.Tags()["scalars"]
    assert "loss/current" in tags and "loss/validation/step_average" in tags


@pytest.mark.parametrize("module, marker", [("networks.dylora", "lora_down"), ("networks.oft", "oft_blocks")])
def test_dylora_and_oft_train_save_and_reload(ws, tmp_path, module, marker):
    extra = ["--network_args", "unit=2"] if module.endswith("dylora") else []
    train(ws, tmp_path, *extra, module=module)
    path = tmp_path / "net.safetensors"
    sd = tensors(path)
    assert any(marker in k for k in sd)
    import importlib

    from library.models.sd.loading import load_sd_models

    mod = importlib.import_module(module)
    models = load_sd_models(ws["model"])
    net, weights = mod.create_network_from_weights(1.0, str(path), models.vae, models.text_encoder, models.unet)
    net.apply_to(models.text_encoder, models.unet)
    info = net.load_weights(str(path))
    assert not getattr(info, "missing_keys", []) and not getattr(info, "unexpected_keys", [])


def test_network_weights_dim_from_weights_and_base_weights(ws, tmp_path):
    train(ws, tmp_path / "first", "--network_dim", "6")
    first = tmp_path / "first" / "net.safetensors"
    train(ws, tmp_path / "cont", "--network_weights", str(first), "--dim_from_weights")
    sd = tensors(tmp_path / "cont" / "net.safetensors")
    assert {v.shape[0] for k, v in sd.items() if k.endswith("lora_down.weight")} == {6}
    train(ws, tmp_path / "based", "--base_weights", str(first), "--base_weights_multiplier", "0.5")
    assert (tmp_path / "based" / "net.safetensors").exists()


def test_no_metadata_keeps_the_minimum(ws, tmp_path):
    train(ws, tmp_path, "--no_metadata", "--network_args", "conv_dim=2")
    md = safetensors_io.read_metadata(tmp_path / "net.safetensors")
    ss = {k for k in md if k.startswith("ss_")}
    assert ss == {"ss_v2", "ss_base_model_version", "ss_network_module", "ss_network_dim", "ss_network_alpha", "ss_network_args"}
    assert "modelspec.architecture" in md and "sshs_model_hash" in md


def test_epoch_saves_and_keep_last(ws, tmp_path):
    # 4 images, batch 2 -> 2 steps per epoch; 8 steps = 4 epochs
    train(ws, tmp_path, "--save_every_n_epochs", "1", "--save_last_n_epochs", "2", steps=8)
    files = sorted(f for f in os.listdir(tmp_path) if f.endswith(".safetensors"))
    assert files == ["net-000002.safetensors", "net-000003.safetensors", "net.safetensors"]
    md = safetensors_io.read_metadata(tmp_path / "net-000003.safetensors")
    assert md["ss_epoch"] == "3" and md["ss_steps"] == "6"
    summary = json.loads((tmp_path / "training_summary.json").read_text())
    assert summary["steps"] == 8


def test_noise_and_loss_options_together(ws, tmp_path):
    summary = train(ws, tmp_path, "--noise_offset", "0.05", "--noise_offset_random_strength", "--adaptive_noise_scale", "0.01",
                    "--multires_noise_iterations", "2", "--multires_noise_discount", "0.3", "--ip_noise_gamma", "0.05",
                    "--ip_noise_gamma_random_strength", "--min_snr_gamma", "5", "--loss_type", "huber", "--huber_schedule", "snr",
                    "--zero_terminal_snr", "--debiased_estimation_loss", "--min_timestep", "100", "--max_timestep", "900",
                    "--weighted_captions", "--max_token_length", "150", "--clip_skip", "2", "--gradient_accumulation_steps", "2",
                    "--lr_scheduler", "cosine_with_restarts", "--lr_warmup_steps", "0.5", "--optimizer_type", "Lion")
    assert summary["steps"] == 2 and summary["final_loss"] == summary["final_loss"]
    md = safetensors_io.read_metadata(tmp_path / "net.safetensors")
    assert md["ss_loss_type"] == "huber" and md["ss_min_snr_gamma"] == "5.0" and md["ss_optimizer"].endswith("Lion")
    assert md["modelspec.timestep_range"] == "100,900" and md["modelspec.encoder_layer"] == "2"


def test_v_parameterization_on_sd2(tiny_sd, ws, tmp_path):
    import train_network

    train_network.main([
        "--pretrained_model_name_or_path", tiny_sd("sd2-v").path, "--v2", "--v_parameterization",
        "--scale_v_pred_loss_like_noise_pred", "--tokenizer_cache_dir", ws["tok"], "--train_data_dir", ws["data"],
        "--caption_extension", ".txt", "--resolution", "64", "--output_dir", str(tmp_path), "--output_name", "v",
        "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2", "--seed", "1",
        "--max_data_loader_n_workers", "0",
    ])
    md = safetensors_io.read_metadata(tmp_path / "v.safetensors")
    assert md["ss_base_model_version"] == "sd_v2_v" and md["modelspec.prediction_type"] == "v"
    assert md["modelspec.architecture"] == "stable-diffusion-v2-768-v/lora"
    assert any(k.startswith("lora_te_text_model_encoder_layers_22_") for k in tensors(tmp_path / "v.safetensors"))


def test_alpha_mask_and_conditioning_masks(ws, tmp_path):
    """--alpha_mask (transparency) and --masked_loss with --conditioning_data_dir both train."""
    import numpy as np
    from PIL import Image

    import train_network

    img_dir = tmp_path / "data" / "1_sks"
    mask_dir = tmp_path / "masks"
    img_dir.mkdir(parents=True)
    mask_dir.mkdir()
    for i in range(2):
        rgba = np.zeros((64, 64, 4), np.uint8)
        rgba[..., 0] = 200
        rgba[16:48, 16:48, 3] = 255  # only the centre counts
        Image.fromarray(rgba, "RGBA").save(img_dir / f"{i}.png")
        (img_dir / f"{i}.txt").write_text("sks")
        m = np.zeros((64, 64, 3), np.uint8)
        m[:32] = 255
        Image.fromarray(m).save(mask_dir / f"{i}.png")
    common = ["--pretrained_model_name_or_path", ws["model"], "--tokenizer_cache_dir", ws["tok"],
              "--train_data_dir", str(tmp_path / "data"), "--caption_extension", ".txt", "--resolution", "64",
              "--network_module", "networks.lora", "--network_dim", "4", "--max_train_steps", "2", "--seed", "1",
              "--max_data_loader_n_workers", "0", "--train_batch_size", "2"]
    s1 = train_network.main(common + ["--output_dir", str(tmp_path / "a"), "--alpha_mask"])
    s2 = train_network.main(common + ["--output_dir", str(tmp_path / "b"), "--masked_loss",
                                      "--conditioning_data_dir", str(mask_dir)])
    s3 = train_network.main(common + ["--output_dir", str(tmp_path / "c")])
    assert len({round(s["final_loss"], 6) for s in (s1, s2, s3)}) == 3  # masks change the loss
