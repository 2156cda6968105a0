"""Errors a user can cause, and how the command-line tools report them.

A `UserError` carries one line that names the input (file, line, key) and what
to do. Command-line entry points turn it into that line on stderr and exit
status 2, with no traceback; anything else is a bug and keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable

EXIT_USER_ERROR = 2


class UserError(Exception):
    """Bad input or environment: reported as one line, exit status 2."""


def reports_user_errors(main: Callable[..., int | None]) -> Callable[..., int]:
    """Wrap a CLI `main` so user errors end as one line and exit status 2."""

    @functools.wraps(main)
    def wrapped(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs) or 0
        except UserError as err:
            print(f"error: {err}", file=sys.stderr)
            return EXIT_USER_ERROR
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130

    return wrapped
