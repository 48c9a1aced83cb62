"""Fisher engines: interchangeable ways to compute sums of squared pull-backs.

``get_engine(backend, model)`` resolves a backend name to an engine; ``"auto"`` picks the
fastest engine that supports the model.
"""

from __future__ import annotations

from torch import nn

from .base import Engine, accumulation_dtype
from .functorch import FunctorchEngine

ENGINES: dict[str, type] = {"functorch": FunctorchEngine}
BACKENDS = ("auto", *ENGINES)


def get_engine(backend: str, model: nn.Module) -> Engine:
    """The engine for ``backend`` (one of :data:`BACKENDS`)."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; choose one of {list(BACKENDS)}")
    if backend == "auto":
        backend = "functorch"
    return ENGINES[backend]()


__all__ = ["BACKENDS", "ENGINES", "Engine", "accumulation_dtype", "get_engine"]
