"""The SDXL U-Net with the module tree of the original (LDM) checkpoints.

Module paths are the checkpoint's keys without `model.diffusion_model.`
(`input_blocks.4.1.transformer_blocks.0.attn1.to_q`, `middle_block.0.in_layers.2`,
`output_blocks.2.2.conv`, `label_emb.0.0`...), so a file loads with `load_state_dict`
directly and a kohya LoRA key is the module path with '.' -> '_', with no translation.
Block classes carry the names the LoRA ecosystem selects by (ResnetBlock2D,
Transformer2DModel, Downsample2D, Upsample2D):

* Transformer2DModel and Upsample2D are diffusers' own classes, whose child names already
  match the LDM files (norm, proj_in, transformer_blocks.N.{attn1,attn2,ff.net.0.proj,
  ff.net.2,norm1..3}, proj_out; conv).
* ResnetBlock2D and Downsample2D are defined here: diffusers' versions name their children
  norm1/conv1/time_emb_proj/... and conv, where the files say in_layers/emb_layers/
  out_layers/skip_connection and op. The arithmetic is the same as diffusers'.

Sizes come from SDXLUNetConfig (inferred from the checkpoint, config.py).
"""

from __future__ import annotations

import torch
from diffusers.models.attention import AttentionMixin
from diffusers.models.embeddings import get_timestep_embedding
from diffusers.models.transformers.transformer_2d import Transformer2DModel
from diffusers.models.upsampling import Upsample2D
from torch import nn

from library.models.sdxl.config import SDXLUNetConfig

GROUPS = 32  # GroupNorm groups everywhere in the U-Net
RESNET_EPS = 1e-5


class ResnetBlock2D(nn.Module):
    """GroupNorm-SiLU-conv, plus the projected time embedding, GroupNorm-SiLU-conv, residual."""

    def __init__(self, in_channels: int, out_channels: int, emb_channels: int):
        super().__init__()
        self.in_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, in_channels, eps=RESNET_EPS), nn.SiLU(), nn.Conv2d(in_channels, out_channels, 3, padding=1)
        )
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, out_channels))
        self.out_layers = nn.Sequential(
            nn.GroupNorm(GROUPS, out_channels, eps=RESNET_EPS), nn.SiLU(), nn.Dropout(0.0),
            nn.Conv2d(out_channels, out_channels, 3, padding=1),
        )
        self.skip_connection = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else nn.Identity()

    def forward(self, x, emb):
        h = self.in_layers(x)
        h = h + self.emb_layers(emb).to(h.dtype)[:, :, None, None]
        h = self.out_layers(h)
        return self.skip_connection(x) + h


class Downsample2D(nn.Module):
    """Stride-2 3x3 convolution, stored as `op` like the original files."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x):
        return self.op(x)


class UNetBlock(nn.ModuleList):
    """One entry of input_blocks / output_blocks / the middle block: layers run in order,
    each given what it needs (resnets the embedding, transformers the text context)."""

    def forward(self, x, emb, context, upsample_size=None):
        for layer in self:
            if isinstance(layer, ResnetBlock2D):
                x = layer(x, emb)
            elif isinstance(layer, Transformer2DModel):
                x = layer(x, encoder_hidden_states=context, return_dict=False)[0]
            elif isinstance(layer, Upsample2D):
                x = layer(x, output_size=upsample_size)
            else:
                x = layer(x)
        return x


def _transformer(cfg: SDXLUNetConfig, width: int, depth: int) -> Transformer2DModel:
    heads = cfg.heads(width)
    return Transformer2DModel(
        num_attention_heads=heads, attention_head_dim=width // heads, in_channels=width, num_layers=depth,
        cross_attention_dim=cfg.context_dim, norm_num_groups=GROUPS, use_linear_projection=cfg.use_linear_projection,
    )


class SDXLUNet(nn.Module, AttentionMixin):
    """forward(x, timesteps, context, y) -> predicted noise (or v), like the original model.

    `context` is concat(CLIP-L states, bigG states) (B, L, context_dim); `y` is the
    (B, adm_in_channels) vector of pooled text embedding and size/crop embeddings.
    """

    def __init__(self, config: SDXLUNetConfig):
        super().__init__()
        self.config = config
        self.gradient_checkpointing = False
        cfg, mc, ted = config, config.model_channels, config.time_embed_dim
        self.time_embed = nn.Sequential(nn.Linear(mc, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.label_emb = nn.Sequential(nn.Sequential(nn.Linear(cfg.adm_in_channels, ted), nn.SiLU(), nn.Linear(ted, ted)))

        self.input_blocks = nn.ModuleList([UNetBlock([nn.Conv2d(cfg.in_channels, mc, 3, padding=1)])])
        skip_channels = [mc]
        ch = mc
        for level, width in enumerate(cfg.widths):
            for _ in range(cfg.num_res_blocks):
                layers = [ResnetBlock2D(ch, width, ted)]
                ch = width
                if cfg.transformer_depth[level]:
                    layers.append(_transformer(cfg, ch, cfg.transformer_depth[level]))
                self.input_blocks.append(UNetBlock(layers))
                skip_channels.append(ch)
            if level < cfg.levels - 1:
                self.input_blocks.append(UNetBlock([Downsample2D(ch)]))
                skip_channels.append(ch)

        self.middle_block = UNetBlock(
            [ResnetBlock2D(ch, ch, ted), _transformer(cfg, ch, cfg.transformer_depth_middle), ResnetBlock2D(ch, ch, ted)]
        )

        self.output_blocks = nn.ModuleList()
        for up, level in enumerate(reversed(range(cfg.levels))):
            width = cfg.widths[level]
            for j in range(cfg.num_res_blocks + 1):
                layers = [ResnetBlock2D(ch + skip_channels.pop(), width, ted)]
                ch = width
                if cfg.transformer_depth_up[up]:
                    layers.append(_transformer(cfg, ch, cfg.transformer_depth_up[up]))
                if level > 0 and j == cfg.num_res_blocks:
                    layers.append(Upsample2D(ch, use_conv=True, out_channels=ch))
                self.output_blocks.append(UNetBlock(layers))

        self.out = nn.Sequential(nn.GroupNorm(GROUPS, ch, eps=RESNET_EPS), nn.SiLU(), nn.Conv2d(ch, cfg.out_channels, 3, padding=1))

    # ------------------------------------------------------------------ trainer-facing helpers
    @property
    def dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def enable_gradient_checkpointing(self) -> None:
        """Recompute each U-Net block in the backward pass (training mode only)."""
        self.gradient_checkpointing = True

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False

    def _attention_modules(self):
        return [m for m in self.modules() if hasattr(m, "set_processor") and hasattr(m, "sliceable_head_dim")]

    def set_attention_slice(self, slice_size="auto") -> None:
        """Sliced attention: "auto" halves the heads per step, "max" runs one head at a time."""
        for m in self._attention_modules():
            heads = m.sliceable_head_dim
            size = max(1, heads // 2) if slice_size == "auto" else 1 if slice_size == "max" else int(slice_size)
            m.set_attention_slice(min(size, heads))

    def enable_xformers_memory_efficient_attention(self, attention_op=None) -> None:
        for m in self.modules():
            if hasattr(m, "set_use_memory_efficient_attention_xformers"):
                m.set_use_memory_efficient_attention_xformers(True, attention_op)

    # ------------------------------------------------------------------ forward
    def _run(self, block, h, emb, context, upsample_size=None):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, h, emb, context, upsample_size, use_reentrant=False)
        return block(h, emb, context, upsample_size)

    def forward(self, x, timesteps, context, y):
        if not torch.is_tensor(timesteps):
            timesteps = torch.tensor([timesteps], device=x.device)
        if timesteps.dim() == 0:
            timesteps = timesteps[None]
        timesteps = timesteps.to(x.device).expand(x.shape[0])
        t_emb = get_timestep_embedding(timesteps, self.config.model_channels, flip_sin_to_cos=True, downscale_freq_shift=0)
        dtype = self.time_embed[0].weight.dtype
        emb = self.time_embed(t_emb.to(dtype)) + self.label_emb(y.to(dtype))

        skips = []
        h = x
        for block in self.input_blocks:
            h = self._run(block, h, emb, context)
            skips.append(h)
        h = self._run(self.middle_block, h, emb, context)
        for block in self.output_blocks:
            h = torch.cat([h, skips.pop()], dim=1)
            size = None
            if skips and isinstance(block[-1], Upsample2D):
                target = tuple(skips[-1].shape[-2:])
                if target != (2 * h.shape[-2], 2 * h.shape[-1]):
                    size = target  # odd latent sizes: upsample to the next skip's size
            h = self._run(block, h, emb, context, size)
        return self.out(h)


def build_unet(config: SDXLUNetConfig) -> SDXLUNet:
    return SDXLUNet(config)
