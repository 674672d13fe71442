"""Helpers shared by every entry script: one-line errors instead of tracebacks."""

from __future__ import annotations

import sys
from typing import Callable

from library.errors import UserInputError


def run_main(main: Callable[[], object]) -> None:
    """Call `main()`; a UserInputError becomes one line on stderr and exit status 2."""
    try:
        main()
    except UserInputError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
    except BrokenPipeError:  # output piped into `head` and the like
        sys.stderr.close()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
