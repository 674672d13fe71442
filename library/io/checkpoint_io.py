"""Load a whole-model checkpoint file (.safetensors, or .ckpt/.pt/.bin via torch).

Pickle-based files are opened only with `torch.load(weights_only=True)`, which refuses
arbitrary code; a file that is not a valid archive is reported by name.
"""

from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass, field

from library.errors import UserInputError
from library.io import safetensors_io

PICKLE_SUFFIXES = (".ckpt", ".pt", ".pth", ".bin")


@dataclass
class CheckpointFile:
    path: str
    state_dict: dict
    metadata: dict[str, str] = field(default_factory=dict)
    epoch: int = 0
    global_step: int = 0


def read_checkpoint_shapes(path: str) -> dict[str, tuple[int, ...]] | None:
    """Key -> shape without loading tensors (safetensors only; None for other formats)."""
    if safetensors_io.is_safetensors_path(path):
        return safetensors_io.read_header(path).shapes()
    return None


def load_checkpoint(path: str, mmap: bool = True) -> CheckpointFile:
    if not os.path.exists(path):
        raise UserInputError(f"{path}: file not found")
    if os.path.isdir(path):
        raise UserInputError(f"{path}: is a folder, expected a checkpoint file")
    if safetensors_io.is_safetensors_path(path):
        header = safetensors_io.read_header(path)
        sd = safetensors_io.load_state_dict(path, mmap=mmap)
        return CheckpointFile(path, sd, header.metadata)
    if path.lower().endswith(PICKLE_SUFFIXES):
        return _load_pickle_checkpoint(path)
    raise UserInputError(f"{path}: unknown checkpoint extension (expected .safetensors, .ckpt, .pt, .pth or .bin)")


def _load_pickle_checkpoint(path: str) -> CheckpointFile:
    import torch

    # torch.save files are zip archives since torch 1.6; legacy pickles start with 0x80.
    with open(path, "rb") as f:
        magic = f.read(2)
    if not zipfile.is_zipfile(path) and magic[:1] != b"\x80":
        raise UserInputError(f"{path}: not a valid checkpoint archive (expected a torch.save zip or pickle file)")
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as e:  # noqa: BLE001 - any failure here is a bad file, reported by name
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserInputError(
            f"{path}: cannot be read as a weights-only checkpoint ({first_line}); convert it to .safetensors"
        ) from None
    if not isinstance(obj, dict):
        raise UserInputError(f"{path}: checkpoint holds a {type(obj).__name__}, expected a dict of tensors")
    epoch = int(obj.get("epoch", 0) or 0) if "state_dict" in obj else 0
    global_step = int(obj.get("global_step", 0) or 0) if "state_dict" in obj else 0
    sd = obj["state_dict"] if isinstance(obj.get("state_dict"), dict) else obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserInputError(f"{path}: checkpoint contains no tensors")
    return CheckpointFile(path, tensors, {}, epoch, global_step)


def save_checkpoint(path: str, state_dict: dict, metadata: dict[str, str] | None = None, epoch: int = 0, global_step: int = 0) -> None:
    """Write .safetensors (with metadata) or a .ckpt holding {state_dict, epoch, global_step}; atomic."""
    if safetensors_io.is_safetensors_path(path):
        safetensors_io.save_state_dict(state_dict, path, metadata)
        return
    import torch

    from library.io.atomic import atomic_output

    payload = {"state_dict": {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}, "epoch": epoch, "global_step": global_step}
    with atomic_output(path) as tmp:
        torch.save(payload, tmp)
