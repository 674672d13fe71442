"""Our SD sampling loop against diffusers' StableDiffusionPipeline, and its own guarantees.

Tolerance against diffusers (same weights, scheduler and initial latents, float32, CPU):
final latents within rtol=atol=1e-4 and decoded 8-bit pixels within 1 level. Measured:
identical (max difference 0.0) for DDIM and Euler on SD1 and for DDIM v-prediction on SD2.
"""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch

from library.arch.sd import SDArchitecture
from library.inference.prompt_file import parse_prompt_line, resolve_sample_spec
from library.inference.samplers import get_scheduler
from library.inference.sd_sampling import SDSampler, create_sampler, generate_from_spec, pil_to_tensor, tensor_to_pil
from library.models.sd.loading import load_sd_models
from library.tokenizers import load_sd_tokenizer

SIZE = 64
STEPS = 3
PROMPT = "a photo of a cat"
NEGATIVE = "blurry"


class Bundle:
    def __init__(self, tiny, cache, variant):
        from diffusers import StableDiffusionPipeline

        v2 = variant != "sd1"
        v_pred = variant == "sd2-v"
        t = tiny(variant)
        self.tokenizer = load_sd_tokenizer(v2, cache)
        self.models = load_sd_models(t.path, v_parameterization=v_pred)
        self.arch = SDArchitecture(v2, v_pred)
        self.v_pred = v_pred
        self.sampler = SDSampler(self.arch, self.models.text_encoder, self.models.vae, self.models.unet, self.tokenizer)
        self.pipe = StableDiffusionPipeline.from_pretrained(
            t.reference_folder, tokenizer=self.tokenizer, safety_checker=None, feature_extractor=None,
            requires_safety_checker=False,
        )
        self.pipe.set_progress_bar_config(disable=True)


@pytest.fixture(scope="module")
def sd1(tiny_sd, tokenizer_cache):
    return Bundle(tiny_sd, tokenizer_cache, "sd1")


def _noise(seed=0, n=1):
    return torch.randn(n, 4, SIZE // 8, SIZE // 8, generator=torch.Generator().manual_seed(seed))


def _compare_with_diffusers(b: Bundle, name: str):
    latents = _noise(11)
    ours = b.sampler.generate(PROMPT, NEGATIVE, width=SIZE, height=SIZE, steps=STEPS, guidance_scale=7.5,
                              scheduler=get_scheduler(name, b.v_pred), latents=latents, output_type="latent")
    b.pipe.scheduler = get_scheduler(name, b.v_pred)
    theirs = b.pipe(PROMPT, negative_prompt=NEGATIVE, width=SIZE, height=SIZE, num_inference_steps=STEPS,
                    guidance_scale=7.5, latents=latents.clone(), output_type="latent").images
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)
    with torch.no_grad():
        decoded = b.pipe.vae.decode(theirs / b.pipe.vae.config.scaling_factor).sample
    their_img = np.asarray(b.pipe.image_processor.postprocess(decoded, output_type="pil")[0], dtype=np.int16)
    with torch.no_grad():
        our_img = np.asarray(tensor_to_pil(b.sampler.decode_latents(ours))[0], dtype=np.int16)
    assert our_img.shape == (SIZE, SIZE, 3)
    assert np.abs(our_img - their_img).max() <= 1
    return ours


@pytest.mark.parametrize("name", ["ddim", "euler"])
def test_txt2img_matches_diffusers(sd1, name):
    _compare_with_diffusers(sd1, name)


def test_v_prediction_matches_diffusers(tiny_sd, tokenizer_cache):
    b = Bundle(tiny_sd, tokenizer_cache, "sd2-v")
    assert get_scheduler("ddim", b.v_pred).config.prediction_type == "v_prediction"
    _compare_with_diffusers(b, "ddim")


def test_same_seed_same_pixels_other_seed_different(sd1):
    kw = dict(width=SIZE, height=SIZE, steps=STEPS, scheduler="euler_a")  # ancestral: seeds drive step noise too
    a = np.asarray(sd1.sampler.generate(PROMPT, NEGATIVE, seed=123, **kw)[0])
    b = np.asarray(sd1.sampler.generate(PROMPT, NEGATIVE, seed=123, **kw)[0])
    c = np.asarray(sd1.sampler.generate(PROMPT, NEGATIVE, seed=124, **kw)[0])
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)
    img = sd1.sampler.generate(PROMPT, seed=9, width=SIZE, height=SIZE, steps=1)[0]
    assert img.info["seed"] == "9" and img.size == (SIZE, SIZE)


def test_seed_per_image_in_a_batch(sd1):
    kw = dict(width=SIZE, height=SIZE, steps=STEPS, scheduler="ddim", output_type="latent")
    batch = sd1.sampler.generate([PROMPT, "a dog"], NEGATIVE, seed=[5, 6], **kw)
    single = sd1.sampler.generate("a dog", NEGATIVE, seed=6, **kw)
    torch.testing.assert_close(batch[1:], single, rtol=1e-4, atol=1e-4)


def test_prompt_weighting_negative_prompt_and_guidance_change_the_result(sd1):
    kw = dict(width=SIZE, height=SIZE, steps=2, seed=1, output_type="latent")
    base = sd1.sampler.generate(PROMPT, **kw)
    for other in (
        sd1.sampler.generate("a photo of a (cat:1.6)", **kw),
        sd1.sampler.generate(PROMPT, NEGATIVE, **kw),
        sd1.sampler.generate(PROMPT, guidance_scale=1.0, **kw),
        sd1.sampler.generate(PROMPT, NEGATIVE, negative_scale=3.0, **kw),
    ):
        assert torch.isfinite(other).all() and not torch.allclose(base, other)
    # the same prompt written with escapes is not weighted
    escaped = sd1.sampler.generate(r"a photo of a \(cat\)", **kw)
    assert not torch.equal(escaped, sd1.sampler.generate("a photo of a (cat)", **kw))


def test_long_prompt_uses_two_windows(sd1):
    long_prompt = ", ".join(["a cat"] * 40)  # > 75 tokens
    ctx = sd1.sampler.encode_text([long_prompt, ""])
    assert ctx.shape[:2] == (2, 152)
    out = sd1.sampler.generate(long_prompt, width=SIZE, height=SIZE, steps=1, seed=0, output_type="latent")
    assert torch.isfinite(out).all()


def test_sizes_round_down_to_multiples_of_8(sd1, caplog):
    with caplog.at_level(logging.WARNING):
        img = sd1.sampler.generate(PROMPT, width=SIZE + 7, height=SIZE + 3, steps=1, seed=0)[0]
    assert img.size == (SIZE, SIZE)
    assert "multiple of 8" in caplog.text


def test_img2img_and_mask(sd1):
    from PIL import Image

    init = Image.fromarray(np.random.default_rng(0).integers(0, 255, (SIZE, SIZE, 3), dtype=np.uint8))
    kw = dict(width=SIZE, height=SIZE, steps=4, seed=3, init_image=init, output_type="latent")
    a = sd1.sampler.generate(PROMPT, strength=0.5, **kw)
    assert torch.equal(a, sd1.sampler.generate(PROMPT, strength=0.5, **kw))
    # a black mask keeps every pixel: the result is the init image's latents
    keep_all = Image.new("L", (SIZE, SIZE), 0)
    kept = sd1.sampler.generate(PROMPT, strength=0.75, mask=keep_all, **kw)
    g = torch.Generator().manual_seed(3)
    torch.randn(_noise().shape, generator=g)  # the seed's generator draws the initial noise first
    init_latents = sd1.sampler.encode_images(pil_to_tensor(init, SIZE, SIZE), [g])
    torch.testing.assert_close(kept, init_latents)
    # strength 1 starts from pure noise scaled like txt2img and differs from strength 0.5
    assert not torch.allclose(a, sd1.sampler.generate(PROMPT, strength=1.0, **kw))


def test_training_preview_from_a_prompt_line(sd1):
    spec = resolve_sample_spec(parse_prompt_line(f"{PROMPT} --w {SIZE} --h {SIZE} --s 2 --d 77 --ss k_euler --n {NEGATIVE}"))
    sampler = create_sampler(sd1.arch, [sd1.models.text_encoder], sd1.models.vae, sd1.models.unet, [sd1.tokenizer])
    assert isinstance(sampler, SDSampler)
    image, seed = generate_from_spec(sampler, spec)
    assert seed == 77 and image.size == (SIZE, SIZE)
    again, _ = generate_from_spec(sampler, spec)
    assert np.array_equal(np.asarray(image), np.asarray(again))
