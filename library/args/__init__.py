"""Command-line arguments shared by the entry scripts.

* ``groups``: ``add_*_arguments(parser, ...)`` builders, one per shared option group;
* ``types``: value converters (``int_or_float``, ``parse_resolution``);
* ``config_file``: ``read_config_from_file`` (``--config_file`` / ``--output_config``) and
  ``warn_secrets_on_command_line``;
* ``checks``: ``verify_training_args``.

Everything imported here is standard library only, so ``--help`` stays fast.
"""

from library.args.checks import verify_training_args
from library.args.config_file import read_config_from_file, warn_secrets_on_command_line
from library.args.groups import *  # noqa: F401,F403
from library.args.groups import __all__ as _group_names
from library.args.types import int_or_float, parse_resolution

__all__ = [
    *_group_names,
    "int_or_float",
    "parse_resolution",
    "read_config_from_file",
    "warn_secrets_on_command_line",
    "verify_training_args",
]
