"""FLUX.1 model stack: our transformer against diffusers, file layouts, dtypes, bad input."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file, save_file

from flux_helpers import diffusers_flux_from_bfl, random_inputs, tiny_flux_files
from library.errors import UserInputError
from library.models.flux import config as cfgmod
from library.models.flux.loading import (
    FluxSource,
    analyze_checkpoint,
    load_ae,
    load_flux_transformer,
    save_flux_transformer,
)
from library.models.flux.model import Flux
from library.models.flux.packing import pack_latents, prepare_img_ids, unpack_latents
from library.models.flux.text_encoders import load_clip_l, load_t5xxl, save_t5xxl

# float32 on CPU; measured max abs difference about 1e-6 on outputs of magnitude ~3
FORWARD_ATOL = 1e-4


def _random_flux(tmp_path, name="m.safetensors", seed=0, dtype=None, **cfg) -> tuple[str, Flux]:
    base = dict(vec_in_dim=32, context_in_dim=64, hidden_size=256, num_heads=2, depth=2, depth_single_blocks=2)
    base.update(cfg)
    config = cfgmod.FluxConfig(**base)
    torch.manual_seed(seed)
    model = Flux(config).eval()
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * 0.05)
    path = str(tmp_path / name)
    save_flux_transformer(model, path, dtype=dtype)
    return path, model


def _same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(
        a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))


# --------------------------------------------------------------------------------------
# forward against diffusers


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_forward_matches_diffusers(variant):
    paths = tiny_flux_files(variant)
    ours = load_flux_transformer(paths["flux"])
    assert ours.config.guidance_embed == (variant == "flux-dev")
    ref = diffusers_flux_from_bfl(paths["flux"], ours.config)
    inp = random_inputs(ours.config)
    with torch.no_grad():
        a = ours(**inp)
        b = ref(hidden_states=inp["img"], encoder_hidden_states=inp["txt"], pooled_projections=inp["y"],
                timestep=inp["timesteps"], img_ids=inp["img_ids"][0], txt_ids=inp["txt_ids"][0],
                guidance=inp["guidance"], return_dict=False)[0]
    diff = (a - b).abs().max().item()
    print(f"{variant}: max |ours - diffusers| = {diff:.2e} (outputs up to {a.abs().max().item():.2f})")
    assert a.shape == (2, 24, 64)
    assert diff < FORWARD_ATOL


def test_attention_mask_hides_padding():
    paths = tiny_flux_files("flux-dev")
    model = load_flux_transformer(paths["flux"])
    inp = random_inputs(model.config, batch=1, txt_len=8)
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0, 0]])
    changed = dict(inp, txt=inp["txt"].clone())
    changed["txt"][:, 5:] += 3.0
    with torch.no_grad():
        a = model(**inp, txt_attention_mask=mask)
        b = model(**changed, txt_attention_mask=mask)
        c = model(**changed)
    assert torch.allclose(a, b, atol=1e-5)  # padded tokens are invisible as keys
    assert not torch.allclose(a, c, atol=1e-3)  # without the mask they matter


def test_gradient_checkpointing_and_block_hooks():
    paths = tiny_flux_files("flux-dev")
    model = load_flux_transformer(paths["flux"]).train()
    inp = random_inputs(model.config, batch=1)

    def grads():
        model.zero_grad()
        model(**inp).square().mean().backward()
        return [p.grad.clone() for p in model.parameters()]

    plain = grads()
    model.enable_gradient_checkpointing()
    ckpt = grads()
    model.enable_gradient_checkpointing(cpu_offload=True)
    offload = grads()
    model.disable_gradient_checkpointing()
    for a, b, c in zip(plain, ckpt, offload):
        assert torch.allclose(a, b, atol=1e-6) and torch.allclose(a, c, atol=1e-6)

    calls = []

    class Recorder:
        def before_block(self, kind, i):
            calls.append(("before", kind, i))

        def after_block(self, kind, i):
            calls.append(("after", kind, i))

    model.block_swap = Recorder()
    with torch.no_grad():
        model.eval()(**inp)
    cfg = model.config
    expected = [(w, "double", i) for i in range(cfg.depth) for w in ("before", "after")]
    expected += [(w, "single", i) for i in range(cfg.depth_single_blocks) for w in ("before", "after")]
    assert calls == expected


def test_packing_layout_and_ids():
    x = torch.randn(2, 16, 6, 4)
    p = pack_latents(x)
    assert p.shape == (2, 6, 64)
    # token (i, j) channel c*4 + di*2 + dj holds pixel (2i+di, 2j+dj) of channel c
    i, j, c, di, dj = 2, 1, 5, 1, 0
    assert p[1, i * 2 + j, c * 4 + di * 2 + dj] == x[1, c, 2 * i + di, 2 * j + dj]
    assert torch.equal(unpack_latents(p, 6, 4), x)
    ids = prepare_img_ids(1, 3, 2)
    assert ids[0].tolist() == [[0, 0, 0], [0, 0, 1], [0, 1, 0], [0, 1, 1], [0, 2, 0], [0, 2, 1]]


# --------------------------------------------------------------------------------------
# files


@pytest.mark.parametrize("dtype", ["bf16", "fp16", "fp8"])
def test_bfl_single_file_round_trip_is_bit_exact(tmp_path, dtype):
    from library.models.flux.loading import parse_dtype

    src, _ = _random_flux(tmp_path, "src.safetensors", dtype=parse_dtype(dtype, "test"))
    model = load_flux_transformer(src, fp8_base=dtype == "fp8")
    if dtype == "fp8":
        assert model.double_blocks[0].img_attn.qkv.weight.dtype == torch.float8_e4m3fn
        assert model.dtype == torch.bfloat16
    out = str(tmp_path / "out.safetensors")
    save_flux_transformer(model, out)
    a, b = load_file(src), load_file(out)
    assert list(a) == list(b)
    assert all(_same_bits(a[k], b[k]) for k in a)


def test_prefixed_and_fp8_stored_files_load(tmp_path):
    src, model = _random_flux(tmp_path, "f32.safetensors")
    sd = {"model.diffusion_model." + k: v for k, v in load_file(src).items()}
    prefixed = str(tmp_path / "prefixed.safetensors")
    save_file(sd, prefixed)
    loaded = load_flux_transformer(prefixed)
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    sft = str(tmp_path / "flux1-dev.sft")  # the first BFL releases used this extension
    os.link(src, sft)
    assert load_flux_transformer(sft).config == model.config

    fp8 = str(tmp_path / "fp8.safetensors")
    save_flux_transformer(model, fp8, dtype=torch.float8_e4m3fn)
    up = load_flux_transformer(fp8, dtype="bf16")  # fp8 storage upcast at load
    w = up.double_blocks[1].txt_mlp[0].weight
    assert w.dtype == torch.bfloat16
    stored = load_file(fp8)["double_blocks.1.txt_mlp.0.weight"]
    assert torch.equal(w, stored.to(torch.bfloat16))
    # --fp8_base from a float32 file: weights converted while loading, output close to float
    f8 = load_flux_transformer(src, dtype="float32", fp8_base=True)
    inp = random_inputs(model.config, batch=1)
    with torch.no_grad():
        ref, got = model(**inp), f8(**inp)
    rel = ((got - ref).norm() / ref.norm()).item()
    print(f"fp8_base relative error {rel:.3f}")
    assert rel < 0.15


def test_diffusers_folder_and_shards_equal_single_file(tmp_path):
    paths = tiny_flux_files("flux-dev")
    single = load_flux_transformer(paths["flux"])
    ref = diffusers_flux_from_bfl(paths["flux"], single.config)
    pipeline = tmp_path / "pipeline"
    ref.save_pretrained(str(pipeline / "transformer"), max_shard_size="12MB")
    shards = sorted(f for f in os.listdir(pipeline / "transformer") if f.startswith("diffusion_pytorch_model-"))
    assert len(shards) >= 2 and (pipeline / "transformer" / "diffusion_pytorch_model.safetensors.index.json").exists()
    want = single.state_dict()
    for path in (str(pipeline), str(pipeline / "transformer"), str(pipeline / "transformer" / shards[0])):
        with FluxSource(path) as src:
            assert src.format == "diffusers"
        model = load_flux_transformer(path)
        assert model.config == single.config
        got = model.state_dict()
        assert list(got) == list(want) and all(torch.equal(got[k], want[k]) for k in want), path

    # a diffusers-named single file, and the conversion tool (bit-exact back to BFL)
    one = str(tmp_path / "diffusers_named.safetensors")
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()}, one)
    assert analyze_checkpoint(one) == single.config
    from tools.convert_diffusers_to_flux import main as convert

    out = str(tmp_path / "converted.safetensors")
    convert(["--diffusers_path", str(pipeline), "--save_to", out])
    a, b = load_file(paths["flux"]), load_file(out)
    assert list(a) == list(b) and all(_same_bits(a[k], b[k]) for k in a)
    out16 = str(tmp_path / "converted_bf16.safetensors")
    convert(["--diffusers_path", str(pipeline / "transformer" / shards[-1]), "--save_to", out16,
             "--save_precision", "bf16", "--mem_eff_load_save"])
    assert all(v.dtype == torch.bfloat16 for v in load_file(out16).values())


def test_compact_model_and_block_index_gap(tmp_path):
    path, model = _random_flux(tmp_path, "compact.safetensors", depth=3, depth_single_blocks=1)
    cfg = analyze_checkpoint(path)
    assert (cfg.depth, cfg.depth_single_blocks, cfg.is_compact) == (3, 1, True)
    loaded = load_flux_transformer(path)
    with torch.no_grad():
        inp = random_inputs(cfg, batch=1)
        assert torch.equal(loaded(**inp), model(**inp))

    sd = load_file(path)
    gap = str(tmp_path / "gap.safetensors")
    save_file({k: v for k, v in sd.items() if not k.startswith("double_blocks.1.")}, gap)
    with pytest.raises(UserInputError, match=r"double_blocks\.1 missing while double_blocks\.2 exists"):
        load_flux_transformer(gap)
    with pytest.raises(UserInputError, match=r"double_blocks\.1"):
        analyze_checkpoint(gap)
    partial = str(tmp_path / "partial.safetensors")
    save_file({k: v for k, v in sd.items() if k != "single_blocks.0.linear2.weight"}, partial)
    with pytest.raises(UserInputError, match=r"single_blocks\.0\.linear2\.weight"):
        load_flux_transformer(partial)


def test_wrong_files_are_named(tmp_path):
    paths = tiny_flux_files("flux-schnell")
    with pytest.raises(UserInputError, match="--ae"):
        load_flux_transformer(paths["ae"])
    with pytest.raises(UserInputError, match="not found"):
        load_flux_transformer(str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserInputError, match="latent channels|not a FLUX autoencoder"):
        load_ae(paths["clip_l"])


# --------------------------------------------------------------------------------------
# AE and text encoders


def test_ae_matches_diffusers_single_file(tmp_path):
    import json

    from diffusers import AutoencoderKL

    paths = tiny_flux_files("flux-dev")
    ours = load_ae(paths["ae"])
    assert (ours.config.latent_channels, ours.config.scaling_factor, ours.config.shift_factor) == (16, 0.3611, 0.1159)
    assert not ours.config.use_quant_conv and not ours.config.use_post_quant_conv
    cfg_dir = tmp_path / "cfg" / "vae"
    cfg_dir.mkdir(parents=True)
    (cfg_dir / "config.json").write_text(json.dumps(dict(_class_name="AutoencoderKL", **dict(ours.config))))
    ref = AutoencoderKL.from_single_file(paths["ae"], config=str(tmp_path / "cfg"), subfolder="vae").eval()
    g = torch.Generator().manual_seed(0)
    images = torch.rand(1, 3, 32, 48, generator=g) * 2 - 1
    with torch.no_grad():
        za, zb = ours.encode(images).latent_dist.mean, ref.encode(images).latent_dist.mean
        da, db = ours.decode(za).sample, ref.decode(za).sample
    assert za.shape == (1, 16, 4, 6)
    assert torch.allclose(za, zb, atol=1e-5) and torch.allclose(da, db, atol=1e-5)
    # the tiny AE is calibrated: scaled latents have roughly unit spread
    scaled = (za - 0.1159) * 0.3611
    assert 0.3 < scaled.std().item() < 3.0


def test_text_encoders_load_with_extras_and_dtypes(tmp_path):
    paths = tiny_flux_files("flux-dev")
    clip = load_clip_l(paths["clip_l"])
    sd = load_file(paths["clip_l"])
    sd["text_projection.weight"] = torch.eye(32)
    sd["logit_scale"] = torch.tensor(4.6)
    extra = str(tmp_path / "clip_extra.safetensors")
    save_file(sd, extra)
    clip2 = load_clip_l(extra)
    ids = torch.randint(0, 49407, (1, 77))
    with torch.no_grad():
        assert torch.equal(clip(ids).pooler_output, clip2(ids).pooler_output)

    t5 = load_t5xxl(paths["t5xxl"])
    ids = torch.randint(0, 1000, (2, 16))
    with torch.no_grad():
        ref = t5(ids).last_hidden_state
        for name, tol in (("fp16", 0.02), ("bf16", 0.1), ("fp8", 0.5)):
            out = load_t5xxl(paths["t5xxl"], name)(ids).last_hidden_state.float()
            rel = ((out - ref).norm() / ref.norm()).item()
            print(f"T5 {name}: relative error {rel:.4f}")
            assert rel < tol, name
        fp16 = load_t5xxl(paths["t5xxl"], "fp16")
        assert fp16.encoder.block[0].layer[1].DenseReluDense.wo.weight.dtype == torch.float32
        # an fp8-stored file (e4m3fn) loads and computes in bf16
        f8_file = str(tmp_path / "t5_fp8.safetensors")
        save_t5xxl(t5, f8_file, dtype=torch.float8_e4m3fn)
        f8 = load_t5xxl(f8_file)
        assert f8(ids).last_hidden_state.dtype == torch.bfloat16


def test_t5_unsupported_dtypes_are_clear_errors(tmp_path):
    paths = tiny_flux_files("flux-dev")
    sd = load_file(paths["t5xxl"])
    key = "encoder.block.1.layer.0.SelfAttention.k.weight"
    for bad in (torch.float8_e5m2, torch.float64):
        s = dict(sd)
        s[key] = s[key].to(bad)
        path = str(tmp_path / f"t5_{str(bad)[6:]}.safetensors")
        save_file(s, path)
        with pytest.raises(UserInputError, match=rf"--t5xxl .*'{key}' is stored as {str(bad)[6:]}"):
            load_t5xxl(path)
    s = dict(sd)
    s[key] = (s[key] * 100).to(torch.int8)
    path = str(tmp_path / "t5_int8.safetensors")
    save_file(s, path)
    with pytest.raises(UserInputError, match="int8"):
        load_t5xxl(path)
    with pytest.raises(UserInputError, match="--t5xxl_dtype int8: unknown dtype"):
        load_t5xxl(paths["t5xxl"], "int8", what="--t5xxl_dtype")
    with pytest.raises(UserInputError, match="only fp8 e4m3fn"):
        load_t5xxl(paths["t5xxl"], "fp8_e5m2")


def test_make_tiny_model_cli(tmp_path):
    from tools.make_tiny_model import main

    out = tmp_path / "schnell"
    main(["--arch", "flux-schnell", "--out", str(out), "--save_precision", "bf16", "--depth", "1", "--depth_single", "2"])
    names = sorted(os.listdir(out))
    assert names == ["ae.safetensors", "clip_l.safetensors", "flux1-schnell.safetensors", "t5xxl.safetensors"]
    cfg = analyze_checkpoint(str(out / "flux1-schnell.safetensors"))
    assert (cfg.variant, cfg.depth, cfg.depth_single_blocks, cfg.hidden_size, cfg.num_heads) == ("schnell", 1, 2, 256, 2)
    assert all(v.dtype == torch.bfloat16 for v in load_file(str(out / "flux1-schnell.safetensors")).values())
    with pytest.raises(UserInputError, match="already exists"):
        main(["--arch", "flux-schnell", "--out", str(out)])
