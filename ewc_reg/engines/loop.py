r"""The last-resort engine: one sample at a time, plain autograd, one backward pass per vector
(or per chunk of a sample's vectors, behind the functorch engine).

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

As the last resort of the functorch engine (``LoopEngine(batched_vectors=True)``), for models
``vmap`` cannot run over samples (Hugging Face's attention-mask helpers branch on the mask's
values; ``nn.LSTM`` on packed sequences), a sample's vectors are pulled back together instead, in
one backward pass batched over them (:func:`.base.batched_grads`: ``vmap`` over the backward
only), as many at a time as ``memory_budget`` holds: per vector, three gradients of all the
parameters and two of the activations the first sample's forward pass saved. Where that fails,
or the model calls a function of :data:`.base.VMAP_WRONG`, one at a time. ``backend="loop"``
keeps one backward pass per vector: plain autograd, the reference.
"""

from __future__ import annotations

import logging
import weakref
from contextlib import AbstractContextManager, nullcontext
from typing import ClassVar

import torch
from torch import Tensor, nn

from .._batches import Batch
from .base import (
    BatchingFailed,
    CallsVmapWrong,
    OutputFn,
    RowWiseVectors,
    VectorFn,
    batched_grads,
    check_differentiable,
    resolve_chunk_size,
    zero_sums,
)

logger = logging.getLogger("ewc_reg")


class _SavedBytes:
    """The bytes of the tensors autograd saves for the backward inside :meth:`counting`.

    The pack hook keeps a detached alias (same storage and version counter), not the tensor
    itself: a node's saved output would hold the tensor, which holds the node, a cycle through
    C++ that Python's garbage collector cannot see. A graph retained for a later backward
    (the loop's last chunk of vectors) then outlived the call: a sample's whole graph per
    batch, and its stale gradient accumulators broke a later ``resize_token_embeddings``."""

    def __init__(self) -> None:
        self.bytes = 0

    def counting(self) -> AbstractContextManager[object]:
        def pack(t: Tensor) -> Tensor:
            self.bytes += t.numel() * t.element_size()
            return t.detach()

        return torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t)


class LoopEngine:
    """Per-sample autograd loop (see the module docstring): one backward pass per vector, or,
    with ``batched_vectors``, per chunk of a sample's vectors."""

    name = "loop"
    #: Models on which the pull-back batched over the vectors failed: one vector at a time.
    unbatchable: ClassVar[weakref.WeakSet[nn.Module]] = weakref.WeakSet()

    def __init__(self, batched_vectors: bool = False) -> None:
        self.batched_vectors = batched_vectors

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
        """Sums of squared pull-backs, one sample at a time (``chunk_size`` is not needed;
        ``memory_budget`` bounds the chunks of vectors pulled back together)."""
        with torch.no_grad():
            vectors = make_vectors(output_fn(batch.call(model)))  # (K, B, *S, C)
        names = list(params)
        tensors = [params[name] for name in names]
        sums = zero_sums(params)
        num_vectors = vectors.shape[0]
        params_bytes = sum(t.numel() * t.element_size() for t in tensors)
        # (None: sized on the first sample's forward pass, by the activations it saves)
        step: int | None = None if self.batched_vectors and model not in self.unbatchable else 1
        for n in range(batch.size):
            sample = batch.samples(n, n + 1)
            sizing = step is None
            calls, saved = CallsVmapWrong(), _SavedBytes()
            try:
                with (
                    torch.enable_grad(),
                    calls if sizing else nullcontext(),
                    saved.counting() if sizing else nullcontext(),
                ):
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
            if step is None:  # (per vector: three gradients of the parameters, two of the
                # activations; one at a time where vmap gets a backward wrong: VMAP_WRONG)
                per_vector = 3 * params_bytes + 2 * saved.bytes
                step = 1 if calls.called else resolve_chunk_size(None, memory_budget, per_vector)
            check_differentiable(output)
            mine = vectors[:, n : n + 1]  # (K, 1, *S, C)
            if output.shape == mine.shape[2:]:  # (the model squeezed the batch of one away)
                mine = mine.squeeze(1)
            if output.shape == mine.shape[1:] and isinstance(make_vectors, RowWiseVectors):
                # (from the sample's own output: the batch's row differs where the model
                # mixes the samples)
                alone = make_vectors(output.detach().reshape(1, *vectors.shape[2:]), n, n + 1)
                mine = alone.reshape(mine.shape)
            if output.shape != mine.shape[1:]:
                raise ValueError(
                    f"the model's output on sample {n} alone has shape {tuple(output.shape)}, "
                    f"where one sample's is {tuple(mine.shape[1:])}: the batch was not cut "
                    f"into samples as the model reads it ({batch.layout()}). Tensors in "
                    "containers other than tuples, lists and dicts (a dataclass, an object's "
                    "attributes) are passed whole: pass the per-sample tensors in those"
                )
            k = 0
            while k < num_vectors:
                stop = min(k + step, num_vectors)
                try:
                    grads = batched_grads(  # (a failed batched pass must leave the graph)
                        output,
                        tensors,
                        mine[k:stop],
                        retain_graph=stop - k > 1 or stop < num_vectors,
                    )
                except BatchingFailed as failure:  # (only with several vectors)
                    logger.info(
                        "loop engine: the pull-back batched over the vectors failed (%s); one "
                        "backward pass per vector instead",
                        failure,
                    )
                    step = 1
                    self.unbatchable.add(model)
                    continue
                for name, g in zip(names, grads):  # (each (vectors, *shape))
                    if g is not None:
                        sums[name] += g.to(sums[name].dtype).square().sum(0)
                k = stop
        return sums
