"""Checks of dataset options and dataset-config values: a bad one is one :class:`ConfigError`
naming where it came from and the key, with the value quoted short.

``where`` is the message's prefix, e.g. ``"dataset 'synthetic'"`` or ``"dataset config
d.yaml, dataset 'x': feature_cols[2] 'item_id'"``; the key follows it.
"""

from __future__ import annotations

import math
import numbers
from typing import Any, Sequence

from cetnet.config import ConfigError
from cetnet.data.csvio import shorten

__all__ = ["ConfigError", "MAX_SEQ_LEN", "check_int", "check_float", "check_bool", "check_str",
           "check_choice"]

#: The longest sequence feature (padded ids per row): far above any CTR benchmark's history
#: length (BARS uses up to a few hundred); a larger value is taken for a typo (``1e11``).
MAX_SEQ_LEN = 100_000


def _fail(where: str, key: str, expected: str, value: Any) -> ConfigError:
    return ConfigError(f"{where}: {key}: expected {expected}, got {shorten(value)}")


def _bounds(minimum: float | None, maximum: float | None) -> str:
    if minimum is not None and maximum is not None:
        return f" in [{minimum:,}, {maximum:,}]"
    if minimum is not None:
        return f" >= {minimum:,}"
    return f" <= {maximum:,}" if maximum is not None else ""


def check_int(value: Any, key: str, where: str, *, minimum: int | None = None,
              maximum: int | None = None) -> int:
    """``value`` as an int (a bool or a float is not one: ``true`` or ``1e11`` are typos)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise _fail(where, key, "an integer" + _bounds(minimum, maximum), value)
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise _fail(where, key, "an integer" + _bounds(minimum, maximum), value)
    return value


def check_float(value: Any, key: str, where: str, *, minimum: float | None = None,
                maximum: float | None = None) -> float:
    """``value`` as a finite float (an int is fine, a bool is not)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(
            value):
        raise _fail(where, key, "a number" + _bounds(minimum, maximum), value)
    number = float(value)
    if (minimum is not None and number < minimum) or (maximum is not None and number > maximum):
        raise _fail(where, key, "a number" + _bounds(minimum, maximum), value)
    return number


def check_bool(value: Any, key: str, where: str) -> bool:
    """``value`` if it is true or false (``1``, ``"no"`` are not: ambiguous in a config)."""
    if not isinstance(value, bool):
        raise _fail(where, key, "true or false", value)
    return value


def check_str(value: Any, key: str, where: str, *, what: str = "a non-empty string") -> str:
    """``value`` if it is a non-empty string without NUL characters."""
    if not isinstance(value, str) or not value or "\x00" in value:
        raise _fail(where, key, what, value)
    return value


def check_choice(value: Any, key: str, where: str, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        raise _fail(where, key, "one of " + ", ".join(map(repr, choices)), value)
    return value
