"""Value converters used by the shared argument groups.

Standard library only: these are imported while a parser is being built, and
`script.py --help` must not pay for heavy imports.
"""

from __future__ import annotations

import argparse
from typing import Sequence, Tuple, Union

from library.errors import UserInputError


def int_or_float(value: str) -> Union[int, float]:
    """Step count or ratio for --lr_warmup_steps / --lr_decay_steps.

    * ``"10%"`` -> ``0.1`` (a ratio of the total number of steps);
    * a number below 1 (``"0.05"``) stays a float ratio;
    * a number of 1 or more must be a whole count (``"100"`` -> ``100``);
      ``"1.5"`` is rejected because it is neither a count nor a ratio.
    """
    text = str(value).strip()
    if text.endswith("%"):
        try:
            return float(text[:-1]) / 100
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{value!r} is not a valid percentage; write it like 10%"
            ) from None
    try:
        number = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r} is not a number; give a step count (100), a ratio below 1 (0.1) "
            f"or a percentage (10%)"
        ) from None
    if number < 1:
        return number
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{value!r}: values of 1 or more are step counts and must be whole numbers; "
            f"use a value below 1 (0.1) or a percentage (10%) for a ratio"
        ) from None


def parse_resolution(
    value: Union[str, int, Sequence[int], None], option: str = "--resolution"
) -> Tuple[int, int]:
    """Turn a resolution into ``(width, height)``.

    Accepts ``"512"`` -> ``(512, 512)``, ``"768,512"`` -> ``(768, 512)`` (width first),
    and, for values that come from a TOML file, an int or a two-element list.
    Anything else raises UserInputError naming ``option``.
    """
    if value is None:
        raise UserInputError(f"{option} is required: give a size like 512 or 768,512")
    if isinstance(value, bool):
        raise UserInputError(f"{option}: {value!r} is not a resolution; give 512 or 768,512")
    if isinstance(value, int):
        parts: list = [value]
    elif isinstance(value, (list, tuple)):
        parts = list(value)
    else:
        text = str(value).strip()
        parts = [p.strip() for p in text.split(",")] if text else []
    if len(parts) == 1:
        parts = parts * 2
    if len(parts) != 2:
        raise UserInputError(
            f"{option}: {value!r} is not a resolution; give one size (512) or width,height (768,512)"
        )
    sizes = []
    for part in parts:
        if isinstance(part, bool):
            part = "invalid"
        try:
            number = int(part) if not isinstance(part, float) or part.is_integer() else None
        except (TypeError, ValueError):
            number = None
        if number is None or number <= 0:
            raise UserInputError(
                f"{option}: {value!r} is not a resolution; sizes must be positive whole numbers "
                f"like 512 or 768,512"
            )
        sizes.append(number)
    return sizes[0], sizes[1]
