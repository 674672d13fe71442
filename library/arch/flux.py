"""The FLUX.1 architecture: four model files, CLIP-L + T5-XXL conditioning, packed latents,
rectified-flow training (training-math.md §3).

What the trainer asks of it (the same methods as library/arch/sd.py):

* models: `load_models` reads `--pretrained_model_name_or_path` (the transformer), `--ae`,
  `--clip_l`, `--t5xxl`; `--fp8_base` keeps the transformer's (and, without
  `--fp8_base_unet`, the text encoders') Linear weights in float8_e4m3fn, converted tensor
  by tensor while loading; `text_encoders(models)` = [CLIP-L, T5-XXL] (LoRA prefixes
  `lora_te1`, `lora_te3`).
* text: `tokenize_captions` -> {"clip": (B, 77), "t5": (B, L), "t5_mask": (B, L)} with L =
  `--t5xxl_max_token_length` (default 512 dev, 256 schnell); `encode_batch` -> a
  `FluxCondition` (CLIP-L pooled, T5 states, txt ids, T5 mask) from tokens, weighted
  captions (T5 states scaled per token) or the text-encoder cache (`_flux_te.npz`).
* latents: the cache and the live path both hold model latents `0.3611 (z - 0.1159)`
  (`encode_latents_for_cache`), so `latent_scale` is 1.
* one training step: `noise_and_target` draws σ by `--timestep_sampling` (flow_matching.py),
  `x_σ = (1 - σ) x0 + σ ε` and `target = ε - x0`; `call_denoiser` packs x_σ into 2x2
  patches, runs the transformer with guidance `--guidance_scale` (dev), unpacks and applies
  `--model_prediction_type`; `loss` weights by `--weighting_scheme` for sigma_scaled.
* previews: `generate_preview` (Euler flow sampler of library/inference/flux_sampling.py).
* metadata: `ss_base_model_version` flux1, the FLUX `ss_*` keys, modelspec flux-1-dev/schnell.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from library.data.text_encoder_cache import TextEncoderCacheStrategy
from library.errors import UserInputError

logger = logging.getLogger(__name__)

PREDICTION_TYPES = ("raw", "additive", "sigma_scaled")


@dataclass
class FluxModels:
    unet: Any  # the FLUX transformer (the trainer's denoiser)
    vae: Any  # the 16-channel autoencoder
    clip_l: Any
    t5: Any

    @property
    def text_encoder(self):
        return self.clip_l


def _condition_class():
    """FluxCondition (library/inference/flux_sampling.py) with the tensor-like `.to(dtype)` /
    `.to(device)` the trainer uses and row selection (differential output preservation)."""
    global _FluxTrainCondition
    if _FluxTrainCondition is None:
        import dataclasses

        import torch

        from library.inference.flux_sampling import FluxCondition

        class FluxTrainCondition(FluxCondition):
            def to(self, *args, **kwargs):
                device, dtype = kwargs.get("device"), kwargs.get("dtype")
                for a in args:
                    if isinstance(a, torch.dtype):
                        dtype = a
                    else:
                        device = a
                return FluxTrainCondition(**vars(FluxCondition.to(self, device=device, dtype=dtype)))

            def select(self, index):
                return FluxTrainCondition(**{f.name: None if getattr(self, f.name) is None else getattr(self, f.name)[index]
                                             for f in dataclasses.fields(self)})

        _FluxTrainCondition = FluxTrainCondition
    return _FluxTrainCondition


_FluxTrainCondition = None


class FluxTextEncoderCacheStrategy(TextEncoderCacheStrategy):
    """`_flux_te.npz`: l_pooled (768), t5_out (L, 4096), txt_ids (L, 3), t5_attn_mask (L,),
    and the flag apply_t5_attn_mask, compared on load (formats.md §d.2)."""

    suffix = "_flux_te.npz"
    npz_keys = ("l_pooled", "t5_out", "txt_ids", "t5_attn_mask")

    def __init__(self, arch: "FluxArchitecture", clip_l, t5, tokenizers, device):
        self.arch, self.clip_l, self.t5, self.tokenizers, self.device = arch, clip_l, t5, tokenizers, device

    def tokenize(self, captions):
        return self.arch.tokenize_captions(self.tokenizers, list(captions))

    def encode(self, tokens, captions):
        import torch

        with torch.no_grad():
            cond = self.arch.encode_tokens([self.clip_l, self.t5], tokens, self.device)
        return {"l_pooled": cond.l_pooled, "t5_out": cond.t5_out, "txt_ids": cond.txt_ids,
                "t5_attn_mask": tokens["t5_mask"].to(torch.int32)}

    def flags(self):
        return {"apply_t5_attn_mask": bool(self.arch.apply_t5_attn_mask)}


@dataclass
class FluxArchitecture:
    model_type: str = "flux"
    apply_t5_attn_mask: bool = False
    t5xxl_max_token_length: Optional[int] = None  # None: by variant once known
    guidance_scale: float = 3.5
    model_prediction_type: str = "sigma_scaled"
    fm_cfg: Any = None  # FlowMatchConfig
    config: Any = None  # FluxConfig, read from the checkpoint header by check_model_path
    train_clip_l: bool = False  # CLIP-L LoRA trained: encoded live even when outputs are cached
    train_t5xxl: bool = False
    fixed_timestep: Optional[float] = None  # validation: every sample at this timestep (sigma = t / 1000)
    sample_conditions: dict = field(default_factory=dict)  # prompt -> FluxCondition (CPU) for previews

    name = "flux"
    latent_scale = 1.0  # latents are stored scaled (see encode_latents_for_cache)
    latent_channels = 16
    vae_downscale = 8
    v2 = False
    v_parameterization = False
    supports_text_encoder_caching = True
    bucket_reso_multiple = 32

    @classmethod
    def from_args(cls, args) -> "FluxArchitecture":
        from library.training.flow_matching import FlowMatchConfig

        g = lambda n, d=None: getattr(args, n, d) if getattr(args, n, None) is not None else d  # noqa: E731
        model_type = g("model_type", "flux")
        if model_type == "chroma":
            raise UserInputError("--model_type chroma: Chroma models are not supported by this implementation yet "
                                 "(FLUX.1 dev/schnell are)")
        if model_type != "flux":
            raise UserInputError(f"--model_type {model_type!r}: expected flux or chroma")
        pt = g("model_prediction_type", "sigma_scaled")
        if pt not in PREDICTION_TYPES:
            raise UserInputError(f"--model_prediction_type {pt!r} is not one of {', '.join(PREDICTION_TYPES)}")
        t5_len = g("t5xxl_max_token_length")
        if t5_len is not None and int(t5_len) <= 0:
            raise UserInputError(f"--t5xxl_max_token_length must be positive, got {t5_len}")
        return cls(
            model_type=model_type, apply_t5_attn_mask=bool(g("apply_t5_attn_mask", False)),
            t5xxl_max_token_length=None if t5_len is None else int(t5_len),
            guidance_scale=float(g("guidance_scale", 3.5)), model_prediction_type=pt,
            fm_cfg=FlowMatchConfig.from_args(args),
        )

    # ------------------------------------------------------------------ models
    def check_model_path(self, path: str) -> None:
        """The transformer's config from the file header (a clear error for other files)."""
        from library.models.flux.loading import analyze_checkpoint

        self.config = analyze_checkpoint(path, "--pretrained_model_name_or_path")

    @staticmethod
    def check_model_files(args) -> None:
        for opt in ("ae", "clip_l", "t5xxl"):
            path = getattr(args, opt, None)
            if not path:
                raise UserInputError(f"--{opt} is required for FLUX.1 training (the "
                                     f"{ {'ae': 'autoencoder ae.safetensors', 'clip_l': 'CLIP-L text encoder', 't5xxl': 'T5-XXL text encoder'}[opt] } file)")
            if not os.path.exists(path):
                raise UserInputError(f"--{opt} {path}: file not found")

    @property
    def is_schnell(self) -> bool:
        return bool(self.config is not None and self.config.is_schnell)

    @property
    def t5_max_length(self) -> int:
        from library.models.flux.text_encoders import default_t5_max_length

        if self.t5xxl_max_token_length is not None:
            return self.t5xxl_max_token_length
        return default_t5_max_length(self.is_schnell)

    def load_models(self, args, dtype=None, vae_dtype=None) -> FluxModels:
        """Transformer, AE, CLIP-L and T5-XXL; with --fp8_base Linear weights stored in fp8."""
        import torch

        from library.models.flux.loading import load_ae, load_flux_transformer
        from library.models.flux.text_encoders import load_clip_l, load_t5xxl

        fp8 = bool(getattr(args, "fp8_base", False) or getattr(args, "fp8_base_unet", False))
        te_fp8 = bool(getattr(args, "fp8_base", False)) and not bool(getattr(args, "fp8_base_unet", False))
        flux = load_flux_transformer(args.pretrained_model_name_or_path, dtype=dtype, fp8_base=fp8,
                                     what="--pretrained_model_name_or_path")
        self.config = flux.config
        ae = load_ae(args.ae, dtype=vae_dtype if vae_dtype is not None else dtype)
        te_dtype = torch.float8_e4m3fn if te_fp8 else dtype
        clip_l = load_clip_l(args.clip_l, dtype=te_dtype)
        t5 = load_t5xxl(args.t5xxl, dtype=te_dtype)
        if te_fp8 and dtype is not None and dtype != torch.bfloat16:
            # the loaders compute fp8-stored encoders in bf16; follow the training dtype instead
            for te in (clip_l, t5):
                for p in te.parameters():
                    if p.is_floating_point() and p.dtype not in (torch.float8_e4m3fn,):
                        p.data = p.data.to(dtype)
        self.loaded_models = FluxModels(flux, ae, clip_l, t5)
        return self.loaded_models

    @staticmethod
    def text_encoders(models) -> list:
        return [models.clip_l, models.t5]

    def load_vae(self, args, dtype=None):
        from library.models.flux.loading import load_ae

        return load_ae(getattr(args, "ae", None), dtype=dtype)

    def load_tokenizers(self, args) -> list:
        from library.tokenizers import load_flux_tokenizers

        return list(load_flux_tokenizers(getattr(args, "tokenizer_cache_dir", None)))

    # ------------------------------------------------------------------ latents
    @property
    def latent_cache_format(self):
        from library.data.latent_cache import LATENT_FORMATS

        return LATENT_FORMATS["flux"]

    @staticmethod
    def encode_latents_for_cache(vae, images, generator=None):
        """Model latents 0.3611 (z - 0.1159) of images in [-1, 1] (what `_flux.npz` stores; the
        trainer encodes live batches the same way, and latent_scale is 1)."""
        from library.models.flux.packing import scale_latents

        return scale_latents(vae.encode(images).latent_dist.sample(generator=generator).float())

    # ------------------------------------------------------------------ text
    def tokenize_captions(self, tokenizers, captions, max_token_length=None) -> dict:
        """{"clip": (B, 77), "t5": (B, L), "t5_mask": (B, L)}; `max_token_length` (the SD
        option) does not apply to FLUX."""
        from library.models.flux.text_encoders import tokenize

        clip, t5, mask = tokenize(tokenizers[0], tokenizers[1], list(captions), self.t5_max_length)
        return {"clip": clip, "t5": t5, "t5_mask": mask}

    def tokenize_weighted(self, tokenizers, captions) -> dict:
        """As tokenize_captions, plus "t5_weights" (B, L) from the (word:1.2) / [word] syntax;
        CLIP-L (whose pooled vector cannot carry per-token weights) reads the plain text."""
        import torch

        from library.inference.prompt_weighting import parse_prompt_attention
        from library.models.flux.text_encoders import CLIP_MAX_LENGTH

        tok_l, tok_t5 = tokenizers
        length = self.t5_max_length
        plain, ids, weights, masks = [], [], [], []
        for caption in captions:
            pieces = parse_prompt_attention(caption)
            plain.append("".join(t for t, _ in pieces))
            texts = [t for t, _ in pieces]
            encoded = tok_t5(texts, add_special_tokens=False).input_ids if any(texts) else [[] for _ in texts]
            row, w = [], []
            for (_, weight), toks in zip(pieces, encoded):
                row.extend(toks)
                w.extend([weight] * len(toks))
            row, w = row[: length - 1] + [tok_t5.eos_token_id], w[: length - 1] + [1.0]
            pad = length - len(row)
            masks.append([1] * len(row) + [0] * pad)
            ids.append(row + [tok_t5.pad_token_id] * pad)
            weights.append(w + [1.0] * pad)
        clip = tok_l(plain, max_length=CLIP_MAX_LENGTH, padding="max_length", truncation=True,
                     return_tensors="pt").input_ids
        t5 = torch.tensor(ids, dtype=torch.long)
        mask = torch.tensor(masks, dtype=torch.long)
        return {"clip": clip, "t5": t5, "t5_mask": mask, "t5_weights": torch.tensor(weights)}

    def encode_tokens(self, text_encoders, tokens: dict, device):
        """FluxCondition from token ids (either encoder may be None: its part stays None)."""
        import torch

        FluxCondition = _condition_class()
        clip_l, t5 = text_encoders
        l_pooled = t5_out = None
        if clip_l is not None:
            l_pooled = clip_l(tokens["clip"].to(device)).pooler_output
        mask = tokens["t5_mask"].to(device)
        if t5 is not None:
            t5_out = t5(input_ids=tokens["t5"].to(device),
                        attention_mask=mask if self.apply_t5_attn_mask else None).last_hidden_state
            if "t5_weights" in tokens:
                from library.inference.prompt_weighting import apply_token_weights

                t5_out = apply_token_weights(t5_out, tokens["t5_weights"].to(device))
        n = mask.shape[0]
        txt_ids = torch.zeros(n, mask.shape[1], 3, device=device)
        return FluxCondition(l_pooled, t5_out, txt_ids, mask)

    def encode_batch(self, text_encoders, tokenizers, batch: dict, args, device):
        """The training batch's FluxCondition: cached outputs (CLIP-L re-encoded live when its
        LoRA is trained), weighted captions, or token ids."""
        import torch

        FluxCondition = _condition_class()
        cached = batch.get("text_encoder_outputs")
        if cached is not None:
            cond = FluxCondition(cached["l_pooled"].to(device), cached["t5_out"].to(device),
                                 cached["txt_ids"].to(device), cached["t5_attn_mask"].to(device))
            if self.train_clip_l and text_encoders[0] is not None:
                tokens = self.tokenize_captions(tokenizers, batch["captions"])
                cond.l_pooled = text_encoders[0](tokens["clip"].to(device)).pooler_output
            return cond
        if getattr(args, "weighted_captions", False):
            tokens = self.tokenize_weighted(tokenizers, batch["captions"])
        else:
            tokens = batch.get("input_ids")
            if tokens is None:
                tokens = self.tokenize_captions(tokenizers, batch["captions"])
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_t5xxl):
            t5_part = self.encode_tokens([None, text_encoders[1]], tokens, device)
        with torch.set_grad_enabled(torch.is_grad_enabled() and self.train_clip_l):
            l_pooled = text_encoders[0](tokens["clip"].to(device)).pooler_output
        t5_part.l_pooled = l_pooled
        return t5_part

    def text_encoder_cache_strategy(self, args, text_encoders=None, tokenizers=None, device=None):
        """The `_flux_te.npz` strategy; without models given (tools/cache_text_encoder_outputs.py)
        the text encoders are loaded here."""
        import torch

        if text_encoders is None:
            from library.models.flux.text_encoders import load_clip_l, load_t5xxl

            self.check_model_files_te(args)
            if getattr(args, "pretrained_model_name_or_path", None) and self.config is None:
                self.check_model_path(args.pretrained_model_name_or_path)
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            dtype = getattr(args, "t5xxl_dtype", None)
            text_encoders = [load_clip_l(args.clip_l, device=device), load_t5xxl(args.t5xxl, dtype=dtype, device=device)]
        if tokenizers is None:
            tokenizers = self.load_tokenizers(args)
        return FluxTextEncoderCacheStrategy(self, text_encoders[0], text_encoders[1], tokenizers, device or "cpu")

    @staticmethod
    def check_model_files_te(args) -> None:
        for opt in ("clip_l", "t5xxl"):
            path = getattr(args, opt, None)
            if not path or not os.path.exists(path):
                raise UserInputError(f"--{opt} {path or ''}: the file is required to cache FLUX text-encoder outputs")

    # ------------------------------------------------------------------ training step
    def prepare_training(self, args, device) -> None:
        from library.training.losses import LossConfig

        self.loss_cfg = LossConfig.from_args(args)
        self.loss_cfg.check_schedule_support(has_alphas_cumprod=False)
        self.ip_noise_gamma = getattr(args, "ip_noise_gamma", None)
        self.ip_noise_gamma_random_strength = bool(getattr(args, "ip_noise_gamma_random_strength", False))

    def sample_sigmas(self, batch_size: int, image_seq_len: int, device, generator=None):
        """(σ, t) per sample by --timestep_sampling (t = 1000 σ); a validation timestep fixes σ."""
        import torch

        from library.training.flow_matching import sample_flux_sigmas

        if self.fixed_timestep is not None:
            sig = torch.full((batch_size,), float(self.fixed_timestep) / 1000.0, device=device)
            return sig, sig * 1000.0
        sig, t = sample_flux_sigmas(self.fm_cfg, batch_size, image_seq_len, generator=generator, device=device)
        return sig, t

    def noise_and_target(self, latents, generator=None):
        """(x_σ, target ε - x0, t = 1000 σ, {"sigmas": σ}) for model latents x0 (B, 16, H, W)."""
        import torch

        b, _, h, w = latents.shape
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=torch.float32)
        sigmas, timesteps = self.sample_sigmas(b, (h // 2) * (w // 2), latents.device, generator)
        noise_in = noise
        gamma = self.ip_noise_gamma
        if gamma:
            if self.ip_noise_gamma_random_strength:
                gamma = torch.rand(1, device=latents.device, generator=generator).item() * gamma
            noise_in = noise + gamma * torch.randn(latents.shape, generator=generator, device=latents.device)
        from library.training.flow_matching import noisy_input

        x0 = latents.float()
        noisy = noisy_input(x0, noise_in, sigmas)
        return noisy, noise - x0, timesteps, {"sigmas": sigmas}

    def call_denoiser(self, flux, noisy, timesteps, cond, batch):
        """Prediction for the loss: the transformer's output on packed x_σ, unpacked, then
        --model_prediction_type (raw: o; additive: o + x_σ; sigma_scaled: x_σ - σ o)."""
        import torch

        from library.models.flux.packing import pack_latents, prepare_img_ids, unpack_latents

        b, _, h, w = noisy.shape
        dtype = noisy.dtype
        img = pack_latents(noisy)
        img_ids = prepare_img_ids(b, h // 2, w // 2, device=noisy.device)
        sigmas = (timesteps.float() / 1000.0).to(noisy.device)
        guidance = None
        if not flux.is_schnell:
            guidance = torch.full((b,), float(self.guidance_scale), device=noisy.device, dtype=dtype)
        mask = cond.t5_attn_mask.to(noisy.device) if (self.apply_t5_attn_mask and cond.t5_attn_mask is not None) else None
        out = flux(img=img, img_ids=img_ids, txt=cond.t5_out.to(dtype), txt_ids=cond.txt_ids.to(noisy.device),
                   timesteps=sigmas.to(dtype), y=cond.l_pooled.to(dtype), guidance=guidance, txt_attention_mask=mask)
        out = unpack_latents(out, h, w)
        return self.apply_prediction_type(out, noisy, sigmas)

    def apply_prediction_type(self, out, noisy, sigmas):
        if self.model_prediction_type == "raw":
            return out
        if self.model_prediction_type == "additive":
            return out + noisy
        s = sigmas.to(out.dtype).reshape(-1, 1, 1, 1)
        return noisy - s * out

    def loss(self, pred, target, timesteps, sample_weights, mask, extras):
        """Per-sample loss (B,); --weighting_scheme weights only with sigma_scaled (§5.2)."""
        from library.training.flow_matching import loss_weighting
        from library.training.losses import per_sample_loss

        weighting = None
        if self.model_prediction_type == "sigma_scaled":
            weighting = loss_weighting(self.fm_cfg.weighting_scheme, extras["sigmas"])
        return per_sample_loss(pred, target, self.loss_cfg, timesteps, weighting=weighting, mask=mask,
                               sample_weights=sample_weights)

    # ------------------------------------------------------------------ previews
    def encode_prompts(self, text_encoders, tokenizers, prompts, device):
        """FluxCondition for preview prompts, from the live encoders."""
        import torch

        with torch.no_grad():
            return self.encode_tokens(text_encoders, self.tokenize_captions(tokenizers, prompts), device)

    def precompute_sample_conditions(self, specs, text_encoders, tokenizers, device) -> None:
        """Encode every preview prompt (and negative prompt) once, kept on the CPU, so the text
        encoders are not needed again after text-encoder outputs were cached."""
        texts = []
        for s in specs:
            texts += [s.prompt] + ([s.negative_prompt] if s.negative_prompt else [])
        for t in dict.fromkeys(texts):
            if t not in self.sample_conditions:
                self.sample_conditions[t] = self.encode_prompts(text_encoders, tokenizers, [t], device).to("cpu")

    def generate_preview(self, flux, ae, text_encoders, tokenizers, spec, device, dtype, seed: int):
        """One preview image (PIL) for a resolved PromptSpec (sizes multiples of 16)."""
        import torch

        from library.inference.flux_sampling import decode_latents, denoise, flux_schedule, to_pil_images
        from library.models.flux.packing import prepare_img_ids

        def cond_for(text):
            c = self.sample_conditions.get(text)
            if c is None:
                c = self.encode_prompts(text_encoders, tokenizers, [text], device)
            return c.to(device=device, dtype=dtype)

        h, w = spec.height // 16, spec.width // 16
        noise = torch.randn(1, h * w, 64, generator=torch.Generator("cpu").manual_seed(seed)).to(device, dtype)
        img_ids = prepare_img_ids(1, h, w, device=device)
        cond = cond_for(spec.prompt)
        if not self.apply_t5_attn_mask:
            cond.t5_attn_mask = None
        neg = None
        scale = spec.scale if spec.scale is not None else 1.0
        if scale != 1.0:
            neg = cond_for(spec.negative_prompt or "")
            if not self.apply_t5_attn_mask:
                neg.t5_attn_mask = None
        taus = flux_schedule(spec.sample_steps, h * w, shift=True)  # training previews always shift (§3.4)
        guidance = spec.guidance_scale if spec.guidance_scale is not None else 3.5
        x = denoise(flux, noise, img_ids, cond, taus, guidance=guidance, cfg_scale=scale, neg_cond=neg, progress=False)
        image = decode_latents(ae, x, h * 2, w * 2)
        return to_pil_images(image)[0]

    # ------------------------------------------------------------------ metadata
    def modelspec_kwargs(self) -> dict:
        return {"flux": "schnell" if self.is_schnell else ("dev" if self.config is not None else "")}

    @property
    def base_model_version(self) -> str:
        return "flux1"

    def default_resolution(self) -> tuple[int, int]:
        return (1024, 1024)

    def training_metadata(self, args) -> dict:
        """The FLUX `ss_*` keys of flux_train_network (formats.md §b.2)."""
        g = lambda n, d=None: getattr(args, n, d)  # noqa: E731
        return {
            "ss_model_type": self.model_type, "ss_apply_t5_attn_mask": self.apply_t5_attn_mask,
            "ss_weighting_scheme": g("weighting_scheme"), "ss_logit_mean": g("logit_mean"),
            "ss_logit_std": g("logit_std"), "ss_mode_scale": g("mode_scale"),
            "ss_guidance_scale": g("guidance_scale"), "ss_timestep_sampling": g("timestep_sampling"),
            "ss_sigmoid_scale": g("sigmoid_scale"), "ss_model_prediction_type": g("model_prediction_type"),
            "ss_discrete_flow_shift": g("discrete_flow_shift"),
        }
