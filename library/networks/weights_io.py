"""Network weight files: flat {key: tensor} dicts in .safetensors or torch pickles.

Saving casts every tensor (alpha included) to the requested dtype, adds the `sshs_*`
hashes (formats.md b.1) to the safetensors metadata and writes atomically, so an
interrupted save never leaves a truncated file under the final name.
"""

from __future__ import annotations

import logging
import os
from typing import Mapping

import torch

from library.errors import UserInputError
from library.io.atomic import atomic_output
from library.io.hashing import add_sshs_hashes
from library.io.safetensors_io import is_safetensors_path, load_state_dict, save_state_dict

logger = logging.getLogger(__name__)


def load_weights_file(path: str | os.PathLike, device: str = "cpu") -> dict:
    """Read a network file (.safetensors, or .pt/.ckpt/.bin written by torch.save)."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise UserInputError(f"{path}: network weights file not found")
    if is_safetensors_path(path):
        return load_state_dict(path, device=device)
    try:
        sd = torch.load(path, map_location=device, weights_only=True)
    except Exception as e:  # pickle errors, zip errors...
        raise UserInputError(f"{path}: cannot read network weights ({type(e).__name__}: {e})") from None
    if isinstance(sd, Mapping) and "state_dict" in sd and isinstance(sd["state_dict"], Mapping):
        sd = sd["state_dict"]
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise UserInputError(f"{path}: not a network weights file (expected a flat dict of tensors)")
    return dict(sd)


def prepare_for_save(state_dict: Mapping[str, torch.Tensor], dtype=None) -> dict:
    """Detached CPU copies, cast to `dtype` when given (every tensor, alpha included)."""
    out = {}
    for k, v in state_dict.items():
        v = v.detach().to("cpu")
        if dtype is not None:
            v = v.to(dtype)
        out[k] = v.contiguous()
    return out


def save_weights_file(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, dtype=None,
                      metadata: Mapping[str, str] | None = None) -> None:
    """Write network weights; safetensors gets metadata plus sshs_* hashes, others torch.save."""
    path = os.fspath(path)
    tensors = prepare_for_save(state_dict, dtype)
    if is_safetensors_path(path):
        meta = {k: str(v) for k, v in (metadata or {}).items()}
        add_sshs_hashes(tensors, meta)
        save_state_dict(tensors, path, meta)
    else:
        with atomic_output(path) as tmp:
            torch.save(tensors, tmp)
    logger.info("saved network weights to %s (%d tensors)", path, len(tensors))


def module_names(weights_sd: Mapping[str, torch.Tensor]) -> list[str]:
    """Module names (text before the first '.') in file order, each once."""
    seen = {}
    for k in weights_sd:
        if "." in k:
            seen.setdefault(k.split(".", 1)[0], None)
    return list(seen)
