"""User-facing errors.

Anything the user can fix (a bad option, a missing folder, an unreadable cache) raises
:class:`FeatcacheError`; the CLI prints it as one line and exits with code 2.
"""

from __future__ import annotations


class FeatcacheError(Exception):
    """A user-facing error: the CLI prints it as one line and exits with code 2."""


class FeatcacheValueError(FeatcacheError, ValueError):
    """A bad value (a parameter, a label, an array): a ``ValueError`` for scikit-learn and Python callers,
    and still a :class:`FeatcacheError` for the CLI (one line, exit 2)."""


def first_line(e: BaseException, limit: int = 300) -> str:
    """An exception as one short line for a user-facing message (its type when it says nothing)."""
    return ((str(e).strip().splitlines() or [type(e).__name__])[0] or type(e).__name__)[:limit]
