"""Infer every size of an SDXL model from its single-file checkpoint keys and shapes.

The U-Net configuration is ours (LDM vocabulary: model_channels, widths per level,
res blocks per level, transformer depth per level with 0 meaning "no attention", middle
depth, context width, adm_in_channels from `label_emb`). Text-encoder and VAE configs are
transformers / diffusers constructor kwargs. Head counts follow the head_dim-64 rule of
ARCHITECTURE.md (one head below width 64); everything else comes from the tensors.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from library.errors import UserInputError
from library.models.sd import config as sdcfg
from library.models.sd.config import heads_for_width

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_L_PREFIX = "conditioner.embedders.0.transformer."  # Hugging Face CLIP naming (text_model.*)
BIGG_PREFIX = "conditioner.embedders.1.model."  # OpenCLIP naming

SDXL_LATENT_SCALE = 0.13025
SIZE_EMBED_DIM = 256  # per size/crop scalar (training-math §2.7)
SIZE_SCALARS = 6  # original h, w; crop top, left; target h, w


@dataclass
class SDXLUNetConfig:
    in_channels: int = 4
    out_channels: int = 4
    model_channels: int = 320
    widths: list = field(default_factory=lambda: [320, 640, 1280])  # output width of each level
    num_res_blocks: int = 2
    transformer_depth: list = field(default_factory=lambda: [0, 2, 10])  # per level, input side
    transformer_depth_up: list = field(default_factory=lambda: [10, 2, 0])  # per up level (lowest resolution first)
    transformer_depth_middle: int = 10
    context_dim: int = 2048
    adm_in_channels: int = 2816
    use_linear_projection: bool = True

    @property
    def time_embed_dim(self) -> int:
        return 4 * self.model_channels

    @property
    def levels(self) -> int:
        return len(self.widths)

    def heads(self, width: int) -> int:
        return heads_for_width(width)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "SDXLUNetConfig":
        return cls(**{k: (list(v) if isinstance(v, (list, tuple)) else v) for k, v in d.items()})

    def diffusers_config(self) -> dict:
        """The equivalent diffusers UNet2DConditionModel config (for folders and comparisons)."""
        down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.transformer_depth]
        up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in self.transformer_depth_up]
        # diffusers needs a depth >= 1 even for levels without attention; they are ignored
        depth = [max(1, d) for d in self.transformer_depth]
        cfg = dict(
            sample_size=128,
            in_channels=self.in_channels,
            out_channels=self.out_channels,
            down_block_types=down,
            up_block_types=up,
            mid_block_type="UNetMidBlock2DCrossAttn",
            block_out_channels=list(self.widths),
            layers_per_block=self.num_res_blocks,
            cross_attention_dim=self.context_dim,
            attention_head_dim=[heads_for_width(w) for w in self.widths],  # diffusers: head count
            use_linear_projection=self.use_linear_projection,
            transformer_layers_per_block=depth,
            addition_embed_type="text_time",
            addition_time_embed_dim=SIZE_EMBED_DIM,
            projection_class_embeddings_input_dim=self.adm_in_channels,
            norm_eps=1e-5,
            flip_sin_to_cos=True,
            freq_shift=0,
        )
        up_depth = [max(1, d) for d in self.transformer_depth_up]
        if up_depth != list(reversed(depth)) or self.transformer_depth_middle != depth[-1]:
            if self.transformer_depth_middle != depth[-1]:
                raise UserInputError(
                    f"SDXL U-Net middle depth {self.transformer_depth_middle} differs from the last level's "
                    f"{depth[-1]}: diffusers cannot express this model"
                )
            cfg["reverse_transformer_layers_per_block"] = [[d] * (self.num_res_blocks + 1) for d in up_depth]
        return cfg

    @classmethod
    def from_diffusers_config(cls, cfg: dict) -> "SDXLUNetConfig":
        widths = list(cfg["block_out_channels"])
        n = len(widths)
        depth = cfg.get("transformer_layers_per_block", 1)
        depth = [depth] * n if isinstance(depth, int) else list(depth)
        down = [d if t.startswith("CrossAttn") else 0 for d, t in zip(depth, cfg["down_block_types"])]
        rev = cfg.get("reverse_transformer_layers_per_block")
        up_raw = [r[0] for r in rev] if rev else list(reversed(depth))
        up = [d if t.startswith("CrossAttn") else 0 for d, t in zip(up_raw, cfg["up_block_types"])]
        return cls(
            in_channels=cfg["in_channels"], out_channels=cfg["out_channels"], model_channels=widths[0],
            widths=widths, num_res_blocks=cfg["layers_per_block"], transformer_depth=down, transformer_depth_up=up,
            transformer_depth_middle=depth[-1], context_dim=cfg["cross_attention_dim"],
            adm_in_channels=cfg["projection_class_embeddings_input_dim"],
            use_linear_projection=bool(cfg.get("use_linear_projection", False)),
        )


@dataclass
class SDXLModelConfig:
    unet: SDXLUNetConfig
    vae: dict  # diffusers AutoencoderKL kwargs ({} when the file has no VAE)
    text_encoder1: dict  # CLIPTextConfig kwargs (CLIP ViT-L)
    text_encoder2: dict  # CLIPTextConfig kwargs (OpenCLIP bigG, with projection)
    has_vae: bool = True


def _indices(shapes: dict, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    return {int(m.group(1)) for k in shapes if (m := rx.match(k))}


def _need(shapes: dict, key: str, path: str, what: str):
    if key not in shapes:
        raise UserInputError(f"{path}: not a complete SDXL checkpoint: missing '{key}' ({what})")
    return shapes[key]


def _depth(shapes: dict, block: str) -> int:
    """Transformer blocks inside `block` (a prefix ending in '.'); 0 without attention."""
    if block + "proj_in.weight" not in shapes:
        return 0
    return len(_indices(shapes, re.escape(block + "transformer_blocks.") + r"(\d+)\."))


def infer_unet_config(shapes: dict, path: str, prefix: str = UNET_PREFIX) -> SDXLUNetConfig:
    p = prefix
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", path, "U-Net input convolution")
    out_channels = _need(shapes, p + "out.2.weight", path, "U-Net output convolution")[0]
    label = _need(shapes, p + "label_emb.0.0.weight", path, "size/pooled-text embedding")
    n_input = 1 + max(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."))
    downs = sorted(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight"))
    levels = len(downs) + 1
    n, rest = divmod(n_input - 1 - (levels - 1), levels)
    if rest or n < 1:
        raise UserInputError(f"{path}: U-Net input blocks do not form equal levels ({n_input} blocks, {levels} levels)")
    stride = n + 1
    if downs != [(i + 1) * stride for i in range(levels - 1)]:
        raise UserInputError(f"{path}: U-Net downsamplers at unexpected input blocks {downs}")
    widths, depth, depth_up = [], [], []
    for i in range(levels):
        first = 1 + i * stride
        widths.append(_need(shapes, p + f"input_blocks.{first}.0.out_layers.3.weight", path, "U-Net resnet")[0])
        depth.append(_depth(shapes, p + f"input_blocks.{first}.1."))
        depth_up.append(_depth(shapes, p + f"output_blocks.{i * stride}.1."))
    middle = _depth(shapes, p + "middle_block.1.")
    attn_keys = sorted(k for k in shapes if k.startswith(p) and k.endswith("transformer_blocks.0.attn2.to_k.weight"))
    if not attn_keys:
        raise UserInputError(f"{path}: SDXL U-Net has no cross-attention layers")
    proj_in = shapes[sorted(k for k in shapes if k.startswith(p) and k.endswith(".proj_in.weight"))[0]]
    return SDXLUNetConfig(
        in_channels=conv_in[1], out_channels=out_channels, model_channels=conv_in[0], widths=widths,
        num_res_blocks=n, transformer_depth=depth, transformer_depth_up=depth_up, transformer_depth_middle=middle,
        context_dim=shapes[attn_keys[0]][1], adm_in_channels=label[1], use_linear_projection=len(proj_in) == 2,
    )


def infer_bigg_config(shapes: dict, path: str, prefix: str = BIGG_PREFIX) -> dict:
    """CLIPTextConfig kwargs for the OpenCLIP bigG tower; SDXL uses every layer."""
    cfg, in_file = sdcfg.infer_openclip_config(shapes, path, prefix)
    _need(shapes, prefix + "text_projection", path, "OpenCLIP text projection (pooled output)")
    cfg["num_hidden_layers"] = in_file
    # the tokenizer pads with 0; the pooled state is taken at the first EOS token
    cfg.update(bos_token_id=49406, eos_token_id=49407, pad_token_id=0)
    return cfg


def detect_family(shapes: dict) -> str:
    """'sdxl', 'sd' (1.x/2.x), 'flux', 'sd3' or 'unknown' from the key names alone."""
    if any(k.startswith("conditioner.embedders.") for k in shapes) or UNET_PREFIX + "label_emb.0.0.weight" in shapes:
        return "sdxl"
    if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in shapes):
        return "flux"
    if any(k.startswith(("joint_blocks.", "model.diffusion_model.joint_blocks.")) for k in shapes):
        return "sd3"
    if any(k.startswith(UNET_PREFIX + "input_blocks.") for k in shapes):
        return "sd"
    return "unknown"


def infer_sdxl_config(shapes: dict, path: str) -> SDXLModelConfig:
    """Work out an SDXL model's full configuration from key -> shape."""
    family = detect_family(shapes)
    if family == "sd":
        raise UserInputError(f"{path}: this is an SD1.x/2.x checkpoint, not SDXL; use train_network.py / train_db.py / fine_tune.py")
    if family == "flux":
        raise UserInputError(f"{path}: this is a FLUX.1 checkpoint, not SDXL; use the flux_* scripts")
    if family == "sd3":
        raise UserInputError(f"{path}: this is an SD3 checkpoint, not SDXL; use the sd3_* scripts")
    if family == "unknown":
        raise UserInputError(f"{path}: unknown checkpoint layout: no '{UNET_PREFIX}*' U-Net keys (expected an SDXL single file)")
    unet = infer_unet_config(shapes, path)
    if not any(k.startswith(CLIP_L_PREFIX) for k in shapes):
        raise UserInputError(f"{path}: SDXL checkpoint has no first text encoder ('{CLIP_L_PREFIX}*' keys)")
    if not any(k.startswith(BIGG_PREFIX) for k in shapes):
        raise UserInputError(f"{path}: SDXL checkpoint has no second text encoder ('{BIGG_PREFIX}*' keys)")
    te1 = sdcfg.infer_clip_config(shapes, path, CLIP_L_PREFIX + "text_model.")
    te2 = infer_bigg_config(shapes, path)
    if te1["hidden_size"] + te2["hidden_size"] != unet.context_dim:
        raise UserInputError(
            f"{path}: text encoder widths {te1['hidden_size']} + {te2['hidden_size']} do not add up to the "
            f"U-Net's cross-attention width {unet.context_dim}"
        )
    expected_adm = te2["projection_dim"] + SIZE_SCALARS * SIZE_EMBED_DIM
    if unet.adm_in_channels != expected_adm:
        raise UserInputError(
            f"{path}: U-Net label_emb takes {unet.adm_in_channels} values, expected {expected_adm} "
            f"(pooled {te2['projection_dim']} + 6 x {SIZE_EMBED_DIM} size/crop embeddings)"
        )
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    vae = sdcfg.infer_vae_config(shapes, path) if has_vae else {}
    if vae:
        vae["scaling_factor"] = SDXL_LATENT_SCALE
        vae["sample_size"] = 1024
    return SDXLModelConfig(unet, vae, te1, te2, has_vae)
