"""Turning the user's data into uniform batches.

Accepted batch forms (anything else is a ``TypeError``):

* a tuple or list ``(inputs, targets, *rest)``: the model is called as ``model(inputs)``;
  ``rest`` (task ids, indices, ...) is ignored; ``targets`` may be ``None`` (inputs only);
* a dict whose ``"labels"`` entry holds the targets: the model is called as
  ``model(**others)`` with every other entry;
* without targets (for the estimators that need none, ``exact`` and ``sample``): a tensor of
  inputs, a one-element tuple or list ``(inputs,)`` (what a ``DataLoader`` over a
  ``TensorDataset(inputs)`` yields), or a dict without ``"labels"`` or with
  ``"labels": None`` (what Hugging Face's collators give for data without labels; the other
  entries go to the model).

The batch size ``B`` is the length of the targets' first dimension (without targets: that of
the first tensor among the inputs). Tensors whose first dimension is ``B`` are per-sample and
are sliced, moved to the model's device, and (by the functorch engine) vmapped over;
everything else is passed through unchanged. Tensors are found in tuples, lists and dicts
(and what else ``torch.utils._pytree`` walks); a mapping inside the batch that it does not walk
(Hugging Face's ``BatchEncoding``, a ``UserDict``) is passed to the model as a ``dict`` of its
entries.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torch.utils import _pytree as pytree

ACCEPTED_FORMS = (
    "a tuple/list (inputs, targets, *rest) or a dict with a 'labels' entry "
    "(other entries are passed as model(**batch)); without targets, for 'exact' and 'sample': "
    "a tensor of inputs, a tuple/list (inputs,) or (inputs, None), or a dict without 'labels' "
    "(or with None)"
)

#: What to pass instead of one batch.
_ONE_BATCH = (
    "looks like one batch; pass an iterable of batches, e.g. [(inputs, targets)] or a DataLoader"
)


@dataclass(frozen=True)
class Batch:
    """One batch: the model is called as ``model(*args, **kwargs)``."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    targets: Tensor | None  # (None: inputs only)
    size: int

    def samples(self, start: int, stop: int) -> Batch:
        """Samples ``start`` to ``stop - 1`` as a batch of their own."""

        def cut(leaf: Any) -> Any:
            return leaf[start:stop] if is_per_sample(leaf, self.size) else leaf

        args, kwargs, targets = pytree.tree_map(cut, (self.args, self.kwargs, self.targets))
        return Batch(args, kwargs, targets, len(range(start, min(stop, self.size))))

    def reversed(self) -> Batch:
        """The samples in reverse order."""

        def flip(leaf: Any) -> Any:
            return leaf.flip(0) if is_per_sample(leaf, self.size) else leaf

        args, kwargs, targets = pytree.tree_map(flip, (self.args, self.kwargs, self.targets))
        return Batch(args, kwargs, targets, self.size)

    def sample_shapes(self) -> tuple[tuple[int, ...], ...]:
        """The shapes of one sample's tensors (each per-sample tensor's without its first
        dimension), in the order of the batch's inputs."""
        leaves = pytree.tree_leaves((self.args, self.kwargs))
        return tuple(tuple(t.shape[1:]) for t in leaves if is_per_sample(t, self.size))

    def layout(self) -> str:
        """How the batch is cut into samples, for error messages: its input tensors (by
        position or keyword) with their shapes, those cut along their first dimension and
        those passed whole."""
        cut, whole = [], []
        named = [(f"input {i}", a) for i, a in enumerate(self.args)] + list(self.kwargs.items())
        for name, value in named:
            for leaf in pytree.tree_leaves(value):
                if isinstance(leaf, Tensor):
                    shape = f"{name} {tuple(leaf.shape)}"
                    (cut if is_per_sample(leaf, self.size) else whole).append(shape)
        return (
            f"cut per sample (first dimension {self.size}): {', '.join(cut) or 'none'}; "
            f"passed whole to every sample: {', '.join(whole) or 'none'}"
        )

    def to(self, device: torch.device) -> Batch:
        """Move every tensor (per-sample or not) to ``device``; tensors made in
        ``torch.inference_mode`` (which autograd cannot save) become ordinary copies, when
        called outside it."""

        def move(leaf: Any) -> Any:
            if not isinstance(leaf, Tensor):
                return leaf
            moved = leaf.to(device)
            return moved.clone() if moved.is_inference() else moved

        args, kwargs, targets = pytree.tree_map(move, (self.args, self.kwargs, self.targets))
        return Batch(args, kwargs, targets, self.size)

    def call(self, model: Callable[..., Any]) -> Any:
        return model(*self.args, **self.kwargs)


def is_per_sample(leaf: Any, size: int) -> bool:
    """Whether ``leaf`` is a per-sample tensor of a batch of ``size`` (first dimension ``size``)."""
    return _batched(leaf) and leaf.shape[0] == size


def as_batch(raw: Any) -> Batch:
    """Parse one element of the user's data into a :class:`Batch`."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    labelled = True
    if isinstance(raw, Mapping):  # (a dict; Hugging Face's BatchEncoding is a UserDict)
        kwargs = {k: v for k, v in raw.items() if k != "labels"}
        targets = raw.get("labels")
        labelled = targets is not None  # ("labels": None: inputs only, as without the key)
    elif isinstance(raw, (tuple, list)) and len(raw) >= 2:
        args, targets = (raw[0],), raw[1]
        labelled = targets is not None  # ((inputs, None): inputs only, as a dict's None)
    elif isinstance(raw, Tensor):
        args, labelled = (raw,), False
    elif isinstance(raw, (tuple, list)) and len(raw) == 1:
        args, labelled = (raw[0],), False
    else:
        raise TypeError(
            f"cannot read a batch of type {type(raw).__name__}"
            f"{' of length ' + str(len(raw)) if isinstance(raw, (tuple, list)) else ''}; "
            f"accepted batch forms: {ACCEPTED_FORMS}"
        )
    args, kwargs = _with_plain_dicts((args, kwargs))
    if not labelled:
        first = next((t for t in pytree.tree_leaves((args, kwargs)) if _batched(t)), None)
        if first is None:
            raise TypeError(
                "a batch without targets needs a tensor input with a batch dimension; "
                f"accepted batch forms: {ACCEPTED_FORMS}"
            )
        return Batch(args, kwargs, None, int(first.shape[0]))
    if not _batched(targets):
        raise TypeError(
            f"batch targets must be a tensor with a batch dimension, got {type(targets).__name__}"
            f"{'' if not isinstance(targets, Tensor) else ' of shape ()'}; "
            f"accepted batch forms: {ACCEPTED_FORMS}"
        )
    return Batch(args, kwargs, targets, int(targets.shape[0]))


def _foreign_mapping(node: Any) -> bool:
    """Whether ``node`` is a mapping that ``pytree`` takes for a leaf (Hugging Face's
    ``BatchEncoding``, a ``UserDict``): its tensors would be neither cut nor moved."""
    if not isinstance(node, Mapping):
        return False
    leaves = pytree.tree_leaves(node)
    return len(leaves) == 1 and leaves[0] is node


def _with_plain_dicts(tree: Any) -> Any:
    """``tree`` with every :func:`_foreign_mapping` in it, at any depth, made a ``dict`` of
    its entries, which every engine cuts into samples and moves as it does a dict's."""

    def plain(node: Any) -> Any:
        return _with_plain_dicts(dict(node)) if _foreign_mapping(node) else node

    return pytree.tree_map(plain, tree, is_leaf=_foreign_mapping)


def _maybe_one_batch(data: Any) -> bool:
    """Whether ``data`` is a list of two or more tensors with the same first dimension: one
    batch's ``[inputs, targets, *rest]``, or batches of inputs of one size; nothing tells them
    apart (token ids, next-token labels and an attention mask have the same shape and dtype;
    regression targets are floating point as the inputs)."""
    return (
        isinstance(data, list)
        and len(data) >= 2
        and all(map(_batched, data))
        and len({t.shape[0] for t in data}) == 1
    )


def _batched(leaf: Any) -> bool:
    """Whether ``leaf`` is a tensor with a leading (batch) dimension."""
    return isinstance(leaf, Tensor) and leaf.dim() > 0


def iter_batches(data: Iterable[Any], n_samples: int | None = None) -> Iterator[Batch]:
    """Yield parsed batches, stopping after ``n_samples`` samples (the last batch is cut).

    Data that looks like one batch is an error: a tuple of tensors (``TypeError``; a list of
    tensors is batches of inputs only), or a list of two or more tensors with the same first
    dimension (``ValueError``: taken for batches of inputs, the targets of one batch would go
    to the model; batches of inputs of one size are written ``[(x1,), (x2,), ...]``)."""
    if isinstance(data, tuple) and data and all(isinstance(t, Tensor) for t in data):
        raise TypeError(
            f"data is a tuple of {len(data)} tensors, which {_ONE_BATCH} (a list of tensors, "
            "for batches of inputs only)"
        )
    if _maybe_one_batch(data):
        shapes = ", ".join(str(tuple(t.shape)) for t in data)
        raise ValueError(
            f"data is a list of {len(data)} tensors of shapes {shapes}, which {_ONE_BATCH}; "
            "for batches of inputs only, pass [(x1,), (x2,), ...]"
        )
    if isinstance(data, (Tensor, Mapping)) or not isinstance(data, Iterable):
        raise TypeError(
            f"data must be an iterable of batches (e.g. a DataLoader), got {type(data).__name__}; "
            f"accepted batch forms: {ACCEPTED_FORMS}"
        )
    seen = 0
    for raw in data:
        batch = as_batch(raw)
        if n_samples is not None and seen + batch.size > n_samples:
            batch = batch.samples(0, n_samples - seen)
        if batch.size == 0:
            _check_empty(batch)
            continue
        seen += batch.size
        yield batch
        if n_samples is not None and seen >= n_samples:
            return


def _check_empty(batch: Batch) -> None:
    """``ValueError`` for a batch whose labels have no rows while its inputs have some and
    none has 0 (the labels of another batch, say): skipped as empty, its samples would be
    left out of the Fisher without an error."""
    inputs = [t for t in pytree.tree_leaves((batch.args, batch.kwargs)) if _batched(t)]
    if batch.targets is not None and inputs and not batch.sample_shapes():
        raise ValueError(
            f"a batch's labels have 0 rows but no input tensor has 0 rows ({batch.layout()}): "
            "do the labels belong to these inputs?"
        )


#: How far two computations of the same outputs may differ (:func:`same_output`), relative to
#: the largest entry: ``min(1000 eps, 1e-2)`` of their dtype (the same values, through kernels
#: of other sizes that may round differently); ``1e-2`` in float32 on a GPU that may round
#: matmuls and convolutions to TensorFloat-32 (10 mantissa bits; the kernels cuDNN picks for
#: two batch sizes may differ in whether they do).
OUTPUT_TOLERANCE = (1000, 1e-2)


def _may_round_to_tf32(t: Tensor) -> bool:
    return (
        t.is_cuda
        and t.dtype == torch.float32
        and (torch.backends.cuda.matmul.allow_tf32 or torch.backends.cudnn.allow_tf32)
    )


def same_output(a: Any, b: Any) -> bool:
    """Whether output leaves ``a`` and ``b`` agree (tensors: to :data:`OUTPUT_TOLERANCE`)."""
    if not isinstance(a, Tensor):
        return True
    if not isinstance(b, Tensor) or a.shape != b.shape or a.dtype != b.dtype:
        return False
    if not a.is_floating_point() or not a.numel():
        return torch.equal(a, b)
    finite = torch.isfinite(a)
    if not torch.equal(finite, torch.isfinite(b)):
        return False
    if not torch.equal(a[~finite].nan_to_num(), b[~finite].nan_to_num()):  # (±inf; NaN as 0)
        return False
    if not bool(finite.any()):
        return True
    factor, cap = OUTPUT_TOLERANCE
    tolerance = cap if _may_round_to_tf32(a) else min(factor * torch.finfo(a.dtype).eps, cap)
    a, b = a[finite].double(), b[finite].double()  # (logits masked with -inf, say)
    return (a - b).abs().max().item() <= tolerance * a.abs().max().item()


def check_cut(
    model: Callable[..., Any], batch: Batch, output_fn: Callable[[Any], Any], checked: set
) -> None:
    """Raise ``ValueError`` when cutting ``batch`` into samples changes the model's output.

    Every engine takes samples (or chunks of them) from a batch by cutting each tensor whose
    first dimension is the batch size ``B`` (:meth:`Batch.samples`). A tensor the samples
    share whose first dimension happens to be ``B`` too (a ``(T, T)`` mixing matrix with
    ``T == B``, say) would be cut as well, and the Fisher would be wrong without an error. So
    where two or more input tensors are cut, the model's output on the first ``b`` samples
    must be the first rows of its output on the first ``b + 1`` (``b = 2``, or ``B - 1`` for
    ``B <= 3``: the whole batch then), and its output on samples 1 to ``b`` the last rows,
    without gradients; a shared tensor cut to two lengths gives two different results, and
    cut from another start (a bank of rows of which the model reads row 0) too. Once per set
    of input shapes in ``checked``."""
    leaves = [t for t in pytree.tree_leaves((batch.args, batch.kwargs)) if isinstance(t, Tensor)]
    if batch.size < 2 or sum(is_per_sample(t, batch.size) for t in leaves) < 2:
        return
    shapes = tuple(tuple(t.shape) for t in leaves)
    if shapes in checked:
        return
    fewer = min(2, batch.size - 1)
    problem = (
        f"cutting the batch into samples changes the model's output: {batch.layout()}. A "
        "tensor all samples share whose first dimension equals the batch size is cut as if it "
        "were per-sample; give it a leading dimension of 1 (or keep it in the model, as a "
        "buffer). The model must also be deterministic in eval mode (as the Fisher is "
        "computed) and give each sample the same output whatever the samples beside it"
    )
    try:
        with torch.no_grad():
            more = pytree.tree_leaves(output_fn(batch.samples(0, fewer + 1).call(model)))
            part = pytree.tree_leaves(output_fn(batch.samples(0, fewer).call(model)))
            later = pytree.tree_leaves(output_fn(batch.samples(1, fewer + 1).call(model)))
    except Exception as error:
        with torch.no_grad():  # (a model failing on the whole batch too: its own error here)
            output_fn(batch.call(model))
        raise ValueError(
            f"the model failed on its first {fewer} or {fewer + 1} samples alone "
            f"({type(error).__name__}: {error}); {problem}"
        ) from error
    per_sample = [
        pair
        for a, b, c in zip(more, part, later)
        if is_per_sample(a, fewer + 1)
        for pair in ((a[:fewer], b), (a[1:], c))
    ]  # (outputs the samples share, if any, may differ)
    if len({len(more), len(part), len(later)}) > 1 or not all(
        same_output(a, b) for a, b in per_sample
    ):
        raise ValueError(problem)
    checked.add(shapes)
