"""SDXL LoRAs against diffusers, gen_img.py with SDXL models, networks/sdxl_merge_lora.py.

Oracle: diffusers' StableDiffusionXLPipeline built from the tiny model's own diffusers folder
(local config and tokenizers, no hub).

Tolerances (float32, CPU), measured values in brackets:
* `load_lora_weights` of our SDXL LoRA (U-Net + te1 + te2, LoRA-C3Lier) vs our network at
  multiplier 1: atol 1e-5 on outputs of magnitude ~1 [te1 0, te2 0, U-Net ~1e-6];
* gen_img.py vs the pipeline, same scheduler and initial latents: saved 8-bit pixels within
  1 level, with size/crop conditioning and with a LoRA [0 to 1];
* sdxl_merge_lora.py merged checkpoint vs `fuse_lora` + `unload_lora_weights`: every weight
  within 1e-6 [~1e-7]; OFT merged vs applied live and LBW vs a hand-scaled LoRA: 1e-5.
"""

from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from library.errors import UserInputError
from library.io import safetensors_io

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "a photo of a cat"
NEGATIVE = "blurry"


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _randomize(net, std, seed=1):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * std)


class Env:
    def __init__(self, files, tokenizer_cache, tmp):
        self.files, self.tok, self.tmp = files, tokenizer_cache, tmp
        self._pipe = None
        self._lora = None
        self._oft = None

    def pipe(self):
        if self._pipe is None:
            self._pipe = self.new_pipe()
        return self._pipe

    def new_pipe(self):
        from diffusers import StableDiffusionXLPipeline

        pipe = StableDiffusionXLPipeline.from_pretrained(self.files.reference_folder, add_watermarker=False,
                                                         local_files_only=True)
        pipe.set_progress_bar_config(disable=True)
        return pipe

    def models(self):
        from library.models.sdxl.loading import load_sdxl_models

        return load_sdxl_models(self.files.path)

    @property
    def lora(self) -> str:
        """A rank-4 LoRA-C3Lier (alpha 2, conv rank 2) on both text encoders and the U-Net."""
        if self._lora is None:
            import networks.lora as lora

            m = self.models()
            net = lora.create_network(1.0, 4, 2.0, None, m.text_encoders, m.unet, conv_dim="2", conv_alpha="1")
            _randomize(net, 0.05)
            self._lora = str(self.tmp / "sdxl_lora.safetensors")
            net.save_weights(self._lora, None, {"ss_network_module": "networks.lora"})
        return self._lora

    @property
    def oft(self) -> str:
        if self._oft is None:
            import networks.oft as oft

            m = self.models()
            net = oft.create_network(1.0, 4, 1e-2, None, m.text_encoders, m.unet, enable_conv="1")
            _randomize(net, 0.3, seed=2)
            self._oft = str(self.tmp / "sdxl_oft.safetensors")
            net.save_weights(self._oft, None, {"ss_network_module": "networks.oft"})
        return self._oft


@pytest.fixture(scope="module")
def env(tiny_sdxl_files, tokenizer_cache, tmp_path_factory):
    return Env(tiny_sdxl_files, tokenizer_cache, tmp_path_factory.mktemp("sdxl_gen_merge"))


# ---------------------------------------------------------------------------------- diffusers loads our LoRA
def _inputs(seed=0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(1, 4, 8, 8, generator=g), torch.tensor([900]), torch.randn(1, 77, 96, generator=g),
            torch.randn(1, 64 + 6 * 256, generator=g), torch.randint(0, 49408, (1, 77), generator=g))


@torch.no_grad()
def _ours(models):
    x, t, ctx, y, ids = _inputs()
    te1, te2 = models.text_encoders
    return te1(ids).last_hidden_state, te2(ids).text_embeds, models.unet(x, t, ctx, y)


@torch.no_grad()
def _theirs(pipe):
    x, t, ctx, y, ids = _inputs()
    text_embeds, time_ids = y[:, :64], None
    # diffusers computes the size embeddings itself from time ids: rebuild y's numbers from them
    sizes = torch.tensor([[64.0, 96.0, 4.0, 8.0, 64.0, 64.0]])
    from library.arch.sdxl import size_embedding

    y_ours = torch.cat([text_embeds, size_embedding(sizes)], dim=1)
    time_ids = sizes
    out = pipe.unet(x, t, ctx, added_cond_kwargs={"text_embeds": text_embeds, "time_ids": time_ids}).sample
    return pipe.text_encoder(ids).last_hidden_state, pipe.text_encoder_2(ids).text_embeds, out, y_ours


def test_diffusers_load_lora_weights_takes_every_key_and_agrees(env):
    from peft.tuners.lora import LoraLayer

    import networks.lora as lora

    pipe = env.new_pipe()
    pipe.load_lora_weights(env.lora, adapter_name="ours")
    models = env.models()
    net, _ = lora.create_network_from_weights(1.0, env.lora, None, models.text_encoders, models.unet)
    net.apply_to(models.text_encoders, models.unet)
    net.load_weights(env.lora)
    net.eval()
    counts = {"unet": 0, "te1": 0, "te2": 0}
    for name, m in pipe.unet.named_modules():
        counts["unet"] += isinstance(m, LoraLayer)
    for key, model in (("te1", pipe.text_encoder), ("te2", pipe.text_encoder_2)):
        counts[key] = sum(isinstance(m, LoraLayer) for m in model.modules())
    n_file = {"unet": 0, "te1": 0, "te2": 0}
    for m in net.all_loras:
        n_file["te1" if m.lora_name.startswith("lora_te1_") else "te2" if m.lora_name.startswith("lora_te2_") else "unet"] += 1
    assert counts == n_file, (counts, n_file)  # every module of the file became a peft layer
    assert n_file["te1"] == 72 and n_file["te2"] == 192 and n_file["unet"] > 300

    x, t, ctx, y, ids = _inputs()
    te1_t, te2_t, unet_t, y_sizes = _theirs(pipe)
    with torch.no_grad():
        te1_o, te2_o = models.text_encoders[0](ids).last_hidden_state, models.text_encoders[1](ids).text_embeds
        unet_o = models.unet(x, t, ctx, y_sizes)
    base = _theirs(env.pipe())
    for name, o, th, b in (("te1", te1_o, te1_t, base[0]), ("te2", te2_o, te2_t, base[1]), ("unet", unet_o, unet_t, base[2])):
        assert (o - b).abs().max() > 1e-2, f"{name}: the LoRA has no visible effect"
        diff = (o - th).abs().max().item()
        print(f"{name}: max abs diff vs diffusers {diff:.3g}")
        assert diff <= 1e-5, f"{name}: max abs diff {diff}"


# ---------------------------------------------------------------------------------- gen_img.py
def _gen(env, *extra, outdir=None):
    from library.args.gen_img_args import gen_img_parser
    from library.inference import gen_img_runner as runner

    outdir = outdir or str(env.tmp / f"gen{np.random.randint(1 << 30)}")
    args = gen_img_parser().parse_args(["--ckpt", env.files.path, "--tokenizer_cache_dir", env.tok, "--outdir", outdir,
                                        "--W", "64", "--H", "64", "--steps", "3", *extra])
    return [np.asarray(Image.open(p), dtype=np.int16) for p in runner.run(args)]


def _diffusers_pixels(pipe, sampler, seed, **kw):
    from library.inference.samplers import get_scheduler

    pipe.scheduler = get_scheduler(sampler)
    latents = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))
    image = pipe(PROMPT, negative_prompt=NEGATIVE, width=64, height=64, num_inference_steps=3, guidance_scale=7.5,
                 latents=latents, **kw).images[0]
    return np.asarray(image, dtype=np.int16)


@pytest.mark.parametrize("sampler", ["ddim", "euler"])
def test_gen_img_sdxl_matches_diffusers(env, sampler):
    (ours,) = _gen(env, "--prompt", f"{PROMPT} --n {NEGATIVE} --d 11", "--sampler", sampler)
    theirs = _diffusers_pixels(env.pipe(), sampler, 11)
    assert ours.shape == (64, 64, 3) and ours.std() > 5
    print(f"gen_img SDXL {sampler} vs diffusers: max pixel diff {np.abs(ours - theirs).max()}")
    assert np.abs(ours - theirs).max() <= 1


def test_gen_img_size_conditioning_matches_diffusers(env, tmp_path):
    """--ow/--oh (original size), --nw/--nh (negative original size), --ct/--cl (crop)."""
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT} --n {NEGATIVE} --d 11\n"
                       f"{PROMPT} --n {NEGATIVE} --d 11 --ow 256 --oh 192 --nw 32 --nh 48 --ct 16 --cl 8\n")
    plain, ours = _gen(env, "--from_file", str(prompts), "--sampler", "ddim")
    theirs = _diffusers_pixels(env.pipe(), "ddim", 11, original_size=(192, 256), crops_coords_top_left=(16, 8),
                               target_size=(64, 64), negative_original_size=(48, 32),
                               negative_crops_coords_top_left=(16, 8), negative_target_size=(64, 64))
    assert np.abs(ours - plain).max() > 2, "size conditioning had no effect"
    print(f"gen_img SDXL size conditioning vs diffusers: max pixel diff {np.abs(ours - theirs).max()}")
    assert np.abs(ours - theirs).max() <= 1
    # the same through the command-line options
    (opts,) = _gen(env, "--prompt", f"{PROMPT} --n {NEGATIVE} --d 11", "--sampler", "ddim", "--original_width", "256",
                   "--original_height", "192", "--original_width_negative", "32", "--original_height_negative", "48",
                   "--crop_top", "16", "--crop_left", "8")
    assert np.array_equal(opts, ours)


def test_gen_img_sdxl_lora_matches_diffusers(env, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text(f"{PROMPT} --n {NEGATIVE} --d 11\n{PROMPT} --n {NEGATIVE} --d 11 --am 0\n")
    ours, base = _gen(env, "--from_file", str(prompts), "--sampler", "ddim", "--network_module", "networks.lora",
                      "--network_weights", env.lora)
    (merged,) = _gen(env, "--prompt", f"{PROMPT} --n {NEGATIVE} --d 11", "--sampler", "ddim", "--network_module",
                     "networks.lora", "--network_weights", env.lora, "--network_merge")
    pipe = env.pipe()
    pipe.load_lora_weights(env.lora, adapter_name="gen")
    try:
        theirs = _diffusers_pixels(pipe, "ddim", 11)
    finally:
        pipe.unload_lora_weights()
    assert np.abs(ours - base).max() > 10, "the LoRA has no visible effect"
    print(f"gen_img SDXL LoRA vs diffusers: max pixel diff {np.abs(ours - theirs).max()}; merged vs live "
          f"{np.abs(merged - ours).max()}")
    assert np.abs(ours - theirs).max() <= 1
    assert np.abs(merged - ours).max() <= 1


def test_gen_img_sdxl_folder_and_textual_inversion(env, tmp_path, caplog):
    """A diffusers SDXL folder is recognised (and its two tokenizers used); an SDXL embedding
    (clip_l + clip_g) adds its token to both encoders."""
    import gen_img

    emb = tmp_path / "tok.safetensors"
    g = torch.Generator().manual_seed(0)
    safetensors_io.save_state_dict({"clip_l": torch.randn(2, 32, generator=g), "clip_g": torch.randn(2, 64, generator=g)},
                                   str(emb))
    out = tmp_path / "folder"
    caplog.set_level("INFO")
    gen_img.main(["--ckpt", env.files.reference_folder, "--outdir", str(out), "--W", "64", "--H", "64", "--steps", "2",
                  "--prompt", "a tok cat --d 3", "--textual_inversion_embeddings", str(emb), "--sequential_file_name"])
    assert "an SDXL model" in caplog.text and "textual inversion: 'tok' (2 vectors)" in caplog.text
    assert os.listdir(out) == ["im_000001.png"]
    # an SD1.x embedding is refused for SDXL with the reason
    sd1 = tmp_path / "sd1emb.safetensors"
    safetensors_io.save_state_dict({"emb_params": torch.randn(1, 32)}, str(sd1))
    with pytest.raises(UserInputError, match="this model has 2 text encoder"):
        _gen(env, "--prompt", "x", "--textual_inversion_embeddings", str(sd1))


# ---------------------------------------------------------------------------------- sdxl_merge_lora.py
def _merge(*argv):
    from networks import sdxl_merge_lora

    return sdxl_merge_lora.main(list(argv))


def _flat(models):
    from library.models.sdxl.saving import diffusers_unet

    out = {f"unet.{k}": v for k, v in diffusers_unet(models.unet).state_dict().items()}
    for name, te in (("te1", models.text_encoders[0]), ("te2", models.text_encoders[1])):
        out.update({f"{name}.{k}": v for k, v in te.state_dict().items()})
    return out


def test_spec_options_of_sdxl_merge_lora():
    from networks import sdxl_merge_lora

    p = sdxl_merge_lora.setup_parser()
    dests = {a.dest: a.default for a in p._actions if a.option_strings and a.dest != "help"}
    assert dests == {"save_precision": None, "precision": "float", "sd_model": None, "save_to": None, "models": None,
                     "ratios": None, "lbws": None, "no_metadata": False, "concat": False, "shuffle": False}
    r = subprocess.run([sys.executable, "-X", "importtime", os.path.join(ROOT, "networks", "sdxl_merge_lora.py"), "--help"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and "--lbws" in r.stdout and " torch" not in r.stderr.replace("torch_", "")


def test_merged_checkpoint_equals_diffusers_fuse_lora(env, tmp_path):
    from library.models.sdxl.loading import load_sdxl_models

    out = tmp_path / "merged.safetensors"
    _merge("--sd_model", env.files.path, "--models", env.lora, "--ratios", "0.7", "--save_to", str(out))
    ours = _flat(load_sdxl_models(str(out)))
    pipe = env.new_pipe()
    pipe.load_lora_weights(env.lora)
    pipe.fuse_lora(lora_scale=0.7)
    pipe.unload_lora_weights()
    theirs = {f"unet.{k}": v for k, v in pipe.unet.state_dict().items()}
    theirs.update({f"te1.{k}": v for k, v in pipe.text_encoder.state_dict().items()})
    theirs.update({f"te2.{k}": v for k, v in pipe.text_encoder_2.state_dict().items()})
    base = _flat(env.models())
    common = set(ours) & set(theirs)
    assert len(common) >= len(ours) - 2, sorted(set(ours) - set(theirs))[:5]
    changed = [k for k in common if not torch.equal(ours[k], base[k])]
    assert len(changed) > 500
    worst = max((ours[k].float() - theirs[k].float()).abs().max().item() for k in common)
    print(f"sdxl_merge_lora vs diffusers fuse_lora: max abs weight diff {worst:.3g}")
    assert worst <= 1e-6
    md = safetensors_io.read_metadata(str(out))
    assert md["modelspec.architecture"] == "stable-diffusion-xl-v1-base"


def test_oft_and_lbw_merge_into_checkpoint(env, tmp_path):
    """OFT merged equals OFT applied live; an LBW list equals merging a LoRA whose modules were
    scaled by their block weights by hand."""
    import networks.oft as oft
    from library.models.sdxl.loading import load_sdxl_models

    out = tmp_path / "oft_merged.safetensors"
    _merge("--sd_model", env.files.path, "--models", env.oft, "--save_to", str(out))
    live = env.models()
    net, weights = oft.create_network_from_weights(1.0, env.oft, None, live.text_encoders, live.unet)
    net.apply_to(live.text_encoders, live.unet)
    net.load_state_dict(weights, strict=False)
    want, got = _ours(live), _ours(load_sdxl_models(str(out)))
    assert (want[2] - _ours(env.models())[2]).abs().max() > 1e-3, "the OFT network has no effect"
    print(f"OFT merged vs live: U-Net max abs diff {(want[2] - got[2]).abs().max().item():.3g}")
    assert (want[2] - got[2]).abs().max() <= 1e-5

    # LBW (20 values): BASE 0.5, IN04 0, MID 2, OUT02 0; every other block 1
    lbw = [0.5] + [1.0] * 9 + [2.0] + [1.0] * 9
    lbw[1 + 4] = 0.0
    lbw[11 + 2] = 0.0
    with_lbw = tmp_path / "lbw.safetensors"
    _merge("--sd_model", env.files.path, "--models", env.lora, "--ratios", "0.8", "--lbws", ",".join(map(str, lbw)),
           "--save_to", str(with_lbw))
    from library.lora_tools.lorafile import read_lora
    from library.lora_tools.sd import all_layers

    merged, base = all_layers(load_sdxl_models(str(with_lbw))), all_layers(env.models())
    worst, checked = 0.0, set()
    for name, m in read_lora(env.lora).modules.items():
        w = 0.5 if name.startswith("lora_te") else 0.0 if name.startswith(("lora_unet_input_blocks_4_", "lora_unet_output_blocks_2_")) \
            else 2.0 if name.startswith("lora_unet_middle_block_") else 1.0
        got = merged[name][1].module.weight - base[name][1].module.weight
        worst = max(worst, (got - 0.8 * w * m.delta()).abs().max().item())
        checked.add(w)
    assert checked == {0.0, 0.5, 1.0, 2.0}
    print(f"LBW merge vs ratio x block weight x delta: max abs weight diff {worst:.3g}")
    assert worst <= 1e-5


def test_lora_into_lora_with_lbw_and_concat(env, tmp_path):
    from library.lora_tools.lorafile import read_lora

    lbw = "[1,1,1,1,1,0,0,0,0,0,0,0]"  # 12 values: BASE IN04 IN05 IN07 IN08 MID OUT00-05; OUT* off
    out = tmp_path / "ab.safetensors"
    _merge("--models", env.lora, env.lora, "--ratios", "0.5", "0.25", "--lbws", lbw, lbw, "--concat", "--save_to", str(out))
    merged, src = read_lora(str(out)), read_lora(env.lora)
    names = set(merged.modules)
    assert not [n for n in names if n.startswith(tuple(f"lora_unet_output_blocks_{i}_" for i in range(6)))]
    assert any(n.startswith("lora_unet_output_blocks_6_") for n in names)  # OUT06+ is not in a 12-value list
    name = "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    torch.testing.assert_close(merged.modules[name].delta(), 0.75 * src.modules[name].delta(), atol=1e-6, rtol=1e-5)
    md = safetensors_io.read_metadata(str(out))
    assert md["ss_base_model_version"] == "sdxl_base_v1-0"


def test_merge_bad_input(env, tmp_path, tiny_sd):
    import networks.lora as lora
    from library.models.sd.loading import load_sd_models

    m = load_sd_models(tiny_sd("sd1").path)
    sd1_lora = tmp_path / "sd1.safetensors"
    lora.create_network(1.0, 2, 1.0, None, m.text_encoder, m.unet).save_weights(str(sd1_lora), None, {})
    out = str(tmp_path / "x.safetensors")
    with pytest.raises(UserInputError, match=r"LoRA for SD1\.x/2\.x .*use networks/merge_lora\.py"):
        _merge("--sd_model", env.files.path, "--models", str(sd1_lora), "--save_to", out)
    with pytest.raises(UserInputError, match=r"not an SDXL checkpoint but SD1\.x/2\.x"):
        _merge("--sd_model", tiny_sd("sd1").path, "--models", env.lora, "--save_to", out)
    with pytest.raises(UserInputError, match="OFT file can only be merged into a checkpoint"):
        _merge("--models", env.oft, "--save_to", out)
    with pytest.raises(UserInputError, match="17 values is for SD1.x/2.x"):
        _merge("--models", env.lora, "--lbws", ",".join(["1"] * 17), "--save_to", out)
    assert not os.path.exists(out)
