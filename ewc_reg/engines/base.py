r"""The interface every Fisher engine implements.

An engine computes, for one batch of ``B`` samples,

.. math::

    \Sigma_\theta = \sum_{n=1}^{B} \sum_{k=1}^{K} \big(J_n^\top v_{nk}\big)^{\odot 2}
    \quad\text{for every parameter } \theta,

where :math:`J_n = \partial f(x_n)/\partial\theta` is the per-sample Jacobian of the
(``output_fn``-mapped) model output and ``V = make_vectors(f(X).detach())`` has shape
``(K, B, C)``, or ``(K, B, *S, C)`` for outputs with positions (sequences), i.e. ``(K, *f.shape)``.
The estimators (:mod:`ewc_reg.fisher`) choose the vectors; engines only pull them back, and only
into the parameters in ``params`` (the others are constants: no gradient is computed for them).
Sums are returned in the accumulation dtype (float32 or wider).

Memory: an engine processes the batch in chunks of samples. With ``chunk_size=None`` it must pick
the chunk with :func:`resolve_chunk_size` from ``memory_budget`` (bytes) and its own estimate of
the working memory one sample adds (for the functorch engine, the ``K`` per-sample pull-backs of
all parameters), so that the chunk's working set stays within the budget as the batch grows.
The budget covers the per-chunk work; the one no-grad forward pass of the whole batch that
forms ``V`` is bounded by the batch the data yields.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Protocol

import torch
from torch import Tensor, nn

from .._batches import Batch

OutputFn = Callable[[object], Tensor]
VectorFn = Callable[[Tensor], Tensor]

#: Memory per chunk when the caller sets no ``memory_budget``: 512 MiB.
DEFAULT_MEMORY_BUDGET = 512 * 2**20


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
        memory_budget: int,
    ) -> dict[str, Tensor]: ...


def resolve_chunk_size(chunk_size: int | None, memory_budget: int, bytes_per_sample: int) -> int:
    """``chunk_size`` when given, else the most samples whose working memory
    (``bytes_per_sample`` each) fits in ``memory_budget`` bytes, and at least one."""
    if chunk_size is not None:
        return chunk_size
    return max(1, memory_budget // max(bytes_per_sample, 1))


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums are kept in at least float32 (bf16/fp16 models accumulate in float32)."""
    return torch.promote_types(dtype, torch.float32)
