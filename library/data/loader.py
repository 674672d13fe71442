"""Batches in a deterministic, resumable order, optionally built by DataLoader workers.

:class:`EpochSampler` yields keys ``(batch index, epoch, step)``; the dataset builds the
batch from the key alone, so

* the order of an epoch depends only on ``(seed, epoch)``;
* workers need no shared state for the epoch or step (caption dropout / token warm-up
  see exact values even with prefetching);
* resuming at ``(epoch, batch)`` skips straight there -- no batch before it is loaded.

Usage::

    loader = ResumableLoader(group, seed=args.seed, num_workers=n, persistent_workers=True)
    loader.set_position(*resume_position(...))          # optional
    for epoch in range(loader.epoch, num_epochs + 1):
        for batch in loader.iter_epoch(epoch):
            ...
        state = loader.state_dict()                     # {"epoch": e, "batch": b}
"""

from __future__ import annotations

import math
import os
import random
from typing import Any, Iterator, Optional

__all__ = ["EpochSampler", "ResumableLoader", "resume_position", "worker_count"]


def _passthrough(batch: Any) -> Any:
    """The dataset already collates; the DataLoader must not touch the batch."""
    return batch


def worker_count(max_data_loader_n_workers: Optional[int]) -> int:
    """Workers actually used: the option, capped at the number of CPUs."""
    if not max_data_loader_n_workers:
        return 0
    return max(0, min(int(max_data_loader_n_workers), os.cpu_count() or 1))


class EpochSampler:
    """Keys for one epoch: a permutation of the batches seeded by ``(seed, epoch)``."""

    def __init__(self, num_batches: int, seed: int, shuffle: bool = True, gradient_accumulation_steps: int = 1):
        self.num_batches = num_batches
        self.seed = seed
        self.shuffle = shuffle
        self.grad_accum = max(1, gradient_accumulation_steps)
        self.epoch = 1
        self.start = 0
        self.step_offset = 0  # batches trained before epoch 1 of this numbering (resumes)

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        self.epoch = epoch
        self.start = start_batch

    def order(self, epoch: int) -> list[int]:
        order = list(range(self.num_batches))
        if self.shuffle:
            random.Random(f"order:{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        order = self.order(self.epoch)
        base = self.step_offset + (self.epoch - 1) * self.num_batches
        for pos in range(self.start, self.num_batches):
            yield order[pos], self.epoch, (base + pos) // self.grad_accum

    def __len__(self) -> int:
        return max(0, self.num_batches - self.start)


class ResumableLoader:
    """A DataLoader over a dataset group with an exact, resumable position."""

    def __init__(
        self,
        dataset,
        seed: int,
        num_workers: int = 0,
        persistent_workers: bool = False,
        shuffle: bool = True,
        gradient_accumulation_steps: int = 1,
        pin_memory: bool = False,
    ):
        import torch
        from torch.utils.data import DataLoader

        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), seed, shuffle, gradient_accumulation_steps)
        self.loader = DataLoader(
            dataset,
            batch_size=None,
            sampler=self.sampler,
            collate_fn=_passthrough,
            num_workers=num_workers,
            persistent_workers=persistent_workers and num_workers > 0,
            pin_memory=pin_memory,
            # Its own generator: creating an iterator each epoch must not draw from the
            # global RNG, which the training noise uses (exact resume depends on it).
            generator=torch.Generator().manual_seed(int(seed)),
        )
        self.epoch = 1
        self.batch = 0  # next batch position within self.epoch

    def __len__(self) -> int:
        """Batches per epoch."""
        return self.sampler.num_batches

    def set_position(self, epoch: int, batch: int = 0) -> None:
        self.epoch, self.batch = epoch, batch

    def iter_epoch(self, epoch: Optional[int] = None) -> Iterator[dict]:
        """Batches of ``epoch`` (default: the current one), starting at the saved position."""
        if epoch is None:
            epoch = self.epoch
        start = self.batch if epoch == self.epoch else 0
        self.sampler.set_epoch(epoch, start)
        if hasattr(self.dataset, "set_current_epoch"):
            self.dataset.set_current_epoch(epoch)
        self.epoch, self.batch = epoch, start
        for batch in self.loader:
            self.batch += 1
            yield batch
        self.epoch, self.batch = epoch + 1, 0

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "batch": self.batch}

    def load_state_dict(self, state: dict) -> None:
        self.set_position(int(state["epoch"]), int(state.get("batch", 0)))


def resume_position(
    initial_step: Optional[int],
    initial_epoch: Optional[int],
    batches_per_epoch: int,
    gradient_accumulation_steps: int = 1,
    skip_until_initial_step: bool = False,
) -> tuple[int, int, int]:
    """``(epoch, batch in epoch, global optimizer step)`` to start from.

    ``--initial_step`` wins over ``--initial_epoch`` (epoch N starts at step
    ``(N - 1) x steps_per_epoch``). With ``--skip_until_initial_step`` the loader starts
    exactly at that step's batch; otherwise only the counters move and the data starts at
    the beginning of the epoch.
    """
    ga = max(1, gradient_accumulation_steps)
    steps_per_epoch = max(1, math.ceil(batches_per_epoch / ga))
    if initial_step is not None:
        step = int(initial_step)
    elif initial_epoch is not None:
        step = (int(initial_epoch) - 1) * steps_per_epoch
    else:
        return 1, 0, 0
    step = max(step, 0)
    epoch = step // steps_per_epoch + 1
    if not skip_until_initial_step:
        return epoch, 0, step
    within = (step % steps_per_epoch) * ga
    return epoch, min(within, batches_per_epoch), step
