"""Checks for the settings a stage is built with, so that a wrong type is a ConfigurationError naming the
setting when the stage is built, not a TypeError on its first call or, worse, a setting silently off:
NaN passes every `<` test, and a bare string is an iterable of one-letter names."""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

from .errors import ConfigurationError


def whole_number(value: Any, name: str, *, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigurationError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value}")
    return value


def fraction(value: Any, name: str) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0 < value <= 1:
        raise ConfigurationError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def name_list(value: Any, name: str) -> tuple[str, ...]:
    """A list of tool names; a bare string ("search") is refused rather than read as its letters."""
    if isinstance(value, str) or not isinstance(value, Iterable):
        raise ConfigurationError(f"{name} must be a list of tool names, got {value!r}")
    items = tuple(value)
    wrong = [item for item in items if not isinstance(item, str)]
    if wrong:
        raise ConfigurationError(f"{name} must be a list of tool names, got {wrong[0]!r} in it")
    return items
