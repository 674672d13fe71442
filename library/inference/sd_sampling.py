"""Text-to-image and image-to-image sampling on our own models (training previews, gen_img).

`LatentDiffusionSampler.generate` holds the loop every latent-diffusion architecture
shares: initial noise from per-image seeds, classifier-free guidance (with gen_img's
optional separate negative scale), img2img strength and inpainting masks, any diffusers
scheduler from `library.inference.samplers`, VAE decoding to PIL images.

What differs between architectures is four methods: `encode_conditioning` (prompts ->
U-Net inputs), `predict` (one denoiser call), `decode_latents` and `encode_images`.
`SDSampler` implements them for SD1.x/2.x with `SDArchitecture.encode_tokens` (clip skip,
long prompts) and prompt weighting; SDXL subclasses it (two text encoders, pooled vector
and size conditioning, its own U-Net call) and is picked by `create_sampler` through the
architecture object's `image_sampler_class` attribute.

Deterministic: the noise of image i comes from a CPU `torch.Generator` seeded with its
seed (also used by ancestral samplers and VAE sampling): the same seed gives the same
starting noise in any batch and identical pixels when repeated on the same machine.
"""

from __future__ import annotations

import logging
import random
from typing import Any, Callable, Optional, Sequence, Union

import torch

from library.inference import samplers as samplers_mod
from library.inference.prompt_weighting import CHUNK, apply_token_weights, tokenize_weighted

logger = logging.getLogger(__name__)

Conditioning = dict  # name -> tensor, batch first; what `predict` needs besides x and t


def random_seed() -> int:
    return random.SystemRandom().randint(0, 2**32 - 1)


def _as_list(value, n: int, what: str) -> list:
    if value is None or isinstance(value, (str, int, float)):
        return [value] * n
    value = list(value)
    if len(value) == 1:
        return value * n
    if len(value) != n:
        raise ValueError(f"{what}: {len(value)} values for {n} images")
    return value


def _cat_conditioning(parts: Sequence[Conditioning]) -> Conditioning:
    return {k: torch.cat([p[k] for p in parts], dim=0) for k in parts[0]}


def _slice_conditioning(cond: Conditioning, start: int, stop: int) -> Conditioning:
    return {k: v[start:stop] for k, v in cond.items()}


def pil_to_tensor(image, width: int, height: int) -> torch.Tensor:
    """PIL image -> (1, 3, H, W) in [-1, 1], resized (Lanczos) to width x height when needed."""
    import numpy as np
    from PIL import Image

    image = image.convert("RGB")
    if image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    arr = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(arr).permute(2, 0, 1).unsqueeze(0)


def tensor_to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [-1, 1] -> PIL images (rounded to the nearest uint8)."""
    import numpy as np
    from PIL import Image

    x = (images.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((a * 255).round().astype(np.uint8)) for a in x]


class LatentDiffusionSampler:
    """The shared denoising loop. Subclasses supply the four architecture methods."""

    latent_channels = 4
    vae_scale_factor = 8
    latent_scale = 1.0

    def __init__(self, unet, vae, *, device=None, vae_batch_size: Optional[int] = None):
        self.unet = unet
        self.vae = vae
        self.vae_batch_size = vae_batch_size
        self.device = torch.device(device) if device is not None else next(unet.parameters()).device

    # ------------------------------------------------------------ architecture hooks
    def encode_conditioning(self, prompts: list[str], width: int, height: int, extra: dict) -> Conditioning:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """Sampler-space latents -> images in [-1, 1]."""
        vae_dtype = next(self.vae.parameters()).dtype
        z = (latents / self.latent_scale).to(next(self.vae.parameters()).device, vae_dtype)
        bs = max(1, int(self.vae_batch_size or z.shape[0]))
        out = [self.vae.decode(z[i: i + bs]).sample.float() for i in range(0, z.shape[0], bs)]
        return torch.cat(out).clamp(-1, 1)

    def encode_images(self, images: torch.Tensor, generators: list) -> torch.Tensor:
        """Images in [-1, 1] -> sampler-space latents (one VAE sample per image)."""
        p = next(self.vae.parameters())
        latents = []
        for i in range(images.shape[0]):
            dist = self.vae.encode(images[i: i + 1].to(p.device, p.dtype)).latent_dist
            noise = torch.randn(dist.mean.shape, generator=generators[i], dtype=torch.float32).to(dist.mean.device)
            latents.append((dist.mean.float() + dist.std.float() * noise) * self.latent_scale)
        return torch.cat(latents).to(self.device)

    # ------------------------------------------------------------ the loop
    def round_size(self, width: int, height: int) -> tuple[int, int]:
        m = self.vae_scale_factor
        w, h = max(m, int(width) - int(width) % m), max(m, int(height) - int(height) % m)
        if (w, h) != (width, height):
            logger.warning("image size %dx%d is not a multiple of %d; using %dx%d", width, height, m, w, h)
        return w, h

    @torch.no_grad()
    def generate(
        self,
        prompt: Union[str, Sequence[str]],
        negative_prompt: Union[str, Sequence[Optional[str]], None] = None,
        *,
        width: int = 512,
        height: int = 512,
        steps: int = 30,
        guidance_scale: float = 7.5,
        negative_scale: Optional[float] = None,
        scheduler: Any = "ddim",
        seed: Union[int, Sequence[int], None] = None,
        num_images: Optional[int] = None,
        latents: Optional[torch.Tensor] = None,
        init_image: Any = None,
        strength: float = 0.8,
        mask: Any = None,
        eta: float = 0.0,
        extra: Optional[dict] = None,
        init_latents: Optional[torch.Tensor] = None,
        output_type: str = "pil",
        callback: Optional[Callable[[int, Any, torch.Tensor], None]] = None,
        progress: bool = False,
    ):
        """Generate one image per prompt (a single prompt is repeated `num_images` times).

        scheduler: a `--sampler` name or a diffusers scheduler (copied, never mutated).
        seed: one per image; an int with several images means seed, seed+1, ...; None draws
        random seeds. latents: initial noise (B, C, H/8, W/8) instead of seeded noise (as
        diffusers' `latents=`; scaled by the scheduler's init_noise_sigma here).
        init_image: PIL image(s) or a (B, 3, H, W) tensor in [-1, 1] for img2img with
        `strength` (0..1). init_latents: sampler-space latents (B or 1, C, H/8, W/8) used like
        an encoded init_image (no VAE encoding; gen_img's latent highres fix). mask: PIL
        image(s) or (B, 1, H, W) tensor; white is regenerated, black kept (needs an init
        image or init_latents). negative_scale: gen_img's separate weight for the
        negative prompt (against an empty-prompt baseline). extra: architecture options
        (SDXL sizes and crops). output_type: "pil" (images, `.info["seed"]` set), "latent"
        (final sampler-space latents) or "pt" (decoded images in [-1, 1]).
        """
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        n = num_images or len(prompts)
        if len(prompts) == 1 and n > 1:
            prompts = prompts * n
        if len(prompts) != n:
            raise ValueError(f"{len(prompts)} prompts for {n} images")
        negatives = [p or "" for p in _as_list(negative_prompt, n, "negative_prompt")]
        width, height = self.round_size(width, height)
        steps = max(1, int(steps))

        if seed is None:
            seeds = [random_seed() for _ in range(n)]
        elif isinstance(seed, int):
            seeds = [seed + i for i in range(n)]
        else:
            seeds = _as_list(seed, n, "seed")
        generators = [torch.Generator("cpu").manual_seed(int(s)) for s in seeds]

        sched = samplers_mod.get_scheduler(scheduler) if isinstance(scheduler, str) else samplers_mod.fresh_copy(scheduler)
        sched.set_timesteps(steps, device=self.device)
        timesteps = sched.timesteps

        # conditioning: [empty] (negative_scale only), [negative], [positive]
        do_cfg = guidance_scale > 1.0
        use_negative_scale = do_cfg and negative_scale is not None
        texts = ([""] * n if use_negative_scale else []) + (negatives if do_cfg else []) + prompts
        # extra["negative_rows"]: how many leading rows are negative/unconditional (SDXL sizes)
        cond = self.encode_conditioning(texts, width, height, {**(extra or {}), "negative_rows": len(texts) - n})
        copies = len(texts) // n

        shape = (n, self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            noise = torch.cat([torch.randn((1,) + shape[1:], generator=g, dtype=torch.float32) for g in generators])
        else:
            if tuple(latents.shape) != shape:
                raise ValueError(f"latents must have shape {shape}, not {tuple(latents.shape)}")
            noise = latents.float().cpu()
        noise = noise.to(self.device)

        keep = None
        if init_image is not None or init_latents is not None:
            if init_latents is None:
                images = self._images_tensor(init_image, n, width, height)
                init_latents = self.encode_images(images, generators)
            else:
                init_latents = init_latents.float().to(self.device)
                if init_latents.shape[0] == 1 and n > 1:
                    init_latents = init_latents.repeat(n, 1, 1, 1)
                if tuple(init_latents.shape) != shape:
                    raise ValueError(f"init_latents must have shape {shape}, not {tuple(init_latents.shape)}")
            init_steps = min(int(steps * strength), steps)
            t_start = max(steps - init_steps, 0)
            timesteps = timesteps[t_start * sched.order:]
            if hasattr(sched, "set_begin_index"):
                sched.set_begin_index(t_start * sched.order)
            if len(timesteps) == 0:
                logger.warning("strength %.3g with %d steps leaves no denoising step; returning the init image's latents", strength, steps)
                x = init_latents
            else:
                x = sched.add_noise(init_latents, noise, timesteps[:1].repeat(n))
            if mask is not None:
                keep = 1.0 - self._mask_tensor(mask, n, shape[2], shape[3])
        else:
            if mask is not None:
                raise ValueError("an inpainting mask needs an init image")
            x = noise * sched.init_noise_sigma

        kwargs = samplers_mod.step_kwargs(sched, eta, generators)
        iterator = timesteps
        if progress:
            from tqdm import tqdm

            iterator = tqdm(timesteps, desc="sampling", leave=False)
        for i, t in enumerate(iterator):
            model_in = torch.cat([x] * copies) if copies > 1 else x
            model_in = sched.scale_model_input(model_in, t)
            out = self.predict(model_in, t, cond).float()
            if copies == 1:
                guided = out
            elif use_negative_scale:
                u, neg, pos = out.chunk(3)
                guided = u + guidance_scale * (pos - u) - negative_scale * (neg - u)
            else:
                neg, pos = out.chunk(2)
                guided = neg + guidance_scale * (pos - neg)
            x = sched.step(guided, t, x, **kwargs).prev_sample
            if keep is not None:
                if i + 1 < len(timesteps):
                    known = sched.add_noise(init_latents, noise, timesteps[i + 1: i + 2].repeat(n))
                else:
                    known = init_latents
                x = known * keep + x * (1.0 - keep)
            if callback is not None:
                callback(i, t, x)

        if output_type == "latent":
            return x
        images = self.decode_latents(x)
        if output_type == "pt":
            return images
        if output_type != "pil":
            raise ValueError(f"output_type must be 'pil', 'latent' or 'pt', not {output_type!r}")
        pils = tensor_to_pil(images)
        for img, s in zip(pils, seeds):
            img.info["seed"] = str(s)
        return pils

    def _images_tensor(self, init_image, n: int, width: int, height: int) -> torch.Tensor:
        if isinstance(init_image, torch.Tensor):
            images = init_image if init_image.dim() == 4 else init_image.unsqueeze(0)
            if images.shape[-2:] != (height, width):
                images = torch.nn.functional.interpolate(images.float(), size=(height, width), mode="bicubic", align_corners=False)
        else:
            items = _as_list(init_image if isinstance(init_image, (list, tuple)) else [init_image], n, "init_image")
            images = torch.cat([pil_to_tensor(im, width, height) for im in items])
        if images.shape[0] == 1 and n > 1:
            images = images.repeat(n, 1, 1, 1)
        return images.float()

    def _mask_tensor(self, mask, n: int, h: int, w: int) -> torch.Tensor:
        import numpy as np

        if isinstance(mask, torch.Tensor):
            m = mask.float()
            m = m if m.dim() == 4 else m.reshape(1, 1, *m.shape[-2:])
        else:
            items = _as_list(mask if isinstance(mask, (list, tuple)) else [mask], n, "mask")
            m = torch.cat([torch.from_numpy(np.asarray(im.convert("L"), dtype=np.float32) / 255.0)[None, None] for im in items])
        m = torch.nn.functional.interpolate(m, size=(h, w), mode="nearest")
        if m.shape[0] == 1 and n > 1:
            m = m.repeat(n, 1, 1, 1)
        return m.to(self.device)


class SDSampler(LatentDiffusionSampler):
    """SD1.x/2.x: one CLIP text encoder, `encoder_hidden_states` conditioning.

    max_token_length: 75/150/225 (gen_img: 75 x --max_embeddings_multiples); prompts use as
    many 75-token windows as the longest prompt of a batch needs, up to that. Prompt
    weighting is on unless `weighted=False`; `emb_normalize_mode` as gen_img's option
    ("none" for training previews).
    """

    def __init__(
        self,
        arch,
        text_encoder,
        vae,
        unet,
        tokenizer,
        *,
        clip_skip: Optional[int] = None,
        max_token_length: Optional[int] = 225,
        emb_normalize_mode: str = "none",
        weighted: bool = True,
        device=None,
        vae_batch_size: Optional[int] = None,
    ):
        super().__init__(unet, vae, device=device, vae_batch_size=vae_batch_size)
        self.arch = arch
        self.text_encoder = text_encoder
        self.tokenizer = tokenizer
        self.clip_skip = clip_skip
        self.max_token_length = max_token_length or CHUNK
        self.emb_normalize_mode = emb_normalize_mode
        self.weighted = weighted
        self.latent_channels = getattr(arch, "latent_channels", 4)
        self.vae_scale_factor = getattr(arch, "vae_downscale", 8)
        self.latent_scale = arch.latent_scale

    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """Prompts -> (B, n*75+2, width) context on the sampler's device, in the U-Net dtype."""
        tokens = tokenize_weighted(
            self.tokenizer, prompts, self.max_token_length, fit_to_longest=True, warn_truncation=True, parse=self.weighted
        )
        ids, weights = tokens.input_ids, tokens.weights
        te_device = next(self.text_encoder.parameters()).device
        hidden = self.arch.encode_tokens(self.text_encoder, ids.to(te_device), self.tokenizer, clip_skip=self.clip_skip)
        if not bool((weights == 1.0).all()):
            hidden = apply_token_weights(hidden, weights, self.emb_normalize_mode)
        return hidden.to(self.device, next(self.unet.parameters()).dtype)

    def encode_conditioning(self, prompts, width, height, extra):
        return {"encoder_hidden_states": self.encode_text(prompts)}

    def predict(self, x, t, cond):
        dtype = next(self.unet.parameters()).dtype
        return self.unet(x.to(dtype), t, encoder_hidden_states=cond["encoder_hidden_states"]).sample


def create_sampler(arch, text_encoders, vae, unet, tokenizers, **options) -> LatentDiffusionSampler:
    """The sampler for an architecture object: `arch.image_sampler_class` when it has one
    (SDXL, ...), `SDSampler` otherwise. text_encoders / tokenizers: a model or a list."""
    cls = getattr(arch, "image_sampler_class", None) or SDSampler
    te = text_encoders if isinstance(text_encoders, (list, tuple)) else [text_encoders]
    tok = tokenizers if isinstance(tokenizers, (list, tuple)) else [tokenizers]
    if cls is SDSampler:
        return SDSampler(arch, te[0], vae, unet, tok[0], **options)
    return cls(arch, te, vae, unet, tok, **options)


def generate_from_spec(sampler: LatentDiffusionSampler, spec, *, v_parameterization: bool = False, zero_terminal_snr: bool = False, eta: float = 0.0, **kwargs):
    """One training-preview image from a resolved PromptSpec (see `resolve_sample_spec`).

    Returns (PIL image, seed used).
    """
    seed = spec.seed if spec.seed is not None else random_seed()
    scheduler = samplers_mod.get_scheduler(spec.sample_sampler or "ddim", v_parameterization, zero_terminal_snr)
    extra = {k: getattr(spec, k) for k in ("original_width", "original_height", "crop_top", "crop_left") if getattr(spec, k) is not None}
    images = sampler.generate(
        spec.prompt, spec.negative_prompt, width=spec.width or 512, height=spec.height or 512,
        steps=spec.sample_steps or 30, guidance_scale=7.5 if spec.scale is None else spec.scale,
        scheduler=scheduler, seed=seed, eta=eta, extra=extra, **kwargs,
    )
    return images[0], seed
