"""Key maps between the LDM single-file layout and diffusers module names (SD1.x/2.x).

One table of module pairs per model is generated from its config; both directions are
derived from that same table, so load and save can never disagree. A pair maps a module
path (e.g. `down_blocks.1.resnets.0` <-> `input_blocks.4.0`) plus renames of its direct
children; parameters below are named the same on both sides.
"""

from __future__ import annotations

from dataclasses import dataclass, field

# diffusers child name -> LDM child name
_UNET_RESNET = {
    "norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


@dataclass(frozen=True)
class ModulePair:
    diffusers: str
    ldm: str
    children: dict = field(default_factory=dict)
    # VAE attention: diffusers Linear (out, in) <-> LDM 1x1 conv (out, in, 1, 1)
    linear_as_conv1x1: bool = False


def unet_module_pairs(cfg: dict) -> list[ModulePair]:
    n = cfg["layers_per_block"]
    stride = n + 1
    levels = len(cfg["block_out_channels"])
    pairs = [
        ModulePair("time_embedding.linear_1", "time_embed.0"),
        ModulePair("time_embedding.linear_2", "time_embed.2"),
        ModulePair("conv_in", "input_blocks.0.0"),
        ModulePair("conv_norm_out", "out.0"),
        ModulePair("conv_out", "out.2"),
        ModulePair("mid_block.resnets.0", "middle_block.0", _UNET_RESNET),
        ModulePair("mid_block.attentions.0", "middle_block.1"),
        ModulePair("mid_block.resnets.1", "middle_block.2", _UNET_RESNET),
    ]
    for i in range(levels):
        down_attn = cfg["down_block_types"][i].startswith("CrossAttn")
        for j in range(n):
            idx = 1 + i * stride + j
            pairs.append(ModulePair(f"down_blocks.{i}.resnets.{j}", f"input_blocks.{idx}.0", _UNET_RESNET))
            if down_attn:
                pairs.append(ModulePair(f"down_blocks.{i}.attentions.{j}", f"input_blocks.{idx}.1"))
        if i < levels - 1:
            pairs.append(ModulePair(f"down_blocks.{i}.downsamplers.0.conv", f"input_blocks.{(i + 1) * stride}.0.op"))

        up_attn = cfg["up_block_types"][i].startswith("CrossAttn")
        for j in range(n + 1):
            idx = i * stride + j
            pairs.append(ModulePair(f"up_blocks.{i}.resnets.{j}", f"output_blocks.{idx}.0", _UNET_RESNET))
            if up_attn:
                pairs.append(ModulePair(f"up_blocks.{i}.attentions.{j}", f"output_blocks.{idx}.1"))
        if i < levels - 1:
            pairs.append(ModulePair(f"up_blocks.{i}.upsamplers.0.conv", f"output_blocks.{i * stride + n}.{2 if up_attn else 1}.conv"))
    return pairs


def vae_module_pairs(cfg: dict) -> list[ModulePair]:
    levels = len(cfg["block_out_channels"])
    n = cfg["layers_per_block"]
    pairs = [
        ModulePair("quant_conv", "quant_conv"),
        ModulePair("post_quant_conv", "post_quant_conv"),
    ]
    for part in ("encoder", "decoder"):
        pairs += [
            ModulePair(f"{part}.conv_in", f"{part}.conv_in"),
            ModulePair(f"{part}.conv_out", f"{part}.conv_out"),
            ModulePair(f"{part}.conv_norm_out", f"{part}.norm_out"),
            ModulePair(f"{part}.mid_block.resnets.0", f"{part}.mid.block_1", _VAE_RESNET),
            ModulePair(f"{part}.mid_block.resnets.1", f"{part}.mid.block_2", _VAE_RESNET),
            ModulePair(f"{part}.mid_block.attentions.0", f"{part}.mid.attn_1", _VAE_ATTENTION, linear_as_conv1x1=True),
        ]
    for i in range(levels):
        for j in range(n):
            pairs.append(ModulePair(f"encoder.down_blocks.{i}.resnets.{j}", f"encoder.down.{i}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            pairs.append(ModulePair(f"encoder.down_blocks.{i}.downsamplers.0.conv", f"encoder.down.{i}.downsample.conv"))
        # the decoder's LDM levels are numbered from the lowest resolution up
        ldm_level = levels - 1 - i
        for j in range(n + 1):
            pairs.append(ModulePair(f"decoder.up_blocks.{i}.resnets.{j}", f"decoder.up.{ldm_level}.block.{j}", _VAE_RESNET))
        if i < levels - 1:
            pairs.append(ModulePair(f"decoder.up_blocks.{i}.upsamplers.0.conv", f"decoder.up.{ldm_level}.upsample.conv"))
    return pairs


@dataclass(frozen=True)
class KeyMapping:
    ldm_key: str
    reshape: str | None  # None, "to_conv" (diffusers -> LDM) meaning add/remove 1x1 dims


def map_diffusers_keys_to_ldm(diffusers_keys, pairs: list[ModulePair], ldm_prefix: str) -> dict[str, KeyMapping]:
    """For every diffusers key: the LDM key it is stored under (with `ldm_prefix`)."""
    by_len = sorted(pairs, key=lambda p: len(p.diffusers), reverse=True)
    out = {}
    for key in diffusers_keys:
        pair = next((p for p in by_len if key.startswith(p.diffusers + ".")), None)
        if pair is None:
            raise KeyError(f"no LDM name for diffusers key '{key}'")
        rest = key[len(pair.diffusers) + 1:]
        reshape = None
        for child in sorted(pair.children, key=len, reverse=True):
            if rest.startswith(child + "."):
                param = rest[len(child) + 1:]
                rest = pair.children[child] + "." + param
                if pair.linear_as_conv1x1 and param == "weight" and child != "group_norm":
                    reshape = "to_conv"
                break
        out[key] = KeyMapping(f"{ldm_prefix}{pair.ldm}.{rest}", reshape)
    return out


def to_diffusers_tensor(t, mapping: KeyMapping):
    """LDM tensor -> diffusers shape (drops the 1x1 conv dims of VAE attention weights)."""
    if mapping.reshape == "to_conv" and t.dim() == 4:
        return t.reshape(t.shape[0], t.shape[1])
    return t


def to_ldm_tensor(t, mapping: KeyMapping):
    if mapping.reshape == "to_conv" and t.dim() == 2:
        return t.reshape(t.shape[0], t.shape[1], 1, 1)
    return t
