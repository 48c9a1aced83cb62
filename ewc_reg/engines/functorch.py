r"""The general engine: per-sample vector-Jacobian products with :mod:`torch.func`.

For each sample ``n`` (vmapped, in chunks) it builds the pull-back
:math:`v \mapsto J_n^\top v` of :math:`\theta \mapsto f(x_n; \theta)` with ``torch.func.vjp``
and applies it to the sample's ``K`` vectors (vmapped again), then squares and sums. The
vectors come from the batch's output, or, where the first two samples run alone differ from
their rows of it (a model that mixes the samples), from each sample's output run alone, as
its pull-back runs it. A chunk holds ``chunk * K * P`` pull-back numbers for ``P``
parameters, and their squares, so one sample is budgeted at ``3 K P`` numbers
(:func:`bytes_per_sample`) and ``chunk_size=None`` takes ``memory_budget // bytes_per_sample``
samples at a time. When one sample's ``K`` pull-backs alone exceed the budget (``exact`` on
long sequences, ``K = T V``), samples go one at a time and each pulls back its vectors a few
at a time, reusing one forward pass. Works for any module that torch.func can trace in eval
mode. Two kinds of model go to the :class:`~.loop.LoopEngine`, one sample at a time (logged
at info level to the ``"ewc_reg"`` logger, and remembered for the module):

- those on which ``vmap`` fails (``nn.LSTM``, say);
- those whose output reaches a selected parameter other than through its registered name:
  ``torch.func.functional_call`` swaps the registered parameters, so a view made before the
  forward pass (``self.wt = self.weight.t()`` in ``__init__``) or an ``output_fn`` reading a
  parameter would keep the original, and its part of the gradient would be missing. The
  forward pass that makes the vectors runs on detached parameters, buffers and inputs with
  gradients enabled: it records no graph unless such a path exists, and its graph is searched
  for the parameters (:func:`reaches`).
"""

from __future__ import annotations

import logging
import weakref
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.func import vjp, vmap
from torch.nn.parameter import is_lazy
from torch.utils import _pytree as pytree

from .._batches import Batch, is_per_sample, same_output
from .base import (
    CallsVmapWrong,
    OutputFn,
    VectorFn,
    accumulation_dtype,
    resolve_chunk_size,
    swapped_call,
    zero_sums,
)
from .loop import LoopEngine

logger = logging.getLogger("ewc_reg")


def bytes_per_sample(num_vectors: int, params: dict[str, Tensor]) -> int:
    """Working memory of one sample: its ``(K, P)`` pull-backs, their squares and slack."""
    return 3 * max(num_vectors, 1) * sum(p.numel() * p.element_size() for p in params.values())


#: Added to the model's own error on its samples run alone.
ALONE_NOTE = (
    "ewc_reg: the model failed on its samples run alone, each as a batch of one (the functorch "
    "engine's torch.func.vmap over the samples). A model that needs several samples in a batch "
    "(batch statistics in eval mode: nn.BatchNorm with track_running_stats=False on (B, C) "
    "features) has no Fisher of one sample: see 'Models that mix the samples' in docs/fisher.md"
)


class _Captured(Exception):
    """The model's output reaches a selected parameter that ``functional_call`` cannot swap
    (see the module docstring); the message says which."""


def reaches(output: Any, params: dict[str, Tensor]) -> list[str]:
    """The names of ``params`` that the autograd graph of ``output``'s tensors reaches (their
    ``AccumulateGrad`` nodes), in ``params``' order."""
    names = {id(p): name for name, p in params.items()}
    found: set[str] = set()
    stack = [t.grad_fn for t in pytree.tree_leaves(output) if isinstance(t, Tensor)]
    seen: set[Any] = set()
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        variable = getattr(node, "variable", None)  # (an AccumulateGrad node's leaf)
        if variable is not None and id(variable) in names:
            found.add(names[id(variable)])
        stack += [next_node for next_node, _ in node.next_functions]
    return [name for name in params if name in found]


class FunctorchEngine:
    """Whole-model ``torch.func`` engine (see the module docstring)."""

    name = "functorch"
    #: Modules on which ``vmap`` failed, or whose parameters are captured (see the module
    #: docstring): they go straight to the loop engine.
    unvmappable: ClassVar[weakref.WeakSet[nn.Module]] = weakref.WeakSet()

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
        args = (model, params, batch, output_fn, make_vectors, chunk_size, memory_budget)
        if model in self.unvmappable:
            return LoopEngine(batched_vectors=True)(*args)
        try:
            return self._sums(*args)
        except _Captured as error:
            logger.info("functorch engine: %s; using the loop engine", error)
        except (RuntimeError, NotImplementedError) as error:
            if isinstance(error, torch.OutOfMemoryError):
                raise
            logger.info(
                "functorch engine: vmap failed on this model (%s: %s); using the loop "
                "engine, one sample at a time",
                type(error).__name__,
                error,
            )
        # (remembered once the loop engine has done the batch: a model that fails on this
        # batch without vmap too, bad data, raises its own error and keeps its engine)
        sums = LoopEngine(batched_vectors=True)(*args)
        self.unvmappable.add(model)
        return sums

    def _sums(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
        memory_budget: int,
    ) -> dict[str, Tensor]:
        frozen = {
            name: t.detach()
            for name, t in [*model.named_parameters(), *model.named_buffers()]
            if name not in params and not is_lazy(t)  # (lazy: unused, left in the module)
        }
        trainable = {name: p.detach() for name, p in params.items()}
        leaves, spec = pytree.tree_flatten((batch.args, batch.kwargs))
        leaves = [leaf.detach() if isinstance(leaf, Tensor) else leaf for leaf in leaves]
        args, kwargs = pytree.tree_unflatten(leaves, spec)
        # (no graph unless a parameter is captured: see the module docstring)
        with torch.enable_grad(), CallsVmapWrong() as calls:
            output = output_fn(swapped_call(model, {**frozen, **trainable}, args, kwargs))
        captured = reaches(output, params)
        if captured:
            raise _Captured(
                f"the model's output depends on parameters {captured} other than through "
                "their registered names (a view or copy made before the forward pass, or an "
                "output_fn that reads them), which torch.func cannot swap"
            )
        per_sample = [i for i, leaf in enumerate(leaves) if is_per_sample(leaf, batch.size)]

        def output_of_one(theta: dict[str, Tensor], sample_leaves: list[Tensor]) -> Tensor:
            filled: list[Any] = list(leaves)
            for i, leaf in zip(per_sample, sample_leaves):
                filled[i] = leaf.unsqueeze(0)
            args, kwargs = pytree.tree_unflatten(filled, spec)
            out = swapped_call(model, {**frozen, **theta}, args, kwargs)
            return output_fn(out).squeeze(0)

        def outputs_alone(stop: int) -> Tensor:
            """The outputs of samples ``0`` to ``stop - 1``, each run alone (vmapped)."""
            try:
                with torch.no_grad():
                    return vmap(lambda _, sample: output_of_one(trainable, sample))(
                        torch.arange(stop), [leaves[i][:stop] for i in per_sample]
                    )
            except (ValueError, TypeError) as error:  # (the model's own: vmap's are neither)
                error.add_note(ALONE_NOTE)
                raise

        vectors = make_vectors(output)  # (K, B, *S, C); (it checks the output, then detaches)
        first = outputs_alone(min(2, batch.size))
        if first.shape == output[:2].shape and not same_output(first, output[:2].detach()):
            # (a model that mixes the samples: each sample's vectors from its own output, as
            # its pull-back runs it, not from its row of the batch's output; outputs of
            # another shape are samples not cut as the model reads them: raised below)
            vectors = make_vectors(outputs_alone(batch.size))
        del output, first
        num_vectors = vectors.shape[0]
        one_at_a_time = calls.called  # (vmap over the vectors would be wrong: VMAP_WRONG)
        held = 1 if one_at_a_time else num_vectors  # (the vectors a sample holds at once)
        vector_chunk = held
        if chunk_size is None and bytes_per_sample(held, trainable) > memory_budget:
            vector_chunk = resolve_chunk_size(None, memory_budget, bytes_per_sample(1, trainable))
        chunk_size = resolve_chunk_size(
            chunk_size, memory_budget, bytes_per_sample(held, trainable)
        )

        def squared_pullbacks(sample_leaves: list[Tensor], sample_vectors: Tensor) -> dict:
            _, pull_back = vjp(lambda theta: output_of_one(theta, sample_leaves), trainable)
            squares: dict[str, Tensor] = {}
            for start in range(0, num_vectors, vector_chunk):
                chunk = sample_vectors[start : start + vector_chunk]
                if one_at_a_time:
                    (grads,) = pull_back(chunk[0])
                    grads = {name: g.unsqueeze(0) for name, g in grads.items()}
                else:
                    (grads,) = vmap(pull_back)(chunk)
                for name, g in grads.items():  # each (vector_chunk, *shape)
                    # (squared in the sums' dtype: a float16 gradient's square under- or
                    # overflows in float16)
                    sq = g.to(accumulation_dtype(g.dtype)).square().sum(0)
                    squares[name] = squares[name] + sq if name in squares else sq
            return squares

        sums = zero_sums(trainable)
        per_sample_vectors = vectors.transpose(0, 1)  # (B, K, *S, C)
        for start in range(0, batch.size, chunk_size):
            stop = min(start + chunk_size, batch.size)
            chunk_leaves = [leaves[i][start:stop] for i in per_sample]
            squares = vmap(squared_pullbacks)(chunk_leaves, per_sample_vectors[start:stop])
            for name, sq in squares.items():
                # (detached: a tensor the model uses that requires gradients, not a parameter,
                # would otherwise leave the Fisher in its graph)
                sums[name] += sq.sum(0, dtype=sums[name].dtype).detach()
        return sums
