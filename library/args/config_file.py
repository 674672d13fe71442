"""``--config_file`` / ``--output_config``: option values from a TOML file.

Behaviour (compatible with sd-scripts, shared/spec/cli-options.md §1):

* ``.toml`` is appended to ``--config_file`` unless it already ends with it.
* ``--output_config``: the options that differ from the parser defaults are written to
  that file as flat TOML keys (without ``config_file``, ``output_config`` and
  ``wandb_api_key``), then the program exits with status 0. An existing file is never
  overwritten (exit status 1).
* Loading: ``[section]`` tables are flattened into one set of keys (section names do
  not matter), then the command line is parsed again on top of them, so a value given
  on the command line wins over the file, which wins over the default. File values
  keep their TOML type (they do not go through the option's converter or choices).
* Keys that match no option are kept on the namespace, with a warning (sd-scripts
  keeps them silently).
* Finally ``args.config_file`` is the path without its extension.

The ``toml`` package is imported lazily so that importing this module stays cheap.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import PurePath
from typing import Any, Dict, Iterable, List, Optional, Sequence

from library.errors import UserInputError

logger = logging.getLogger(__name__)

# Never written by --output_config.
EXCLUDED_FROM_OUTPUT = ("config_file", "output_config", "wandb_api_key")

# Options whose values should not be typed on a command line.
SECRET_OPTIONS = ("wandb_api_key", "huggingface_token")


def config_file_path(config_file: str) -> str:
    """The file actually used for a ``--config_file`` value (``.toml`` appended if missing)."""
    path = str(config_file)
    return path if path.endswith(".toml") else path + ".toml"


def parser_defaults(parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """Default value of every option, as ``parser.parse_args([])`` would give them.

    Computed from the actions, so it also works for parsers with required arguments.
    String defaults go through the option's converter, like argparse does.
    """
    defaults: Dict[str, Any] = {}
    for action in parser._actions:
        if action.dest == argparse.SUPPRESS or action.default == argparse.SUPPRESS:
            continue
        value = parser.get_default(action.dest)
        if isinstance(value, str) and action.type is not None and callable(action.type):
            try:
                value = action.type(value)
            except (TypeError, ValueError, argparse.ArgumentTypeError):
                pass
        defaults[action.dest] = value
    return defaults


def _known_dests(parser: argparse.ArgumentParser) -> set:
    return {a.dest for a in parser._actions if a.dest != argparse.SUPPRESS}


def _to_toml_value(value: Any) -> Any:
    if isinstance(value, PurePath):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_to_toml_value(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_toml_value(v) for k, v in value.items()}
    return value


def values_for_output(args: argparse.Namespace, parser: argparse.ArgumentParser) -> Dict[str, Any]:
    """The flat dict ``--output_config`` writes: non-default values, secrets and control options left out."""
    defaults = parser_defaults(parser)
    out: Dict[str, Any] = {}
    for key, value in vars(args).items():
        if key in EXCLUDED_FROM_OUTPUT or value is None:
            continue
        if key in defaults and value == defaults[key]:
            continue
        out[key] = _to_toml_value(value)
    return out


def _write_atomically(path: str, text: str) -> None:
    from library.io.atomic import atomic_write_text

    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UserInputError(f"--config_file: cannot write {path}: folder {folder} does not exist")
    atomic_write_text(path, text)


def flatten_config(data: Dict[str, Any]) -> Dict[str, Any]:
    """Merge the keys of every top-level table into one dict (section names are ignored).

    Non-table top-level keys are kept as they are; a later key with the same name wins.
    """
    flat: Dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, dict):
            flat.update(value)
        else:
            flat[key] = value
    return flat


def load_config_dict(path: str) -> Dict[str, Any]:
    """Read and flatten a TOML option file; bad syntax raises UserInputError naming file and line."""
    import toml

    try:
        with open(path, "r", encoding="utf-8") as f:
            text = f.read()
    except UnicodeDecodeError as err:
        raise UserInputError(f"--config_file {path}: not a UTF-8 text file ({err})") from None
    except OSError as err:
        raise UserInputError(f"--config_file {path}: cannot read it: {err.strerror or err}") from None
    try:
        data = toml.loads(text)
    except toml.TomlDecodeError as err:
        raise UserInputError(
            f"--config_file {path}: invalid TOML at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    return flatten_config(data)


def read_config_from_file(
    args: argparse.Namespace,
    parser: argparse.ArgumentParser,
    argv: Optional[Sequence[str]] = None,
) -> argparse.Namespace:
    """Apply ``--config_file`` / ``--output_config`` to already-parsed ``args``.

    ``argv`` is the command line to parse again on top of the file values (default:
    ``sys.argv[1:]``, the one ``args`` came from). Returns the resulting namespace
    (``args`` itself when no config file is given). Exits with status 0 after
    ``--output_config`` wrote the file, and with status 1 when the file to write
    already exists or the file to read does not exist.
    """
    if not getattr(args, "config_file", None):
        return args

    path = config_file_path(args.config_file)

    # Make sure the messages below reach the user even if the script has not set up
    # logging yet (a no-op when it has).
    from library.log import setup_logging

    setup_logging(args)

    if getattr(args, "output_config", False):
        if os.path.exists(path):
            logger.error(
                f"--output_config: {path} already exists; it is not overwritten. "
                f"Choose another --config_file or remove the file first."
            )
            sys.exit(1)
        import toml

        values = values_for_output(args, parser)
        _write_atomically(path, toml.dumps(values))
        logger.info(f"--output_config: wrote {len(values)} option value(s) to {path}; exiting without training")
        sys.exit(0)

    if not os.path.exists(path):
        logger.error(f"--config_file: {path} not found")
        sys.exit(1)

    logger.info(f"loading options from {path}")
    flat = load_config_dict(path)

    unknown = sorted(k for k in flat if k not in _known_dests(parser))
    if unknown:
        logger.warning(
            f"{path}: {len(unknown)} key(s) match no option of this script (misspelled?); "
            f"they are kept but probably have no effect: {', '.join(unknown)}"
        )

    if argv is None:
        argv = sys.argv[1:]
    new_args = parser.parse_args(list(argv), namespace=argparse.Namespace(**flat))
    new_args.config_file = os.path.splitext(path)[0]
    return new_args


def _flags_on_command_line(argv: Iterable[str], option: str) -> bool:
    """True if ``--option`` (or ``--option=value``, or an unambiguous abbreviation) is in argv."""
    full = "--" + option
    # shortest prefix that no other shared option starts with (argparse accepts abbreviations)
    shortest = {"wandb_api_key": "--wandb_a", "huggingface_token": "--huggingface_t"}.get(option, full)
    for token in argv:
        if token == "--":
            break
        if not token.startswith("--"):
            continue
        name = token.split("=", 1)[0]
        if name == full or (len(name) >= len(shortest) and full.startswith(name)):
            return True
    return False


def warn_secrets_on_command_line(
    argv: Optional[Sequence[str]] = None, args: Optional[argparse.Namespace] = None
) -> List[str]:
    """Warn when a secret (``--wandb_api_key``, ``--huggingface_token``) was typed on the command line.

    Command lines end up in shell history and are visible to other users of the machine
    (``ps``); the TOML ``--config_file`` is the place for them. Returns the option names warned about.
    """
    if argv is None:
        argv = sys.argv[1:]
    found = []
    for option in SECRET_OPTIONS:
        if args is not None and not getattr(args, option, None):
            continue
        if _flags_on_command_line(argv, option):
            found.append(option)
    for option in found:
        logger.warning(
            f"--{option} was given on the command line, where shell history and other users "
            f"can see it; put `{option} = \"...\"` into the --config_file TOML instead"
        )
    return found
