"""gen_img.py end to end on a tiny SD1 model (64x64 images, 2-3 steps).

Tolerance against diffusers' StableDiffusionPipeline (same weights, scheduler and initial
latents, float32, CPU): saved 8-bit pixels within 1 level. Measured: max 1 level for DDIM
and Euler without and with a LoRA (final latents differ by at most 2e-5 for DDIM and 9e-5
for Euler, whose latents reach about 50 in magnitude). A diffusers-layout copy of the LoRA,
--network_merge and --network_pre_calc give the kohya-file result within 1 level
(measured: 0 to 1).
"""

from __future__ import annotations

import io
import logging
import os
import re
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
from PIL import Image

from library.args.gen_img_args import gen_img_parser
from library.errors import UserInputError
from library.inference import gen_img_runner as runner
from library.inference.samplers import SAMPLER_NAMES, get_scheduler

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a cat"
NEGATIVE = "blurry"

# cli-options.md §6: G-LOG (3) + 91 own options
SPEC_OPTIONS = """
console_log_level console_log_file console_log_simple sdxl v1 v2 v_parameterization zero_terminal_snr
pyramid_noise_prob pyramid_noise_discount_range noise_offset_prob noise_offset_range prompt from_file from_module
prompter_module_args interactive no_preview image_path mask_path strength images_per_prompt outdir
sequential_file_name use_original_file_name n_iter H W original_height original_width original_height_negative
original_width_negative crop_top crop_left batch_size vae_batch_size vae_slices no_half_vae steps sampler scale ckpt
vae tokenizer_cache_dir seed iter_same_seed shuffle_prompts fp16 bf16 xformers sdpa diffusers_xformers
opt_channels_last network_module network_weights network_mul network_args network_show_meta network_merge_n_models
network_merge network_pre_calc network_regional_mask_max_color_codes textual_inversion_embeddings clip_skip
max_embeddings_multiples emb_normalize_mode force_scheduler_zero_steps_offset guide_image_path highres_fix_scale
highres_fix_steps highres_fix_strength highres_fix_save_1st highres_fix_latents_upscaling highres_fix_upscaler
highres_fix_upscaler_args highres_fix_disable_control_net negative_scale control_net_lllite_models control_net_models
control_net_preps control_net_multipliers control_net_ratios clip_vision_strength ds_depth_1 ds_timesteps_1 ds_depth_2
ds_timesteps_2 ds_ratio gradual_latent_timesteps gradual_latent_ratio gradual_latent_ratio_step
gradual_latent_every_n_steps gradual_latent_s_noise gradual_latent_unsharp_params
""".split()


# options that change the loaded models or the text encoding: such runs load their own pipeline
PIPELINE_OPTIONS = ("--network", "--textual_inversion", "--emb_normalize", "--max_embeddings", "--clip_skip", "--fp16",
                    "--bf16", "--vae", "--xformers", "--sdpa", "--opt_channels", "--no_half", "--v2", "--v1", "--sdxl")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest single-threaded on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


class Env:
    def __init__(self, tiny, tokenizer_cache, tmp):
        self.model = tiny("sd1")
        self.tokenizers = tokenizer_cache
        self.tmp = tmp
        self._pipe = None
        self._shared = None
        self._lora = None
        self._count = 0

    def argv(self, *extra, outdir=None):
        self._count += 1
        outdir = outdir or str(self.tmp / f"out{self._count}")
        return ["--ckpt", self.model.path, "--tokenizer_cache_dir", self.tokenizers, "--outdir", outdir,
                "--W", "64", "--H", "64", "--steps", "2", *extra]

    def args(self, *extra, outdir=None):
        return gen_img_parser().parse_args(self.argv(*extra, outdir=outdir))

    def run(self, *extra, outdir=None, shared=True) -> list[str]:
        """Generate; options that change no model reuse one loaded pipeline (much faster)."""
        args = self.args(*extra, outdir=outdir)
        if not shared or any(str(x).startswith(PIPELINE_OPTIONS) for x in extra):
            return runner.run(args)
        checked = runner.check_inputs(args)
        if self._shared is None:
            self._shared = runner.GenerationPipeline.load(args, checked)
        return runner.Generator(args, self._shared, checked.init_images, checked.masks).run(checked)

    def pixels(self, *extra) -> np.ndarray:
        paths = self.run(*extra)
        assert len(paths) == 1
        return np.asarray(Image.open(paths[0]), dtype=np.int16)

    @property
    def lora(self) -> str:
        """A rank-4 LoRA (alpha 2) with random non-zero up and down weights."""
        if self._lora is None:
            import networks.lora as lora
            from library.models.sd.loading import load_sd_models

            m = load_sd_models(self.model.path)
            net = lora.create_network(1.0, 4, 2.0, None, m.text_encoder, m.unet)
            g = torch.Generator().manual_seed(1)
            with torch.no_grad():
                for p in net.parameters():
                    p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            self._lora = str(self.tmp / "lora.safetensors")
            net.save_weights(self._lora, None, {"ss_network_module": "networks.lora"})
        return self._lora

    def diffusers_pipe(self):
        if self._pipe is None:
            from diffusers import StableDiffusionPipeline

            from library.tokenizers import load_sd_tokenizer

            self._pipe = StableDiffusionPipeline.from_pretrained(
                self.model.reference_folder, tokenizer=load_sd_tokenizer(False, self.tokenizers), safety_checker=None,
                feature_extractor=None, requires_safety_checker=False,
            )
            self._pipe.set_progress_bar_config(disable=True)
        return self._pipe


@pytest.fixture(scope="module")
def env(tiny_sd, tokenizer_cache, tmp_path_factory):
    return Env(tiny_sd, tokenizer_cache, tmp_path_factory.mktemp("gen_img"))


def _diffusers_pixels(pipe, sampler: str, seed: int, steps: int) -> np.ndarray:
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    pipe.scheduler = get_scheduler(sampler)
    image = pipe(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=steps, guidance_scale=7.5,
                 latents=latents).images[0]
    return np.asarray(image, dtype=np.int16)


# ---------------------------------------------------------------------------- command line
def test_parser_has_every_spec_option_and_help_is_fast():
    parser = gen_img_parser()
    dests = {a.dest for a in parser._actions if a.dest != "help"}
    assert len(SPEC_OPTIONS) == 94
    assert set(SPEC_OPTIONS) <= dests
    assert dests - set(SPEC_OPTIONS) == {"ddim_eta"}  # the one addition
    defaults = parser.parse_args([])
    assert (defaults.sampler, defaults.steps, defaults.scale, defaults.outdir, defaults.highres_fix_steps) == ("ddim", 50, 7.5, "outputs", 28)
    assert (defaults.ds_timesteps_1, defaults.ds_ratio, defaults.gradual_latent_every_n_steps) == (650, 0.5, 3)
    assert defaults.emb_normalize_mode == "original" and defaults.images_per_prompt == 1
    code = ("import sys; from library.args.gen_img_args import gen_img_parser; gen_img_parser().parse_args([]); "
            "print('torch' in sys.modules)")
    t0 = time.time()
    res = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr
    assert time.time() - t0 < 5


def test_real_command_line_writes_a_png(env, tmp_path):
    out = tmp_path / "cli"
    res = subprocess.run(
        [sys.executable, "gen_img.py", *env.argv("--prompt", "a cat --n dog --d 3", "--console_log_simple", outdir=str(out))],
        cwd=ROOT, capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert res.returncode == 0, res.stderr[-2000:]
    files = os.listdir(out)
    assert len(files) == 1 and re.fullmatch(r"im_\d{14}_000_3\.png", files[0]), files
    assert "done: 1 image" in res.stderr


def test_missing_model_is_a_one_line_error(tmp_path):
    res = subprocess.run(
        [sys.executable, "gen_img.py", "--ckpt", str(tmp_path / "nope.safetensors"), "--prompt", "x", "--outdir", str(tmp_path / "o")],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert res.returncode == 2
    assert res.stderr.strip().splitlines()[-1] == f"error: --ckpt {tmp_path / 'nope.safetensors'}: file or folder not found"


# ---------------------------------------------------------------------------- bad input
def _no_model_loading(monkeypatch):
    from library.arch.sd import SDArchitecture

    def refuse(*a, **k):
        raise AssertionError("the model must not load")

    monkeypatch.setattr(SDArchitecture, "load_models", refuse)


def test_unwritable_outdir_fails_before_the_model_loads(env, tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    with pytest.raises(UserInputError, match=r"--outdir .*a_file/sub"):
        env.run("--prompt", "x", outdir=str(blocker / "sub"))


def test_missing_network_file_and_bad_network_options(env, tmp_path, monkeypatch):
    _no_model_loading(monkeypatch)
    with pytest.raises(UserInputError, match="--network_weights .*missing.safetensors: file not found"):
        env.run("--prompt", "x", "--network_module", "networks.lora", "--network_weights", str(tmp_path / "missing.safetensors"))
    with pytest.raises(UserInputError, match="1 file\\(s\\) for 2 --network_module"):
        env.run("--prompt", "x", "--network_module", "networks.lora", "networks.lora", "--network_weights", env.lora)
    with pytest.raises(UserInputError, match="cannot be imported"):
        env.run("--prompt", "x", "--network_module", "networks.nope", "--network_weights", env.lora)
    with pytest.raises(UserInputError, match="not key=value"):
        env.run("--prompt", "x", "--network_module", "networks.lora", "--network_weights", env.lora, "--network_args", "conv_dim")
    with pytest.raises(UserInputError, match="no prompt"):
        env.run()
    with pytest.raises(UserInputError, match="--image_path .*not found"):
        env.run("--prompt", "x", "--image_path", str(tmp_path / "none.png"))


def test_unknown_prompt_option_warns_and_generation_continues(env, caplog):
    with caplog.at_level(logging.WARNING):
        paths = env.run("--prompt", "a cat --zz 3 --w 64 --s notanumber")
    assert len(paths) == 1 and os.path.isfile(paths[0])
    assert "unknown prompt option --zz" in caplog.text
    assert "--s expects an integer" in caplog.text


def test_not_implemented_options_are_reported(env, caplog):
    with caplog.at_level(logging.WARNING):
        paths = env.run("--prompt", "a cat --dsd1 3", "--ds_depth_1", "3", "--control_net_models", "cn.safetensors")
    assert len(paths) == 1
    assert "--ds_depth_1: Deep Shrink is not implemented" in caplog.text
    assert "--control_net_models: ControlNet is not implemented" in caplog.text
    assert "Deep Shrink (--dsd1" in caplog.text


# ---------------------------------------------------------------------------- determinism and the oracle
def test_same_seed_same_pixels_other_seed_different(env):
    kw = ("--prompt", "a cat --n dog", "--sampler", "euler_a")  # ancestral: the seed drives step noise too
    a = env.pixels(*kw, "--seed", "7")
    b = env.pixels(*kw, "--seed", "7")
    c = env.pixels(*kw, "--seed", "8")
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_txt2img_matches_diffusers(env, sampler):
    ours = env.pixels("--prompt", f"{PROMPT} --n {NEGATIVE} --d 11", "--sampler", sampler, "--steps", "3")
    theirs = _diffusers_pixels(env.diffusers_pipe(), sampler, 11, 3)
    assert ours.shape == (64, 64, 3) and ours.std() > 5
    assert np.abs(ours - theirs).max() <= 1


def test_lora_matches_diffusers_in_every_layout_and_mode(env, tmp_path):
    from peft.utils import get_peft_model_state_dict

    pipe = env.diffusers_pipe()
    line = f"{PROMPT} --n {NEGATIVE} --d 11"
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{line}\n{line} --am 0\n")
    kw = ("--from_file", str(prompts), "--steps", "3")
    net = ("--network_module", "networks.lora", "--network_weights")

    def pixels(*extra):
        return [np.asarray(Image.open(p), dtype=np.int16) for p in env.run(*kw, *extra)]

    (base, _) = pixels()
    ours, off = pixels(*net, env.lora)
    pipe.load_lora_weights(env.lora, adapter_name="ours")
    try:
        theirs = _diffusers_pixels(pipe, "ddim", 11, 3)
        # the same LoRA in diffusers' own layout (peft keys + lora_adapter_metadata)
        folder = tmp_path / "diffusers_lora"
        type(pipe).save_lora_weights(
            str(folder), unet_lora_layers=get_peft_model_state_dict(pipe.unet, adapter_name="ours"),
            text_encoder_lora_layers=get_peft_model_state_dict(pipe.text_encoder, adapter_name="ours"),
            unet_lora_adapter_metadata=pipe.unet.peft_config["ours"].to_dict(),
            text_encoder_lora_adapter_metadata=pipe.text_encoder.peft_config["ours"].to_dict(),
        )
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours - base).max() > 10, "the LoRA has no visible effect"
    assert np.abs(ours - theirs).max() <= 1
    assert np.array_equal(off, base)  # --am 0 switches it off
    converted, _ = pixels(*net, str(folder / "pytorch_lora_weights.safetensors"))
    assert np.abs(converted - ours).max() <= 1
    # two networks: the first merged into the weights, the second live and switched off by --am 0
    _, merged = pixels("--network_module", "networks.lora", "networks.lora", "--network_weights", env.lora, env.lora,
                       "--network_merge_n_models", "1")
    assert np.abs(merged - ours).max() <= 1
    # pre-calculated weights follow the per-prompt multiplier from batch to batch
    pre_calc, pre_calc_off = pixels(*net, env.lora, "--network_pre_calc")
    assert np.abs(pre_calc - ours).max() <= 1 and np.abs(pre_calc_off - base).max() <= 1


def test_every_sampler_runs(env):
    results = {}
    for name in SAMPLER_NAMES:
        (path,) = env.run("--prompt", "a cat --d 5", "--sampler", name, "--steps", "1")
        with Image.open(path) as im:
            assert im.text["sampler"] == name
            results[name] = np.asarray(im)
    assert np.array_equal(results["euler"], results["k_euler"])
    assert not np.array_equal(results["euler"], results["ddim"])


# ---------------------------------------------------------------------------- prompts and weighting
def _pipeline(env, *extra):
    args = env.args("--prompt", "x", *extra)
    return runner.GenerationPipeline.load(args, runner.check_inputs(args))


def test_weighting_scales_the_token_state(env):
    pipe = _pipeline(env, "--emb_normalize_mode", "none")
    s = pipe.sampler
    ids = s.tokenizer("a cat", add_special_tokens=False).input_ids
    pos = 1 + ids.index(s.tokenizer.convert_tokens_to_ids("cat</w>"))
    with torch.no_grad():
        plain, weighted = s.encode_text(["a cat", "a (cat:1.5)"])
    ratio = weighted / plain
    torch.testing.assert_close(ratio[pos], torch.full_like(ratio[pos], 1.5), rtol=1e-4, atol=1e-4)
    others = [i for i in range(plain.shape[0]) if i != pos]
    torch.testing.assert_close(weighted[others], plain[others])
    # gen_img's default (original): the weighted states are rescaled to keep the prompt's mean
    s.emb_normalize_mode = "original"
    with torch.no_grad():
        plain, weighted = s.encode_text(["a cat", "a (cat:1.5)"])
    scaled = plain.clone()
    scaled[pos] *= 1.5
    expected = scaled * (plain.mean() / scaled.mean())
    torch.testing.assert_close(weighted, expected, rtol=1e-4, atol=1e-5)


def test_long_prompts_use_two_windows(env, caplog):
    long_prompt = ", ".join(["a red cat"] * 30)  # about 120 tokens
    pipe = _pipeline(env, "--max_embeddings_multiples", "2")
    with torch.no_grad():
        assert pipe.sampler.encode_text([long_prompt]).shape[1] == 152
        pipe.sampler.max_token_length = 75  # the default, --max_embeddings_multiples 1: one window, cut
        with caplog.at_level(logging.WARNING):
            assert pipe.sampler.encode_text([long_prompt]).shape[1] == 77
    assert "too long" in caplog.text
    pipe.sampler.max_token_length = 150
    args = env.args("--prompt", long_prompt, "--max_embeddings_multiples", "2")
    checked = runner.check_inputs(args)
    assert len(runner.Generator(args, pipe, None, None).run(checked)) == 1


def test_prompt_file_dynamic_prompts_and_per_prompt_options(env, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text(
        "# a comment\n\n"
        "a {e$$red|blue} cat --n dog --d 1,2 --s 1 --l 4 --w 72 --h 64\n"
        "a fox --f fox --nl 2 --c clip words\n",
        encoding="utf-8",
    )
    out = tmp_path / "o"
    paths = env.run("--from_file", str(prompts), "--batch_size", "4", outdir=str(out))
    assert len(paths) == 3
    infos = [Image.open(p).text for p in paths]
    assert [i["prompt"] for i in infos] == ["a red cat", "a blue cat", "a fox"]
    assert [i["seed"] for i in infos[:2]] == ["1", "2"]
    assert infos[0]["steps"] == "1" and infos[0]["scale"] == "4.0" and infos[0]["negative-prompt"] == "dog"
    assert Image.open(paths[0]).size == (72, 64)
    assert infos[0]["raw-prompt"] == "a red cat --n dog --d 1,2 --s 1 --l 4 --w 72 --h 64"
    assert os.path.basename(paths[2]) == "fox.png"
    assert infos[2]["negative-scale"] == "2.0" and infos[2]["clip-prompt"] == "clip words"
    assert "Steps: 2, Sampler: ddim, CFG scale: 7.5" in infos[2]["parameters"]

    toml_file = tmp_path / "prompts.toml"
    toml_file.write_text('[prompt]\nsample_steps = 1\n[[prompt.subset]]\nprompt = "a cow"\nseed = 9\nfile_name = "cow"\n')
    (cow,) = env.run("--from_file", str(toml_file), outdir=str(out))
    assert os.path.basename(cow) == "cow.png" and Image.open(cow).text["seed"] == "9"


def test_interactive_reads_stdin_until_eof(env, tmp_path, monkeypatch):
    monkeypatch.setattr(sys, "stdin", io.StringIO("a cat --f one\n   \n --n only options\na dog --f two\n"))
    out = tmp_path / "o"
    paths = env.run("--interactive", "--no_preview", "--n_iter", "3", outdir=str(out))
    assert sorted(os.listdir(out)) == ["one.png", "two.png"] and len(paths) == 2


def test_seeds_images_per_prompt_batches_and_iterations(env, tmp_path):
    out = tmp_path / "o"
    paths = env.run("--prompt", "a cat", "--seed", "3", "--images_per_prompt", "3", "--batch_size", "2", "--n_iter", "2",
                    "--sequential_file_name", outdir=str(out))
    assert sorted(os.listdir(out)) == [f"im_{i:06d}.png" for i in range(1, 7)]
    seeds = [Image.open(p).text["seed"] for p in paths]
    assert len(set(seeds)) == 6
    again = env.run("--prompt", "a cat", "--seed", "3", "--images_per_prompt", "3", "--n_iter", "2")
    assert [Image.open(p).text["seed"] for p in again] == seeds  # batch size does not change seeds
    # a batch of 2 gives each image the pixels it gets alone
    assert np.abs(np.asarray(Image.open(paths[1]), dtype=np.int16) - np.asarray(Image.open(again[1]), dtype=np.int16)).max() <= 1
    # --seed with one prompt and one image is that image's seed; --iter_same_seed shares one per iteration
    (single,) = env.run("--prompt", "a cat", "--seed", "42")
    assert Image.open(single).text["seed"] == "42"
    same = env.run("--prompt", "a cat", "--images_per_prompt", "2", "--iter_same_seed", "--seed", "1")
    assert len({Image.open(p).text["seed"] for p in same}) == 1


def test_output_names(env, tmp_path):
    out = str(tmp_path / "o")
    first = env.run("--prompt", "a cat --f pic --d 4,5", "--images_per_prompt", "2", outdir=out)
    assert [os.path.basename(p) for p in first] == ["pic_0.png", "pic_1.png"]
    second = env.run("--prompt", "a cat --f pic --d 4,5", "--images_per_prompt", "2", outdir=out)
    assert [os.path.basename(p) for p in second] == ["pic_0_1.png", "pic_1_1.png"]  # never overwritten
    (default,) = env.run("--prompt", "a cat --d 77", outdir=out)
    assert re.fullmatch(r"im_\d{14}_000_77\.png", os.path.basename(default))
    info = Image.open(default).text
    assert list(info)[:6] == ["prompt", "seed", "sampler", "steps", "scale", "negative-prompt"]


# ---------------------------------------------------------------------------- img2img, inpainting, highres fix
def _image(path, size, seed):
    arr = np.random.default_rng(seed).integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return str(path)


def test_img2img_and_inpainting(env, tmp_path):
    init = _image(tmp_path / "source.png", (80, 72), 0)  # not a multiple of 32: 64x64 is used
    args = env.args("--prompt", "a cat --d 2", "--image_path", init, "--use_original_file_name")
    args.W = args.H = None
    (path,) = runner.run(args)
    assert os.path.basename(path) == "source.png" and Image.open(path).size == (64, 64)
    assert Image.open(path).text["parameters"].endswith("Denoising strength: 0.8")

    def i2i(prompt, *extra):
        a = env.args("--prompt", f"{prompt} --d 2", "--image_path", init, *extra)
        a.W = a.H = None
        checked = runner.check_inputs(a)
        (p,) = runner.Generator(a, env._shared or runner.GenerationPipeline.load(a, checked), checked.init_images,
                                checked.masks).run(checked)
        return np.asarray(Image.open(p), dtype=np.int16)

    Image.new("L", (80, 72), 0).save(tmp_path / "keep.png")
    Image.new("L", (80, 72), 255).save(tmp_path / "redo.png")
    keep = ("--mask_path", str(tmp_path / "keep.png"))
    # a black mask keeps everything: the prompt no longer matters; white regenerates
    kept = i2i("a cat", *keep)
    assert np.array_equal(kept, i2i("a dog", *keep))
    assert not np.array_equal(kept, i2i("a cat", "--mask_path", str(tmp_path / "redo.png")))


def test_prompt_from_init_image_metadata(env, tmp_path):
    (src,) = env.run("--prompt", "a green fox --n rain --d 8", outdir=str(tmp_path / "a"))
    args = env.args("--image_path", src, "--strength", "0.5", outdir=str(tmp_path / "b"))
    args.W = args.H = None
    (path,) = runner.run(args)
    info = Image.open(path).text
    assert info["prompt"] == "a green fox" and info["negative-prompt"] == "rain"


@pytest.mark.parametrize("latents", [False, True])
def test_highres_fix(env, tmp_path, latents):
    out = tmp_path / "o"
    extra = ("--highres_fix_latents_upscaling",) if latents else ()
    paths = env.run("--prompt", "a cat --d 6", "--highres_fix_scale", "0.5", "--highres_fix_steps", "2",
                    "--highres_fix_save_1st", *extra, outdir=str(out))
    names = sorted(os.path.basename(p) for p in paths)
    assert len(names) == 2 and re.fullmatch(r"im_\d{14}_0000_6\.png", names[0]) and re.fullmatch(r"im_\d{14}_1000_6\.png", names[1])
    sizes = sorted(Image.open(p).size for p in paths)
    assert sizes == [(32, 32), (64, 64)]


def test_vae_batch_size_and_noise_options(env):
    kw = ("--prompt", "a cat --d 3,4", "--images_per_prompt", "2", "--batch_size", "2")
    a = [np.asarray(Image.open(p), dtype=np.int16) for p in env.run(*kw)]
    b = [np.asarray(Image.open(p), dtype=np.int16) for p in env.run(*kw, "--vae_batch_size", "0.5")]
    assert all(np.abs(x - y).max() <= 1 for x, y in zip(a, b))
    c = [np.asarray(Image.open(p), dtype=np.int16) for p in env.run(*kw, "--noise_offset_prob", "1", "--noise_offset_range", "0.5", "0.5")]
    d = [np.asarray(Image.open(p), dtype=np.int16) for p in env.run(*kw, "--noise_offset_prob", "1", "--noise_offset_range", "0.5", "0.5")]
    assert all(np.array_equal(x, y) for x, y in zip(c, d))
    assert not np.array_equal(a[0], c[0])


def test_textual_inversion_embedding(env, tmp_path):
    from safetensors.torch import save_file

    width = env.diffusers_pipe().text_encoder.config.hidden_size
    emb = torch.randn(2, width, generator=torch.Generator().manual_seed(0))
    path = tmp_path / "mytok.safetensors"
    save_file({"emb_params": emb}, str(path))
    pipe = _pipeline(env, "--textual_inversion_embeddings", str(path))
    tok = pipe.tokenizers[0]
    ids = tok(pipe.expand_tokens("a mytok cat"), add_special_tokens=False).input_ids
    new = tok.convert_tokens_to_ids(["mytok", "mytok1"])
    assert ids[1:3] == new
    weight = pipe.text_encoders[0].get_input_embeddings().weight
    torch.testing.assert_close(weight[new], emb)
    with pytest.raises(UserInputError, match="already exists"):
        pipe.add_textual_inversion(str(path))


# ---------------------------------------------------------------------------- plug-ins
def test_lycoris_plugin_module(env, tmp_path, caplog):
    kohya = pytest.importorskip("lycoris.kohya")
    from library.models.sd.loading import load_sd_models
    from library.networks.discovery import plugin_view

    m = load_sd_models(env.model.path)
    # alpha == dim (scale 1): LyCORIS 3.4's LoHa merge applies alpha/dim twice, its live path once
    net = kohya.create_network(1.0, 4, 4, None, plugin_view(m.text_encoder), m.unet, algo="loha", dropout=None)
    net.apply_to(m.text_encoder, m.unet, True, True)
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    path = str(tmp_path / "loha.safetensors")
    net.save_weights(path, None, {"ss_network_module": "lycoris.kohya"})
    kw = ("--prompt", "a cat --d 4")
    net_kw = ("--network_module", "lycoris.kohya", "--network_weights", path)
    base = env.pixels(*kw)
    live = env.pixels(*kw, *net_kw)
    merged = env.pixels(*kw, *net_kw, "--network_merge")
    with caplog.at_level(logging.WARNING):
        pre_calc = env.pixels(*kw, *net_kw, "--network_pre_calc")
    assert np.abs(live - base).max() > 10
    assert np.abs(merged - live).max() <= 2 and np.array_equal(pre_calc, live)
    assert "cannot be pre-calculated" in caplog.text


def test_prompter_module_and_upscaler_module(env, tmp_path, monkeypatch):
    (tmp_path / "my_prompts.py").write_text(
        "def get_prompter(args, pipe, networks):\n"
        "    items = iter(['a cat --f m1', 'a dog --f m2'])\n"
        "    return lambda args, pipe, seed_random, iter_seed, index, step: next(items, None)\n"
    )
    out = tmp_path / "o"
    env.run("--from_module", str(tmp_path / "my_prompts.py"), outdir=str(out))
    assert sorted(os.listdir(out)) == ["m1.png", "m2.png"]

    (tmp_path / "my_upscaler.py").write_text(
        "calls = []\n"
        "class Upscaler:\n"
        "    def to(self, *a, **k):\n"
        "        return self\n"
        "    def support_latents(self):\n"
        "        return False\n"
        "    def upscale(self, vae, images, latents, dtype, width, height, batch_size, vae_batch_size):\n"
        "        calls.append((len(images), width, height))\n"
        "        return [im.resize((width, height)) for im in images]\n"
        "def create_upscaler(**kwargs):\n"
        "    assert kwargs == {'mode': 'nearest'}, kwargs\n"
        "    return Upscaler()\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    (path,) = env.run("--prompt", "a cat", "--highres_fix_scale", "0.5", "--highres_fix_upscaler", "my_upscaler",
                      "--highres_fix_upscaler_args", "mode=nearest")
    import my_upscaler

    assert my_upscaler.calls == [(1, 64, 64)] and Image.open(path).size == (64, 64)


def test_diffusers_lora_key_layouts_convert_to_kohya_names():
    from library.inference.network_loading import convert_diffusers_lora, is_diffusers_lora

    t = torch.zeros
    sd = {
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.down.weight": t(4, 8),
        "unet.mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_out_lora.up.weight": t(8, 4),
        "unet.down_blocks.0.resnets.0.conv1.lora.down.weight": t(2, 8, 3, 3),
        "unet.down_blocks.0.resnets.0.conv1.lora.up.weight": t(8, 2, 1, 1),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.down.weight": t(4, 8),
        "text_encoder.text_model.encoder.layers.0.self_attn.to_k_lora.up.weight": t(8, 4),
        "text_encoder.encoder.layers.1.mlp.fc1.lora_A.weight": t(3, 8),
        "text_encoder.encoder.layers.1.mlp.fc1.lora_B.weight": t(8, 3),
        "text_encoder.encoder.layers.1.mlp.fc1.alpha": torch.tensor(1.5),
    }
    assert is_diffusers_lora(list(sd)) and not is_diffusers_lora(["lora_unet_x.lora_down.weight"])
    meta = {"lora_adapter_metadata": '{"unet.lora_alpha": 2, "unet.alpha_pattern": {"conv1": 1}}'}
    out = convert_diffusers_lora(sd, meta)
    att = "lora_unet_mid_block_attentions_0_transformer_blocks_0_attn1_to_out_0"
    conv = "lora_unet_down_blocks_0_resnets_0_conv1"
    k_proj = "lora_te_text_model_encoder_layers_0_self_attn_k_proj"
    fc1 = "lora_te_text_model_encoder_layers_1_mlp_fc1"
    assert set(out) == {f"{n}.{s}" for n in (att, conv, k_proj, fc1) for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    assert float(out[f"{att}.alpha"]) == 2.0  # lora_alpha from the metadata
    assert float(out[f"{conv}.alpha"]) == 1.0  # alpha_pattern
    assert float(out[f"{k_proj}.alpha"]) == 4.0  # no alpha for text_encoder: alpha = rank (scale 1)
    assert float(out[f"{fc1}.alpha"]) == 1.5  # stored alpha
