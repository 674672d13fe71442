"""Which model a LoRA belongs to, from its module names; LoRA Block Weight (LBW) blocks.

Module names follow the model's own layer paths (formats.md a.1), so they tell the model
family without any metadata:

| family | U-Net / transformer names                              | text encoders            |
|--------|--------------------------------------------------------|--------------------------|
| sd     | lora_unet_down_blocks_*, _mid_block_*, _up_blocks_*    | lora_te_*                |
| sdxl   | lora_unet_input_blocks_*, _middle_block_*, _output_blocks_* | lora_te1_*, lora_te2_* |
| flux   | lora_unet_double_blocks_*, _single_blocks_*, _img_in ...| lora_te1_*, lora_te3_*  |
| sd3    | lora_unet_joint_blocks_*, _x_embedder ...              | lora_te1_/2_/3_*         |

SDXL files whose U-Net part uses diffusers names (down_blocks...) are recognised by their
two text-encoder prefixes.

LBW lists (the sd-webui-lora-block-weight convention) give one weight per block, in the
order of `LBW_BLOCKS` restricted to a preset: 17 or 26 entries for SD1.x/2.x, 12 or 20 for
SDXL. "BASE" is every text-encoder module.
"""

from __future__ import annotations

import json
import re
from typing import Iterable

from library.errors import UserInputError

FAMILY_LABELS = {"sd": "SD1.x/2.x", "sdxl": "SDXL", "flux": "FLUX.1", "sd3": "SD3"}

_SD_UNET = re.compile(r"^lora_unet_(down_blocks|mid_block|up_blocks|conv_in|conv_out|time_embedding)_")
_SDXL_UNET = re.compile(r"^lora_unet_(input_blocks|middle_block|output_blocks|label_emb|time_embed)_")
_FLUX = re.compile(r"^lora_unet_(double_blocks|single_blocks|img_in|txt_in|time_in|vector_in|guidance_in|final_layer|distilled_guidance_layer)")
_SD3 = re.compile(r"^lora_unet_(joint_blocks|x_embedder|context_embedder|t_embedder|y_embedder)")


def family_of_names(names: Iterable[str]) -> set[str]:
    """Every family the names point to (usually one)."""
    names = list(names)
    found: set[str] = set()
    for n in names:
        if _SD_UNET.match(n):
            found.add("sd_unet")
        elif _SDXL_UNET.match(n):
            found.add("sdxl")
        elif _FLUX.match(n):
            found.add("flux")
        elif _SD3.match(n):
            found.add("sd3")
    te = {p for p in ("lora_te1_", "lora_te2_", "lora_te3_") if any(n.startswith(p) for n in names)}
    te_single = any(n.startswith("lora_te_") for n in names)
    if "sd_unet" in found:
        found.discard("sd_unet")
        # SDXL files from diffusers-named trainers: SD1-style U-Net names, two text encoders
        found.add("sdxl" if ("lora_te1_" in te or "lora_te2_" in te) and not te_single else "sd")
    if not found:
        if te_single:
            found.add("sd")
        elif "lora_te3_" in te:
            found.add("sd3" if "lora_te2_" in te else "flux")
        elif te:
            found.add("sdxl")
    return found


def detect_family(names: Iterable[str], path: str = "LoRA") -> str:
    """'sd', 'sdxl', 'flux' or 'sd3'; 'unknown' when the names say nothing; an error when they
    mix families."""
    found = family_of_names(names)
    if len(found) > 1:
        labels = " and ".join(FAMILY_LABELS[f] for f in sorted(found))
        raise UserInputError(f"{path}: its module names mix {labels} layers; not a LoRA for one model")
    return found.pop() if found else "unknown"


def family_label(family: str) -> str:
    return FAMILY_LABELS.get(family, "an unknown model")


def require_family(path: str, family: str, expected: str, script_hint: str | None = None) -> None:
    """Refuse a LoRA for another model family, naming the file and the right tool."""
    if family in (expected, "unknown"):
        return
    hints = {"sdxl": "networks/sdxl_merge_lora.py", "flux": "networks/flux_merge_lora.py", "sd": "networks/merge_lora.py"}
    hint = script_hint or hints.get(family)
    raise UserInputError(
        f"{path}: this is a LoRA for {family_label(family)} (by its key names), not for {family_label(expected)}"
        + (f"; use {hint}" if hint else "")
    )


def sd_version_hint(modules) -> bool | None:
    """For an SD1.x/2.x LoRA: True (v2), False (v1) or None, from the text-encoder width or the
    cross-attention context width (768 for v1, 1024 for v2). Tiny test models say None."""
    widths = []
    for name, m in modules.items():
        if name.startswith("lora_te_") and name.endswith("_self_attn_q_proj"):
            widths.append(m.in_features)
        elif name.startswith("lora_unet_") and name.endswith("_attn2_to_k"):
            widths.append(m.in_features)
    if widths and all(w == 1024 for w in widths):
        return True
    if widths and all(w == 768 for w in widths):
        return False
    return None


# -- LoRA Block Weight ----------------------------------------------------------------------
LBW_BLOCKS = ["BASE"] + [f"IN{i:02d}" for i in range(12)] + ["MID"] + [f"OUT{i:02d}" for i in range(12)]

LBW_PRESETS: dict[int, tuple[str, list[str]]] = {
    17: ("sd", ["BASE", "IN01", "IN02", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(3, 12)]),
    26: ("sd", list(LBW_BLOCKS)),
    12: ("sdxl", ["BASE", "IN04", "IN05", "IN07", "IN08", "MID"] + [f"OUT{i:02d}" for i in range(6)]),
    20: ("sdxl", ["BASE"] + [f"IN{i:02d}" for i in range(9)] + ["MID"] + [f"OUT{i:02d}" for i in range(9)]),
}

_SD_BLOCK = re.compile(r"^lora_unet_(down|up)_blocks_(\d+)_(resnets|attentions|downsamplers|upsamplers)_(\d+)_")
_SDXL_BLOCK = re.compile(r"^lora_unet_(input_blocks|output_blocks)_(\d+)_")


def lbw_block(name: str, family: str) -> str | None:
    """The LBW block of a module name ('BASE', 'IN00'..'IN11', 'MID', 'OUT00'..'OUT11'), or None
    for modules outside the blocks.

    SD1.x/2.x: down_blocks.i resnet/attention j is IN(3i+j+1), its downsampler IN(3i+3);
    up_blocks.i member j is OUT(3i+j), its upsampler OUT(3i+2); the middle block is MID.
    SDXL: input_blocks.n is IN n, middle_block MID, output_blocks.n OUT n.
    """
    if name.startswith("lora_te"):
        return "BASE"
    if family == "sdxl":
        if name.startswith("lora_unet_middle_block_"):
            return "MID"
        m = _SDXL_BLOCK.match(name)
        if not m:
            return None
        return f"{'IN' if m.group(1) == 'input_blocks' else 'OUT'}{int(m.group(2)):02d}"
    if name.startswith("lora_unet_mid_block_"):
        return "MID"
    m = _SD_BLOCK.match(name)
    if not m:
        return None
    i, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
    if m.group(1) == "down":
        return f"IN{3 * i + 3 if kind == 'downsamplers' else 3 * i + j + 1:02d}"
    return f"OUT{3 * i + 2 if kind == 'upsamplers' else 3 * i + j:02d}"


def parse_lbw(text: str, option: str = "--lbws") -> list[float]:
    """'[1,0,0.5,...]' (JSON, as sd-scripts takes it) or '1,0,0.5,...' -> numbers."""
    s = str(text).strip()
    try:
        value = json.loads(s) if s.startswith("[") else [float(x) if x.strip() else 0.0 for x in s.split(",")]
    except (ValueError, json.JSONDecodeError):
        raise UserInputError(f"{option} {text!r}: expected a list of numbers such as '[1,0,0,1,...]' or '1,0,0,1,...'") from None
    if not isinstance(value, list) or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in value):
        raise UserInputError(f"{option} {text!r}: expected a list of numbers such as '[1,0,0,1,...]'")
    if len(value) not in LBW_PRESETS:
        raise UserInputError(
            f"{option} {text!r}: {len(value)} values; an LBW list has 17 or 26 values (SD1.x/2.x) or 12 or 20 (SDXL)"
        )
    return [float(v) for v in value]


def lbw_weights(values: list[float], family: str, path: str, option: str = "--lbws") -> dict[str, float]:
    """Block name -> weight for one LoRA; blocks the list does not name keep 1.0."""
    lbw_family, blocks = LBW_PRESETS[len(values)]
    if family not in ("unknown", lbw_family):
        raise UserInputError(
            f"{option}: a list of {len(values)} values is for {family_label(lbw_family)} LoRAs, but {path} is for "
            f"{family_label(family)} (use {' or '.join(str(n) for n, (f, _) in LBW_PRESETS.items() if f == family) or 'no LBW'})"
        )
    return dict(zip(blocks, values))
