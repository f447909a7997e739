"""Values quoted in one-line error messages, cut short: a 10 MB cell, a huge YAML structure (or
one built from aliases) or another exception's long text never lands whole in a message.
Shared by the config checks and the data readers, with the hint of an unknown name that a
plugin may register (:func:`plugin_hint`)."""

from __future__ import annotations

import reprlib
from typing import Sequence

__all__ = ["SHORT", "shorten", "clip", "shorten_list", "plugin_hint"]

SHORT = 80          # characters of a user's value quoted in a message
_repr = reprlib.Repr()
_repr.maxstring = _repr.maxother = SHORT
_repr.maxlist = _repr.maxtuple = _repr.maxdict = _repr.maxset = 8
_repr.maxlevel = 3


def shorten(value: object, limit: int = SHORT) -> str:
    """``repr(value)``, cut to about ``limit`` characters with an ellipsis and the full length.

    Every value from a user's file or config that goes into a message goes through this.
    """
    if isinstance(value, str):
        if len(value) <= limit:
            return repr(value)
        return f"{value[:limit]!r}… ({len(value):,} characters)"
    text = _repr.repr(value)  # bounded depth and width: never expands a huge structure
    return text if len(text) <= limit + 20 else f"{text[:limit]}…"


def clip(text: str, limit: int = 200) -> str:
    """``text`` (e.g. another exception's message) cut to ``limit`` characters, unquoted."""
    text = " ".join(text.split())  # one line
    return text if len(text) <= limit else f"{text[:limit]}… ({len(text):,} characters)"


def shorten_list(values: Sequence[object], limit: int = 12) -> str:
    """``[a, b, ...]`` with each value :func:`shorten` ed and at most ``limit`` of them."""
    head = ", ".join(shorten(v, 40) for v in values[:limit])
    more = f", … ({len(values):,} in all)" if len(values) > limit else ""
    return f"[{head}{more}]"


def plugin_hint(what: str) -> str:
    """The hint that ends an unknown-name error of something a plugin may register: ``what``
    with its article (``"a dataset"``, ``"an ensemble"``). One wording for every registry, so a
    user who forgot ``--plugin`` on any command reads the same fix."""
    return (f"({what} a plugin registers needs its module: cetnet --plugin MODULE, or "
            "$CETNET_PLUGINS)")
