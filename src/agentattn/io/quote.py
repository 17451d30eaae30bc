"""Short, bounded quotes of values read from files, for error messages.

A file can hold a string of megabytes or a list nested to depth 24 whose ``repr`` is gigabytes long; messages
quote at most ``limit`` characters of it, and the quoting itself stops early (``reprlib``), so it takes no more
time or memory than the quote.
"""

from __future__ import annotations

import reprlib
from typing import Any

__all__ = ["one_line", "quote"]

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxdict = _REPR.maxlist = _REPR.maxtuple = _REPR.maxset = _REPR.maxfrozenset = _REPR.maxdeque = 8
_REPR.maxstring = _REPR.maxother = 120
_REPR.maxlong = 40


def quote(value: Any, limit: int = 200) -> str:
    """``repr(value)`` cut to at most ``limit`` characters (with ``...``), safe on huge or deep values."""
    try:
        text = _REPR.repr(value)
    except Exception:  # a value whose repr fails is still named
        text = f"<{type(value).__name__}>"
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def one_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's message on one line (whitespace runs collapsed), cut to ``limit`` characters when given; the
    exception's type name when the message is empty. What every command prints after ``error:``."""
    text = " ".join(str(err).split())
    if limit is not None and len(text) > limit:
        text = text[: limit - 3] + "..."
    return text or type(err).__name__
