"""FLUX.1 sizes, read from a checkpoint's keys and shapes (formats.md §c.3).

Nothing is hard-coded except what shapes cannot tell and every FLUX.1 model shares:
head dim 128 (hidden = 128 x heads, ARCHITECTURE.md), RoPE axes (16, 56, 56), theta 10000.
Block counts come from the block indices in the keys, so "compact" / pruned models with
fewer blocks load; a gap in the indices (block 3 missing while 4 exists) is an error that
names the missing block. dev vs schnell is the presence of the guidance embedder.

The keys here are BFL names (`double_blocks.N.img_attn.qkv.weight`); diffusers-format
files are renamed to BFL by library/models/flux/key_maps.py before this looks at them.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from library.errors import UserInputError

HEAD_DIM = 128
AXES_DIM = (16, 56, 56)
ROPE_THETA = 10000
TIME_EMBED_DIM = 256  # sinusoidal width fed to time_in / guidance_in

# AE latent scaling (training-math.md §3.1): x0 = AE_SCALE * (z - AE_SHIFT)
AE_SCALE = 0.3611
AE_SHIFT = 0.1159
AE_LATENT_CHANNELS = 16

PREFIXES = ("model.diffusion_model.",)  # tolerated and stripped on load

# released models (for messages and defaults)
FULL_DEPTH = 19
FULL_DEPTH_SINGLE = 38
FULL_HIDDEN = 3072


@dataclass
class FluxConfig:
    """Constructor arguments of library.models.flux.model.Flux."""

    in_channels: int = 64  # 16 latent channels x 2x2 patch
    out_channels: int = 64
    vec_in_dim: int = 768  # CLIP-L pooled width
    context_in_dim: int = 4096  # T5-XXL width
    hidden_size: int = FULL_HIDDEN
    mlp_ratio: float = 4.0
    num_heads: int = 24
    depth: int = FULL_DEPTH
    depth_single_blocks: int = FULL_DEPTH_SINGLE
    axes_dim: tuple = AXES_DIM
    theta: int = ROPE_THETA
    qkv_bias: bool = True
    guidance_embed: bool = True  # dev: True, schnell: False

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def mlp_hidden_dim(self) -> int:
        return int(self.hidden_size * self.mlp_ratio)

    @property
    def variant(self) -> str:
        """'dev' (guidance-distilled, has guidance_in) or 'schnell'."""
        return "dev" if self.guidance_embed else "schnell"

    @property
    def is_schnell(self) -> bool:
        return not self.guidance_embed

    @property
    def is_compact(self) -> bool:
        return (self.depth, self.depth_single_blocks) != (FULL_DEPTH, FULL_DEPTH_SINGLE)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["axes_dim"] = list(self.axes_dim)
        return d

    @classmethod
    def from_dict(cls, d: dict) -> "FluxConfig":
        d = dict(d)
        if "axes_dim" in d:
            d["axes_dim"] = tuple(d["axes_dim"])
        return cls(**d)

    def diffusers_config(self) -> dict:
        """Constructor kwargs of diffusers' FluxTransformer2DModel for the same network."""
        return dict(
            patch_size=1, in_channels=self.in_channels, out_channels=self.out_channels,
            num_layers=self.depth, num_single_layers=self.depth_single_blocks,
            attention_head_dim=self.head_dim, num_attention_heads=self.num_heads,
            joint_attention_dim=self.context_in_dim, pooled_projection_dim=self.vec_in_dim,
            guidance_embeds=self.guidance_embed, axes_dims_rope=list(self.axes_dim),
        )

    def describe(self) -> str:
        return (f"FLUX.1 {self.variant}: hidden {self.hidden_size} ({self.num_heads} heads), "
                f"{self.depth} double + {self.depth_single_blocks} single blocks"
                + (" (compact)" if self.is_compact else ""))


@dataclass
class BlockCounts:
    depth: int
    depth_single: int
    notes: list = field(default_factory=list)


def strip_prefix(keys) -> dict[str, str]:
    """{bfl_key: stored_key}; a leading `model.diffusion_model.` is dropped."""
    out = {}
    for k in keys:
        name = k
        for p in PREFIXES:
            if k.startswith(p):
                name = k[len(p):]
                break
        out[name] = k
    return out


def _block_indices(keys, kind: str) -> list[int]:
    rx = re.compile(rf"^{kind}\.(\d+)\.")
    return sorted({int(m.group(1)) for k in keys if (m := rx.match(k))})


def contiguous_count(indices: list[int], what: str, path: str) -> int:
    """len(range) of block indices 0..n-1; a gap is a UserInputError naming the first missing index."""
    if not indices:
        return 0
    expected = set(range(indices[-1] + 1))
    missing = sorted(expected - set(indices))
    if missing:
        shown = ", ".join(f"{what}.{i}" for i in missing[:5]) + (" ..." if len(missing) > 5 else "")
        raise UserInputError(
            f"{path}: FLUX block indices have a gap: {shown} missing while {what}.{indices[-1]} exists "
            f"({len(indices)} of {indices[-1] + 1} {what} present). A compact model must number its blocks 0..N-1"
        )
    return len(indices)


def _need(shapes: dict, key: str, path: str, what: str) -> tuple:
    if key not in shapes:
        raise UserInputError(f"{path}: not a FLUX.1 transformer: missing '{key}' ({what})")
    return tuple(shapes[key])


def looks_like_flux(keys) -> bool:
    keys = strip_prefix(keys)
    return "img_in.weight" in keys and any(k.startswith("double_blocks.") for k in keys)


def infer_flux_config(shapes: dict, path: str) -> FluxConfig:
    """Config of a BFL-named transformer state dict (prefix already stripped)."""
    if any(k.startswith("transformer_blocks.") for k in shapes):
        raise UserInputError(f"{path}: diffusers-named FLUX weights must be converted first (internal error)")
    hidden, in_channels = _need(shapes, "img_in.weight", path, "image input projection")
    vec_in = _need(shapes, "vector_in.in_layer.weight", path, "pooled text input")[1]
    context_in = _need(shapes, "txt_in.weight", path, "T5 input projection")[1]
    out_channels = _need(shapes, "final_layer.linear.weight", path, "output projection")[0]
    depth = contiguous_count(_block_indices(shapes, "double_blocks"), "double_blocks", path)
    depth_single = contiguous_count(_block_indices(shapes, "single_blocks"), "single_blocks", path)
    if depth == 0 and depth_single == 0:
        raise UserInputError(f"{path}: FLUX.1 transformer without any double_blocks / single_blocks")
    if depth:
        head_dim = _need(shapes, "double_blocks.0.img_attn.norm.query_norm.scale", path, "QK norm")[0]
        mlp_hidden = _need(shapes, "double_blocks.0.img_mlp.0.weight", path, "image MLP")[0]
        qkv_bias = "double_blocks.0.img_attn.qkv.bias" in shapes
    else:
        head_dim = _need(shapes, "single_blocks.0.norm.query_norm.scale", path, "QK norm")[0]
        mlp_hidden = _need(shapes, "single_blocks.0.linear1.weight", path, "fused projection")[0] - 3 * hidden
        qkv_bias = True
    if hidden % head_dim:
        raise UserInputError(f"{path}: hidden width {hidden} is not a multiple of the head dim {head_dim}")
    if head_dim != sum(AXES_DIM):
        raise UserInputError(
            f"{path}: FLUX.1 head dim is {sum(AXES_DIM)} (RoPE axes {AXES_DIM}); this file has {head_dim} "
            f"(hidden {hidden} = 128 x heads is required)"
        )
    guidance = "guidance_in.in_layer.weight" in shapes or "guidance_in.in_layer.bias" in shapes
    cfg = FluxConfig(
        in_channels=in_channels, out_channels=out_channels, vec_in_dim=vec_in, context_in_dim=context_in,
        hidden_size=hidden, mlp_ratio=mlp_hidden / hidden, num_heads=hidden // head_dim, depth=depth,
        depth_single_blocks=depth_single, qkv_bias=qkv_bias, guidance_embed=guidance,
    )
    for i in range(depth_single):
        shape = _need(shapes, f"single_blocks.{i}.linear1.weight", path, "fused projection")
        if shape != (3 * hidden + cfg.mlp_hidden_dim, hidden):
            raise UserInputError(f"{path}: single_blocks.{i}.linear1.weight has shape {shape}, expected "
                                 f"{(3 * hidden + cfg.mlp_hidden_dim, hidden)} for hidden {hidden}")
    return cfg
