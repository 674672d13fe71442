"""Command-line plumbing shared by the LoRA tools: safe output paths, ratio lists, progress
bars, timing and the closing summary. Imports nothing heavy (scripts answer --help fast)."""

from __future__ import annotations

import os
import sys
import time
from typing import Iterable, Sequence

from library.errors import UserInputError

LORA_EXTENSIONS = (".safetensors", ".ckpt", ".pt", ".pth")


def same_file(a: str, b: str) -> bool:
    """True when two paths name the same file (existing: by inode; else by resolved path)."""
    try:
        if os.path.exists(a) and os.path.exists(b):
            return os.path.samefile(a, b)
    except OSError:
        pass
    return os.path.realpath(a) == os.path.realpath(b)


def check_output(path: str | None, inputs: Sequence[tuple[str, str | None]], option: str = "--save_to",
                 extensions: Sequence[str] = LORA_EXTENSIONS) -> str:
    """Validate an output path before any work: given, a file name with an allowed extension,
    not a folder, and not one of the inputs (`inputs`: (option, path) pairs). Returns it."""
    if not path:
        raise UserInputError(f"{option} is required: the file to write")
    ext = os.path.splitext(path)[1].lower()
    if extensions and ext not in extensions:
        raise UserInputError(f"{option} {path}: the file name must end in {', '.join(extensions)}")
    if os.path.isdir(path):
        raise UserInputError(f"{option} {path}: is a folder; give a file name")
    for opt, p in inputs:
        if p and same_file(path, p):
            raise UserInputError(f"{option} {path} is also the input {opt} {p}; refusing to overwrite an input, "
                                 f"choose another output file")
    return path


def check_inputs_exist(inputs: Sequence[tuple[str, str | None]]) -> None:
    for opt, p in inputs:
        if p and not os.path.exists(p):
            raise UserInputError(f"{opt} {p}: file not found")


def ratios_for(models: Sequence[str] | None, ratios: Sequence[float] | None, option: str = "--ratios") -> list[float]:
    """One ratio per model; all 1.0 when none are given; a count mismatch is an error."""
    models = list(models or [])
    if not models:
        raise UserInputError("--models: give at least one LoRA file")
    if ratios is None:
        return [1.0] * len(models)
    ratios = list(ratios)
    if len(ratios) != len(models):
        raise UserInputError(f"{option}: {len(ratios)} values for {len(models)} --models; give one ratio per model")
    return [float(r) for r in ratios]


def progress(iterable: Iterable, total: int | None = None, desc: str = "", enabled: bool = True, unit: str = "module"):
    """A tqdm bar on stderr; none when disabled or when the environment sets SD_TOOLS_PROGRESS=0."""
    if not enabled or os.environ.get("SD_TOOLS_PROGRESS") == "0":
        return iterable
    from tqdm import tqdm

    return tqdm(iterable, total=total, desc=desc, file=sys.stderr, leave=False, dynamic_ncols=True, unit=unit)


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def file_size(path: str) -> str:
    try:
        return human_bytes(os.path.getsize(path))
    except OSError:
        return "?"


class Stopwatch:
    def __init__(self):
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return time.perf_counter() - self.start


def summary(lines: Iterable[str]) -> None:
    """The closing report, on stdout."""
    for line in lines:
        print(line)
    sys.stdout.flush()


def precision_choices() -> list:
    return [None, "float", "fp16", "bf16"]
