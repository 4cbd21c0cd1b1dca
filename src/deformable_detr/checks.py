"""The checks the public functions make of their arguments, one wording for each kind of rule."""

from __future__ import annotations

import numbers
from typing import Any


def is_whole_number(value: Any) -> bool:
    """An int, numpy's included, but not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_count(name: str, value: Any, *, at_least: int) -> None:
    """Raise ValueError unless ``value`` is a whole number of at least ``at_least``."""
    if not is_whole_number(value) or value < at_least:
        raise ValueError(f"{name} must be a whole number of at least {at_least}, got {value!r}")


def check_fraction(name: str, value: Any) -> None:
    """Raise ValueError unless ``value`` is a number in [0, 1] (a score, a share of the image)."""
    if not (isinstance(value, numbers.Real) and not isinstance(value, bool) and 0 <= value <= 1):  # NaN fails too
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
