"""Console logging set-up shared by every entry script.

``setup_logging(args)`` reads the G-LOG options (``--console_log_level``,
``--console_log_file``, ``--console_log_simple``) and installs one handler on the
root logger. Library modules only ever do ``logger = logging.getLogger(__name__)``.

Call it right after parsing the command line; after ``read_config_from_file`` call it
again with ``reset=True`` so that log options set in the TOML file take effect.

Importing this module is cheap: ``rich`` is imported only when a rich handler is
actually created, and torch is never imported.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Optional

from library.errors import UserInputError

LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

# Marks the handler we installed, so repeated calls can find (and replace) it.
_MARK = "_sd_trainer_console_handler"

_PLAIN_FORMAT = "%(asctime)s %(levelname)-8s %(name)s: %(message)s"
_DATE_FORMAT = "%Y-%m-%d %H:%M:%S"


def _our_handlers(root: logging.Logger) -> list:
    return [h for h in root.handlers if getattr(h, _MARK, False)]


def _level_from(args: Any) -> int:
    name = getattr(args, "console_log_level", None) if args is not None else None
    if name is None or name == "":
        return logging.INFO
    text = str(name).upper()
    if text not in LEVELS:
        raise UserInputError(
            f"--console_log_level: {name!r} is not a log level; choose one of {', '.join(LEVELS)}"
        )
    return getattr(logging, text)


class _EmptyFp32ListFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "should be kept in float32: []" not in record.getMessage()


def setup_logging(args: Any = None, reset: bool = False) -> Optional[logging.Handler]:
    """Install the console (or file) log handler on the root logger.

    Idempotent: when our handler is already installed nothing changes, unless
    ``reset`` is true, in which case the old handler is closed and replaced.
    Returns the installed handler, or None when nothing was changed.
    """
    root = logging.getLogger()
    existing = _our_handlers(root)
    if existing and not reset:
        return None

    level = _level_from(args)
    log_file = getattr(args, "console_log_file", None) if args is not None else None
    simple = bool(getattr(args, "console_log_simple", False)) if args is not None else False

    handler: logging.Handler
    if log_file:
        try:
            # Append: a second set-up in the same run (reset=True) must not wipe earlier lines,
            # and a previous run's log is never destroyed.
            handler = logging.FileHandler(log_file, mode="a", encoding="utf-8")
        except OSError as err:
            raise UserInputError(f"--console_log_file: cannot open {log_file!r} for writing: {err}") from None
        handler.setFormatter(logging.Formatter(_PLAIN_FORMAT, _DATE_FORMAT))
    elif simple:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(_PLAIN_FORMAT, _DATE_FORMAT))
    else:
        try:
            from rich.console import Console
            from rich.logging import RichHandler

            handler = RichHandler(console=Console(stderr=True), show_path=False)
            handler.setFormatter(logging.Formatter("%(name)s: %(message)s"))
        except ImportError:  # rich is in requirements.txt, but never fail on logging
            handler = logging.StreamHandler(sys.stderr)
            handler.setFormatter(logging.Formatter(_PLAIN_FORMAT, _DATE_FORMAT))

    setattr(handler, _MARK, True)
    for old in existing:
        root.removeHandler(old)
        old.close()
    root.addHandler(handler)
    root.setLevel(level)
    # bitsandbytes (imported by diffusers) warns on every CPU start that an optional
    # kernels package is missing; it changes nothing for us, so keep it out of the log.
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    # diffusers warns on every `.to(dtype)` of a model, even when it pins no module to fp32.
    noisy = logging.getLogger("diffusers.models.modeling_utils")
    if not any(isinstance(f, _EmptyFp32ListFilter) for f in noisy.filters):
        noisy.addFilter(_EmptyFp32ListFilter())
    return handler


def teardown_logging() -> None:
    """Remove (and close) the handler installed by setup_logging, if any. Mainly for tests."""
    root = logging.getLogger()
    for old in _our_handlers(root):
        root.removeHandler(old)
        old.close()
