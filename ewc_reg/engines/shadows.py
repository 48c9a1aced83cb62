r"""Per-sample copies of loose parameters that reach the batch through operations on parameters
alone (a ConvNeXt block's layer scale ``gamma.reshape(1, C, 1, 1)``; BEiT's query and value
biases joined by ``torch.cat`` into ``F.linear``'s bias), where no layout of
:data:`.loose.LAYOUTS` fits the model's operations.

A loose parameter :math:`p` enters the batch's computation through tensors
:math:`D = g(p)` computed from parameters and constants alone, until an operation :math:`h`
meets batch data :math:`X` (of shape ``(B, ...)``): :math:`Y = h(X, D)`. During the forward
pass, the torch-function mode :class:`Shadows` keeps beside each such :math:`D` its shadow
:math:`D^{\mathrm{b}} = (g(P_1), \dots, g(P_B))` of shape ``(B, *D.shape)``, computed from the
per-sample copies :math:`P = (p, \dots, p)` (``torch.vmap`` of each operation over them), and
at the meeting returns, in place of :math:`Y`,

.. math::

    Y'_n = h\big(X_{n:n+1}, D^{\mathrm{b}}_n\big)_0 \qquad (\text{vmap over } n).

Every :math:`D^{\mathrm{b}}_n` equals :math:`D`, so :math:`Y' = Y` wherever :math:`h` treats the
samples apart, and the gradient with respect to :math:`P_n` is sample ``n``'s gradient with
respect to :math:`p`, as for the copies of the other layouts. Batch data is what the batch's
inputs lead to (their descendants, through any operation); what :math:`h` returns must have one
row per sample (``h(X_{n:n+1}, \cdot)`` of leading dimension 1), or the mode raises. Whether
:math:`h` treats the samples apart is checked for each parameter on two samples
(:func:`.loose.per_sample_problem`), as the copies of every layout are.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode
from torch.utils.weak import WeakIdKeyDictionary

from .base import tensors_in


class Shadows(TorchFunctionMode):
    """Inside the block, the operations on the parameters of ``copies`` (a parameter to its
    per-sample copies ``(B, *p.shape)``) and on what they compute are shadowed per sample, and
    each meeting of such a tensor with batch data (descendants of ``inputs``) is computed
    sample by sample from the shadows (see the module docstring)."""

    def __init__(self, copies: dict[Tensor, Tensor], inputs: list[Tensor]) -> None:
        super().__init__()
        self.shadow: WeakIdKeyDictionary = WeakIdKeyDictionary(copies)
        self.batch: WeakIdKeyDictionary = WeakIdKeyDictionary(dict.fromkeys(inputs, True))

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        tensors = tensors_in((args, kwargs))
        shadowed = any(t in self.shadow for t in tensors)
        of_batch = any(t in self.batch for t in tensors)
        if not shadowed:
            result = func(*args, **kwargs)
            if of_batch:
                self._mark_batch(result)
            return result
        leaves, spec = pytree.tree_flatten((args, kwargs))
        derived = [i for i, leaf in enumerate(leaves) if _in(leaf, self.shadow)]
        shadows = [self.shadow[leaves[i]] for i in derived]
        if not of_batch:  # (parameters and constants alone: the shadow beside the result)
            result = func(*args, **kwargs)
            outputs = tensors_in(result)
            if outputs:
                per_sample = torch.vmap(_substituted(func, leaves, spec, derived))(*shadows)
                for output, shadow in zip(outputs, tensors_in(per_sample)):
                    self.shadow[output] = shadow
            return result
        batch = [i for i, leaf in enumerate(leaves) if _in(leaf, self.batch)]
        meet = _substituted(func, leaves, spec, derived, batch)
        result = torch.vmap(meet)(*shadows, *(leaves[i] for i in batch))
        self._mark_batch(result)
        return result

    def _mark_batch(self, result: Any) -> None:
        for output in tensors_in(result):
            self.batch[output] = True


def _in(leaf: Any, table: WeakIdKeyDictionary) -> bool:
    return isinstance(leaf, Tensor) and leaf in table


def _substituted(
    func: Any, leaves: list[Any], spec: Any, derived: list[int], batch: list[int] = ()
) -> Callable[..., Any]:
    """``func`` on ``leaves`` (unflattened by ``spec``) with those at positions ``derived``
    replaced by the first arguments (one sample's shadows) and, at a meeting, those at positions
    ``batch`` by one sample's rows of the others, each with its leading dimension of 1; its
    outputs lose that dimension again (``ValueError`` where one has another)."""

    def call(*tensors: Tensor) -> Any:
        values = list(leaves)
        for i, tensor in zip(derived, tensors):
            values[i] = tensor
        for i, tensor in zip(batch, tensors[len(derived) :]):
            values[i] = tensor.unsqueeze(0)
        args, kwargs = pytree.tree_unflatten(values, spec)
        result = func(*args, **kwargs)
        return pytree.tree_map_only(Tensor, _one_row, result) if batch else result

    return call


def _one_row(t: Tensor) -> Tensor:
    if t.dim() == 0 or t.shape[0] != 1:
        raise ValueError(
            f"an operation meeting per-sample copies gives a sample's rows {tuple(t.shape)} "
            "instead of one row: it does not treat the samples apart"
        )
    return t.squeeze(0)
