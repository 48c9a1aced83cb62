"""Putting a model in evaluation mode for Fisher computation and restoring it exactly."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block; afterwards every submodule's training flag and every
    parameter's ``.grad`` and ``requires_grad`` are as before, on success and on error."""
    training = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    saved = [(p, p.grad, p.requires_grad) for p in params]
    model.eval()
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for p, grad, requires_grad in saved:
            p.grad = grad
            p.requires_grad_(requires_grad)
