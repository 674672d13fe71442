"""Precision names used on the command line (`--save_precision`, `--mixed_precision`...) -> torch dtypes."""

from __future__ import annotations

from library.errors import UserInputError

_NAMES = {
    "float": "float32", "fp32": "float32", "float32": "float32",
    "fp16": "float16", "float16": "float16", "half": "float16",
    "bf16": "bfloat16", "bfloat16": "bfloat16",
}


def dtype_from_precision(name, option: str = "--save_precision"):
    """None / "no" -> None (keep what is stored); otherwise the torch dtype."""
    import torch

    if name is None or isinstance(name, torch.dtype):
        return name
    key = str(name).lower()
    if key in ("no", "none", ""):
        return None
    if key not in _NAMES:
        raise UserInputError(f"{option} {name}: expected one of float, fp16, bf16")
    return getattr(torch, _NAMES[key])
