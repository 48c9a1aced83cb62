"""Argument checks shared by the public entry points: each error says what is accepted."""

from __future__ import annotations

import math
import numbers
import sys
from collections.abc import Sequence
from typing import Any

import torch


def check_choice(what: str, value: Any, choices: Sequence[str]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"unknown {what} {value!r}; choose one of {list(choices)}")
    return str.__str__(value)  # (a str subclass's value, an enum's or NumPy's: it is saved)


def check_count(what: str, value: Any, *, allow_none: bool = False) -> int | None:
    """An integer >= 1 (or ``None`` where allowed)."""
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        accepted = "an integer >= 1" + (" or None" if allow_none else "")
        raise ValueError(f"{what} must be {accepted}, got {value!r}")
    return int(value)  # (a NumPy integer too)


def check_real(what: str, value: Any, low: float, high: float = float("inf")) -> float:
    """A real number in ``[low, high]``, as a Python float: a Python or NumPy number, a NumPy
    0-d array or a one-element tensor (``torch.tensor(1e5)``) of a real dtype."""
    bounds = f">= {low}" if high == float("inf") else f"in [{low}, {high}]"
    numpy = sys.modules.get("numpy")  # (not imported here: a NumPy array needs it loaded)
    array = numpy is not None and isinstance(value, numpy.ndarray)
    if (array and value.ndim == 0) or (isinstance(value, torch.Tensor) and value.numel() == 1):
        value = value.item()  # (bool and complex dtypes give a bool or complex: refused below)
    elif array or isinstance(value, torch.Tensor):
        kind = "NumPy array" if array else "tensor"
        raise ValueError(
            f"{what} must be a number {bounds} (a one-element tensor or 0-d array is taken), "
            f"got a {kind} of shape {tuple(value.shape)}"
        )
    problem = ValueError(f"{what} must be a number {bounds}, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # (a NumPy number too)
        raise problem
    try:
        number = float(value)
    except OverflowError:  # (an int beyond float's range, 10**400)
        raise problem from None
    if not math.isfinite(number) or not low <= number <= high:
        raise problem
    return number
