"""The FLUX.1 transformer, with the module names of the BFL checkpoints.

The module tree is the key layout of the released files (formats.md §c.3), so a BFL state
dict loads without renaming and kohya LoRA names (`lora_unet_double_blocks_0_img_attn_qkv`)
are module paths with '.' -> '_':

    img_in, time_in.{in_layer,out_layer}, vector_in.*, guidance_in.* (dev only), txt_in
    double_blocks.N   DoubleStreamBlock: img_mod.lin, img_attn.{qkv,norm.{query_norm,key_norm}.scale,proj},
                      img_mlp.{0,2}, and the same for txt_
    single_blocks.N   SingleStreamBlock: linear1, linear2, norm.{query_norm,key_norm}.scale, modulation.lin
    final_layer       LastLayer: linear, adaLN_modulation.1

Forward (timesteps are sigma in [0, 1]; the model scales them by 1000 itself):

    out = model(img, img_ids, txt, txt_ids, timesteps, y, guidance=None, txt_attention_mask=None)

img (B, L, 64) packed latents (library.models.flux.packing), img_ids (B, L, 3) or (L, 3),
txt (B, Lt, context_in_dim) T5 states, txt_ids likewise, y (B, vec_in_dim) CLIP-L pooled,
guidance (B,) for dev models, txt_attention_mask (B, Lt) 1 = real token (masks T5 padding
as attention keys). Returns (B, L, 64).

Training hooks:
- `enable_gradient_checkpointing(cpu_offload=False)`: each block is recomputed in backward;
  with `cpu_offload` (`--cpu_offload_checkpointing`) the block inputs kept for that are
  moved to the CPU and back.
- `block_swap`: an object with `before_block(kind, index)` / `after_block(kind, index)`
  (kind 'double' or 'single'), called around every block in forward, where `--blocks_to_swap`
  can move block weights between devices. Blocks live in two ModuleLists
  (`double_blocks`, `single_blocks`) so they can be moved one at a time;
  `non_block_modules()` lists everything else.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from library.models.flux.config import TIME_EMBED_DIM, FluxConfig


# --------------------------------------------------------------------------------------
# positional and timestep embeddings


def rope(pos: torch.Tensor, dim: int, theta: int) -> torch.Tensor:
    """Rotation matrices (..., n, dim/2, 2, 2) for positions `pos` (..., n) on one axis."""
    device_type = pos.device.type
    use_f64 = device_type not in ("mps", "xla")
    ftype = torch.float64 if use_f64 else torch.float32
    scale = torch.arange(0, dim, 2, dtype=ftype, device=pos.device) / dim
    omega = 1.0 / (theta ** scale)
    angles = pos.to(ftype).unsqueeze(-1) * omega  # (..., n, dim/2)
    cos, sin = torch.cos(angles), torch.sin(angles)
    out = torch.stack([cos, -sin, sin, cos], dim=-1)
    return out.reshape(*out.shape[:-1], 2, 2).float()


def apply_rope(xq: torch.Tensor, xk: torch.Tensor, freqs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotate consecutive channel pairs of q and k (B, H, L, D) by `freqs` (B, 1, L, D/2, 2, 2)."""
    def rotate(x):
        x2 = x.float().reshape(*x.shape[:-1], -1, 1, 2)
        out = freqs[..., 0] * x2[..., 0] + freqs[..., 1] * x2[..., 1]
        return out.reshape(*x.shape).type_as(x)

    return rotate(xq), rotate(xk)


class EmbedND(nn.Module):
    """RoPE over the 3 position axes (index, row, column): per-axis rotations concatenated."""

    def __init__(self, dim: int, theta: int, axes_dim):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n_axes = ids.shape[-1]
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(n_axes)], dim=-3)
        return emb.unsqueeze(1)


def timestep_embedding(t: torch.Tensor, dim: int = TIME_EMBED_DIM, max_period: int = 10000,
                       time_factor: float = 1000.0) -> torch.Tensor:
    """Sinusoidal embedding [cos | sin] of `time_factor * t` (t: (B,) floats in [0, 1])."""
    t = time_factor * t.float()
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


# --------------------------------------------------------------------------------------
# layers


class MLPEmbedder(nn.Module):
    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS norm computed in float32, scaled by `scale` (BFL name of the weight)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.float()
        x = x * torch.rsqrt(x.pow(2).mean(dim=-1, keepdim=True) + self.eps)
        return x.to(dtype) * self.scale.to(dtype)


class QKNorm(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


def split_heads(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, L, 3*H*D) -> three (B, H, L, D)."""
    b, n, _ = qkv.shape
    qkv = qkv.reshape(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4)
    return qkv[0], qkv[1], qkv[2]


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, pe: torch.Tensor,
              attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
    """RoPE + scaled dot-product attention; (B, H, L, D) -> (B, L, H*D)."""
    q, k = apply_rope(q, k, pe)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
    b, h, n, d = x.shape
    return x.transpose(1, 2).reshape(b, n, h * d)


class SelfAttention(nn.Module):
    """Fused q/k/v projection, per-head RMS norm of q and k, output projection."""

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, pe: torch.Tensor, attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = split_heads(self.qkv(x), self.num_heads)
        q, k = self.norm(q, k, v)
        return self.proj(attention(q, k, v, pe, attn_mask))


@dataclass
class ModulationOut:
    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class Modulation(nn.Module):
    """adaLN parameters from the conditioning vector: 3 (or 6 for `double`) chunks of width dim."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: torch.Tensor) -> tuple[ModulationOut, Optional[ModulationOut]]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)
        first = ModulationOut(*out[:3])
        return first, (ModulationOut(*out[3:]) if self.is_double else None)


def _modulate(x: torch.Tensor, norm: nn.Module, mod: ModulationOut) -> torch.Tensor:
    return (1 + mod.scale) * norm(x) + mod.shift


class DoubleStreamBlock(nn.Module):
    """Separate weights for the image and text streams, one joint attention over both."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size
        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.img_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )
        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_attn = SelfAttention(hidden_size, num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.txt_mlp = nn.Sequential(
            nn.Linear(hidden_size, mlp_hidden, bias=True),
            nn.GELU(approximate="tanh"),
            nn.Linear(mlp_hidden, hidden_size, bias=True),
        )

    def forward(self, img: torch.Tensor, txt: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = split_heads(self.img_attn.qkv(_modulate(img, self.img_norm1, img_mod1)), self.num_heads)
        img_q, img_k = self.img_attn.norm(img_q, img_k, img_v)
        txt_q, txt_k, txt_v = split_heads(self.txt_attn.qkv(_modulate(txt, self.txt_norm1, txt_mod1)), self.num_heads)
        txt_q, txt_k = self.txt_attn.norm(txt_q, txt_k, txt_v)

        # joint attention over [text; image] tokens
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe, attn_mask)
        n_txt = txt.shape[1]
        txt_attn, img_attn = attn[:, :n_txt], attn[:, n_txt:]

        img = img + img_mod1.gate * self.img_attn.proj(img_attn)
        img = img + img_mod2.gate * self.img_mlp(_modulate(img, self.img_norm2, img_mod2))
        txt = txt + txt_mod1.gate * self.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * self.txt_mlp(_modulate(txt, self.txt_norm2, txt_mod2))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [text; image] tokens; attention and MLP in parallel from one fused projection."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        head_dim = hidden_size // num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(head_dim)
        self.pre_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: torch.Tensor, vec: torch.Tensor, pe: torch.Tensor,
                attn_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        mod, _ = self.modulation(vec)
        qkv, mlp = torch.split(self.linear1(_modulate(x, self.pre_norm, mod)),
                               [3 * self.hidden_size, self.mlp_hidden_dim], dim=-1)
        q, k, v = split_heads(qkv, self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe, attn_mask)
        return x + mod.gate * self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2))


class LastLayer(nn.Module):
    def __init__(self, hidden_size: int, out_channels: int):
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, vec: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)


# --------------------------------------------------------------------------------------
# the model


class BlockSwapHooks:
    """Interface of `Flux.block_swap` (no-op base class); kind is 'double' or 'single'."""

    def before_block(self, kind: str, index: int) -> None:  # pragma: no cover - interface
        pass

    def after_block(self, kind: str, index: int) -> None:  # pragma: no cover - interface
        pass


def _offloaded_checkpoint(fn, *args):
    """Gradient checkpointing whose saved block inputs live on the CPU until backward."""
    from torch.utils.checkpoint import checkpoint

    device = next((a.device for a in args if isinstance(a, torch.Tensor)), None)
    if device is None or device.type == "cpu":
        return checkpoint(fn, *args, use_reentrant=False)

    def on_device(*cpu_args):
        return fn(*[a.to(device, non_blocking=True) if isinstance(a, torch.Tensor) else a for a in cpu_args])

    cpu_args = [a.to("cpu") if isinstance(a, torch.Tensor) else a for a in args]
    return checkpoint(on_device, *cpu_args, use_reentrant=False)


class Flux(nn.Module):
    """FLUX.1 dev / schnell (and compact variants) transformer; see the module docstring."""

    def __init__(self, config: FluxConfig):
        super().__init__()
        if config.hidden_size % config.num_heads:
            raise ValueError(f"hidden size {config.hidden_size} is not divisible by {config.num_heads} heads")
        if sum(config.axes_dim) != config.head_dim:
            raise ValueError(f"RoPE axes {config.axes_dim} do not sum to the head dim {config.head_dim}")
        self.config = config
        self.in_channels = config.in_channels
        self.out_channels = config.out_channels
        self.hidden_size = config.hidden_size
        self.num_heads = config.num_heads
        self.pe_embedder = EmbedND(config.head_dim, config.theta, config.axes_dim)
        self.img_in = nn.Linear(config.in_channels, config.hidden_size, bias=True)
        self.time_in = MLPEmbedder(TIME_EMBED_DIM, config.hidden_size)
        self.vector_in = MLPEmbedder(config.vec_in_dim, config.hidden_size)
        self.guidance_in = MLPEmbedder(TIME_EMBED_DIM, config.hidden_size) if config.guidance_embed else nn.Identity()
        self.txt_in = nn.Linear(config.context_in_dim, config.hidden_size)
        self.double_blocks = nn.ModuleList([
            DoubleStreamBlock(config.hidden_size, config.num_heads, config.mlp_ratio, config.qkv_bias)
            for _ in range(config.depth)
        ])
        self.single_blocks = nn.ModuleList([
            SingleStreamBlock(config.hidden_size, config.num_heads, config.mlp_ratio)
            for _ in range(config.depth_single_blocks)
        ])
        self.final_layer = LastLayer(config.hidden_size, config.out_channels)
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False
        self.block_swap: Optional[BlockSwapHooks] = None

    # -- properties ----------------------------------------------------------------------
    @property
    def is_schnell(self) -> bool:
        return not self.config.guidance_embed

    @property
    def device(self) -> torch.device:
        return self.img_in.bias.device

    @property
    def dtype(self) -> torch.dtype:
        """Compute dtype (of the biases: weights may be stored in fp8)."""
        return self.img_in.bias.dtype

    def non_block_modules(self) -> list[nn.Module]:
        return [self.img_in, self.time_in, self.vector_in, self.guidance_in, self.txt_in, self.final_layer]

    # -- training switches ---------------------------------------------------------------
    def enable_gradient_checkpointing(self, cpu_offload: bool = False) -> None:
        self.gradient_checkpointing = True
        self.cpu_offload_checkpointing = bool(cpu_offload)

    def disable_gradient_checkpointing(self) -> None:
        self.gradient_checkpointing = False
        self.cpu_offload_checkpointing = False

    def _call_block(self, block: nn.Module, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            if self.cpu_offload_checkpointing:
                return _offloaded_checkpoint(block, *args)
            from torch.utils.checkpoint import checkpoint

            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # -- forward -------------------------------------------------------------------------
    def forward(self, img: torch.Tensor, img_ids: torch.Tensor, txt: torch.Tensor, txt_ids: torch.Tensor,
                timesteps: torch.Tensor, y: torch.Tensor, guidance: Optional[torch.Tensor] = None,
                txt_attention_mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must be (batch, tokens, channels)")
        b = img.shape[0]
        dtype = img.dtype
        img = self.img_in(img)
        vec = self.time_in(timestep_embedding(timesteps.reshape(-1).expand(b) if timesteps.numel() == 1
                                              else timesteps).to(dtype))
        if self.config.guidance_embed:
            if guidance is None:
                raise ValueError("this FLUX.1 dev model needs a guidance value (guidance=...)")
            g = guidance.reshape(-1)
            g = g.expand(b) if g.numel() == 1 else g
            vec = vec + self.guidance_in(timestep_embedding(g).to(dtype))
        vec = vec + self.vector_in(y.to(dtype))
        txt = self.txt_in(txt.to(dtype))

        if img_ids.ndim == 2:
            img_ids = img_ids.unsqueeze(0).expand(b, -1, -1)
        if txt_ids.ndim == 2:
            txt_ids = txt_ids.unsqueeze(0).expand(b, -1, -1)
        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))

        attn_mask = None
        if txt_attention_mask is not None:
            keep = torch.cat([txt_attention_mask.to(device=img.device, dtype=torch.bool),
                              torch.ones(b, img.shape[1], device=img.device, dtype=torch.bool)], dim=1)
            attn_mask = keep[:, None, None, :]  # (B, 1, 1, L): masks keys only

        hooks = self.block_swap
        for i, block in enumerate(self.double_blocks):
            if hooks is not None:
                hooks.before_block("double", i)
            img, txt = self._call_block(block, img, txt, vec, pe, attn_mask)
            if hooks is not None:
                hooks.after_block("double", i)

        n_txt = txt.shape[1]
        x = torch.cat((txt, img), dim=1)
        for i, block in enumerate(self.single_blocks):
            if hooks is not None:
                hooks.before_block("single", i)
            x = self._call_block(block, x, vec, pe, attn_mask)
            if hooks is not None:
                hooks.after_block("single", i)
        img = x[:, n_txt:, ...]
        return self.final_layer(img, vec)
