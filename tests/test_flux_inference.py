"""flux_minimal_inference.py: the whole generation against diffusers' FluxPipeline, the command
line in a subprocess (deterministic per seed), LoRA/OFT files, bad input."""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from flux_helpers import diffusers_flux_from_bfl, random_inputs, tiny_flux_files, tokenizer_dir
from library.errors import UserInputError

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "flux_minimal_inference.py")
# float32 on CPU; measured max abs difference of images in [0, 1] about 5e-6
PIPELINE_ATOL = 1e-4


def _argv(paths, out_dir, *extra):
    return ["--ckpt_path", paths["flux"], "--clip_l", paths["clip_l"], "--t5xxl", paths["t5xxl"], "--ae", paths["ae"],
            "--tokenizer_cache_dir", tokenizer_dir(), "--output_dir", str(out_dir), *extra]


def _context(paths, tmp_path, *extra):
    import flux_minimal_inference as script
    from library.inference import flux_minimal

    args = script.setup_parser().parse_args(_argv(paths, tmp_path, "--dtype", "float32", *extra))
    dtypes = flux_minimal.check_args(args)
    return flux_minimal.load(args, dtypes, torch.device("cpu"))


@pytest.mark.parametrize("variant", ["flux-dev", "flux-schnell"])
def test_generation_matches_diffusers_flux_pipeline(tmp_path, variant):
    """Prompt encoding, schedule (shifted for dev only), Euler steps, true CFG and decoding
    together equal diffusers' FluxPipeline on the same tiny models and initial noise."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

    from library.inference import flux_minimal
    from library.tokenizers import load_flux_tokenizers

    paths = tiny_flux_files(variant)
    ctx = _context(paths, tmp_path)
    tok_l, tok_t5 = load_flux_tokenizers(tokenizer_dir())
    scheduler = FlowMatchEulerDiscreteScheduler(
        num_train_timesteps=1000, shift=1.0, use_dynamic_shifting=variant == "flux-dev", base_shift=0.5,
        max_shift=1.15, base_image_seq_len=256, max_image_seq_len=4096)
    pipe = FluxPipeline(scheduler=scheduler, vae=ctx.ae, text_encoder=ctx.clip_l, tokenizer=tok_l,
                        text_encoder_2=ctx.t5, tokenizer_2=tok_t5,
                        transformer=diffusers_flux_from_bfl(paths["flux"], ctx.flux.config))
    pipe.set_progress_bar_config(disable=True)
    for cfg_scale, negative in ((1.0, None), (2.5, "blurry")):
        _, ours, _ = flux_minimal.generate_image(ctx, "a red cat", 5, 64, 48, 3, 3.5, negative, cfg_scale, save=False)
        noise = torch.randn(1, 3 * 4, 64, generator=torch.Generator("cpu").manual_seed(5))  # our seed-5 noise
        ref = pipe(prompt="a red cat", negative_prompt=negative, true_cfg_scale=cfg_scale, height=48, width=64,
                   num_inference_steps=3, guidance_scale=3.5, latents=noise, max_sequence_length=ctx.t5_max_length,
                   output_type="pt").images
        diff = ((ours + 1) / 2 - ref).abs().max().item()
        print(f"{variant} cfg {cfg_scale}: max |ours - FluxPipeline| = {diff:.2e}")
        assert ours.shape == ref.shape == (1, 3, 48, 64)
        assert diff < PIPELINE_ATOL


def test_schedule_shift_rule():
    from library.inference.flux_sampling import flux_schedule

    plain = flux_schedule(4, 1024, shift=False)
    assert plain == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    shifted = flux_schedule(4, 1024, shift=True)
    mu = 0.65 / 3840 * 1024 + (0.5 - 256 * 0.65 / 3840)
    expected = [np.exp(mu) / (np.exp(mu) + (1 / t - 1)) for t in (1.0, 0.75, 0.5, 0.25)] + [0.0]
    assert shifted == pytest.approx(expected)


def test_cli_subprocess_is_deterministic_per_seed(tmp_path):
    paths = tiny_flux_files("flux-schnell")
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    images = []
    for run in ("a", "b"):
        out = tmp_path / run
        cmd = [sys.executable, SCRIPT, *_argv(paths, out, "--width", "64", "--height", "48", "--seed", "42",
                                              "--dtype", "float32", "--prompt", "a photo of a dog")]
        result = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=300)
        assert result.returncode == 0, result.stderr[-2000:]
        assert "1 image(s)" in result.stdout
        files = os.listdir(out)
        assert len(files) == 1 and files[0].endswith(".png")
        with Image.open(out / files[0]) as im:
            assert im.size == (64, 48)
            assert im.text["seed"] == "42" and im.text["steps"] == "4" and im.text["prompt"] == "a photo of a dog"
            images.append(np.asarray(im.convert("RGB")).copy())
    assert np.array_equal(images[0], images[1])
    assert images[0].std() > 1  # not a blank image


def test_seed_changes_the_image_and_png_names_do_not_collide(tmp_path):
    from library.inference import flux_minimal

    ctx = _context(tiny_flux_files("flux-schnell"), tmp_path)
    p1, a, _ = flux_minimal.generate_image(ctx, "a dog", 1, 32, 32, 2, 3.5, None, 1.0)
    p2, b, _ = flux_minimal.generate_image(ctx, "a dog", 1, 32, 32, 2, 3.5, None, 1.0)
    _, c, _ = flux_minimal.generate_image(ctx, "a dog", 2, 32, 32, 2, 3.5, None, 1.0, save=False)
    assert torch.equal(a, b) and not torch.allclose(a, c, atol=1e-3)
    assert p1 != p2 and os.path.exists(p1) and os.path.exists(p2)


# --------------------------------------------------------------------------------------
# LoRA / OFT files


def _lora_file(path, flux, names, rank=4, seed=0, alpha=2.0, prefix="lora_unet"):
    g = torch.Generator().manual_seed(seed)
    sd = {}
    modules = dict(flux.named_modules())
    for name in names:
        layer = modules[name]
        key = f"{prefix}_{name.replace('.', '_')}"
        sd[f"{key}.lora_down.weight"] = torch.randn(rank, layer.in_features, generator=g) * 0.1
        sd[f"{key}.lora_up.weight"] = torch.randn(layer.out_features, rank, generator=g) * 0.1
        sd[f"{key}.alpha"] = torch.tensor(alpha)
    save_file(sd, path)
    return sd


def test_lora_live_equals_merged_equals_manual_delta(tmp_path):
    from library.inference.flux_adapters import load_adapters
    from library.models.flux.loading import load_flux_transformer

    paths = tiny_flux_files("flux-dev")
    names = ["double_blocks.0.img_attn.qkv", "double_blocks.1.txt_mlp.2", "single_blocks.3.linear1", "guidance_in.in_layer"]
    base = load_flux_transformer(paths["flux"])
    lora = str(tmp_path / "lora.safetensors")
    sd = _lora_file(lora, base, names)
    inp = random_inputs(base.config, batch=1)

    manual = load_flux_transformer(paths["flux"])
    modules = dict(manual.named_modules())
    with torch.no_grad():
        for n in names:
            k = "lora_unet_" + n.replace(".", "_")
            modules[n].weight += 0.7 * (2.0 / 4) * sd[k + ".lora_up.weight"] @ sd[k + ".lora_down.weight"]
        want = manual(**inp)
        live_model = load_flux_transformer(paths["flux"])
        adapters = load_adapters([(lora, 0.7)], live_model)
        live = live_model(**inp)
        merged_model = load_flux_transformer(paths["flux"])
        load_adapters([(lora, 0.7)], merged_model, merge=True)
        merged = merged_model(**inp)
        adapters.set_multipliers([0.0])
        off = live_model(**inp)
        plain = base(**inp)
    assert torch.allclose(live, want, atol=1e-5) and torch.allclose(merged, want, atol=1e-5)
    assert not torch.allclose(want, plain, atol=1e-3)
    assert torch.allclose(off, plain, atol=1e-6)


def test_oft_live_equals_merged(tmp_path):
    from library.inference.flux_adapters import load_adapters
    from library.models.flux.loading import load_flux_transformer

    paths = tiny_flux_files("flux-dev")
    g = torch.Generator().manual_seed(3)
    k = 4
    sd = {
        # fused qkv: three parts of 256 rows each
        **{f"oft_unet_double_blocks_0_img_attn_qkv.oft_blocks.{p}": torch.randn(k, 64, 64, generator=g) * 0.01
           for p in range(3)},
        "oft_unet_double_blocks_0_img_attn_qkv.alpha": torch.tensor(1.0),
        "oft_unet_double_blocks_1_txt_attn_proj.oft_blocks.0": torch.randn(k, 64, 64, generator=g) * 0.01,
        "oft_unet_double_blocks_1_txt_attn_proj.alpha": torch.tensor(1.0),
    }
    path = str(tmp_path / "oft.safetensors")
    save_file(sd, path)
    base = load_flux_transformer(paths["flux"])
    inp = random_inputs(base.config, batch=1)
    live_model, merged_model = load_flux_transformer(paths["flux"]), load_flux_transformer(paths["flux"])
    load_adapters([(path, 1.0)], live_model)
    load_adapters([(path, 1.0)], merged_model, merge=True)
    with torch.no_grad():
        plain, live, merged = base(**inp), live_model(**inp), merged_model(**inp)
    assert torch.allclose(live, merged, atol=1e-5)
    assert not torch.allclose(live, plain, atol=1e-4)
    # each block of 64 output rows is rotated: column norms within a block are unchanged
    w0 = base.double_blocks[1].txt_attn.proj.weight
    w1 = merged_model.double_blocks[1].txt_attn.proj.weight
    assert not torch.allclose(w0, w1, atol=1e-4)
    assert torch.allclose(w0.reshape(k, 64, -1).norm(dim=1), w1.reshape(k, 64, -1).norm(dim=1), atol=1e-4)


def test_lora_for_another_model_is_refused(tmp_path):
    from library.inference.flux_adapters import load_adapters
    from library.models.flux.loading import load_flux_transformer

    dev = load_flux_transformer(tiny_flux_files("flux-dev")["flux"])
    schnell = load_flux_transformer(tiny_flux_files("flux-schnell")["flux"])
    lora = str(tmp_path / "dev_lora.safetensors")
    _lora_file(lora, dev, ["guidance_in.in_layer", "double_blocks.0.img_attn.proj"])
    with pytest.raises(UserInputError, match="lora_unet_guidance_in_in_layer.*schnell"):
        load_adapters([(lora, 1.0)], schnell)
    deep = str(tmp_path / "deep.safetensors")
    save_file({"lora_unet_double_blocks_18_img_attn_proj.lora_down.weight": torch.zeros(4, 256),
               "lora_unet_double_blocks_18_img_attn_proj.lora_up.weight": torch.zeros(256, 4)}, deep)
    with pytest.raises(UserInputError, match="double_blocks_18.*different FLUX variant"):
        load_adapters([(deep, 1.0)], dev)
    wide = str(tmp_path / "wide.safetensors")
    save_file({"lora_unet_double_blocks_0_img_attn_proj.lora_down.weight": torch.zeros(4, 3072),
               "lora_unet_double_blocks_0_img_attn_proj.lora_up.weight": torch.zeros(3072, 4)}, wide)
    with pytest.raises(UserInputError, match="different model"):
        load_adapters([(wide, 1.0)], dev)
    sdxl = str(tmp_path / "sdxl.safetensors")
    save_file({"lora_unet_input_blocks_4_1_proj_in.lora_down.weight": torch.zeros(4, 64),
               "lora_unet_input_blocks_4_1_proj_in.lora_up.weight": torch.zeros(64, 4)}, sdxl)
    with pytest.raises(UserInputError, match="input_blocks"):
        load_adapters([(sdxl, 1.0)], dev)


def test_cli_with_lora_and_t5_lora(tmp_path):
    import flux_minimal_inference as script
    from library.models.flux.loading import load_flux_transformer
    from library.models.flux.text_encoders import load_t5xxl

    paths = tiny_flux_files("flux-schnell")
    flux = load_flux_transformer(paths["flux"])
    lora = str(tmp_path / "l.safetensors")
    sd = _lora_file(lora, flux, ["single_blocks.0.linear2"])
    t5 = load_t5xxl(paths["t5xxl"])
    g = torch.Generator().manual_seed(1)
    q = t5.encoder.block[0].layer[0].SelfAttention.q
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_down.weight"] = torch.randn(2, q.in_features, generator=g)
    sd["lora_te3_encoder_block_0_layer_0_SelfAttention_q.lora_up.weight"] = torch.randn(q.out_features, 2, generator=g)
    save_file(sd, lora)
    written = script.main(_argv(paths, tmp_path / "out", "--dtype", "float32", "--width", "32", "--height", "32",
                                "--seed", "3", "--lora_weights", f"{lora};0.5", "--merge_lora_weights",
                                "--apply_t5_attn_mask", "--cfg_scale", "2", "--negative_prompt", "bad"))
    assert len(written) == 1 and os.path.exists(written[0])


# --------------------------------------------------------------------------------------
# command line


def test_bad_input_is_reported_before_loading(tmp_path):
    import flux_minimal_inference as script

    paths = tiny_flux_files("flux-schnell")
    cases = [
        (["--model_type", "chroma"], "chroma is not implemented"),
        (["--t5xxl_dtype", "int8"], "--t5xxl_dtype int8: unknown dtype"),
        (["--lora_weights", str(tmp_path / "nope.safetensors")], "--lora_weights .*nope.safetensors: file not found"),
        (["--lora_weights", "x.safetensors;abc"], "multiplier 'abc' is not a number"),
        (["--width", "0"], "--width 0"),
        (["--steps", "0"], "--steps 0"),
    ]
    for extra, message in cases:
        with pytest.raises(UserInputError, match=message):
            script.main(_argv(paths, tmp_path, *extra))
    argv = _argv(paths, tmp_path)
    i = argv.index("--clip_l")
    with pytest.raises(UserInputError, match="--clip_l is required"):
        script.main(argv[:i] + argv[i + 2:])


def test_help_imports_no_torch():
    code = ("import sys; sys.argv = ['x', '--help']\nimport flux_minimal_inference as s\n"
            "assert 'torch' not in sys.modules\ntry:\n    s.main()\nexcept SystemExit:\n    pass\n"
            "assert 'torch' not in sys.modules")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert result.returncode == 0, result.stderr
    for opt in ("--ckpt_path", "--model_type", "--clip_l", "--t5xxl", "--ae", "--apply_t5_attn_mask", "--prompt",
                "--output_dir", "--dtype", "--clip_l_dtype", "--ae_dtype", "--t5xxl_dtype", "--flux_dtype", "--seed",
                "--steps", "--guidance", "--negative_prompt", "--cfg_scale", "--offload", "--lora_weights",
                "--merge_lora_weights", "--width", "--height", "--interactive"):
        assert opt in result.stdout, opt


def test_interactive_line_parsing():
    from library.inference.flux_minimal import parse_interactive

    state = dict(width=1360, height=768, steps=None, guidance=3.5, cfg_scale=1.0)
    prompt, per = parse_interactive("a cat in a hat --w 512 --h 256 --s 8 --d 7 --g 2.5 --n - --c 3", state, None)
    assert prompt == "a cat in a hat"
    assert state == dict(width=512, height=256, steps=8, guidance=2.5, cfg_scale=3.0)
    assert per == {"seed": 7, "negative_prompt": ""}
