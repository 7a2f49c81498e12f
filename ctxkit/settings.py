"""Checks for the settings a stage is built with, so that a wrong type is a ConfigurationError naming the
setting when the stage is built, not a TypeError on its first call or, worse, a setting silently off:
NaN passes every `<` test, and a bare string is an iterable of one-letter names."""

from __future__ import annotations

import numbers
from collections.abc import Iterable
from typing import Any

from .errors import ConfigurationError


def whole_number(value: Any, name: str, *, minimum: int = 0) -> int:
    """An int (a numpy integer too: a top_k computed with numpy is still a whole number)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ConfigurationError(f"{name} must be a whole number, got {value!r}")
    if value < minimum:
        raise ConfigurationError(f"{name} must be at least {minimum}, got {value}")
    return int(value)


def fraction(value: Any, name: str) -> float:
    """A number in (0, 1]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) <= 1:
        raise ConfigurationError(f"{name} must be a number in (0, 1], got {value!r}")  # NaN fails `0 <` too
    return float(value)


def positive_seconds(value: Any, name: str) -> float:
    """A positive, finite number of seconds (NaN fails every comparison: a NaN TTL never expired)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 < float(value) < float("inf"):
        raise ConfigurationError(f"{name} must be a positive number of seconds, got {value!r}")
    return float(value)


def number_between(value: Any, name: str, low: float, high: float) -> float:
    """A number in [low, high]."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not low <= float(value) <= high:
        raise ConfigurationError(f"{name} must be a number in [{low:g}, {high:g}], got {value!r}")
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
