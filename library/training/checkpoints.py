"""Output names, save/keep schedules and resumable state folders (formats.md e).

A state folder is written to a temporary sibling and renamed into place only when
complete, so a killed run never leaves a folder that --resume would trust. Besides
accelerate's files it holds `train_state.json` with the epoch/step counters and the data
loader position, which makes a resumed run continue exactly where the old one stopped.
"""

from __future__ import annotations

import json
import logging
import os
import shutil

from library.errors import UserInputError

logger = logging.getLogger(__name__)

TRAIN_STATE = "train_state.json"


def epoch_name(output_name: str | None, epoch: int) -> str:
    return f"{output_name or 'epoch'}-{epoch:06d}"


def step_name(output_name: str | None, step: int) -> str:
    return f"{output_name or 'at'}-step{step:08d}"


def last_name(output_name: str | None) -> str:
    return output_name or "last"


def should_save_epoch(epoch: int, every: int | None, num_epochs: int) -> bool:
    """Epoch saves: every N epochs, except the last epoch (which writes the final file)."""
    return bool(every) and epoch % every == 0 and epoch < num_epochs


def should_save_step(step: int, every: int | None) -> bool:
    return bool(every) and step % every == 0


def stale_epoch(epoch: int, every: int | None, keep: int | None) -> int | None:
    """The epoch whose files --save_last_n_epochs K removes now (or None)."""
    if not every or not keep:
        return None
    old = epoch - every * keep
    return old if old > 0 else None


def stale_step(step: int, every: int | None, keep: int | None, for_state: bool = False) -> int | None:
    """The step whose files --save_last_n_steps removes now (or None)."""
    if not every or not keep:
        return None
    x = step - keep - 1
    x -= x % every
    if x < 0 or (for_state and x == 0):
        return None
    return x


def remove_quietly(path: str) -> None:
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
        logger.info("removed old %s", path)
    elif os.path.exists(path):
        os.remove(path)
        logger.info("removed old %s", path)


def save_state_folder(accelerator, folder: str, train_state: dict) -> None:
    """accelerator.save_state into `folder` (atomically) plus train_state.json."""
    from library.io.atomic import atomic_folder

    with atomic_folder(folder, prefix=".tmp-state-") as tmp:
        accelerator.save_state(tmp)
        with open(os.path.join(tmp, TRAIN_STATE), "w") as f:
            json.dump(train_state, f)
    logger.info("saved training state to %s", folder)


def read_train_state(folder: str) -> dict:
    """Validate a --resume folder before anything heavy happens."""
    if not os.path.isdir(folder):
        raise UserInputError(f"--resume {folder}: not a folder (expected a state folder written with --save_state)")
    path = os.path.join(folder, TRAIN_STATE)
    if not os.path.exists(os.path.join(folder, "optimizer.bin")) and not any(
        n.startswith("optimizer") for n in os.listdir(folder)
    ):
        raise UserInputError(f"--resume {folder}: no optimizer state inside; not a complete state folder")
    if not os.path.exists(path):
        logger.warning("--resume %s: no %s; counters start from 0", folder, TRAIN_STATE)
        return {}
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UserInputError(f"--resume {folder}: unreadable {TRAIN_STATE} ({e})") from None
