"""The one exception type that means "the user's input is wrong".

Every layer raises :class:`CurvscopeError` for bad input; the CLI turns it into a
one-paragraph message and exit code 2. Anything else escaping is a bug.
"""
from __future__ import annotations


class CurvscopeError(Exception):
    """Bad input or an unusable situation, described in one paragraph for the user."""


def summary(exc: BaseException) -> str:
    """``Type: first line of the message``, for quoting a foreign exception inside a one-paragraph error."""
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__
