"""SDXL model stack: exact file round trips, agreement with diffusers, conditioning."""

from __future__ import annotations

import math
import os

import pytest
import torch

from library.errors import UserInputError
from library.io import safetensors_io
from library.models.sdxl.loading import load_sdxl_models
from library.models.sdxl.saving import save_sdxl_checkpoint, save_sdxl_diffusers

# measured: 0.0 (the same diffusers attention/transformer code runs on both sides)
ATOL = 1e-5


class TinySDXL:
    def __init__(self, path, reference_folder, tokenizers):
        self.path, self.reference_folder, self.tokenizers = path, reference_folder, tokenizers


@pytest.fixture(scope="module")
def tiny_sdxl(tmp_path_factory, tokenizer_cache):
    """A tiny SDXL single file plus a diffusers folder holding its true configuration."""
    from library.models.sdxl.tiny import make_sdxl_models
    from library.tokenizers import load_sdxl_tokenizers

    root = tmp_path_factory.mktemp("tiny_sdxl")
    tokenizers = load_sdxl_tokenizers(tokenizer_cache)
    models = make_sdxl_models(seed=1234)
    path = str(root / "sdxl.safetensors")
    save_sdxl_checkpoint(models, path)
    ref = str(root / "sdxl_reference")
    save_sdxl_diffusers(models, ref, tokenizers=tokenizers)
    return TinySDXL(path, ref, tokenizers)


@pytest.fixture(scope="module")
def diffusers_pipe(tiny_sdxl):
    from diffusers import StableDiffusionXLPipeline

    return StableDiffusionXLPipeline.from_single_file(
        tiny_sdxl.path, config=tiny_sdxl.reference_folder, local_files_only=True,
        tokenizer=tiny_sdxl.tokenizers[0], tokenizer_2=tiny_sdxl.tokenizers[1],
    )


@pytest.fixture(scope="module")
def ours(tiny_sdxl):
    return load_sdxl_models(tiny_sdxl.path)


def _tensors(path):
    return safetensors_io.load_state_dict(path)


def _assert_same(a: dict, b: dict):
    assert set(a) == set(b), sorted(set(a) ^ set(b))[:5]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), f"tensor {k} differs"


# ---------------------------------------------------------------------------------- files
@pytest.mark.parametrize("mmap", [True, False])
def test_single_file_round_trip_is_bit_exact(tiny_sdxl, tmp_path, mmap):
    models = load_sdxl_models(tiny_sdxl.path, mmap=mmap)
    out = str(tmp_path / "resaved.safetensors")
    save_sdxl_checkpoint(models, out)
    _assert_same(_tensors(tiny_sdxl.path), _tensors(out))


def test_unused_tensors_survive_and_ckpt_adds_steps(tiny_sdxl, tmp_path):
    full = _tensors(tiny_sdxl.path)
    full["conditioner.embedders.0.transformer.text_model.embeddings.position_ids"] = torch.arange(77)[None]
    full["model_ema.decay"] = torch.tensor(0.9999)
    src = str(tmp_path / "extra.safetensors")
    safetensors_io.save_state_dict(full, src)
    models = load_sdxl_models(src)
    assert set(models.unused_tensors) == {
        "conditioner.embedders.0.transformer.text_model.embeddings.position_ids", "model_ema.decay",
        "conditioner.embedders.1.model.logit_scale",
    }
    ckpt = str(tmp_path / "model.ckpt")
    save_sdxl_checkpoint(models, ckpt, epoch=1, global_step=7)
    again = load_sdxl_models(ckpt)
    assert (again.epoch, again.global_step) == (1, 7)
    payload = torch.load(ckpt, weights_only=True)
    _assert_same(full, payload["state_dict"])


def test_diffusers_folder_round_trip(tiny_sdxl, ours, tmp_path):
    folder = str(tmp_path / "pipe")
    save_sdxl_diffusers(ours, folder)
    from_folder = load_sdxl_models(folder)
    assert from_folder.source_format == "diffusers"
    out = str(tmp_path / "from_folder.safetensors")
    save_sdxl_checkpoint(from_folder, out)
    _assert_same(_tensors(tiny_sdxl.path), _tensors(out))


def test_save_precision_and_formats(ours, tmp_path):
    from library.models.sdxl.saving import save_sdxl_model

    out = str(tmp_path / "half.safetensors")
    assert save_sdxl_model(ours, out, None, "fp16", metadata={"modelspec.title": "t"}) == "safetensors"
    assert {t.dtype for t in _tensors(out).values()} == {torch.float16}
    assert safetensors_io.read_metadata(out)["modelspec.title"] == "t"
    assert load_sdxl_models(out).unet.dtype == torch.float16
    with pytest.raises(UserInputError, match="--save_model_as"):
        save_sdxl_model(ours, str(tmp_path / "x.onnx"), "onnx")


# ---------------------------------------------------------------------------------- structure
def test_config_is_read_from_the_file(ours):
    from library.models.sdxl.tiny import sdxl_configs

    unet_cfg, _, te1_cfg, te2_cfg = sdxl_configs()
    cfg = ours.unet.config
    assert cfg == unet_cfg
    assert cfg.transformer_depth == [0, 2, 3] and cfg.transformer_depth_up == [3, 2, 0] and cfg.transformer_depth_middle == 3
    assert cfg.context_dim == te1_cfg["hidden_size"] + te2_cfg["hidden_size"]
    assert cfg.adm_in_channels == te2_cfg["projection_dim"] + 6 * 256
    assert ours.text_encoder1.config.num_hidden_layers == 12
    assert ours.text_encoder2.config.num_hidden_layers == 32
    assert ours.text_encoder2.config.num_attention_heads == te2_cfg["hidden_size"] // 64
    assert ours.vae.config.scaling_factor == 0.13025


def test_full_size_config_matches_sdxl_base():
    from library.models.sdxl.tiny import sdxl_configs

    unet, _, te1, te2 = sdxl_configs(full_size=True)
    d = unet.diffusers_config()
    assert d["attention_head_dim"] == [5, 10, 20] and d["transformer_layers_per_block"] == [1, 2, 10]
    assert (unet.context_dim, unet.adm_in_channels) == (2048, 2816)
    assert (te1["num_attention_heads"], te2["num_attention_heads"]) == (12, 20)


def test_full_size_layout_is_inferred_from_shapes():
    """The released layout ([0, 2, 10] depths, 2816-wide label_emb) read back from key shapes."""
    from accelerate import init_empty_weights

    from library.models.sdxl.config import UNET_PREFIX, infer_unet_config
    from library.models.sdxl.key_maps import diffusers_unet_keys, unet_module_pairs
    from library.models.sd.key_maps import map_diffusers_keys_to_ldm
    from library.models.sdxl.tiny import sdxl_configs
    from library.models.sdxl.unet import SDXLUNet

    cfg = sdxl_configs(full_size=True)[0]
    with init_empty_weights():
        unet = SDXLUNet(cfg)
    shapes = {UNET_PREFIX + k: tuple(v.shape) for k, v in unet.state_dict().items()}
    assert len(shapes) == 1680  # tensors of the SDXL base U-Net
    assert infer_unet_config(shapes, "full") == cfg
    mapped = {m.ldm_key for m in map_diffusers_keys_to_ldm(diffusers_unet_keys(cfg), unet_module_pairs(cfg), UNET_PREFIX).values()}
    assert mapped == set(shapes)


def test_module_names_are_the_lora_key_names(ours):
    modules = dict(ours.unet.named_modules())
    expected = {
        "input_blocks.4.1": "Transformer2DModel", "input_blocks.4.0": "ResnetBlock2D", "input_blocks.3.0": "Downsample2D",
        "output_blocks.2.2": "Upsample2D", "output_blocks.5.2": "Upsample2D", "middle_block.1": "Transformer2DModel",
        "middle_block.0": "ResnetBlock2D", "output_blocks.8.0": "ResnetBlock2D",
    }
    for path, cls in expected.items():
        assert type(modules[path]).__name__ == cls, path
    for path in ("input_blocks.4.1.transformer_blocks.0.attn1.to_q", "middle_block.1.transformer_blocks.2.ff.net.2",
                 "output_blocks.2.2.conv", "input_blocks.3.0.op", "input_blocks.4.0.in_layers.2",
                 "input_blocks.4.0.out_layers.3", "input_blocks.4.0.emb_layers.1", "input_blocks.4.0.skip_connection",
                 "label_emb.0.0", "time_embed.2", "out.2"):
        assert isinstance(modules[path], (torch.nn.Linear, torch.nn.Conv2d)), path
    assert "input_blocks.1.1" not in modules  # level 1 has no attention


# ---------------------------------------------------------------------------------- oracle
def test_unet_and_encoders_match_diffusers(ours, diffusers_pipe):
    pipe = diffusers_pipe
    g = torch.Generator().manual_seed(0)
    cfg = ours.unet.config
    latents = torch.randn(2, 4, 8, 8, generator=g)
    context = torch.randn(2, 77, cfg.context_dim, generator=g)
    pooled = torch.randn(2, ours.text_encoder2.config.projection_dim, generator=g)
    time_ids = torch.tensor([[1024.0, 768, 0, 16, 64, 64], [640, 1280, 32, 0, 64, 64]])
    from library.arch.sdxl import conditioning_vector

    y = conditioning_vector(pooled, time_ids[:, :2], time_ids[:, 2:4], time_ids[:, 4:])
    ids = torch.randint(0, 49408, (2, 77), generator=g)
    image = torch.rand(1, 3, 64, 64, generator=g) * 2 - 1
    t = torch.tensor([10, 900])
    with torch.no_grad():
        pairs = {
            "unet": (pipe.unet(latents, t, context, added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample,
                     ours.unet(latents, t, context, y)),
            "unet odd size": (
                pipe.unet(latents[:1, :, :7, :5], t[:1], context[:1], added_cond_kwargs={"text_embeds": pooled[:1], "time_ids": time_ids[:1]}).sample,
                ours.unet(latents[:1, :, :7, :5], t[:1], context[:1], y[:1])),
            "text encoder 1": (torch.stack(pipe.text_encoder(ids, output_hidden_states=True).hidden_states),
                               torch.stack(ours.text_encoder1(ids, output_hidden_states=True).hidden_states)),
            "text encoder 2": (torch.stack(pipe.text_encoder_2(ids, output_hidden_states=True).hidden_states),
                               torch.stack(ours.text_encoder2(ids, output_hidden_states=True).hidden_states)),
            "projection": (pipe.text_encoder_2(ids).text_embeds, ours.text_encoder2(ids).text_embeds),
            "vae encode": (pipe.vae.encode(image).latent_dist.mean, ours.vae.encode(image).latent_dist.mean),
            "vae decode": (pipe.vae.decode(latents[:1]).sample, ours.vae.decode(latents[:1]).sample),
        }
    for name, (ref, got) in pairs.items():
        assert ref.abs().mean() > 1e-3, f"{name}: degenerate reference output"
        torch.testing.assert_close(got, ref, atol=ATOL, rtol=ATOL, msg=f"{name} differs from diffusers")


def test_our_diffusers_export_is_diffusers_own_conversion(ours, diffusers_pipe):
    from library.models.sdxl.saving import diffusers_unet

    mine = diffusers_unet(ours.unet).state_dict()
    theirs = diffusers_pipe.unet.state_dict()
    assert set(mine) == set(theirs)
    for k in theirs:
        assert torch.equal(mine[k], theirs[k]), k


@pytest.mark.parametrize("prompt", ["a photo of a cat", "", "a very " * 40 + "long prompt"])
def test_encoding_matches_diffusers_encode_prompt(ours, diffusers_pipe, tiny_sdxl, prompt):
    from library.arch.sdxl import SDXLArchitecture

    arch = SDXLArchitecture()
    ids = arch.tokenize(list(tiny_sdxl.tokenizers), [prompt, "second caption"])
    assert ids.shape == (2, 2, 77)
    with torch.no_grad():
        cond = arch.encode_tokens(ours.text_encoders, ids, tiny_sdxl.tokenizers)
        embeds, _, pooled, _ = diffusers_pipe.encode_prompt([prompt, "second caption"], device="cpu", num_images_per_prompt=1,
                                                            do_classifier_free_guidance=False)
    torch.testing.assert_close(cond.context, embeds, atol=ATOL, rtol=ATOL)
    torch.testing.assert_close(cond.pooled, pooled, atol=ATOL, rtol=ATOL)


def test_long_captions_join_windows_and_pool_from_the_first(ours, tiny_sdxl):
    from library.arch.sdxl import SDXLArchitecture

    arch = SDXLArchitecture()
    caps = ["a cat", "dog " * 100]
    with torch.no_grad():
        short = arch.encode_tokens(ours.text_encoders, arch.tokenize(list(tiny_sdxl.tokenizers), caps), tiny_sdxl.tokenizers)
        long_ids = arch.tokenize(list(tiny_sdxl.tokenizers), caps, max_token_length=150)
        long = arch.encode_tokens(ours.text_encoders, long_ids, tiny_sdxl.tokenizers)
    assert long_ids.shape == (2, 2, 152)
    assert long.context.shape == (2, 152, ours.unet.config.context_dim)
    # a caption that fits one window: its first window is the 77-token encoding
    torch.testing.assert_close(long.context[0, :76], short.context[0, :76], atol=ATOL, rtol=ATOL)
    # the pooled vector comes from the first window only
    torch.testing.assert_close(long.pooled, short.pooled, atol=ATOL, rtol=ATOL)
    assert not torch.allclose(long.context[1, 76:151], short.context[1, :1].expand(75, -1))


# ---------------------------------------------------------------------------------- conditioning
def test_size_embedding_vector_follows_the_formula():
    from diffusers.models.embeddings import get_timestep_embedding

    from library.arch.sdxl import conditioning_vector

    pooled = torch.randn(2, 1280)
    orig, crop, target = torch.tensor([[1024, 768], [333, 2000]]), torch.tensor([[0, 16], [5, 0]]), torch.tensor([[1024, 1024], [512, 1536]])
    vec = conditioning_vector(pooled, orig, crop, target)
    assert vec.shape == (2, 2816)
    assert torch.equal(vec[:, :1280], pooled)
    scalars = torch.cat([orig, crop, target], dim=1)
    for b in range(2):
        for i in range(6):
            x = float(scalars[b, i])
            expected = [math.cos(x * math.exp(-math.log(10000) * k / 128)) for k in range(128)] + \
                       [math.sin(x * math.exp(-math.log(10000) * k / 128)) for k in range(128)]
            got = vec[b, 1280 + 256 * i: 1280 + 256 * (i + 1)]
            torch.testing.assert_close(got, torch.tensor(expected), atol=2e-4, rtol=0)
    ref = get_timestep_embedding(scalars.flatten(), 256, flip_sin_to_cos=True, downscale_freq_shift=0).reshape(2, -1)
    torch.testing.assert_close(vec[:, 1280:], ref, atol=1e-6, rtol=0)
    # one size for the whole batch broadcasts
    torch.testing.assert_close(conditioning_vector(pooled, torch.tensor([1024, 768]), torch.tensor([0, 16]), torch.tensor([1024, 1024]))[0], vec[0])


def test_training_hooks(ours, tiny_sdxl):
    from types import SimpleNamespace

    from library.arch.sdxl import SDXLArchitecture, SDXLCondition

    arch = SDXLArchitecture.from_args(SimpleNamespace(v2=False, v_parameterization=False, clip_skip=None))
    assert (arch.name, arch.latent_scale, arch.base_model_version, arch.default_resolution()) == (
        "sdxl", 0.13025, "sdxl_base_v1-0", (1024, 1024))
    assert arch.modelspec_kwargs() == {"sdxl": True}
    with pytest.raises(UserInputError, match="--v2"):
        SDXLArchitecture.from_args(SimpleNamespace(v2=True))
    with torch.no_grad():
        cond = arch.encode_tokens(ours.text_encoders, arch.tokenize(list(tiny_sdxl.tokenizers), ["x", "y"]), tiny_sdxl.tokenizers)
    cond16 = cond.to(torch.float16)
    assert isinstance(cond16, SDXLCondition) and cond16.pooled.dtype == torch.float16
    h1, h2, pool = cond.split(ours.text_encoder1.config.hidden_size)
    assert torch.equal(SDXLCondition.from_parts(h1, h2, pool).context, cond.context)
    batch = {"original_sizes_hw": torch.tensor([[64, 64], [80, 48]]), "crop_top_lefts": torch.tensor([[0, 0], [8, 0]]),
             "target_sizes_hw": torch.tensor([[64, 64], [64, 64]])}
    noisy = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        pred = arch.call_denoiser(ours.unet, noisy, torch.tensor([5, 500]), cond, batch)
        direct = ours.unet(noisy, torch.tensor([5, 500]), cond.context, arch.vector_from_batch(cond.pooled, batch))
    assert torch.equal(pred, direct)


def test_gradient_checkpointing_gives_the_same_gradients(ours):
    unet = ours.unet
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 77, unet.config.context_dim, generator=g)
    y = torch.randn(1, unet.config.adm_in_channels, generator=g)
    grads = []
    unet.train()
    try:
        for ckpt in (False, True):
            unet.gradient_checkpointing = ckpt
            unet.zero_grad(set_to_none=True)
            unet(x, torch.tensor([300]), ctx, y).square().mean().backward()
            grads.append(unet.input_blocks[4][1].transformer_blocks[0].attn1.to_q.weight.grad.clone())
    finally:
        unet.disable_gradient_checkpointing()
        unet.zero_grad(set_to_none=True)
        unet.eval()
        for p in unet.parameters():
            p.requires_grad_(False)
    torch.testing.assert_close(grads[1], grads[0], atol=1e-6, rtol=1e-5)


def test_attention_processors_can_be_switched(ours):
    from diffusers.models.attention_processor import AttnProcessor, AttnProcessor2_0

    unet = ours.unet
    unet.set_attn_processor(AttnProcessor())
    assert all(isinstance(p, AttnProcessor) for p in unet.attn_processors.values())
    unet.set_attention_slice("auto")
    unet.set_attn_processor(AttnProcessor2_0())
    assert len(unet.attn_processors) == 2 * (2 * 2 + 3 * 2 + 3 + 2 * 3 + 3 * 3)


# ---------------------------------------------------------------------------------- bad input
def test_truncated_file_names_it(tiny_sdxl, tmp_path):
    data = open(tiny_sdxl.path, "rb").read()
    cut = tmp_path / "cut.safetensors"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(UserInputError, match=r"cut\.safetensors: truncated"):
        load_sdxl_models(str(cut))


def test_sd1_file_given_to_sdxl_loader_and_back(tiny_sd, tiny_sdxl, tmp_path):
    with pytest.raises(UserInputError, match=r"SD1\.x/2\.x checkpoint, not SDXL"):
        load_sdxl_models(tiny_sd("sd1").path)
    from library.models.sd.loading import load_sd_models

    with pytest.raises(UserInputError, match="SDXL checkpoint; use the sdxl_"):
        load_sd_models(tiny_sdxl.path)
    with pytest.raises(UserInputError, match="not found"):
        load_sdxl_models(str(tmp_path / "missing.safetensors"))


def test_sd_diffusers_folder_given_to_sdxl_loader(tiny_sd, tmp_path):
    with pytest.raises(UserInputError, match="one text encoder"):
        load_sdxl_models(tiny_sd("sd1").reference_folder)


def test_incomplete_sdxl_file_is_named(tiny_sdxl, tmp_path):
    full = _tensors(tiny_sdxl.path)
    no_bigg = {k: v for k, v in full.items() if not k.startswith("conditioner.embedders.1.")}
    path = tmp_path / "nobigg.safetensors"
    safetensors_io.save_state_dict(no_bigg, str(path))
    with pytest.raises(UserInputError, match=r"nobigg\.safetensors: .*second text encoder"):
        load_sdxl_models(str(path))
    missing_layer = {k: v for k, v in full.items() if ".input_blocks.4.1.transformer_blocks.1.attn2.to_k." not in k}
    path = tmp_path / "hole.safetensors"
    safetensors_io.save_state_dict(missing_layer, str(path))
    with pytest.raises(UserInputError, match=r"hole\.safetensors: .*U-Net"):
        load_sdxl_models(str(path))


def test_make_tiny_model_tool_sdxl(tmp_path, tokenizer_cache):
    import importlib.util

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    spec = importlib.util.spec_from_file_location("make_tiny_model", os.path.join(root, "tools", "make_tiny_model.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    out, ref = str(tmp_path / "xl.safetensors"), str(tmp_path / "xl_ref")
    tool.main(["--arch", "sdxl", "--out", out, "--diffusers_config", ref, "--tokenizer_cache_dir", tokenizer_cache,
               "--save_precision", "bf16"])
    models = load_sdxl_models(out)
    assert models.unet.dtype == torch.bfloat16
    for sub in ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler"):
        assert os.path.isdir(os.path.join(ref, sub)), sub
