"""The checks the public functions make of their arguments, one wording for each kind of rule."""

from __future__ import annotations

import numbers
import reprlib
from collections.abc import Mapping
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


def class_names_by_id(names: object, *, field: str = "class_names") -> dict[int, str] | None:
    """``names``, a mapping of category id to name, with integer ids (JSON writes them as strings:
    safetensors metadata, config.json); None where there are none. Raises ValueError on anything else."""
    if names is None:
        return None
    if not isinstance(names, Mapping) or not all(str(identifier).isdigit() for identifier in names):
        raise ValueError(f"{field} is {reprlib.repr(names)}; expected a mapping of category id to name, like {{1: 'cat'}}")
    return {int(identifier): str(name) for identifier, name in names.items()} or None
