"""Argument checks shared by every layer, with messages that name the argument and the accepted values."""

from __future__ import annotations

import math
from typing import Any


def check_choice(name: str, value: Any, accepted: tuple) -> None:
    """Raise ValueError unless ``value`` is one of ``accepted``."""
    if value not in accepted:
        raise ValueError(f"{name}={value!r} is not supported; accepted values: {', '.join(map(repr, accepted))}")


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    """Raise ValueError unless ``value`` is a finite positive number (an int when ``integer``)."""
    kind = "an integer" if integer else "a number"
    if isinstance(value, bool) or not isinstance(value, (int,) if integer else (int, float)):
        raise ValueError(f"{name} must be {kind}, got {value!r}")
    bad = value < 0 if allow_zero else value <= 0
    if bad or value != value or value in (float("inf"), float("-inf")):
        bound = ">= 0" if allow_zero else "> 0"
        raise ValueError(f"{name} must be {kind} {bound}, got {value!r}")


def check_unit_interval(name: str, value: float, *, closed_low: bool = True) -> None:
    """Raise ValueError unless ``value`` lies in [0, 1) (or (0, 1) when not ``closed_low``)."""
    ok = (0.0 <= value < 1.0) if closed_low else (0.0 < value < 1.0)
    if not ok or math.isnan(value):
        interval = "[0, 1)" if closed_low else "(0, 1)"
        raise ValueError(f"{name} must lie in {interval}, got {value!r}")


def check_flag(name: str, value: Any) -> bool:
    """Raise ValueError unless ``value`` is a bool; return it."""
    if not isinstance(value, bool):
        raise ValueError(f"{name} must be True or False, got {value!r}")
    return value
