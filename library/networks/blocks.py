"""U-Net block indices for block-wise learning rates and ranks.

SD1.x/2.x (diffusers module paths), 25 blocks:
  0 conv_in (never adapted) | 1..11 down: down_blocks.i.{resnets,attentions}.j -> 1+3i+j,
  down_blocks.i.downsamplers.0 -> 1+3i+2 | 12 mid_block | 13..24 up: up_blocks.i.* -> 13+3i+j,
  up_blocks.i.upsamplers.0 -> 13+3i+2.
SDXL (LDM module paths), 23 blocks:
  0 time/label embedding | 1..9 input_blocks.n -> 1+n | 10..12 middle_block.n -> 10+n |
  13..21 output_blocks.n -> 13+n | 22 out.

`--network_args down_lr_weight/mid_lr_weight/up_lr_weight` give one weight per down /
mid / up entry (12/1/12 for SD1/2, 9/3/9 for SDXL) or a preset for down/up.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from library.errors import UserInputError

PRESETS = ("sine", "cosine", "linear", "reverse_linear", "zeros")

_SD_PART = re.compile(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions|downsamplers|upsamplers)\.(\d+)\.")
_SDXL_PART = re.compile(r"^(input_blocks|middle_block|output_blocks)\.(\d+)\.")


@dataclass(frozen=True)
class BlockLayout:
    name: str
    num_blocks: int  # N: entries of block_dims / block_alphas
    num_down: int  # D: entries of down_lr_weight / up_lr_weight
    num_mid: int  # M: entries of mid_lr_weight

    def block_index(self, unet_path: str) -> int | None:
        """Block index of a U-Net module path, or None when it is outside the blocks."""
        if self.name == "sdxl":
            m = _SDXL_PART.match(unet_path)
            if not m:
                return None
            base = {"input_blocks": 1, "middle_block": 10, "output_blocks": 13}[m.group(1)]
            return base + int(m.group(2))
        if unet_path.startswith("mid_block."):
            return 12
        m = _SD_PART.match(unet_path)
        if not m:
            return None
        i, kind, j = int(m.group(2)), m.group(3), int(m.group(4))
        base = 1 if m.group(1) == "down_blocks" else 13
        if kind in ("downsamplers", "upsamplers"):
            return base + 3 * i + 2
        return base + 3 * i + j

    def assemble(self, down: list[float], mid: list[float], up: list[float]) -> list[float]:
        """Per-block list of length N from the down/mid/up parts."""
        if self.name == "sdxl":
            return [1.0] + down + mid + up + [1.0]
        return down + mid + up


SD_LAYOUT = BlockLayout("sd", 25, 12, 1)
SDXL_LAYOUT = BlockLayout("sdxl", 23, 9, 3)


def layout_for(sdxl: bool) -> BlockLayout:
    return SDXL_LAYOUT if sdxl else SD_LAYOUT


def _parse_list(value, key: str) -> list[float]:
    if isinstance(value, (list, tuple)):
        items = list(value)
    else:
        items = str(value).split(",")
    out = []
    for item in items:
        s = str(item).strip()
        try:
            out.append(float(s) if s else 0.0)  # an empty item means 0
        except ValueError:
            raise UserInputError(f"--network_args {key}: {s!r} is not a number") from None
    return out


def preset_weights(spec: str, n: int, key: str) -> list[float]:
    """`name` or `name+base` -> n weights (sine, cosine, linear, reverse_linear, zeros)."""
    name, _, base_s = spec.strip().partition("+")
    try:
        base = float(base_s) if base_s else 0.0
    except ValueError:
        raise UserInputError(f"--network_args {key}={spec!r}: '{base_s}' after '+' is not a number") from None
    steps = [i / (n - 1) if n > 1 else 0.0 for i in range(n)]
    if name == "sine":
        w = [math.sin(math.pi / 2 * s) for s in steps]
    elif name == "cosine":
        w = [math.sin(math.pi / 2 * s) for s in steps][::-1]
    elif name == "linear":
        w = list(steps)
    elif name == "reverse_linear":
        w = steps[::-1]
    elif name == "zeros":
        w = [0.0] * n
    else:
        raise UserInputError(
            f"--network_args {key}={spec!r}: give comma-separated numbers (at least one comma, e.g. '1,0.5') "
            f"or a preset: {', '.join(PRESETS)} (optionally '+<base>', e.g. 'sine+0.5')"
        )
    return [x + base for x in w]


def _fit(values: list[float], n: int) -> list[float]:
    """Truncate to n entries or pad with 1.0."""
    return (values + [1.0] * n)[:n]


def parse_lr_weights(layout: BlockLayout, down=None, mid=None, up=None, zero_threshold: float = 0.0) -> list[float] | None:
    """Per-block lr weights (length N), or None when no part is given.

    down/up: comma list or preset; mid: comma list. Missing parts become 1.0; weights at or
    below `zero_threshold` become 0 (the block is not trained).
    """
    if down is None and mid is None and up is None:
        return None

    def part(value, n, key, allow_preset):
        if value is None:
            return [1.0] * n
        if allow_preset and not isinstance(value, (list, tuple)) and "," not in str(value):
            return _fit(preset_weights(str(value), n, key), n)
        return _fit(_parse_list(value, key), n)

    d = part(down, layout.num_down, "down_lr_weight", True)
    m = part(mid, layout.num_mid, "mid_lr_weight", False)
    u = part(up, layout.num_down, "up_lr_weight", True)
    weights = layout.assemble(d, m, u)
    return [0.0 if w <= zero_threshold else w for w in weights]


def per_block(values, n: int, key: str, default):
    """A block_dims-style list: exactly n entries when given, else [default] * n."""
    if values is None:
        return [default] * n
    values = list(values)
    if len(values) != n:
        raise UserInputError(f"--network_args {key}: expected exactly {n} comma-separated values (one per U-Net block), got {len(values)}")
    return values
