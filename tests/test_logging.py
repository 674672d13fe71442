"""setup_logging and the G-LOG options (library/log.py)."""

from __future__ import annotations

import argparse
import logging

import pytest

from library.args.groups import add_logging_arguments
from library.errors import UserInputError
from library.log import setup_logging, teardown_logging


@pytest.fixture(autouse=True)
def _clean_root():
    root = logging.getLogger()
    level = root.level
    teardown_logging()  # earlier tests may have run entry points that set logging up
    yield
    teardown_logging()
    root.setLevel(level)


def log_args(*argv):
    parser = argparse.ArgumentParser()
    add_logging_arguments(parser)
    return parser.parse_args(list(argv))


def ours():
    return [h for h in logging.getLogger().handlers if getattr(h, "_sd_trainer_console_handler", False)]


def test_defaults_to_info_with_rich_handler():
    from rich.logging import RichHandler

    handler = setup_logging(log_args())
    assert isinstance(handler, RichHandler)
    assert logging.getLogger().level == logging.INFO
    assert ours() == [handler]


def test_is_idempotent_unless_reset():
    first = setup_logging(log_args())
    assert setup_logging(log_args("--console_log_level", "DEBUG")) is None
    assert ours() == [first]
    assert logging.getLogger().level == logging.INFO
    second = setup_logging(log_args("--console_log_level", "DEBUG", "--console_log_simple"), reset=True)
    assert ours() == [second] and second is not first
    assert type(second) is logging.StreamHandler
    assert logging.getLogger().level == logging.DEBUG


def test_log_file_receives_messages_at_the_chosen_level(tmp_path, capsys):
    log_file = tmp_path / "run.log"
    setup_logging(log_args("--console_log_file", str(log_file), "--console_log_level", "WARNING"))
    logger = logging.getLogger("library.test_logging")
    logger.info("quiet info line")
    logger.warning("loud warning line")
    teardown_logging()  # closes the file
    text = log_file.read_text(encoding="utf-8")
    assert "loud warning line" in text and "WARNING" in text
    assert "quiet info line" not in text
    assert "loud warning line" not in capsys.readouterr().err


def test_log_file_is_appended_across_resets(tmp_path):
    log_file = tmp_path / "run.log"
    args = log_args("--console_log_file", str(log_file))
    setup_logging(args)
    logging.getLogger("x").info("first")
    setup_logging(args, reset=True)
    logging.getLogger("x").info("second")
    teardown_logging()
    text = log_file.read_text(encoding="utf-8")
    assert "first" in text and "second" in text


def test_works_without_args_and_with_foreign_namespaces():
    assert setup_logging() is not None
    setup_logging(argparse.Namespace(unrelated=1), reset=True)
    assert logging.getLogger().level == logging.INFO


def test_bad_level_from_a_config_file_is_a_user_error():
    with pytest.raises(UserInputError, match="--console_log_level"):
        setup_logging(argparse.Namespace(console_log_level="LOUD"))


def test_unwritable_log_file_is_a_user_error(tmp_path):
    with pytest.raises(UserInputError, match="--console_log_file"):
        setup_logging(argparse.Namespace(console_log_file=str(tmp_path / "missing" / "x.log")))
