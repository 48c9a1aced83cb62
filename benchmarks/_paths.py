"""The engine's device-dependent choices, forced for a block: for benchmarks that compare them
on one device (both ways of a GPU's pull-back, or a GPU's ways counted on the CPU)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from unittest import mock

import torch
from torch import nn

from ewc_reg.engines import base, hooks

PULL_BACKS = ("auto", "looped", "batched")


@contextmanager
def pull_back(kind: str) -> Iterator[None]:
    """The hooks engine's pull-back in the block: ``"auto"`` (its own choice,
    :func:`ewc_reg.engines.hooks.loops_pull_back`), ``"looped"`` (one backward pass per vector)
    or ``"batched"`` (one pass batched over them)."""
    if kind not in PULL_BACKS:
        raise ValueError(f"pull-back must be one of {PULL_BACKS}, got {kind!r}")
    if kind == "auto":
        yield
        return

    def forced(model: nn.Module, device: torch.device, output_bytes: int | None = None) -> bool:
        return kind == "looped"

    with mock.patch.object(hooks, "loops_pull_back", forced):
        yield


WAYS = ("device", "launch-bound", "cpu")


@contextmanager
def engine_ways(ways: str) -> Iterator[None]:
    """The engines' device-dependent ways in the block
    (:func:`ewc_reg.engines.base.launch_bound`): ``"device"`` (those of the device they run
    on), ``"launch-bound"`` (a GPU's, on any device) or ``"cpu"`` (the CPU's, on any device:
    on a GPU, to time the ways against each other)."""
    if ways not in WAYS:
        raise ValueError(f"ways must be one of {WAYS}, got {ways!r}")
    if ways == "device":
        yield
        return
    with mock.patch.object(base, "launch_bound", lambda device: ways == "launch-bound"):
        yield
