"""SD1.x/2.x model stack: exact file round trips and agreement with diffusers."""

from __future__ import annotations

import logging
import os
import subprocess
import sys

import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io
from library.models.sd.loading import load_sd_models, load_vae
from library.models.sd.saving import save_diffusers, save_ldm_checkpoint
from library.models.sd.tiny import sd_configs

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _all_tensors(path):
    return safetensors_io.load_state_dict(path)


def _assert_same_tensors(a: dict, b: dict, keys=None):
    keys = sorted(a) if keys is None else sorted(keys)
    for k in keys:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_ldm_load_save_is_bit_exact(tiny_sd, tmp_path, variant):
    src = tiny_sd(variant).path
    models = load_sd_models(src)
    out = str(tmp_path / "resaved.safetensors")
    save_ldm_checkpoint(models, out)
    a, b = _all_tensors(src), _all_tensors(out)
    assert set(a) == set(b)
    _assert_same_tensors(a, b)


def test_ckpt_round_trip_keeps_tensors_and_adds_steps(tiny_sd, tmp_path):
    models = load_sd_models(tiny_sd("sd1").path)
    ckpt = str(tmp_path / "model.ckpt")
    save_ldm_checkpoint(models, ckpt, epoch=2, global_step=30)
    again = load_sd_models(ckpt)
    assert (again.epoch, again.global_step) == (2, 30)
    ckpt2 = str(tmp_path / "model2.ckpt")
    save_ldm_checkpoint(again, ckpt2, epoch=1, global_step=5)
    payload = torch.load(ckpt2, weights_only=True)
    assert (payload["epoch"], payload["global_step"]) == (3, 35)
    _assert_same_tensors(_all_tensors(tiny_sd("sd1").path), payload["state_dict"])


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_diffusers_folder_to_ldm_and_back(tiny_sd, tmp_path, variant):
    original = tiny_sd(variant).path
    models = load_sd_models(original)
    folder = str(tmp_path / "diffusers")
    save_diffusers(models, folder)
    from_folder = load_sd_models(folder)
    assert from_folder.v2 == (variant != "sd1")
    out = str(tmp_path / "from_folder.safetensors")
    save_ldm_checkpoint(from_folder, out)
    a, b = _all_tensors(original), _all_tensors(out)
    assert set(a) == set(b)
    # A diffusers folder has no place for SD2's unused last OpenCLIP layer and projection:
    # those are rebuilt, everything the model uses must be identical.
    used = [k for k in a if ".resblocks.23." not in k and not k.endswith(("text_projection", "logit_scale"))]
    _assert_same_tensors(a, b, used)


@pytest.mark.parametrize("variant", ["sd1", "sd2", "sd2-v"])
def test_outputs_match_diffusers_from_single_file(tiny_sd, variant):
    from diffusers import StableDiffusionPipeline

    tiny = tiny_sd(variant)
    pipe = StableDiffusionPipeline.from_single_file(
        tiny.path, config=tiny.reference_folder, local_files_only=True,
        tokenizer=None, safety_checker=None, feature_extractor=None,
    )
    ours = load_sd_models(tiny.path, v_parameterization=variant == "sd2-v")
    unet_cfg, _, te_cfg = sd_configs(variant)
    assert list(ours.unet.config.block_out_channels) == unet_cfg["block_out_channels"]
    assert ours.unet.config.attention_head_dim == pipe.unet.config.attention_head_dim
    assert ours.text_encoder.config.num_hidden_layers == te_cfg["num_hidden_layers"]

    g = torch.Generator().manual_seed(0)
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, te_cfg["hidden_size"], generator=g)
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    with torch.no_grad():
        pairs = {
            "unet": (pipe.unet(latents, torch.tensor([10, 900]), context).sample, ours.unet(latents, torch.tensor([10, 900]), context).sample),
            "text encoder": (pipe.text_encoder(ids).last_hidden_state, ours.text_encoder(ids).last_hidden_state),
            "text encoder hidden states": (
                torch.stack(pipe.text_encoder(ids, output_hidden_states=True).hidden_states),
                torch.stack(ours.text_encoder(ids, output_hidden_states=True).hidden_states),
            ),
            "vae encode": (pipe.vae.encode(image).latent_dist.mean, ours.vae.encode(image).latent_dist.mean),
            "vae decode": (pipe.vae.decode(latents[:1]).sample, ours.vae.decode(latents[:1]).sample),
        }
    for name, (ref, got) in pairs.items():
        assert ref.abs().mean() > 1e-3, f"{name}: degenerate reference output"
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5, msg=f"{name} differs from diffusers")


def test_v2_flag_contradicting_file_is_reported_and_file_wins(tiny_sd, caplog):
    with caplog.at_level(logging.WARNING):
        models = load_sd_models(tiny_sd("sd1").path, v2=True)
    assert models.v2 is False
    assert any("--v2" in r.getMessage() for r in caplog.records)


def test_replacement_vae_from_ldm_file_and_folder(tiny_sd, tmp_path):
    tiny = tiny_sd("sd1")
    full = _all_tensors(tiny.path)
    vae_only = {k[len("first_stage_model."):]: v for k, v in full.items() if k.startswith("first_stage_model.")}
    bare = str(tmp_path / "vae.safetensors")
    safetensors_io.save_state_dict(vae_only, bare)
    reference = load_sd_models(tiny.path).vae
    for vae in (load_vae(bare), load_vae(tiny.reference_folder)):
        for k, v in reference.state_dict().items():
            assert torch.equal(vae.state_dict()[k], v), k
    with pytest.raises(UserInputError, match="--vae"):
        load_vae(str(tmp_path / "missing.safetensors"))


def test_inpainting_and_pruned_shapes_are_inferred(tmp_path):
    """A 9-channel (inpainting) U-Net with only two levels loads with sizes read from the file."""
    from diffusers import UNet2DConditionModel

    from library.models.sd.config import infer_unet_config
    from library.models.sd.key_maps import map_diffusers_keys_to_ldm, unet_module_pairs

    cfg = dict(sd_configs("sd1")[0], in_channels=9, block_out_channels=[32, 64], layers_per_block=1,
               down_block_types=["CrossAttnDownBlock2D", "DownBlock2D"], up_block_types=["UpBlock2D", "CrossAttnUpBlock2D"])
    unet = UNet2DConditionModel(**cfg)
    mapping = map_diffusers_keys_to_ldm(unet.state_dict().keys(), unet_module_pairs(cfg), "model.diffusion_model.")
    shapes = {m.ldm_key: tuple(unet.state_dict()[k].shape) for k, m in mapping.items()}
    inferred = infer_unet_config(shapes, v2=False, path="x")
    for key in ("in_channels", "block_out_channels", "layers_per_block", "down_block_types", "up_block_types", "cross_attention_dim"):
        assert inferred[key] == cfg[key], key


# ---------------------------------------------------------------- bad input


def test_missing_file_is_a_clear_error(tmp_path):
    with pytest.raises(UserInputError, match="not found"):
        load_sd_models(str(tmp_path / "nope.safetensors"))


def test_truncated_safetensors_names_file(tiny_sd, tmp_path):
    data = open(tiny_sd("sd1").path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"cut\.safetensors: truncated"):
        load_sd_models(str(cut))


def test_unknown_layout_names_file(tmp_path):
    path = tmp_path / "other.safetensors"
    safetensors_io.save_state_dict({"foo.weight": torch.zeros(2, 2)}, str(path))
    with pytest.raises(UserInputError, match=r"other\.safetensors: unknown checkpoint layout"):
        load_sd_models(str(path))


def test_sdxl_file_is_recognised(tmp_path):
    path = tmp_path / "xl.safetensors"
    safetensors_io.save_state_dict({"model.diffusion_model.label_emb.0.0.weight": torch.zeros(2, 2),
                                    "conditioner.embedders.0.transformer.x": torch.zeros(1)}, str(path))
    with pytest.raises(UserInputError, match="SDXL"):
        load_sd_models(str(path))


def test_ckpt_that_is_not_an_archive(tmp_path):
    path = tmp_path / "broken.ckpt"
    path.write_text("this is not a checkpoint")
    with pytest.raises(UserInputError, match=r"broken\.ckpt: not a valid checkpoint archive"):
        load_sd_models(str(path))


def test_pickle_with_code_is_refused(tmp_path):
    import pickle

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    path = tmp_path / "evil.ckpt"
    with open(path, "wb") as f:
        pickle.dump({"state_dict": Evil()}, f)
    with pytest.raises(UserInputError, match=r"evil\.ckpt: cannot be read as a weights-only checkpoint"):
        load_sd_models(str(path))


def test_cli_error_is_one_line_before_heavy_imports(tmp_path):
    """The convert tool reports a truncated input in one line, exit status 2, no traceback."""
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":")
    r = subprocess.run([sys.executable, os.path.join(ROOT, "tools", "convert_diffusers20_original_sd.py"), str(bad), str(tmp_path / "out")],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    lines = [l for l in r.stderr.strip().splitlines() if l.startswith("error:")]
    assert len(lines) == 1 and "bad.safetensors" in lines[0], r.stderr
    assert "Traceback" not in r.stderr


def test_save_model_as_formats_and_precision(tiny_sd, tmp_path):
    from library.models.sd.saving import save_sd_model

    models = load_sd_models(tiny_sd("sd1").path)
    out = str(tmp_path / "half.safetensors")
    assert save_sd_model(models, out, "safetensors", "fp16", metadata={"modelspec.title": "t"}) == "safetensors"
    assert {t.dtype for t in _all_tensors(out).values()} == {torch.float16}
    assert safetensors_io.read_metadata(out)["modelspec.title"] == "t"
    folder = str(tmp_path / "pipe")
    save_sd_model(models, folder, "diffusers_safetensors")
    assert os.path.exists(os.path.join(folder, "unet", "diffusion_pytorch_model.safetensors"))
    with pytest.raises(UserInputError, match="--save_model_as"):
        save_sd_model(models, str(tmp_path / "x.onnx"), "onnx")
    with pytest.raises(UserInputError, match="--save_precision"):
        save_sd_model(models, out, "safetensors", "fp8")


@pytest.mark.parametrize("variant", ["sd1", "sd2"])
def test_loading_in_another_dtype_converts_every_weight_and_keeps_unused_tensors(tiny_sd, tmp_path, variant):
    """dtype at load time (converted per tensor, pages handed back) == load as stored, then convert."""
    fp16 = str(tmp_path / "fp16.safetensors")
    save_ldm_checkpoint(load_sd_models(tiny_sd(variant).path), fp16, save_dtype=torch.float16)
    stored = load_sd_models(fp16)
    converted = load_sd_models(fp16, dtype=torch.float32, vae_dtype=torch.bfloat16)
    for name, want in (("unet", torch.float32), ("text_encoder", torch.float32), ("vae", torch.bfloat16)):
        a, b = getattr(stored, name).state_dict(), getattr(converted, name).state_dict()
        assert set(a) == set(b)
        for k in a:
            if a[k].is_floating_point():
                assert b[k].dtype == want, (name, k)
                assert torch.equal(a[k].to(want), b[k]), (name, k)
    # a re-save of the converted models in fp16 gives back the file, unused tensors included
    again = str(tmp_path / "again.safetensors")
    save_ldm_checkpoint(converted, again, save_dtype=torch.float16)
    a, b = _all_tensors(fp16), _all_tensors(again)
    assert set(a) == set(b)
    # fp16 -> fp32 -> fp16 is exact; the VAE went through bf16, which is not
    _assert_same_tensors(a, b, [k for k in a if not k.startswith("first_stage_model.")])


def test_tensor_file_get_as_equals_get_then_convert(tmp_path):
    from library.io.tensor_files import TensorFile

    tensors = {"h": torch.randn(3, 5, dtype=torch.float16), "b": torch.randn(7, dtype=torch.bfloat16),
               "i": torch.arange(4, dtype=torch.int64), "e": torch.zeros(0, 3, dtype=torch.float16)}
    path = str(tmp_path / "t.safetensors")
    safetensors_io.save_state_dict(tensors, path)
    with TensorFile(path) as f:
        for k, t in tensors.items():
            got = f.get_as(k, torch.float32)
            want = t.float() if t.is_floating_point() else t
            assert got.dtype == want.dtype and torch.equal(got, want), k
            assert torch.equal(f.get(k), t), k  # the map does not disturb private reads
