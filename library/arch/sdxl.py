"""The SDXL architecture: two text encoders, pooled text and size/crop conditioning.

Same hooks as SDArchitecture (library/arch/sd.py), which it extends: the DDPM noise,
targets and losses are shared (training-math §2); what differs is here:

* two tokenizers (CLIP ViT-L, OpenCLIP bigG padding with id 0); `tokenize` with both
  returns ids of shape (B, 2, n*75+2);
* `encode_tokens` -> SDXLCondition(context, pooled): context = concat(CLIP-L
  hidden_states[11], bigG hidden_states[-2]) along features, pooled = bigG's final
  (layer-normed) state at the first EOS token through text_projection, taken from the
  first 75-token window of a long caption (§2.6);
* the U-Net's extra vector y = concat(pooled, emb(orig h, w), emb(crop top, left),
  emb(target h, w)) with emb the 256-value cos/sin embedding of §2.7;
* latent scale 0.13025, default resolution 1024, `ss_base_model_version` sdxl_base_v1-0;
* text-encoder output caches (`_te_outputs.npz`: hidden_state1, hidden_state2, pool2;
  formats.md §d.2) through `SDXLTextEncoderCache`, used by the trainer and
  tools/cache_text_encoder_outputs.py;
* `SDXLSampler` (library/inference/sdxl_sampling.py) for previews and gen_img.py.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from library.arch.sd import CHUNK, SDArchitecture
from library.data.text_encoder_cache import TextEncoderCacheStrategy
from library.models.sdxl.config import SDXL_LATENT_SCALE, SIZE_EMBED_DIM

logger = logging.getLogger(__name__)

CLIP_L_LAYER = 11  # hidden_states index of CLIP ViT-L used by SDXL (the 11th of 12 layers)


def size_embedding(values, dim: int = SIZE_EMBED_DIM):
    """(B, k) scalars -> (B, k*dim): per scalar x, [cos(x f_0..), sin(x f_0..)], f_j = 10000^(-j/(dim/2))."""
    import torch

    values = torch.as_tensor(values)
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=values.device) / half)
    args = values.float()[..., None] * freqs  # (B, k, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    return emb.reshape(*values.shape[:-1], values.shape[-1] * dim)


def conditioning_vector(pooled, original_sizes_hw, crop_top_lefts, target_sizes_hw):
    """The U-Net's `y`: (B, pooled + 6*256) from (B, 2) size tensors (training-math §2.7)."""
    import torch

    def as_2d(t):
        t = torch.as_tensor(t, device=pooled.device)
        return t.reshape(1, 2).expand(pooled.shape[0], 2) if t.dim() == 1 else t

    sizes = torch.cat([as_2d(original_sizes_hw), as_2d(crop_top_lefts), as_2d(target_sizes_hw)], dim=1)
    return torch.cat([pooled, size_embedding(sizes).to(pooled.dtype)], dim=1)


@dataclass
class SDXLCondition:
    """What the text encoders give the U-Net: context (B, L, w1+w2) and pooled (B, p).

    `.to()` converts both, so code written for a plain context tensor keeps working.
    """

    context: object
    pooled: object

    def to(self, *args, **kwargs) -> "SDXLCondition":
        return SDXLCondition(self.context.to(*args, **kwargs), self.pooled.to(*args, **kwargs))

    @property
    def shape(self):
        return self.context.shape

    def split(self, width1: int):
        """(hidden_state1, hidden_state2, pool2) as stored in the text-encoder cache (formats.md §d)."""
        return self.context[..., :width1], self.context[..., width1:], self.pooled

    @classmethod
    def from_parts(cls, hidden1, hidden2, pooled) -> "SDXLCondition":
        import torch

        return cls(torch.cat([hidden1, hidden2.to(hidden1.dtype)], dim=-1), pooled)


@dataclass
class SDXLArchitecture(SDArchitecture):
    name = "sdxl"
    latent_scale = SDXL_LATENT_SCALE
    latent_channels = 4
    vae_downscale = 8

    @classmethod
    def from_args(cls, args) -> "SDXLArchitecture":
        from library.errors import UserInputError

        if getattr(args, "v2", False):
            raise UserInputError("--v2 is for SD 2.x models; SDXL scripts do not accept it")
        if getattr(args, "clip_skip", None):
            logger.warning("--clip_skip has no effect on SDXL: the layers each text encoder contributes are fixed")
        return cls(False, bool(getattr(args, "v_parameterization", False)))

    # ------------------------------------------------------------------ models
    def load_models(self, args, dtype=None, vae_dtype=None):
        """SDXLModels (two text encoders, VAE, U-Net) from --pretrained_model_name_or_path and --vae."""
        from library.models.sdxl.loading import load_sdxl_models

        return load_sdxl_models(
            getattr(args, "pretrained_model_name_or_path", None), vae_path=getattr(args, "vae", None), dtype=dtype,
            mmap=not getattr(args, "disable_mmap_load_safetensors", False), vae_dtype=vae_dtype,
        )

    def load_tokenizers(self, args) -> list:
        from library.tokenizers import load_sdxl_tokenizers

        return list(load_sdxl_tokenizers(getattr(args, "tokenizer_cache_dir", None)))

    @staticmethod
    def text_encoders(models) -> list:
        """[CLIP ViT-L, OpenCLIP bigG]: LoRA prefixes lora_te1 / lora_te2."""
        return list(models.text_encoders)

    def check_model_path(self, path: str) -> None:
        """An SD1.x/2.x, FLUX or SD3 file (or diffusers folder) is refused before anything loads."""
        import os

        from library.errors import UserInputError
        from library.io.safetensors_io import is_safetensors_path, read_header
        from library.models.sdxl.config import detect_family

        where = f"--pretrained_model_name_or_path {path}"
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "text_encoder", "config.json")) and not os.path.isdir(
                    os.path.join(path, "text_encoder_2")):
                raise UserInputError(f"{where}: a diffusers folder with one text encoder (SD1.x/2.x), not SDXL; "
                                     "use train_network.py for it")
            return
        if not (os.path.isfile(path) and is_safetensors_path(path)):
            return
        family = detect_family(read_header(path).shapes())
        scripts = {"sd": "train_network.py", "flux": "flux_train_network.py", "sd3": "sd3_train_network.py"}
        if family in scripts:
            label = {"sd": "SD1.x/2.x", "flux": "FLUX.1", "sd3": "SD3"}[family]
            raise UserInputError(f"{where}: this is an {label} checkpoint, not SDXL; use {scripts[family]} for it")

    # ------------------------------------------------------------------ conditioning of a training batch
    supports_text_encoder_caching = True
    bucket_reso_multiple = 32  # cli-options.md: SDXL bucket steps must be divisible by 32
    size_conditioning = True  # gen_img: --original_width/height, --crop_top/left apply
    default_generation_size = (1024, 1024)

    @property
    def image_sampler_class(self):
        from library.inference.sdxl_sampling import SDXLSampler

        return SDXLSampler

    def tokenize_captions(self, tokenizers: list, captions: list[str], max_token_length: int | None = None):
        """(B, 2, n*75+2): both tokenizers' ids, as the dataset puts them in `batch["input_ids"]`."""
        return self.tokenize(list(tokenizers), captions, max_token_length)

    def encode_batch(self, text_encoders: list, tokenizers: list, batch: dict, args, device) -> "SDXLCondition":
        """SDXLCondition for a training batch: cached outputs (`--cache_text_encoder_outputs`),
        weighted captions, or the token ids."""
        cached = batch.get("text_encoder_outputs")
        if cached is not None:
            return SDXLCondition.from_parts(cached["hidden_state1"].to(device), cached["hidden_state2"].to(device),
                                            cached["pool2"].to(device))
        if getattr(args, "weighted_captions", False):
            return self.encode_weighted(text_encoders, tokenizers, batch["captions"], getattr(args, "max_token_length", None))
        return self.encode_tokens(text_encoders, batch["input_ids"].to(device), tokenizers)

    def encode_weighted(self, text_encoders, tokenizers, prompts, max_token_length=None, normalize: str = "none",
                        fit_to_longest: bool = False, warn_truncation: bool = False, parse: bool = True) -> "SDXLCondition":
        """Prompts with (word:1.2) / [word] emphasis -> SDXLCondition: each encoder's hidden
        states are multiplied by the token weights (and normalised per encoder with
        `normalize`); the pooled vector is not weighted (formats.md §f.4)."""
        import torch

        from library.inference.prompt_weighting import apply_token_weights, tokenize_weighted

        toks = [tokenize_weighted(t, prompts, max_token_length, fit_to_longest, warn_truncation and i == 0, parse)
                for i, t in enumerate(tokenizers)]
        if toks[0].input_ids.shape != toks[1].input_ids.shape:
            raise ValueError("the two SDXL tokenizers split the prompts into different lengths")
        cond = self.encode_tokens(text_encoders, (toks[0].input_ids, toks[1].input_ids), tokenizers)
        if all(bool((t.weights == 1.0).all()) for t in toks):
            return cond
        width1 = text_encoders[0].config.hidden_size
        h1, h2, pooled = cond.split(width1)
        h1 = apply_token_weights(h1, toks[0].weights, normalize)
        h2 = apply_token_weights(h2, toks[1].weights, normalize)
        return SDXLCondition(torch.cat([h1, h2], dim=-1), pooled)

    def text_encoder_cache_strategy(self, args, text_encoders=None, tokenizers=None, device=None, dtype=None):
        """The `_te_outputs.npz` strategy. Without text encoders (the caching tool) they are
        loaded from --pretrained_model_name_or_path in `dtype` (default float32)."""
        if text_encoders is None:
            import torch

            models = self.load_models(args, dtype=dtype)
            text_encoders = self.text_encoders(models)
            del models
            device = device or ("cuda" if torch.cuda.is_available() else "cpu")
            for te in text_encoders:
                te.to(device).eval().requires_grad_(False)
        if tokenizers is None:
            tokenizers = self.load_tokenizers(args)
        return SDXLTextEncoderCache(self, list(text_encoders), list(tokenizers), getattr(args, "max_token_length", None),
                                    bool(getattr(args, "weighted_captions", False)))

    # ------------------------------------------------------------------ text
    def tokenize(self, tokenizers, captions: list[str], max_token_length: int | None = None):
        """Both tokenizers: (B, 2, n*75+2) ids. A single tokenizer gives (B, n*75+2) as for SD."""
        import torch

        if not isinstance(tokenizers, (list, tuple)):
            return super().tokenize(tokenizers, captions, max_token_length)
        return torch.stack([super(SDXLArchitecture, self).tokenize(t, captions, max_token_length) for t in tokenizers], dim=1)

    def encode_tokens(self, text_encoders, input_ids, tokenizers, clip_skip: int | None = None) -> SDXLCondition:
        """SDXLCondition for (B, 2, n*75+2) ids (or a pair of (B, n*75+2) tensors).

        `clip_skip` is accepted for signature compatibility and ignored (SDXL fixes the
        layers: CLIP-L hidden_states[11], bigG hidden_states[-2]).
        """
        import torch

        te1, te2 = text_encoders
        tok1, tok2 = tokenizers
        ids1, ids2 = (input_ids[:, 0], input_ids[:, 1]) if torch.is_tensor(input_ids) else input_ids
        b, length = ids1.shape
        n = (length - 2) // CHUNK

        w1 = self.split_into_windows(ids1, tok1).to(te1.device)
        h1 = te1(w1, output_hidden_states=True).hidden_states[CLIP_L_LAYER]
        w2 = self.split_into_windows(ids2, tok2).to(te2.device)
        out2 = te2(w2, output_hidden_states=True)
        h2 = out2.hidden_states[-2]

        # pooled: final state at the first EOS of the first window, through the projection
        first = w2.reshape(b, n, -1)[:, 0]
        eos = (first == tok2.eos_token_id).int().argmax(dim=-1)
        last = out2.last_hidden_state.reshape(b, n, CHUNK + 2, -1)[:, 0]
        pooled = te2.text_projection(last[torch.arange(b, device=last.device), eos.to(last.device)])

        return SDXLCondition(torch.cat([self._join(h1, b, n), self._join(h2, b, n).to(h1.device, h1.dtype)], dim=-1), pooled)

    @staticmethod
    def _join(states, b: int, n: int):
        """(B*n, 77, w) window states -> (B, n*75+2, w): BOS, 75 content states per window, last state."""
        import torch

        if n == 1:
            return states
        states = states.reshape(b, n, CHUNK + 2, states.shape[-1])
        parts = [states[:, 0, :1]] + [states[:, i, 1:-1] for i in range(n)] + [states[:, -1, -1:]]
        return torch.cat(parts, dim=1)

    # ------------------------------------------------------------------ training step
    @staticmethod
    def vector_from_batch(pooled, batch):
        """The U-Net's `y` for a training batch (its original/crop/target size records)."""
        return conditioning_vector(pooled, batch["original_sizes_hw"], batch["crop_top_lefts"], batch["target_sizes_hw"])

    def call_denoiser(self, unet, noisy, timesteps, cond, batch):
        """U-Net prediction; `cond` is the SDXLCondition from `encode_tokens`."""
        vector = self.vector_from_batch(cond.pooled, batch).to(noisy.dtype)
        return unet(noisy, timesteps, cond.context.to(noisy.dtype), vector)

    def modelspec_kwargs(self) -> dict:
        return {"sdxl": True}

    default_clip_skip = None  # SDXL fixes the layers each text encoder contributes

    # ------------------------------------------------------------------ metadata
    @property
    def base_model_version(self) -> str:
        return "sdxl_base_v1-0"

    def default_resolution(self) -> tuple[int, int]:
        return (1024, 1024)


class SDXLTextEncoderCache(TextEncoderCacheStrategy):
    """`_te_outputs.npz` caches (formats.md §d.2): hidden_state1 (L, w1) = CLIP-L
    hidden_states[11], hidden_state2 (L, w2) = bigG hidden_states[-2], pool2 (p,) = bigG's
    projected EOS state; L = n*75+2 for --max_token_length. With --weighted_captions the
    hidden states carry the caption's token weights (the pooled vector does not)."""

    suffix = "_te_outputs.npz"
    npz_keys = ("hidden_state1", "hidden_state2", "pool2")

    def __init__(self, arch: SDXLArchitecture, text_encoders: list, tokenizers: list, max_token_length=None,
                 weighted: bool = False):
        self.arch, self.text_encoders, self.tokenizers = arch, text_encoders, tokenizers
        self.max_token_length, self.weighted = max_token_length, weighted

    def tokenize(self, captions):
        return list(captions) if self.weighted else self.arch.tokenize(self.tokenizers, list(captions), self.max_token_length)

    def encode(self, tokens, captions) -> dict:
        device = next(self.text_encoders[0].parameters()).device
        if self.weighted:
            cond = self.arch.encode_weighted(self.text_encoders, self.tokenizers, list(captions), self.max_token_length)
        else:
            cond = self.arch.encode_tokens(self.text_encoders, tokens.to(device), self.tokenizers)
        h1, h2, pooled = cond.split(self.text_encoders[0].config.hidden_size)
        return {"hidden_state1": h1, "hidden_state2": h2, "pool2": pooled}
