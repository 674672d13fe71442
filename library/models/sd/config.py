"""Infer every size of an SD 1.x/2.x model from its LDM checkpoint keys and shapes.

Nothing is hard-coded: widths, depths, channel counts and which levels have attention are
read from tensor shapes, so tiny, pruned and inpainting models load like full ones. What
shapes cannot tell follows one rule (ARCHITECTURE.md): SD1 U-Nets use 8 attention heads;
SD2 U-Nets and every CLIP/OpenCLIP text encoder use head_dim 64 (one head below width 64).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from library.errors import UserInputError

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."  # v1: Hugging Face CLIP naming
OPENCLIP_PREFIX = "cond_stage_model.model."  # v2: OpenCLIP naming

SD_LATENT_SCALE = 0.18215


def heads_for_width(width: int) -> int:
    """Head count under the head_dim-64 rule (one head when narrower than 64)."""
    return max(1, width // 64)


@dataclass
class SDModelConfig:
    v2: bool
    unet: dict
    vae: dict
    text_encoder: dict  # transformers CLIPTextConfig kwargs
    openclip_layers_in_file: int = 0  # v2 only: resblocks stored (the model uses one fewer)
    has_text_encoder: bool = True
    has_vae: bool = True
    notes: list[str] = field(default_factory=list)

    @property
    def version_name(self) -> str:
        return "SD2.x" if self.v2 else "SD1.x"


def _indices(shapes: dict, pattern: str) -> set[int]:
    rx = re.compile(pattern)
    out = set()
    for k in shapes:
        m = rx.match(k)
        if m:
            out.add(int(m.group(1)))
    return out


def _need(shapes: dict, key: str, path: str, what: str):
    if key not in shapes:
        raise UserInputError(f"{path}: not an SD1.x/2.x checkpoint: missing '{key}' ({what})")
    return shapes[key]


def infer_unet_config(shapes: dict, v2: bool, path: str, prefix: str = UNET_PREFIX) -> dict:
    p = prefix
    conv_in = _need(shapes, p + "input_blocks.0.0.weight", path, "U-Net input convolution")
    in_channels, model_channels = conv_in[1], conv_in[0]
    out_channels = _need(shapes, p + "out.2.weight", path, "U-Net output convolution")[0]

    n_input_blocks = 1 + max(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\."))
    downsample_at = sorted(_indices(shapes, re.escape(p) + r"input_blocks\.(\d+)\.0\.op\.weight"))
    levels = len(downsample_at) + 1
    layers, rest = divmod(n_input_blocks - 1 - (levels - 1), levels)
    if rest or layers < 1:
        raise UserInputError(f"{path}: U-Net input blocks do not form equal levels ({n_input_blocks} blocks, {levels} levels)")
    stride = layers + 1

    channels, down_attn = [], []
    for i in range(levels):
        first = 1 + i * stride
        channels.append(_need(shapes, p + f"input_blocks.{first}.0.out_layers.3.weight", path, "U-Net resnet")[0])
        down_attn.append(p + f"input_blocks.{first}.1.proj_in.weight" in shapes)
    up_attn = [p + f"output_blocks.{i * stride}.1.proj_in.weight" in shapes for i in range(levels)]
    if channels[0] != model_channels:
        raise UserInputError(f"{path}: U-Net first level width {channels[0]} differs from conv_in width {model_channels}")

    attn_keys = [k for k in shapes if k.startswith(p) and k.endswith("transformer_blocks.0.attn2.to_k.weight")]
    if not attn_keys:
        raise UserInputError(f"{path}: U-Net has no cross-attention layers; not an SD1.x/2.x text-to-image model")
    cross_attention_dim = shapes[attn_keys[0]][1]
    first_attn = next(i for i, a in enumerate(down_attn) if a)
    proj_in = shapes[p + f"input_blocks.{1 + first_attn * stride}.1.proj_in.weight"]
    depth = len(_indices(shapes, re.escape(p + f"input_blocks.{1 + first_attn * stride}.1.transformer_blocks.") + r"(\d+)\."))

    # diffusers' `attention_head_dim` is (for historical reasons) the number of heads.
    heads = [heads_for_width(c) for c in channels] if v2 else 8
    return dict(
        sample_size=64,
        in_channels=in_channels,
        out_channels=out_channels,
        down_block_types=["CrossAttnDownBlock2D" if a else "DownBlock2D" for a in down_attn],
        up_block_types=["CrossAttnUpBlock2D" if a else "UpBlock2D" for a in up_attn],
        mid_block_type="UNetMidBlock2DCrossAttn" if p + "middle_block.1.proj_in.weight" in shapes else None,
        block_out_channels=channels,
        layers_per_block=layers,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=heads,
        use_linear_projection=len(proj_in) == 2,
        transformer_layers_per_block=depth,
    )


def infer_vae_config(shapes: dict, path: str, prefix: str = VAE_PREFIX) -> dict:
    p = prefix
    conv_in = _need(shapes, p + "encoder.conv_in.weight", path, "VAE encoder input")
    levels = 1 + max(_indices(shapes, re.escape(p) + r"encoder\.down\.(\d+)\."))
    layers = 1 + max(_indices(shapes, re.escape(p) + r"encoder\.down\.0\.block\.(\d+)\."))
    channels = [_need(shapes, p + f"encoder.down.{i}.block.0.conv1.weight", path, "VAE encoder block")[0] for i in range(levels)]
    latent = _need(shapes, p + "decoder.conv_in.weight", path, "VAE decoder input")[1]
    return dict(
        in_channels=conv_in[1],
        out_channels=_need(shapes, p + "decoder.conv_out.weight", path, "VAE decoder output")[0],
        down_block_types=["DownEncoderBlock2D"] * levels,
        up_block_types=["UpDecoderBlock2D"] * levels,
        block_out_channels=channels,
        layers_per_block=layers,
        latent_channels=latent,
        sample_size=512,
        scaling_factor=SD_LATENT_SCALE,
    )


def infer_clip_config(shapes: dict, path: str, prefix: str = CLIP_PREFIX + "text_model.") -> dict:
    vocab, hidden = _need(shapes, prefix + "embeddings.token_embedding.weight", path, "text encoder token embedding")
    positions = _need(shapes, prefix + "embeddings.position_embedding.weight", path, "text encoder positions")[0]
    layers = 1 + max(_indices(shapes, re.escape(prefix) + r"encoder\.layers\.(\d+)\."))
    inter = _need(shapes, prefix + "encoder.layers.0.mlp.fc1.weight", path, "text encoder MLP")[0]
    return dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=layers,
        num_attention_heads=heads_for_width(hidden), max_position_embeddings=positions,
        hidden_act="quick_gelu", layer_norm_eps=1e-5, projection_dim=hidden,
    )


def infer_openclip_config(shapes: dict, path: str, prefix: str = OPENCLIP_PREFIX) -> tuple[dict, int]:
    """HF CLIPTextConfig for an OpenCLIP text tower; SD2 uses all layers but the last."""
    vocab, hidden = _need(shapes, prefix + "token_embedding.weight", path, "OpenCLIP token embedding")
    positions = _need(shapes, prefix + "positional_embedding", path, "OpenCLIP positions")[0]
    in_file = 1 + max(_indices(shapes, re.escape(prefix) + r"transformer\.resblocks\.(\d+)\."))
    inter = _need(shapes, prefix + "transformer.resblocks.0.mlp.c_fc.weight", path, "OpenCLIP MLP")[0]
    proj = shapes.get(prefix + "text_projection", (hidden, hidden))[-1]
    cfg = dict(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=in_file - 1,
        num_attention_heads=heads_for_width(hidden), max_position_embeddings=positions,
        hidden_act="gelu", layer_norm_eps=1e-5, projection_dim=proj,
    )
    return cfg, in_file


def normalize_clip_keys(shapes_or_sd: dict) -> dict:
    """Old v1 files store the text encoder without the `text_model.` level: rename those keys."""
    old = CLIP_PREFIX + "embeddings."
    if any(k.startswith(old) for k in shapes_or_sd):
        renamed = {}
        for k, v in shapes_or_sd.items():
            if k.startswith(CLIP_PREFIX) and not k.startswith(CLIP_PREFIX + "text_model."):
                k = CLIP_PREFIX + "text_model." + k[len(CLIP_PREFIX):]
            renamed[k] = v
        return renamed
    return shapes_or_sd


def infer_sd_config(shapes: dict, path: str, v2_flag: bool | None = None, v_parameterization: bool = False) -> SDModelConfig:
    """Work out an SD1.x/2.x model's full configuration from key -> shape."""
    shapes = normalize_clip_keys(shapes)
    if not any(k.startswith(UNET_PREFIX) for k in shapes):
        if any(k.startswith("conditioner.embedders.") for k in shapes):
            raise UserInputError(f"{path}: this is an SDXL checkpoint; use the sdxl_* scripts")
        if any(k.startswith(("double_blocks.", "model.diffusion_model.double_blocks.")) for k in shapes):
            raise UserInputError(f"{path}: this is a FLUX.1 checkpoint; use the flux_* scripts")
        raise UserInputError(
            f"{path}: unknown checkpoint layout: no '{UNET_PREFIX}*' U-Net keys (expected an SD1.x/2.x LDM single file)"
        )
    if any(k.startswith(UNET_PREFIX + "label_emb.") for k in shapes) or any(k.startswith("conditioner.") for k in shapes):
        raise UserInputError(f"{path}: this is an SDXL checkpoint; use the sdxl_* scripts")

    has_openclip = any(k.startswith(OPENCLIP_PREFIX) for k in shapes)
    has_clip = any(k.startswith(CLIP_PREFIX) for k in shapes)
    notes = []
    if has_openclip or has_clip:
        v2 = has_openclip
        if v2_flag is not None and v2_flag != v2:
            notes.append(
                f"--v2 {'given' if v2_flag else 'not given'} but the file holds an {'OpenCLIP (SD2.x)' if v2 else 'OpenAI CLIP (SD1.x)'} "
                f"text encoder; following the file ({'SD2.x' if v2 else 'SD1.x'})"
            )
    else:
        v2 = bool(v2_flag)

    unet = infer_unet_config(shapes, v2, path)
    if v2 and v_parameterization:
        unet["sample_size"] = 96
        unet["upcast_attention"] = True
    has_vae = any(k.startswith(VAE_PREFIX) for k in shapes)
    vae = infer_vae_config(shapes, path) if has_vae else {}
    openclip_layers = 0
    if has_openclip:
        te, openclip_layers = infer_openclip_config(shapes, path)
    elif has_clip:
        te = infer_clip_config(shapes, path)
    else:
        te = {}
    return SDModelConfig(v2, unet, vae, te, openclip_layers, bool(te), has_vae, notes)
