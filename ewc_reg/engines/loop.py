r"""The last-resort engine: one sample at a time, one backward pass per vector, plain autograd.

Some modules cannot be ``vmap``-ed by :mod:`torch.func`: ``nn.LSTM``, ``nn.GRU`` and ``nn.RNN``
build their initial state as an ordinary tensor and their kernels write per-sample results into
it. For them sample ``n`` goes through the model alone, as a batch of one, and each of its
``K`` vectors is pulled back by ``torch.autograd.grad``:

.. math::

    S_\theta = \sum_n \sum_k \big(J_n^\top v_{nk}\big)^{\odot 2},
    \qquad J_n = \partial f(x_n; \theta) / \partial \theta .

That is ``B`` forward and ``B K`` backward passes (as slow as the paper's reference code, which
loops the same way), as general as autograd, and in the memory of one sample. The vectors are
made from the whole batch's output first, as in the other engines, so all of them draw the same
labels for ``sample``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from .._batches import Batch
from .base import OutputFn, VectorFn, zero_sums


class LoopEngine:
    """Per-sample, per-vector autograd loop (see the module docstring)."""

    name = "loop"

    def __call__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
        memory_budget: int,
    ) -> dict[str, Tensor]:
        """Sums of squared pull-backs; ``chunk_size`` and ``memory_budget`` are not needed (one
        sample at a time)."""
        with torch.no_grad():
            vectors = make_vectors(output_fn(batch.call(model)))  # (K, B, *S, C)
        names = list(params)
        tensors = [params[name] for name in names]
        sums = zero_sums(params)
        num_vectors = vectors.shape[0]
        for n in range(batch.size):
            sample = batch.samples(n, n + 1)
            try:
                with torch.enable_grad():
                    output = output_fn(sample.call(model))
            except Exception as error:
                if hasattr(error, "add_note"):  # (Python 3.11+; the model's own error stays)
                    error.add_note(
                        f"ewc_reg: the model failed on sample {n} alone, cut from the batch "
                        "along the first dimension of every tensor whose first dimension is the "
                        f"batch size: {batch.layout()}. Inputs that are not per-sample that way "
                        "(flat indices with offsets, as nn.EmbeddingBag takes them) cannot be "
                        "cut: pad them to (B, L) instead."
                    )
                raise
            mine = vectors[:, n : n + 1]  # (K, 1, *S, C)
            if output.shape == mine.shape[2:]:  # (the model squeezed the batch of one away)
                mine = mine.squeeze(1)
            for k in range(num_vectors):
                grads = torch.autograd.grad(
                    output,
                    tensors,
                    mine[k],
                    retain_graph=k < num_vectors - 1,
                    allow_unused=True,
                )
                for name, g in zip(names, grads):
                    if g is not None:
                        sums[name] += g.to(sums[name].dtype).square()
        return sums
