r"""The interface every Fisher engine implements.

An engine computes, for one batch of ``B`` samples,

.. math::

    \Sigma_\theta = \sum_{n=1}^{B} \sum_{k=1}^{K} \big(J_n^\top v_{nk}\big)^{\odot 2}
    \quad\text{for every parameter } \theta,

where :math:`J_n = \partial f(x_n)/\partial\theta` is the per-sample Jacobian of the
(``output_fn``-mapped) model output and ``V = make_vectors(f(X).detach())`` has shape
``(K, B, C)``. The estimators (:mod:`ewc_reg.fisher`) choose the vectors; engines only pull them
back. Sums are returned in the accumulation dtype (float32 or wider).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from .._batches import Batch

OutputFn = Callable[[object], Tensor]
VectorFn = Callable[[Tensor], Tensor]


class Engine(Protocol):
    """Computes per-batch sums of squared pull-backs (see the module docstring)."""

    name: str

    def __call__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
    ) -> dict[str, Tensor]: ...


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums are kept in at least float32 (bf16/fp16 models accumulate in float32)."""
    return torch.promote_types(dtype, torch.float32)
