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

    def forced(model: nn.Module, device: torch.device) -> bool:
        return kind == "looped"

    with mock.patch.object(hooks, "loops_pull_back", forced):
        yield


@contextmanager
def launch_bound_ways() -> Iterator[None]:
    """The engines take the ways of a launch-bound device (a GPU) on any device in the block
    (:func:`ewc_reg.engines.base.launch_bound`)."""
    with mock.patch.object(base, "launch_bound", lambda device: True):
        yield
