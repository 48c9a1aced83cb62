r"""Per-sample copies of parameters that reach the batch through operations on parameters
alone, where no layout of :data:`.loose.LAYOUTS` fits the model's operations: loose parameters
(a ConvNeXt block's layer scale ``gamma.reshape(1, C, 1, 1)``; BEiT's query and value biases
joined by ``torch.cat`` into ``F.linear``'s bias; an indexed relative position table), and the
parameters of units whose outputs have no batch dimension (:class:`.recording.Batchless`: a
relative position MLP run on fixed coordinates, T5's bias table looked up with position
buckets), whose modules are then no units.

A parameter :math:`p` enters the batch's computation through tensors :math:`D = g(p)`
computed from parameters and constants alone, until an operation :math:`h` meets batch data
:math:`X` (of shape ``(k B, ...)``: ``k`` rows per sample, one sample's after another, ``k > 1``
where windows or heads are folded into the batch dimension): :math:`Y = h(X, D)`. During the
forward pass, the torch-function mode :class:`Shadows` keeps beside each such :math:`D` its
shadow :math:`D^{\mathrm{b}} = (g(P_1), \dots, g(P_B))` of shape ``(B, *D.shape)``, computed
from the per-sample copies :math:`P = (p, \dots, p)` (``torch.vmap`` of each operation over
them), and at the meeting returns, in place of :math:`Y`,

.. math::

    Y'_{[n]} = h\big(X_{[n]}, D^{\mathrm{b}}_n\big) \qquad (\text{vmap over } n;
    X_{[n]} = X_{nk:(n+1)k}),

or, for the functions of :data:`BROADCASTING`, :math:`h` once with :math:`D^{\mathrm{b}}`
aligned to broadcast as :math:`D` does (:func:`_aligned`; where :math:`D` repeats one row
:math:`r` as many times as :math:`X` has rows, MPNet's bias expanded to the batch size, each
sample's rows take its shadow of :math:`r`, which the mode keeps beside :math:`D`). Every
:math:`D^{\mathrm{b}}_n` equals :math:`D`, so :math:`Y' = Y` wherever :math:`h` treats the
samples apart, and the gradient with respect to :math:`P_n` is sample ``n``'s gradient with
respect to :math:`p`, as for the copies of the other layouts. Batch data is what the batch's
inputs lead to (their descendants, through any operation); what :math:`h` returns must have
``k`` rows per sample, or the mode raises. Whether :math:`h` treats the samples apart (and the
rows are each sample's, together) is checked for each parameter on two samples
(:func:`.loose.per_sample_problem`), as the copies of every layout are.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
import torch.utils._pytree as pytree
from torch import Tensor
from torch.overrides import TorchFunctionMode

from .base import tensors_in


class Shadows(TorchFunctionMode):
    """Inside the block, the operations on the parameters of ``copies`` (a parameter to its
    per-sample copies ``(B, *p.shape)``) and on what they compute are shadowed per sample, and
    each meeting of such a tensor with batch data (descendants of ``inputs``) is computed
    sample by sample from the shadows (see the module docstring)."""

    def __init__(self, copies: dict[Tensor, Tensor], inputs: list[Tensor]) -> None:
        super().__init__()
        self.shadow = ByIdentity(copies)
        self.batch = ByIdentity(dict.fromkeys(inputs, True))
        # (a tensor whose rows all repeat one row, (1, ...) expanded or repeated over its leading
        # dimension: the shadow of that row, (B, 1, ...); see _aligned)
        self.one_row = ByIdentity({})

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
            own = bool(args) and _in(args[0], self.shadow)  # (its first argument, shadowed)
            if own and func in SAME_VALUES:  # (no copy of the shadows: they may be views)
                self.shadow[result] = shadows[0]
            elif own and _expands(func, args, kwargs, result):
                self.shadow[result] = shadows[0].expand(shadows[0].shape[0], *result.shape)
            elif outputs:
                call = _substituted(func, leaves, spec, derived)
                per_sample = torch.vmap(lambda *shadows: tensors_in(call(*shadows)))(*shadows)
                for output, shadow in zip(outputs, per_sample):
                    self.shadow[output] = shadow
            if own:
                self._keep_one_row(func, args, kwargs, shadows[0], result)
            return result
        batch = [i for i, leaf in enumerate(leaves) if _in(leaf, self.batch)]
        size = shadows[0].shape[0]
        rows = _rows_per_sample([leaves[i] for i in batch], size)
        aligned = _aligned(func, leaves, derived, shadows, self.one_row, batch, rows)
        if aligned is not None:
            result = _substituted(func, leaves, spec, derived)(*aligned)
        else:
            meet = _substituted(func, leaves, spec, derived, batch, rows)
            per_sample = torch.vmap(meet)(
                *shadows, *(leaves[i].unflatten(0, (size, rows)) for i in batch)
            )
            result = pytree.tree_map_only(Tensor, lambda t: t.flatten(0, 1), per_sample)
        self._mark_batch(result)
        return result

    def _keep_one_row(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], shadow: Tensor, result: Any
    ) -> None:
        """Where ``result`` (of ``func`` on ``args[0]``, whose shadow is ``shadow``) repeats one
        row along a leading dimension longer than 1, the shadow of that row, ``(B, 1, ...)``
        (see :func:`_aligned`): ``args[0]`` repeats one row, or leads with 1 and is expanded
        (or repeated) over that dimension."""
        tensor = args[0]
        if not isinstance(result, Tensor) or result.dim() == 0 or result.shape[0] < 2:
            return
        if tensor in self.one_row:
            row = _row_after(func, args, kwargs, self.one_row[tensor], result)
        elif tensor.dim() and tensor.shape[0] == 1 and _expands(func, args, kwargs, result):
            row = shadow
        else:
            return
        if row is not None:
            self.one_row[result] = row

    def _mark_batch(self, result: Any) -> None:
        for output in tensors_in(result):
            self.batch[output] = True


#: Functions whose tensor arguments broadcast against each other (elementwise arithmetic;
#: ``scaled_dot_product_attention``'s mask against the scores): where one meets batch data,
#: the shadows, aligned with the batch (:func:`_aligned`), take the place of the tensors they
#: shadow in one call, without ``vmap`` (which gets ``scaled_dot_product_attention``'s
#: gradient for a batched mask wrong on CPU: it raises).
BROADCASTING = frozenset(
    {
        torch.add, torch.sub, torch.mul, torch.div, torch.where,
        Tensor.add, Tensor.sub, Tensor.mul, Tensor.div,
        Tensor.__add__, Tensor.__radd__, Tensor.__sub__, Tensor.__rsub__,
        Tensor.__mul__, Tensor.__rmul__, Tensor.__truediv__, Tensor.__rtruediv__,
        F.scaled_dot_product_attention,
    }
)  # fmt: skip

#: The in-place arithmetic of :data:`BROADCASTING`, aligned like it where the tensor it writes
#: into is batch data (MPNet's ``scores += position_bias``).
IN_PLACE = frozenset(
    {
        Tensor.add_, Tensor.sub_, Tensor.mul_, Tensor.div_,
        Tensor.__iadd__, Tensor.__isub__, Tensor.__imul__, Tensor.__itruediv__,
    }
)  # fmt: skip

#: Functions that return their tensor's values (a copy in another memory layout): the result's
#: shadow is its tensor's, not a copy of it (MPNet's relative position bias, ``expand``ed over
#: the batch, is made ``contiguous`` before it meets the scores: each sample's shadow of it
#: would be a copy of the whole batch's).
SAME_VALUES = frozenset({Tensor.contiguous})

#: Functions that expand a tensor to a shape (of the same rank, here): the result's shadow is
#: an expanded view of its tensor's.
EXPANDING = frozenset({Tensor.expand, Tensor.expand_as})


def _rows_per_sample(tensors: list[Tensor], size: int) -> int:
    """The rows ``k`` each of ``size`` samples has in the batch data ``tensors``, all of leading
    dimension ``k size`` (``k > 1``: positions or windows folded into the batch dimension, a
    sample's rows one after another, which the check on two samples tests); ``ValueError`` for
    other shapes."""
    leading = {t.shape[0] if t.dim() else 0 for t in tensors}
    if len(leading) != 1 or not min(leading) or min(leading) % size:
        shapes = [tuple(t.shape) for t in tensors]
        raise ValueError(
            f"per-sample copies of {size} samples meet batch data of shapes {shapes}, whose "
            "leading dimensions are not one multiple of the batch"
        )
    return min(leading) // size


def _aligned(
    func: Any,
    leaves: list[Any],
    derived: list[int],
    shadows: list[Tensor],
    one_row: ByIdentity,
    batch: list[int],
    rows: int,
) -> list[Tensor] | None:
    """For a meeting of a function of :data:`BROADCASTING` (or :data:`IN_PLACE`, writing into
    batch data) with batch data whose tensors all have the same rank ``r`` (and ``rows`` rows
    per sample), each shadow ``(B, *D.shape)`` made to broadcast as its tensor ``D`` does,
    sample by sample:

    - ``(B, *D.shape[1:])`` where ``D`` has rank ``r`` and leads with 1, and
      ``(B, 1, ..., 1, *D.shape)`` of rank ``r`` where ``D`` has a lower rank, each sample's
      repeated ``rows`` times;
    - where ``D`` has rank ``r``, as many rows as the batch data, ``rows B``, and repeats one
      row (in ``one_row``, with the shadow of that row, ``(B, 1, ...)``; MPNet's position bias
      ``expand``ed to the batch size): that row's shadow, each sample's repeated ``rows``
      times. The function pairs the rows of ``D`` with those of the batch data whatever made
      ``D`` that long (were it a table whose length only equals the batch size), so row ``m``
      of ``D`` reaches sample ``m``'s outputs alone, and each sample's rows of its shadow,
      ``D^b_n[n k:(n + 1) k]``, are its shadow of the one row.

    ``None`` where the function is not one of them or a tensor broadcasts otherwise (rows of
    ``D`` that differ, as long as the batch data: each sample's rows of its shadow would be
    right, but its shadow has the whole batch's rows, ``B`` times the memory, and so has its
    gradient; ConViT's gating times its position scores, ``(B, heads, N, N)``, took 2.1 times
    the time of its attention module on the per-module fallback, B=32)."""
    if func not in BROADCASTING and not (func in IN_PLACE and 0 in batch):
        return None
    size = shadows[0].shape[0]
    ranks = {leaves[i].dim() for i in batch}
    if len(ranks) != 1:
        return None
    (rank,) = ranks
    aligned = []
    for i, shadow in zip(derived, shadows):
        shape = leaves[i].shape
        if len(shape) < rank:
            ones = (1,) * (rank - len(shape) - 1)
            aligned.append(_repeated(shadow.reshape(size, *ones, *shape), rows))
        elif len(shape) == rank and shape[0] == 1:
            aligned.append(_repeated(shadow.reshape(size, *shape[1:]), rows))
        elif len(shape) == rank and shape[0] == rows * size and leaves[i] in one_row:
            aligned.append(one_row[leaves[i]].expand(size, rows, *shape[1:]).flatten(0, 1))
        else:
            return None
    return aligned


def _expands(func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any) -> bool:
    """Whether ``func(*args, **kwargs)``, giving ``result``, expands its tensor to a shape of the
    same rank (:data:`EXPANDING`), or is a ``Tensor.repeat`` that repeats dimensions of size 1
    alone and so gives what ``expand`` does, without a copy (XCiT's Fourier position encoding
    ``(1, C, H, W)`` repeated over the batch before it meets it)."""
    if func in EXPANDING:
        return isinstance(result, Tensor) and result.dim() == args[0].dim()
    if func is not Tensor.repeat or kwargs or len(args) < 2:
        return False
    tensor, sizes = args[0], _flat(args[1:])
    return len(sizes) == tensor.dim() and all(
        isinstance(n, int) and (n == 1 or dim == 1) for n, dim in zip(sizes, tensor.shape)
    )


#: Functions that reshape their tensor (any new shape, read in the same order) and that
#: reorder its dimensions: where a tensor repeats one row and keeps its leading dimension
#: (:func:`_row_after`), so does what they give.
RESHAPING = frozenset({Tensor.reshape, Tensor.view, torch.reshape, Tensor.flatten, torch.flatten})
REORDERING = frozenset({Tensor.permute, torch.permute, Tensor.transpose, torch.transpose})


def _row_after(
    func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], row: Tensor, result: Any
) -> Tensor | None:
    """The shadow ``(B, 1, ...)`` of the one row that ``result`` repeats, where ``func`` takes
    a tensor ``D`` repeating the row shadowed by ``row`` (``(B, 1, ...)``) and keeps the rows
    apart: :data:`SAME_VALUES`, an expansion, a reshape keeping the leading dimension's size
    (each row of the result is that row of ``D``, reshaped), a permutation or transposition
    keeping the leading dimension first (XCiT's position encoding, repeated over the batch,
    then reshaped and permuted to ``(B, N, C)``); ``None`` otherwise."""
    tensor = args[0]
    if func in SAME_VALUES or _expands(func, args, kwargs, result):
        return row  # (an expansion of other dimensions: the row broadcasts to them)
    if result.dtype != tensor.dtype:
        return None
    full = row.expand(row.shape[0], 1, *tensor.shape[1:])
    if func in RESHAPING and result.shape[0] == tensor.shape[0]:
        return full.reshape(row.shape[0], 1, *result.shape[1:])
    if func not in REORDERING or kwargs:
        return None
    dims = [d % tensor.dim() for d in _flat(args[1:])]
    if func in (Tensor.permute, torch.permute) and dims[:1] == [0]:
        return full.permute(0, 1, *(d + 1 for d in dims[1:]))
    if len(dims) == 2 and 0 not in dims:
        return full.transpose(dims[0] + 1, dims[1] + 1)
    return None


def _flat(sizes: tuple[Any, ...]) -> list[Any]:
    """``sizes`` as given to ``repeat`` or ``permute``: one sequence, or its items as arguments."""
    if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
        return list(sizes[0])
    return list(sizes)


def _repeated(shadow: Tensor, rows: int) -> Tensor:
    """Each sample's row of ``shadow`` ``(B, ...)`` repeated ``rows`` times, ``(rows B, ...)``."""
    return shadow.repeat_interleave(rows, 0) if rows > 1 else shadow


class ByIdentity:
    """Values keyed by tensors, by identity, the tensors held weakly: an entry goes when its
    tensor does. (``torch.utils.weak.WeakIdKeyDictionary`` makes a weak reference for every
    lookup, and the mode looks up every operation's arguments: a T5's ``empirical`` Fisher
    took 0.88 of its time with this table, V=5000, B=8, T=32, medians of 9.)"""

    def __init__(self, items: dict[Tensor, Any]) -> None:
        self._items: dict[int, tuple[weakref.ref, Any]] = {}
        for key, value in items.items():
            self[key] = value

    def __setitem__(self, key: Tensor, value: Any) -> None:
        table = weakref.ref(self)  # (no cycle through the callback: the values go with self)

        def forget(ref: weakref.ref, i: int = id(key)) -> None:
            items = getattr(table(), "_items", {})
            if items.get(i, (None,))[0] is ref:  # (not a later tensor's, of its id)
                del items[i]

        self._items[id(key)] = (weakref.ref(key, forget), value)

    def __contains__(self, key: Tensor) -> bool:
        item = self._items.get(id(key))
        return item is not None and item[0]() is key

    def __getitem__(self, key: Tensor) -> Any:
        if key not in self:
            raise KeyError(f"no entry for a tensor of shape {tuple(key.shape)}")
        return self._items[id(key)][1]


def _in(leaf: Any, table: ByIdentity) -> bool:
    return isinstance(leaf, Tensor) and leaf in table


def _substituted(
    func: Any,
    leaves: list[Any],
    spec: Any,
    derived: list[int],
    batch: list[int] = (),
    rows: int = 1,
) -> Callable[..., Any]:
    """``func`` on ``leaves`` (unflattened by ``spec``) with those at positions ``derived``
    replaced by the first arguments (one sample's shadows) and, at a meeting, those at positions
    ``batch`` by the others (one sample's ``rows`` rows of them); each of its outputs must have
    ``rows`` rows too (``ValueError``: the function does not treat the samples apart)."""
    func = _EQUIVALENTS.get(func, func)

    def call(*tensors: Tensor) -> Any:
        values = list(leaves)
        for i, tensor in zip([*derived, *batch], tensors):
            values[i] = tensor
        args, kwargs = pytree.tree_unflatten(values, spec)
        result = func(*args, **kwargs)
        if batch:
            for t in tensors_in(result):
                if t.dim() == 0 or t.shape[0] != rows:
                    raise ValueError(
                        f"an operation meeting per-sample copies gives a sample {tuple(t.shape)} "
                        f"for its {rows} rows: it does not treat the samples apart"
                    )
        return result

    return call


def _embedding(
    input: Tensor,
    weight: Tensor,
    padding_idx: int | None = None,
    max_norm: float | None = None,
    norm_type: float = 2.0,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """``F.embedding``, its ``padding_idx`` (no gradient for that row) by a lookup in the
    detached table there: ``vmap``'s rule for a batched table gave the row a gradient in every
    copy but the first (torch 2.14; a table tied to the output layer, whose shadows are looked
    up in, got a padding row 5.4 times its Fisher)."""
    looked = F.embedding(input, weight, None, max_norm, norm_type, scale_grad_by_freq, sparse)
    if padding_idx is None:
        return looked
    padding = padding_idx + weight.shape[0] if padding_idx < 0 else padding_idx
    frozen = F.embedding(input, weight.detach(), None, max_norm, norm_type, False, sparse)
    return torch.where((input == padding).unsqueeze(-1), frozen, looked)


def _aten_embedding(
    weight: Tensor,
    input: Tensor,
    padding_idx: int = -1,
    scale_grad_by_freq: bool = False,
    sparse: bool = False,
) -> Tensor:
    """``torch.embedding`` (a negative ``padding_idx``: none) as :func:`_embedding`."""
    padding = padding_idx if padding_idx >= 0 else None
    return _embedding(input, weight, padding, None, 2.0, scale_grad_by_freq, sparse)


#: Functions that the per-sample calls (:func:`_substituted`) run as an equivalent one.
_EQUIVALENTS: dict[Any, Callable[..., Any]] = {
    F.embedding: _embedding,
    torch.embedding: _aten_embedding,
}
