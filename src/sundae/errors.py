"""The one error type for bad input from a user: a file, a flag, a config, a request.

Everything the library raises because of what it was given derives from :class:`InputError`;
the CLI prints those as one ``error:`` line (exit 2). Any other exception is a bug and keeps its
traceback, so internal errors are never disguised as user mistakes.
"""

from __future__ import annotations


class InputError(ValueError):
    """The input (file, option, config, request) is wrong; the message says what to change."""


__all__ = ["InputError"]
