"""Argument checks shared by the public entry points: each error says what is accepted."""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any


def check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    return value


def check_count(what: str, value: Any, *, allow_none: bool = False) -> int | None:
    """An integer >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        accepted = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{what} must be {accepted}, got {value!r}")
    return int(value)  # (a NumPy integer too)


def check_real(what: str, value: Any, low: float, high: float = float("inf")) -> float:
    """A real number in ``[low, high]``."""
    if (
        isinstance(value, bool)
        or not isinstance(value, numbers.Real)  # (a NumPy number too)
        or not math.isfinite(value)
        or not low <= value <= high
    ):
        bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
        raise ValueError(f"{what} must be a number {bounds}, got {value!r}")
    return float(value)
