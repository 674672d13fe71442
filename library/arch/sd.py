"""The SD1.x/2.x architecture: everything about it that trainers and tools must not branch on.

A trainer asks this object how to load the models, tokenize and encode captions, scale
latents and describe the result (metadata); SDXL/FLUX/SD3 provide the same methods.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from library.models.sd.config import SD_LATENT_SCALE

logger = logging.getLogger(__name__)

CHUNK = 75  # content tokens per CLIP window (77 minus BOS and EOS)


@dataclass
class SDArchitecture:
    v2: bool = False
    v_parameterization: bool = False

    name = "sd"
    latent_scale = SD_LATENT_SCALE
    latent_channels = 4
    vae_downscale = 8

    @classmethod
    def from_args(cls, args) -> "SDArchitecture":
        return cls(bool(getattr(args, "v2", False)), bool(getattr(args, "v_parameterization", False)))

    # ------------------------------------------------------------------ models
    def load_models(self, args, dtype=None, vae_dtype=None):
        """Text encoder, VAE and U-Net from --pretrained_model_name_or_path (and --vae)."""
        from library.errors import UserInputError
        from library.models.sd.loading import load_sd_models

        path = getattr(args, "pretrained_model_name_or_path", None)
        if not path:
            raise UserInputError("--pretrained_model_name_or_path is required (a .safetensors/.ckpt file or a diffusers folder)")
        models = load_sd_models(
            path, v2=self.v2 if getattr(args, "v2", False) else None, v_parameterization=self.v_parameterization,
            vae_path=getattr(args, "vae", None), dtype=dtype,
            mmap=not getattr(args, "disable_mmap_load_safetensors", False), vae_dtype=vae_dtype,
        )
        self.v2 = models.v2
        return models

    def load_tokenizers(self, args) -> list:
        from library.tokenizers import load_sd_tokenizer

        return [load_sd_tokenizer(self.v2, getattr(args, "tokenizer_cache_dir", None))]

    @staticmethod
    def text_encoders(models) -> list:
        """The loaded models' text encoders, in the order of `load_tokenizers` and the LoRA
        prefixes (one: `lora_te`; several: `lora_te1`, `lora_te2`, ...)."""
        return [models.text_encoder]

    def check_model_path(self, path: str) -> None:
        """Refuse, before anything loads, a single file that belongs to another architecture."""
        from library.errors import UserInputError
        from library.io.safetensors_io import is_safetensors_path, read_header
        from library.models.sdxl.config import detect_family

        import os

        if not (os.path.isfile(path) and is_safetensors_path(path)):
            return
        family = detect_family(read_header(path).shapes())
        scripts = {"sdxl": "sdxl_train_network.py / sdxl_train.py", "flux": "the flux_* scripts", "sd3": "the sd3_* scripts"}
        if family in scripts:
            raise UserInputError(f"--pretrained_model_name_or_path {path}: this is an {family.upper()} checkpoint, not "
                                 f"SD1.x/2.x; use {scripts[family]}")

    # ------------------------------------------------------------------ conditioning of a training batch
    supports_text_encoder_caching = False
    bucket_reso_multiple = None  # bucket sides must be multiples of this (None: any); not a dataclass field

    def tokenize_captions(self, tokenizers: list, captions: list[str], max_token_length: int | None = None):
        """Token ids the dataset puts in `batch["input_ids"]`."""
        return self.tokenize(tokenizers[0], captions, max_token_length)

    def encode_batch(self, text_encoders: list, tokenizers: list, batch: dict, args, device):
        """The U-Net's text conditioning for a training batch: from `batch["input_ids"]`, or
        from the captions themselves with `--weighted_captions` ((word:1.2) syntax)."""
        clip_skip = getattr(args, "clip_skip", None)
        if getattr(args, "weighted_captions", False):
            from library.inference.prompt_weighting import encode_weighted

            return encode_weighted(self, text_encoders[0], tokenizers[0], batch["captions"],
                                   getattr(args, "max_token_length", None), clip_skip)
        return self.encode_tokens(text_encoders[0], batch["input_ids"].to(device), tokenizers[0], clip_skip)

    def text_encoder_cache_strategy(self, args, text_encoders=None, tokenizers=None, device=None):
        from library.errors import UserInputError

        raise UserInputError("--cache_text_encoder_outputs: text-encoder outputs of SD1.x/2.x models are not cached")

    # ------------------------------------------------------------------ text
    @staticmethod
    def token_length(max_token_length: int | None) -> int:
        """Tokens per caption: n * 75 + 2 with n = 1, 2 or 3 (`--max_token_length` 75/150/225)."""
        return (max_token_length or CHUNK) + 2

    def tokenize(self, tokenizer, captions: list[str], max_token_length: int | None = None):
        """(B, n*75+2) token ids, padded the tokenizer's way."""
        enc = tokenizer(captions, padding="max_length", truncation=True, max_length=self.token_length(max_token_length), return_tensors="pt")
        return enc.input_ids

    @staticmethod
    def split_into_windows(input_ids, tokenizer):
        """(B, n*75+2) -> (B*n, 77): each 75-token window wrapped in BOS ... EOS.

        The end token of a window is the sequence's own last token (EOS, or PAD for
        tokenizers that pad with another token), turned into EOS when the window ends
        in content; a window that starts with padding gets EOS as its first token.
        """
        import torch

        bos, eos, pad = tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id
        b, length = input_ids.shape
        n = (length - 2) // CHUNK
        if n == 1:
            return input_ids
        windows = []
        for i in range(n):
            body = input_ids[:, 1 + i * CHUNK: 1 + (i + 1) * CHUNK]
            w = torch.cat([input_ids[:, :1], body, input_ids[:, -1:]], dim=1).clone()
            w[:, 0] = bos
            ends_in_content = (body[:, -1] != eos) & (body[:, -1] != pad)
            w[ends_in_content, -1] = eos
            w[body[:, 0] == pad, 1] = eos
            windows.append(w)
        return torch.stack(windows, dim=1).reshape(b * n, CHUNK + 2)

    def encode_tokens(self, text_encoder, input_ids, tokenizer, clip_skip: int | None = None):
        """Context for the U-Net: (B, n*75+2, width).

        `clip_skip` k takes hidden_states[-k] and applies the final layer norm (k = 1 or
        None is the ordinary last hidden state). Long captions are encoded window by
        window and re-joined: BOS state of the first window, the 75 content states of
        every window, the last state of the last window.
        """
        import torch

        b, length = input_ids.shape
        n = (length - 2) // CHUNK
        windows = self.split_into_windows(input_ids, tokenizer).to(text_encoder.device)
        if clip_skip is None or clip_skip <= 1:
            states = text_encoder(windows).last_hidden_state
        else:
            hidden = text_encoder(windows, output_hidden_states=True).hidden_states[-clip_skip]
            final_norm = getattr(text_encoder, "final_layer_norm", None) or text_encoder.text_model.final_layer_norm
            states = final_norm(hidden)
        if n == 1:
            return states
        states = states.reshape(b, n, CHUNK + 2, states.shape[-1])
        parts = [states[:, 0, :1]] + [states[:, i, 1:-1] for i in range(n)] + [states[:, -1, -1:]]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ training step
    fixed_timestep: int | None = None  # set by validation: every sample uses this timestep

    def prepare_training(self, args, device) -> None:
        """Noise schedule tables and noise/loss settings for the DDPM training step."""
        from library.training.losses import LossConfig
        from library.training.noise import DDPMTables, NoiseConfig

        self.noise_cfg = NoiseConfig.from_args(args)
        self.loss_cfg = LossConfig.from_args(args)
        self.tables = DDPMTables.create(zero_terminal_snr=bool(getattr(args, "zero_terminal_snr", False))).to(device)

    def noise_and_target(self, latents, generator=None):
        """(noisy latents, target, timesteps, extras) for scaled latents x0 (training-math §2)."""
        import torch

        from library.training.noise import prepare_ddpm_step

        timesteps = None
        if self.fixed_timestep is not None:
            timesteps = torch.full((latents.shape[0],), int(self.fixed_timestep), device=latents.device, dtype=torch.long)
        step = prepare_ddpm_step(latents, self.noise_cfg, self.tables, generator=generator, timesteps=timesteps)
        return step.noisy_latents, step.target, step.timesteps, {}

    @staticmethod
    def call_denoiser(unet, noisy, timesteps, context, batch):
        return unet(noisy, timesteps, context).sample

    def loss(self, pred, target, timesteps, sample_weights, mask, extras):
        """Per-sample loss (B,) with masks, prior-loss weights and SNR weighting applied."""
        from library.training.losses import ddpm_loss

        return ddpm_loss(pred, target, timesteps, self.loss_cfg, self.tables, self.v_parameterization,
                         mask=mask, sample_weights=sample_weights)

    def modelspec_kwargs(self) -> dict:
        return {}

    # ------------------------------------------------------------------ metadata
    @property
    def base_model_version(self) -> str:
        """`ss_base_model_version`: sd_v1, sd_v2, sd_v1_v, sd_v2_v."""
        return f"sd_{'v2' if self.v2 else 'v1'}{'_v' if self.v_parameterization else ''}"

    def default_resolution(self) -> tuple[int, int]:
        return (768, 768) if self.v2 and self.v_parameterization else (512, 512)
