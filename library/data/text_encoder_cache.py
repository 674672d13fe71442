"""Text-encoder output caches through a per-architecture strategy.

The dataset never knows which text encoders exist. An architecture supplies a
:class:`TextEncoderCacheStrategy` subclass that says:

* ``suffix`` -- cache file name ending (``_te_outputs.npz`` SDXL, ``_flux_te.npz`` FLUX,
  ``_sd3_te.npz`` SD3; formats.md section d.2);
* ``npz_keys`` -- the per-sample arrays it produces;
* ``tokenize(captions)`` and ``encode(tokens, captions)`` -- the work itself;
  ``encode`` returns ``{key: array of shape (batch, ...)}`` (numpy or torch);
* ``flags()`` -- settings stored in each file (e.g. ``apply_t5_attn_mask``); a file whose
  stored flags differ from the current ones is invalid.

:func:`cache_text_encoder_outputs` runs a strategy over captions: in memory (identical
captions -- typical for class-token regularisation images -- are encoded once) or to
disk (one atomic ``.npz`` per image, existing valid files skipped).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import numpy as np

from library.data.latent_cache import npz_members, save_npz

logger = logging.getLogger(__name__)

__all__ = ["TextEncoderCacheStrategy", "TextCacheJob", "cache_text_encoder_outputs", "to_numpy_for_cache"]


class TextEncoderCacheStrategy:
    """Base class of the per-architecture text-encoder caching strategies."""

    suffix: str = "_te_outputs.npz"
    npz_keys: tuple[str, ...] = ()

    def tokenize(self, captions: Sequence[str]) -> Any:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, tokens: Any, captions: Sequence[str]) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError

    def flags(self) -> dict[str, Any]:
        """Settings stored in every file and compared on load (e.g. attention-mask use)."""
        return {}

    def cache_path(self, image_path: str) -> str:
        return os.path.splitext(image_path)[0] + self.suffix

    def is_cache_valid(self, path: str, skip_cache_check: bool = False) -> bool:
        if skip_cache_check:
            return os.path.exists(path)
        members = npz_members(path)
        if members is None:
            if os.path.exists(path):
                logger.warning("text-encoder cache %s is corrupt or not an .npz file; it will be rebuilt", path)
            return False
        flags = self.flags()
        if any(k not in members for k in self.npz_keys) or any(k not in members for k in flags):
            return False
        if flags:
            try:
                with np.load(path) as z:
                    for k, v in flags.items():
                        if not np.array_equal(z[k], np.asarray(v)):
                            return False
            except (OSError, ValueError):
                return False
        return True

    def load(self, path: str) -> dict[str, np.ndarray]:
        from library.errors import UserInputError

        try:
            with np.load(path) as z:
                return {k: z[k] for k in self.npz_keys}
        except (OSError, ValueError, KeyError) as e:
            raise UserInputError(
                f"text-encoder cache {path} cannot be read ({e}); delete it and run again to rebuild it"
            ) from None


def to_numpy_for_cache(value: Any) -> np.ndarray:
    """Tensor/array -> numpy for storage: bfloat16 becomes float32, fp16 stays fp16."""
    if isinstance(value, np.ndarray):
        return value
    try:
        import torch
    except ImportError:  # pragma: no cover
        return np.asarray(value)
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu()
        if t.dtype == torch.bfloat16:
            t = t.float()
        return t.numpy()
    return np.asarray(value)


@dataclass
class TextCacheJob:
    caption: str
    npz_path: Optional[str] = None  # None: memory only
    tag: Any = None


def cache_text_encoder_outputs(
    jobs: Sequence[TextCacheJob],
    strategy: TextEncoderCacheStrategy,
    batch_size: int = 1,
    skip_cache_check: bool = False,
    on_result: Optional[Callable[[TextCacheJob, dict], None]] = None,
    progress: bool = False,
) -> int:
    """Encode the captions of ``jobs``; returns how many captions were encoded.

    Jobs with an ``npz_path`` whose file is already valid are skipped (their outputs are
    loaded lazily at batch time). Remaining identical captions are encoded once.
    """
    todo: list[TextCacheJob] = []
    for job in jobs:
        if job.npz_path and strategy.is_cache_valid(job.npz_path, skip_cache_check):
            continue
        todo.append(job)
    by_caption: dict[str, list[TextCacheJob]] = {}
    for job in todo:
        by_caption.setdefault(job.caption, []).append(job)
    captions = list(by_caption)
    flags = {k: np.asarray(v) for k, v in strategy.flags().items()}
    bar = None
    if progress and captions:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(captions), desc="caching text encoder outputs", unit="caption")
        except ImportError:  # pragma: no cover
            bar = None
    import torch

    for i in range(0, len(captions), max(1, batch_size)):
        chunk = captions[i : i + batch_size]
        with torch.no_grad():
            outputs = strategy.encode(strategy.tokenize(chunk), chunk)
        arrays = {k: to_numpy_for_cache(v) for k, v in outputs.items()}
        for j, caption in enumerate(chunk):
            sample = {k: v[j] for k, v in arrays.items()}
            for job in by_caption[caption]:
                if on_result is not None:
                    on_result(job, sample)
                if job.npz_path:
                    save_npz(job.npz_path, {**sample, **flags})
        if bar is not None:
            bar.update(len(chunk))
    if bar is not None:
        bar.close()
    return len(captions)
