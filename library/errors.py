"""User-facing errors.

Anything the user can fix (a missing file, a wrong option, a malformed TOML) raises
`UserInputError` with a one-line message that names the file, key or option and what
was expected. Entry scripts catch it in `library.cli.run_main` and print just that line,
so users never see a traceback for their own mistakes.
"""


class UserInputError(Exception):
    """A problem with what the user gave us (files, options, configs)."""
