r"""The fast engine: one forward pass with hooks, one backward pass batched over the vectors, and
per-layer rules.

Layer-wise decomposition. If a parameter :math:`\theta` enters the network only through one call
:math:`y = \phi(x; \theta)` of its module, and sample ``n``'s output :math:`y_n` depends only on
:math:`x_n`, then

.. math::

    J_n^\top v = \big(\partial y_n/\partial\theta\big)^\top G_n, \qquad
    G_n = \big(\partial f(x_n)/\partial y_n\big)^\top v .

So one forward pass records every unit's (parametrised module's) input ``x`` and (the autograd
edge of) its output ``y``; ``V = make_vectors(f)`` of shape ``(K, B, *out)`` (the exact Fisher
of a softmax gives ``C - 1`` vectors: see :class:`~ewc_reg.likelihoods.Categorical`; where each
vector costs a backward pass of its own, ``V`` is first cut to the rank of each sample's
vectors by :func:`~.base.fewer_vectors`) is pulled back to all the outputs in one backward pass
batched over ``K`` (``torch.func.vmap`` over ``autograd.grad``: :func:`.base.batched_grads`), giving
``G`` of shape ``(K, B, *y.shape[1:])`` per module, or, on CPU with convolutions, batch norms or
attention (:func:`loops_pull_back`), in one pass per vector (``G`` then lies in reused
``(B, K, ...)`` buffers, and layers with a reduction in :data:`.rules.REDUCTIONS`, the
normalisations, keep only their per-sample reduced gradients);
and the rules of :mod:`.rules` turn ``(x, G)`` into
:math:`\sum_n \sum_k ((\partial y_n/\partial\theta)^\top G_{nk})^{\odot 2}`
(for ``Linear`` without per-sample gradients at all; :mod:`.unit_sums` takes a unit's
recorded calls to its sums). A parametrised module without a rule (or whose rule declines the
call) is handled by :class:`~.functorch.FunctorchEngine` applied to that module alone, with
its recorded input and ``G`` as the vectors (its output tensors cloned while recording when
there are several: :func:`_separate_leaves`). The parameters of a module
that contains modules owning selected parameters (a ViT's class token, a ConvNeXt block's
layer scale: :mod:`.loose`) are replaced by per-sample copies during the forward pass, when
:func:`.loose.copies_layout` finds a way of doing so that keeps the per-sample gradients, and the
vectors are pulled back to the copies too; otherwise such a module is one unit without a rule
for all of them, the outermost one when they nest deeper (the modules inside it are not
hooked). An
``nn.MultiheadAttention`` is always one unit for its parameters and those of ``out_proj``
(whose weight it uses without calling it), and has a rule
(:func:`.attention.multihead_attention`, which sees the whole recorded call: query, key, value,
masks) unless it has ``add_bias_kv`` or ``add_zero_attn``; while recording, its call is redone
in pieces (:func:`.attention.attention_in_pieces`), and the vectors are pulled back to the
in-projection's outputs as well.

The decomposition is valid only if (checked; otherwise :class:`Unsupported` is raised):

* every parameter in ``params`` (the selected ones: the others are constants, wherever they
  are and however they are used) is registered on a module (modules sharing one, tied weights,
  are one unit, whose rule in :mod:`.tied` or fallback sees all their calls: :func:`_tie`),
  and, where a module's parameters get no per-sample copies, the root module does not own selected
  parameters next to children owning some (the unit would be the whole model), and none lies
  inside a TorchScript module (``torch.jit.script`` or ``trace``: the hooks of the modules
  inside one do not run);
* each unit's selected parameters (those of the modules inside it included) are used only
  while its module runs (not, say, with ``F.linear(h, self.embed.weight)`` in a parent's
  ``forward``); uses are seen by a :class:`~torch.overrides.TorchFunctionMode` during the
  forward pass. A module may run more than once per forward pass (a layer applied to its own
  output, a siamese encoder, a recurrent cell stepped through a sequence by hand): since the
  gradient recorded at call :math:`t`'s output is all that reaches it, the later calls'
  included, :math:`\sum_t (\partial y^{(t)}_n/\partial\theta)^\top G^{(t)}_{nk}` is the
  per-sample pull-back (backpropagation through time). The unit's rule takes all the calls:
  a rule whose reduction gives per-sample gradients (:data:`.rules.REDUCTIONS`: the norms,
  PReLU) sums those of the calls; a convolution joins its calls' patches
  (:data:`.rules.SEVERAL_CALLS`); a rule that treats positions alike
  (:data:`.rules.POSITIONWISE`: ``Linear``, ``Embedding``, attention, the recurrent layers and
  cells) gets its calls joined, positions side by side. A unit without a rule gets the
  per-module fallback on all its calls at once. Not covered: a unit whose rule records its
  calls in pieces it cannot join (an LSTM with a projection; attention that is
  self-attention in one call and not in another), or with a rule and several outputs;
* module outputs have the batch as leading dimension (or where the rule's
  :data:`.rules.BATCH_DIMS` say: a sequence-first ``nn.MultiheadAttention`` or recurrent layer's
  ``(T, B, ...)``; a layer of :data:`.rules.FOLDABLE` (linear layers, embeddings, layer and RMS
  norms) called sequence-first, ``module(x)`` with ``x`` of shape ``(T, B, ...)``, has its rule
  get ``x`` transposed to ``(B, T, ...)`` and the gradients at its output alike
  (:func:`_sequence_first`); a unit whose inputs all lead with 1, or all have one sample's shape
  of a per-sample input without a batch dimension, shared by the samples, such as a position
  embedding on ``position_ids`` of shape ``(1, T)`` or ``(T,)``, is called on them expanded over
  the batch, once a check on two samples shows that the model's output stays the same:
  :func:`_expand_shared`; ``(T,)`` with ``T == B`` once the unit's inputs and output stay the
  same on two samples: :class:`_SharedWithBatchRows`; a unit without a rule whose output the
  samples share, every tensor of it leading with 1, has it expanded over the batch where it is
  recorded, checked alike: :func:`_shared_output`; a model that fails on the expanded inputs or
  output is not covered), recorded inputs are not modified in place afterwards, nor outputs that
  are views other than reshapes of their bases (the gradient of a reshape is taken at its base:
  :func:`_output_edge`), and no batch norm uses batch statistics (it would mix the samples).
  Unit inputs are per-sample (the batch leading) or shared by all samples; a unit whose rule
  treats the leading dimensions alike (:data:`.rules.FOLDABLE`: linear layers, embeddings, layer
  and RMS norms) may also be called on per-sample data folded into the batch dimension, ``x`` of
  shape ``(B T, ...)`` with sample ``n``'s positions in rows ``nT`` to ``nT + T - 1``
  (``hidden.view(-1, D)``, as OPT's layers; Swin's windows): its rule gets ``x`` unfolded to
  ``(B, T, ...)`` and the gradients at its output alike, once the checks below show the rows to
  be so; any other input of three or more dimensions whose leading dimension is a multiple of
  the batch larger than it (a 3-d ``attn_mask`` of shape ``(B * heads, L, S)``) is taken for
  folded per-sample data the decomposition cannot split.
  Since a sequence-first ``(T, B, ...)`` layout with ``T == B``, or a layer run on a shared
  table of ``B`` rows, would pass the checks above, :func:`check_batch_layout` records the
  units again on fewer samples to tell (once per model and recorded shapes; where calls are
  folded, also on the batch in reverse order, on every pass, since how rows fold depends on
  the data: :func:`_check_folds`). A call of a :data:`.rules.FOLDABLE` layer whose layout
  the shapes could not tell and was taken the wrong way (sequence-first with ``T == B``,
  taken as batch-first; rows folded into the batch dimension, ``(B T, W, ...)`` with
  ``W == B``, taken as sequence-first) is taken the other way on the next attempt
  (:class:`_SequenceFirst`); the passes after the first, the checks' among them, take the
  same calls as sequence-first as the first did.

These checks test the assumptions one by one. With them, once per model and structure of the
forward pass (which units ran, how, on tensors of which ranks; :func:`_structure`),
:meth:`HookEngine._check_sums` tests the result: the sums on two samples against the loop
engine's, so that a way of breaking the decomposition that no check looks for (a tensor made
from a unit's parameters leaving it by an attribute, a layer run inside ``torch.vmap`` or
inside a derivative the forward pass takes) raises :class:`Unsupported` too.

Memory: the forward pass over the whole batch gives the checks and the vectors (like the
functorch engine's pass that makes its vectors, it is bounded by the batch the data yields); when
the pull-back of the whole batch (:func:`bytes_per_sample` without the forward pass: ``K`` times
the recorded outputs, or, looped, those whose gradients are kept whole) fits in
``memory_budget`` it also gives the sums, else the batch is redone in chunks of
``resolve_chunk_size(chunk_size, memory_budget, bytes_per_sample)`` samples (forward pass
included), each with its own forward pass; the first pass then runs without gradients
when ``chunk_size`` or the previous batch already told that the batch will be split. Rules
materialise per-sample gradients for chunks of samples within the budget too (and within
:data:`.rules.CHUNK_BYTES` on CPU), so the peak is up to about the budget plus that.
"""

from __future__ import annotations

import functools
import inspect
import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._batches import Batch, _may_round_to_tf32, is_per_sample, same_output
from . import base
from .base import (
    VMAP_WRONG,
    BatchingFailed,
    Engine,
    OutputFn,
    RowWiseVectors,
    VectorFn,
    batched_grads,
    fewer_vectors,
    inside,
    resolve_chunk_size,
    zero_sums,
)
from .loop import LoopEngine
from .loose import (
    SEQUENCE_FIRST,
    LooseParameter,
    call_with,
    copies_layout,
    loose_parameter,
    loose_parameters,
    per_sample_copies,
)
from .rules import (
    BATCH_DIMS,
    FOLDABLE,
    RECORDED_FORWARDS,
    Accumulator,
    CallRule,
    Reducer,
    Rule,
    class_rule,
    global_forward_pre_hooks,
    rule_for,
)
from .unit_sums import (
    Tied,
    accumulation_of,
    accumulator_of,
    batch_dims_of,
    by_rule,
    feed,
    nth,
    reduction_of,
    takes_calls_together,
    unit_sums,
)

logger = logging.getLogger("ewc_reg")


class Unsupported(Exception):
    """The model breaks an assumption of the layer-wise decomposition (see the module
    docstring); the message says which."""


class _SharedWithBatchRows(Unsupported):
    """A unit's inputs and outputs stay the same on fewer samples, but its output has the batch
    size as a dimension where the batch should be: inputs the samples share that
    :func:`_expand_shared` left as they are because the batch size is among their dimensions
    (nanoGPT's ``arange(T)`` with ``T == B``), to be expanded on the next attempt."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class _SequenceFirst(Unsupported):
    """Calls whose layout the shapes could not tell were taken the wrong way (see
    :func:`_sequence_first`): sequence-first ``(T, B, ...)`` with ``T == B``, taken as
    batch-first, or, taken as sequence-first, ``(B T, W, ...)`` rows folded into the batch
    dimension with ``W == B`` or a shared ``(1, T)`` input with ``T == B``; the layout check's
    pass on fewer samples tells (:func:`_layout_shown`). They are taken the other way on the
    next attempt."""

    def __init__(self, calls: dict[tuple[str, int], bool], message: str) -> None:
        super().__init__(message)
        self.calls = calls  # (unit path, call's position among its calls): sequence-first


@dataclass(eq=False)
class _Unit:
    """A module owning selected parameters, with those of the modules inside it when some of
    them own selected parameters too (then without a rule): ``names`` maps the parameter names
    relative to the module (``"in_proj_weight"``, ``"out_proj.weight"``) to the names in
    ``params``."""

    module: nn.Module
    path: str
    names: dict[str, str]
    rule: Rule | CallRule | None
    # its inputs are shared by the samples even with the batch size among their dimensions
    # (expanded by _expand_shared all the same: see _SharedWithBatchRows)
    shared: bool = False
    # the calls (by their order in the forward pass) taken as sequence-first wherever the batch
    # is their second dimension, those taken as batch-first whatever their shapes, and whether
    # all but the first are (the checks' passes follow the checked one: see _sequence_first)
    sequence_first: frozenset[int] = frozenset()
    batch_first: frozenset[int] = frozenset()
    decided: bool = False


@dataclass(eq=False)
class _Record:
    """What one call of a unit's module left behind (the first call; the record of each later
    call in the same forward pass is in ``more``)."""

    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    versions: list[tuple[Tensor, int]]
    edges: list[GradientEdge] = field(default_factory=list)
    # the output leaves (positions) or kept pieces (names) the edges belong to
    leaves: list[int | str] = field(default_factory=list)
    shapes: list[torch.Size] = field(default_factory=list)
    nbytes: int = 0
    inputs: list[torch.Size] = field(default_factory=list)  # every tensor argument's shape
    outputs: list[torch.Size] = field(default_factory=list)  # every output tensor's shape
    kept: dict[str, Tensor] = field(default_factory=dict)  # by the rule's recorded forward
    # its inputs, all shared, were expanded over the batch (or, without a rule, its output)
    expanded: bool = False
    folded: int = 1  # the positions per sample folded into its tensors' batch dimension
    transposed: bool = False  # sequence-first, (T, B, ...): recorded as (B, T, ...)
    given: torch.Size | None = None  # the input's shape, for a call that may be sequence-first
    member: int | None = None  # which of a Tied unit's modules was called
    more: list[_Record] = field(default_factory=list)  # the unit's later calls

    def calls(self) -> list[_Record]:
        """The records of all the unit's calls, in order."""
        return [self, *self.more]


def _separate_leaves(output: Any) -> Any:
    r"""``output`` with each of its differentiable tensors cloned when there are several.

    The per-module fallback pulls back, for each output tensor :math:`y_j`, the gradient
    :math:`G_j` that reaches it from outside the module: :math:`\sum_j J_j^\top G_j`. The
    gradient recorded at a tensor's autograd edge is all that reaches it, though, and an output
    tensor may also feed another inside the module (an LSTM cell's ``h = o * tanh(c)``
    returns ``(h, c)``; ``return y, y.sum(1)``; the same tensor twice): its recorded gradient
    would then count the other's twice. A clone's edge is reached from outside only."""
    leaves, spec = pytree.tree_flatten(output)
    differentiable = [i for i, leaf in enumerate(leaves) if _differentiable(leaf)]
    if len(differentiable) < 2:
        return output
    for i in differentiable:
        leaves[i] = leaves[i].clone()
    return pytree.tree_unflatten(leaves, spec)


def _differentiable(leaf: Any) -> bool:
    return isinstance(leaf, Tensor) and leaf.requires_grad


def _expand_shared(
    call: Any,
    tensors: list[Tensor],
    batch_size: int,
    sample_shapes: set[tuple[int, ...]],
    shared: bool = False,
) -> Any:
    """``call`` (a pytree of the unit's arguments, whose tensors are ``tensors``) with its
    tensors (but 0-d ones) expanded over the batch when they are all shared by the samples;
    else ``None``. Shared inputs either all lead with 1, expanded from it to ``batch_size``
    (when the batch has several samples), or all have no batch dimension and get one in
    front: each has the shape of one sample of a per-sample input of the batch
    (``sample_shapes``), no dimension of the batch size and no leading 1.

    A unit called on inputs the samples share, such as a position embedding looked up with
    ``position_ids`` of shape ``(1, T)`` (Hugging Face's default) or ``(T,)`` beside token ids
    ``(B, T)`` (nanoGPT's), has an output the samples share too, broadcast later: its gradient
    is then the batch's sum, and the per-sample decomposition fails. On the expanded inputs the
    unit's output has the batch in front, and the gradient that reaches it is per sample. The
    engine checks once per model and shapes that the model's output stays the same
    (:func:`check_expansion`). (Per-sample data folded into the batch dimension, ``(B T, D)``,
    has no sample's shape: expanded, it would cost ``B`` times the unit's work before failing.)
    An input with the batch size among its dimensions may be per-sample (``(B,)`` labels
    beside ``(B, T)`` inputs with ``T == B``) and is expanded only for a unit known to be
    ``shared`` (:class:`_SharedWithBatchRows`)."""
    tensors = [t for t in tensors if t.dim() > 0]
    if not tensors:
        return None
    if batch_size > 1 and all(t.shape[0] == 1 for t in tensors):
        kept = 1  # (the leading 1 becomes the batch)
    elif all(
        tuple(t.shape) in sample_shapes
        and (shared or batch_size not in t.shape)
        and t.shape[0] != 1
        for t in tensors
    ):
        kept = 0  # (the batch goes in front)
    else:
        return None
    return pytree.tree_map_only(
        Tensor, lambda t: t.expand(batch_size, *t.shape[kept:]) if t.dim() > 0 else t, call
    )


def _shared_output(output: Any, batch_size: int) -> bool:
    """Whether every tensor of a unit's ``output`` leads with 1 on a batch of several samples:
    an output the samples share, broadcast later (Hugging Face BART's position embeddings,
    ``(1, T, D)``, looked up on shared positions by a subclass of ``nn.Embedding`` without a
    rule, from per-sample ids it reads only the shape of). Expanded over the batch where it is
    recorded, its gradients are per sample, and the per-module fallback's per-sample calls
    give each sample's copy; :func:`check_expansion` checks that the model's output stays the
    same."""
    tensors = _tensors(output)
    return batch_size > 1 and bool(tensors) and all(t.dim() and t.shape[0] == 1 for t in tensors)


def _unfold(t: Tensor, dim: int, positions: int) -> Tensor:
    """``t`` with its dimension ``dim`` of ``B T`` rows, sample ``n``'s positions in rows ``nT``
    to ``nT + T - 1``, split into ``(B, T)`` (``positions`` is ``T``; 1: ``t`` as it is)."""
    if positions == 1:
        return t
    return t.reshape(*t.shape[:dim], -1, positions, *t.shape[dim + 1 :])


def _folds(unit: _Unit, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int) -> int:
    """How many positions per sample a call ``module(x)`` of a unit whose rule is in
    :data:`.rules.FOLDABLE` has folded into its batch dimension: ``T`` where ``x`` has shape
    ``(B T, ...)`` for ``T > 1``, else 1 (:func:`check_batch_layout` checks that its rows are
    the samples' positions, one sample after another)."""
    if unit.rule not in FOLDABLE or kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return 1
    lead = args[0].shape[0] if args[0].dim() else 0
    return lead // batch_size if lead > batch_size and lead % batch_size == 0 else 1


def _transposable(
    unit: _Unit, args: tuple[Any, ...], kwargs: dict[str, Any], member: int | None
) -> torch.Size | None:
    """The shape of ``x`` for a call ``module(x)`` of a unit (of its ``member``-th module, for a
    :class:`~.unit_sums.Tied` unit) whose rule is in :data:`.rules.FOLDABLE`, with ``x`` of
    two dimensions more than the rule's feature dimensions, which may be sequence-first,
    ``(T, B, *F)``; else ``None``."""
    module = unit.module if member is None else unit.module[member]
    rule = unit.rule if member is None else class_rule(module)  # (hooked now: no rule_for)
    if rule not in FOLDABLE or kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return None
    x = args[0]
    return x.shape if x.dim() >= 2 + FOLDABLE[rule](module) else None


def _sequence_first(unit: _Unit, given: torch.Size | None, batch_size: int, call: int) -> bool:
    """Whether a unit's ``call``-th call in the forward pass, on an input of shape ``given``
    (:func:`_transposable`), is sequence-first, ``(T, B, *F)``: with ``T != B``, unless the
    call is known to be batch-first (``(B T, W, *F)`` with ``W == B``: the unit's
    ``batch_first``), or with any ``T`` for a call known to be sequence-first (its
    ``sequence_first``: :class:`_SequenceFirst` found them, or they were in the pass the
    checks' passes follow, whose shapes may not tell); a unit ``decided`` has no others. Its
    rule gets ``x`` transposed to ``(B, T, *F)``, and the gradients at its output alike
    (:func:`check_batch_layout` checks the layout on fewer samples)."""
    if given is None or given[1] != batch_size or call in unit.batch_first:
        return False
    return call in unit.sequence_first or (not unit.decided and given[0] != batch_size)


def _layout_shown(full: torch.Size, part: torch.Size, size: int, fewer: int) -> bool | None:
    """Whether a call's input of shape ``full`` on ``size`` samples and ``part`` on the first
    ``fewer`` is sequence-first, ``(T, B, ...)`` on both (``True``), or not: the same on both,
    shared by the samples (``(1, T)`` position ids with ``T == B``, taken for ``T == 1``
    sequence-first), or with the batch in front on both, rows folded in or not, ``(k B, ...)``
    (``False``); ``None`` if neither. (They exclude each other for ``fewer < size``.)"""
    if len(full) != len(part) or full[2:] != part[2:]:
        return None
    if part == full:
        return False
    if full[1] == size and part[1] == fewer and part[0] == full[0]:
        return True
    if full[0] % size == 0 and part[0] * size == full[0] * fewer and part[1] == full[1]:
        return False
    return None


def _as_recorded(g: Tensor, shape: torch.Size, transposed: bool, vectors: bool) -> Tensor:
    """The gradient ``g`` of an edge's tensor (with the vectors' dimension in front when
    ``vectors``) in the edge's recorded ``shape``: a folded call's output unfolded, a view's
    base reshaped as the view, a sequence-first call's output ``(T, B, ...)`` transposed to
    its recorded ``(B, T, ...)`` (a view)."""
    lead = g.shape[:1] if vectors else ()
    if not transposed:
        return g.reshape(*lead, *shape)
    swapped = g.reshape(*lead, shape[1], shape[0], *shape[2:])
    return swapped.transpose(len(lead), len(lead) + 1)


#: The autograd nodes of views that may reshape a tensor without changing its values' order
#: (a reshape: :func:`_output_edge`).
_RESHAPES = {
    "ViewBackward0",
    "UnsafeViewBackward0",
    "ReshapeAliasBackward0",
    "UnsqueezeBackward0",
    "SqueezeBackward0",
    "SqueezeBackward1",
    "SqueezeBackward2",
    "SliceBackward0",
    "AliasBackward0",
}


def _output_edge(leaf: Tensor) -> tuple[GradientEdge, bool]:
    """The autograd edge at which the gradient that reaches an output ``leaf`` is taken, and
    whether it is the leaf's own. A view that reshapes a tensor autograd made (a Linear's
    output on ``(B, T, in)`` is a view of the ``(B T, out)`` product) takes its base's: an
    in-place operation on the view (``nn.ReLU(inplace=True)``) sends the view's later uses
    past the view's own edge, to the base's (the Linear's Fisher was 0, or 0.84 off where the
    output was also used before), and the base's gradient, reshaped, is the view's. Only where
    the view is its base reshaped (the same numbers, in the same order) by view operations
    alone, each passing the gradient on as it is: a custom ``autograd.Function`` returning
    ``x.view_as(x)`` and scaling the gradient (gradient reversal) lies between them otherwise,
    and the base's gradient would have its factor already. Another view keeps its own edge
    (:meth:`_Recorder.check` sees whether it was modified in place)."""
    base = leaf._base
    if (
        base is None
        or base.grad_fn is None
        or base.numel() != leaf.numel()
        or not (base.is_contiguous() and leaf.is_contiguous())
        or base.data_ptr() != leaf.data_ptr()
    ):
        return get_gradient_edge(leaf), True
    node = leaf.grad_fn
    while node is not base.grad_fn:  # (only reshapes between them)
        if node is None or type(node).__name__ not in _RESHAPES:
            return get_gradient_edge(leaf), True
        node = node.next_functions[0][0]
    return get_gradient_edge(base), False


def _describe(path: str) -> str:
    if "+" in path:  # (a unit of tied modules: _tie)
        return "the tied modules " + " and ".join(map(repr, path.split("+")))
    return "the root module" if not path else f"module {path!r}"


def _tie(units: list[_Unit]) -> list[_Unit]:
    """``units`` with those sharing a selected parameter made one: a module registered twice
    (two paths, one module) is one unit; different modules (an embedding tied to an output
    layer) are the members of a :class:`~.unit_sums.Tied` unit, each of whose calls its rule
    (:mod:`.tied`) or the per-module fallback sees, so that a sample's gradient of the shared
    parameter is summed over all of them before squaring."""
    group_of: dict[str, int] = {}  # parameter name -> index of its group
    groups: list[list[_Unit]] = []
    for unit in units:
        found = sorted({group_of[name] for name in unit.names.values() if name in group_of})
        index = found[0] if found else len(groups)
        if not found:
            groups.append([])
        for other in found[1:]:
            groups[index] += groups[other]
            groups[other] = []
        groups[index].append(unit)
        for member in groups[index]:
            group_of.update(dict.fromkeys(member.names.values(), index))
    tied = []
    for group in filter(None, groups):
        members: dict[int, _Unit] = {}  # one per module (a module registered twice is one)
        for unit in group:
            members.setdefault(id(unit.module), unit).names.update(unit.names)
        if len(members) == 1:
            tied.append(group[0])
            continue
        units_of = list(members.values())  # (none inside another: that one would be nested)
        paths = [unit.path for unit in units_of]
        names = {
            f"{i}.{local}": name
            for i, unit in enumerate(units_of)
            for local, name in unit.names.items()
        }
        container = Tied([unit.module for unit in units_of])
        tied.append(_Unit(container, "+".join(paths), names, None))
    return tied


def plan(model: nn.Module, params: dict[str, Tensor]) -> list[_Unit]:
    """The units computing the sums of ``params``: each module owning some of them, except that
    the outermost module owning some and containing modules that own some is one unit for all
    of them, and an ``nn.MultiheadAttention`` is one unit with the parameters of the modules
    inside it (``out_proj``) even when it owns none of ``params`` itself, and the modules
    sharing a parameter are one unit (:func:`_tie`); raises :class:`Unsupported` for the static
    problems of the module docstring."""
    wanted = {id(p): name for name, p in params.items()}
    owned: set[int] = set()  # (the selected parameters found on a module)
    owners: dict[str, tuple[nn.Module, dict[str, str]]] = {}  # by path, in pre-order
    attention: tuple[str, nn.Module] | None = None  # the last nn.MultiheadAttention seen
    script: str | None = None  # the path of the last TorchScript module seen
    if global_forward_pre_hooks():  # (they run before the recorder's: it sees their inputs)
        raise Unsupported(
            "forward pre-hooks are registered for every module "
            "(torch.nn.modules.module.register_module_forward_pre_hook)"
        )
    for path, module in model.named_modules(remove_duplicate=False):
        in_script = script is not None and (path == script or inside(path, script))
        if isinstance(module, torch.jit.ScriptModule) and not in_script:
            script, in_script = path, True
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise Unsupported(f"{_describe(path)} normalises with batch statistics")
        if isinstance(module, nn.MultiheadAttention):
            attention = (path, module)
        # the parameters of the modules inside an attention module are its own (out_proj)
        unit_path, unit_module, prefix = path, module, ""
        if attention is not None and inside(path, attention[0]):
            (unit_path, unit_module), prefix = attention, path[len(attention[0]) + 1 :] + "."
        for local, p in module.named_parameters(recurse=False, remove_duplicate=False):
            if id(p) not in wanted:
                continue
            if in_script:
                raise Unsupported(
                    f"{_describe(script)} is TorchScript (torch.jit.script or torch.jit.trace): "
                    "the hooks of the modules inside it do not run"
                )
            owned.add(id(p))
            owners.setdefault(unit_path, (unit_module, {}))[1][prefix + local] = wanted[id(p)]
    missing = [name for key, name in wanted.items() if key not in owned]
    if missing:
        raise Unsupported(f"parameters {missing} are not registered on the model's modules")
    paths = list(owners)
    units: list[_Unit] = []
    for i, (path, (module, names)) in enumerate(owners.items()):
        if units and inside(path, units[-1].path):  # pre-order: the enclosing unit is the last
            prefix = path[len(units[-1].path) + 1 :] + "."
            units[-1].names.update({prefix + local: name for local, name in names.items()})
            continue
        nested = i + 1 < len(paths) and inside(paths[i + 1], path)
        if nested and not path:
            inner = paths[1:4]
            raise Unsupported(
                "the root module owns parameters and contains modules that own parameters "
                f"({', '.join(map(repr, inner))})"
            )
        units.append(_Unit(module, path, dict(names), None if nested else rule_for(module)))
    return _tie(units)


def unsupported_reason(model: nn.Module, params: dict[str, Tensor] | None = None) -> str | None:
    """Why :class:`HookEngine` cannot handle ``params`` (default: ``model``'s parameters with
    ``requires_grad``), as far as the module tree tells (the rest is checked during the forward
    pass), or ``None``. The :func:`.loose.loose_parameters` are not in the way (they get
    per-sample copies, or, failing that, their modules become units)."""
    if params is None:
        params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    loose = loose_parameters(model, params)
    try:
        plan(model, {n: p for n, p in params.items() if n not in loose})
    except Unsupported as problem:
        return str(problem)
    return None


#: Leaves that hold no tensor (skipped without asking ``pytree``).
_NOT_TENSORS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def _tensors(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in ``pytree``'s order: tuples, lists and dicts are walked here
    (the recorder's mode calls this on every operation's arguments: ``pytree.tree_leaves``
    took 0.24 of 0.81 s of OPT's ``empirical`` Fisher in a profile), anything else that may
    hold tensors (a registered container) by ``pytree``."""
    found: list[Tensor] = []

    def walk(node: Any) -> None:
        if isinstance(node, Tensor):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)
        elif not isinstance(node, _NOT_TENSORS):
            found.extend(leaf for leaf in pytree.tree_leaves(node) if isinstance(leaf, Tensor))

    walk(tree)
    return found


def _of_parameter(t: Tensor, owner: dict[int, Any]) -> bool:
    """Whether ``t`` is one of the parameters in ``owner`` (by id) or a view of one."""
    return id(t) in owner or (t._base is not None and id(t._base) in owner)


class _Recorder(TorchFunctionMode):
    """Hooks on the units' modules and a torch-function mode, for one forward pass."""

    def __init__(
        self,
        units: list[_Unit],
        batch: Batch,
        expanding: set[str] | None = None,
        watch: bool = True,
    ) -> None:
        super().__init__()
        # whether the mode watches every operation (the pass pulled back through: parameters
        # used outside their modules, views, functions of VMAP_WRONG); the checks' passes,
        # which only read the records, need not pay for it
        self.watch = watch
        self.units = units
        self.batch_size = batch.size
        self.sample_shapes = set(batch.sample_shapes())  # (what a shared input may look like)
        # the paths of the units whose shared inputs may be expanded (None: any unit's)
        self.expanding = expanding
        self.records: dict[_Unit, _Record] = {}  # (the first call's: its later ones in more)
        self.calling: dict[_Unit, _Record] = {}  # the record of each unit's latest call
        self.running: set[_Unit] = set()
        self.owner = {
            id(unit.module.get_parameter(local)): (unit, local)
            for unit in units
            for local in unit.names
        }
        self.problem: str | None = None
        self.vmap_wrong = False  # (whether a function of VMAP_WRONG was called)
        # the views of parameters made during the forward pass, by id (kept alive with it)
        self.made: dict[int, Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forwards: list[nn.Module] = []  # modules whose forward runs in pieces
        # the output views recorded at their own edges, with their versions then
        self.views: list[tuple[_Unit, Tensor, int]] = []

    def __enter__(self) -> _Recorder:
        try:
            for unit in self.units:
                if unit.rule in RECORDED_FORWARDS:
                    self._record_in_pieces(unit)
                tied = isinstance(unit.module, Tied)
                for index, module in enumerate(unit.module if tied else [unit.module]):
                    member = index if tied else None
                    self.handles += [
                        module.register_forward_pre_hook(
                            lambda module, args, kwargs, unit=unit, member=member: self._before(
                                unit, args, kwargs, member
                            ),
                            prepend=True,
                            with_kwargs=True,
                        ),  # (the arguments it returns, if any, replace the call's)
                        module.register_forward_hook(
                            lambda module, args, output, unit=unit: self._after(unit, output)
                        ),  # (the output it returns, if any, replaces the module's)
                    ]
        except BaseException:
            self._remove_hooks()
            raise
        return super().__enter__() if self.watch else self

    def __exit__(self, *exc: object) -> None:
        self._remove_hooks()
        if self.watch:
            super().__exit__(*exc)

    def _remove_hooks(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()
        for module in self.forwards:
            del module.forward
        self.forwards.clear()

    def _record_in_pieces(self, unit: _Unit) -> None:
        """Run the unit's rule's recorded forward in place of its module's ``forward`` (an
        instance attribute, removed again by :meth:`_remove_hooks`; :func:`.rules.rule_for`
        gives no rule to a module with a ``forward`` of its own)."""
        module, forward = unit.module, RECORDED_FORWARDS[unit.rule]
        original = module.forward
        self.forwards.append(module)

        def keep(name: str, piece: Tensor, pull_back: bool) -> Tensor:
            record = self.calling.get(unit) if unit in self.running else None
            if record is None:  # (forward called directly, without the hooks: flagged anyway)
                return piece
            record.kept[name] = piece
            if pull_back and piece.requires_grad:
                record.edges.append(self._edge(unit, piece))
                record.leaves.append(name)
                record.shapes.append(piece.shape)
                record.nbytes += piece.numel() * piece.element_size()
            return piece

        def in_pieces(*args: Any, **kwargs: Any) -> Any:
            output = forward(module, args, kwargs, keep)
            return original(*args, **kwargs) if output is NotImplemented else output

        module.forward = in_pieces

    def _edge(self, unit: _Unit, output: Tensor) -> GradientEdge:
        """The edge at which the gradient of the unit's ``output`` (or kept piece) is taken
        (:func:`_output_edge`); a view taken at its own edge is watched (:meth:`check`)."""
        edge, own = _output_edge(output)
        if own and output._base is not None:  # (a view: modified in place, it is bypassed)
            self.views.append((unit, output, output._version))
        return edge

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem

    def _before(
        self, unit: _Unit, args: tuple[Any, ...], kwargs: dict[str, Any], member: int | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Record the unit's call (a later call of the same unit in its first call's ``more``);
        return its arguments with shared inputs expanded over the batch (see
        :func:`_expand_shared`), or ``None`` (the arguments as they are)."""
        tensors = _tensors((args, kwargs))
        call = len(self.records[unit].calls()) if unit in self.records else 0
        given = _transposable(unit, args, kwargs, member)
        transposed = _sequence_first(unit, given, self.batch_size, call)
        # (a sequence-first call with T == 1, (1, B, ...), is not taken for shared: see
        # _layout_shown; nor that of a rule whose first input is sequence-first, attention or
        # a recurrent layer with batch_first=False)
        dims = BATCH_DIMS.get(unit.rule) if unit.rule is not None else None
        expanded = None
        if (
            not transposed
            and (dims is None or dims(unit.module)[0][:1] != (1,))
            and (self.expanding is None or unit.path in self.expanding)
        ):
            expanded = _expand_shared(
                (args, kwargs), tensors, self.batch_size, self.sample_shapes, unit.shared
            )
        if expanded is not None:
            args, kwargs = expanded
            tensors = _tensors(expanded)
            given = None
        versions = [(t, t._version) for t in tensors]
        if transposed:  # (the module runs on x as it is; its rule gets x transposed)
            args = (args[0].transpose(0, 1),)
            tensors = list(args)
        folded = (
            1 if expanded is not None or transposed else _folds(unit, args, kwargs, self.batch_size)
        )
        if folded > 1:  # (the module runs on x as it is; its rule gets x unfolded)
            args = (_unfold(args[0], 0, folded),)
            tensors = list(args)
        record = _Record(
            args,
            kwargs,
            versions,
            inputs=[t.shape for t in tensors],
            expanded=bool(expanded),
            folded=folded,
            transposed=transposed,
            given=given,
            member=member,
        )
        first = self.records.setdefault(unit, record)
        if first is not record:
            first.more.append(record)
        self.calling[unit] = record
        self.running.add(unit)
        return expanded

    def _after(self, unit: _Unit, output: Any) -> Any:
        """Check and record the unit's output; for a unit going to the per-module fallback
        (without a rule, or whose rule's recorded forward declined the call) and with several
        differentiable output tensors, return the output with each of them cloned (see
        :func:`_separate_leaves`), and for a unit without a rule whose output the samples
        share, with its leading 1 expanded over the batch (see :func:`_shared_output`), else
        ``None`` (the output as it is)."""
        record = self.calling[unit]
        separate = unit.rule is None or (unit.rule in RECORDED_FORWARDS and not record.kept)
        if separate:
            output = _separate_leaves(output)  # (before the unit's call ends: see the mode)
        if (
            unit.rule is None
            and not (record.expanded or record.transposed)
            and (self.expanding is None or unit.path in self.expanding)
            and _shared_output(output, self.batch_size)
        ):
            output = pytree.tree_map_only(
                Tensor, lambda t: t.expand(self.batch_size, *t.shape[1:]), output
            )
            record.expanded = True
        self.running.discard(unit)
        inputs, outputs = batch_dims_of(unit, record)
        for i, shape in enumerate(record.inputs):
            dim = nth(inputs, i)
            lead = shape[dim] if len(shape) >= 3 else 0  # 2-d masks (L, S) are shared
            if lead > self.batch_size and lead % self.batch_size == 0:
                self._flag(
                    f"an input of {_describe(unit.path)} has shape {tuple(shape)}: its batch "
                    f"dimension is a multiple of the batch ({self.batch_size}), per-sample data "
                    "folded into the batch dimension (e.g. a (B * heads, L, S) attention mask)"
                )
        # (an output the recorded forward kept to pull back to already has its edge)
        pulled = [record.kept[name] for name in record.leaves if isinstance(name, str)]
        for i, leaf in enumerate(pytree.tree_leaves(output)):
            if not isinstance(leaf, Tensor):
                continue
            dim = nth(outputs, i)
            # (a folded call's output, (B T, ...) as its input: its gradients are unfolded as the
            # pull-back brings them, see _pull_back)
            shape = leaf.shape
            if record.folded > 1 and leaf.dim() and shape[0] == self.batch_size * record.folded:
                shape = torch.Size((self.batch_size, record.folded, *shape[1:]))
            elif record.transposed:  # (sequence-first as its input: recorded batch first)
                if leaf.dim() < 2 or shape[1] != self.batch_size:
                    self._flag(
                        f"an output of {_describe(unit.path)} has shape {tuple(shape)}, without "
                        f"the batch ({self.batch_size}) as dimension 1, as its sequence-first "
                        "input has"
                    )
                    continue
                shape = torch.Size((shape[1], shape[0], *shape[2:]))
            record.outputs.append(shape)
            if len(shape) <= dim or shape[dim] != self.batch_size:
                where = "leading dimension" if dim == 0 else f"dimension {dim}"
                self._flag(
                    f"an output of {_describe(unit.path)} has shape {tuple(leaf.shape)}, without "
                    f"the batch ({self.batch_size}) as {where}"
                )
            if leaf.is_floating_point():
                record.nbytes += leaf.numel() * leaf.element_size()
            if leaf.requires_grad and not any(leaf is piece for piece in pulled):
                record.edges.append(self._edge(unit, leaf))
                record.leaves.append(i)
                record.shapes.append(shape)
        return output if separate else None

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        result = func(*args, **kwargs)
        self.vmap_wrong = self.vmap_wrong or func in VMAP_WRONG
        inputs = [t for t in _tensors((args, kwargs)) if _of_parameter(t, self.owner)]
        if not inputs:  # (most operations: nothing to check or keep)
            return result
        # (a property read, .T or .shape, is no use by itself; the view .T gives is, where a
        # function takes it: checked as the parameter below)
        if self.problem is None and getattr(func, "__name__", None) != "__get__":
            for leaf in inputs:
                unit, local = self.owner.get(id(leaf), (None, ""))
                if unit is None and leaf._base is not None and id(leaf._base) in self.owner:
                    # a view of the parameter; one this pass did not make was made beforehand
                    # (self.wt = w.t() in __init__: the fallback would swap w, not the view)
                    unit, local = self.owner[id(leaf._base)]
                    if id(leaf) not in self.made:
                        self._flag(
                            f"a view of parameter {local!r} of {_describe(unit.path)} made "
                            "before the forward pass is used (engines that swap parameters "
                            "miss it)"
                        )
                        continue
                if unit is not None and unit not in self.running:
                    self._flag(
                        f"parameter {local!r} of {_describe(unit.path)} is used outside that "
                        "module's call"
                    )
        for leaf in _tensors(result):  # (views of parameters come from parameters or views)
            if leaf._base is not None and id(leaf._base) in self.owner:
                self.made[id(leaf)] = leaf  # (a view of a parameter made during the pass)
        return result

    def check(self) -> None:
        """Raise :class:`Unsupported` for what the forward pass revealed."""
        for unit, record in self.records.items():
            calls = record.calls()
            if any(t._version != v for call in calls for t, v in call.versions):
                self._flag(f"the input of {_describe(unit.path)} is modified in place after it")
            if not record.more or unit.rule is None or takes_calls_together(unit, record):
                continue
            if unit.rule in RECORDED_FORWARDS:
                self._flag(
                    f"{_describe(unit.path)} is called more than once per forward pass, and "
                    "its rule records each call in pieces it cannot join"
                )
            elif any(len(call.edges) > 1 for call in calls):
                self._flag(
                    f"{_describe(unit.path)} is called more than once per forward pass, with "
                    "several outputs"
                )
        for unit, view, version in self.views:
            if view._version != version:
                self._flag(
                    f"an output of {_describe(unit.path)}, a view, is modified in place after it "
                    "(the gradient would bypass the edge where it is taken)"
                )
        if self.problem is not None:
            raise Unsupported(self.problem)


def check_batch_layout(
    model: nn.Module,
    units: list[_Unit],
    batch: Batch,
    output_fn: OutputFn,
    records: dict[_Unit, _Record],
    output: Any,
) -> None:
    """Raise :class:`Unsupported` if the batch is not the batch dimension of the units'
    tensors, or if the samples are mixed.

    The forward pass only checks that each unit output's batch dimension (the leading one, or
    as the rule's :data:`.rules.BATCH_DIMS` say) equals the batch size ``B``. A
    sequence-first layout ``(T, B, ...)`` with ``T == B`` passes that check (and the rules
    would then take positions for samples), and so does a layer run on a table all samples
    share that happens to have ``B`` rows (class embeddings looked up with
    ``torch.arange(C)``, ``C == B``). So the units are recorded again on the first ``B' < B``
    samples (without gradients; a layer's calls taken as sequence-first as in the recorded
    pass, where their shapes allow), and every shape must change as the batch dimension does
    (a call of a :data:`.rules.FOLDABLE` layer that its input's shapes on both show to have
    been taken the wrong way, sequence-first or not, raises :class:`_SequenceFirst` instead):
    inputs from ``(B, *rest)`` to ``(B', *rest)`` or not at all (shared by the samples),
    outputs from ``(B, *rest)`` to ``(B', *rest)``; a call's input with positions folded
    into the batch dimension (:data:`.rules.FOLDABLE`) must be, for the first ``B'``
    samples, the first rows of the whole batch's (positions first, ``(T B, ...)``, are not),
    and its blocks of rows must follow the samples in reverse order (:func:`_check_folds`).
    The model's ``output`` on the whole batch
    must be, for the first ``B'`` samples, what they give alone: batch statistics that no
    batch-norm module computes (``F.batch_norm(..., training=True)`` in a module of the user's,
    ``x - x.mean(0)``) mix the samples, and the decomposition would be wrong. (The engine does
    this once per model and recorded shapes.)"""
    size = batch.size
    if size < 2:
        return
    fewer = 2 if size > 2 else 1
    # (only the units expanded on the whole batch: the others' shapes are what is checked)
    expanding = set(_expanded(records))
    part = batch.samples(0, fewer)  # (the model may not take another batch size)
    samples = set(batch.sample_shapes())
    records_again, alone = _recorded_again(
        model, units, part, output_fn, expanding, f"{fewer} samples"
    )
    untold: dict[tuple[str, int], bool] = {}  # (calls taken the wrong way: see _SequenceFirst)
    for unit in units:
        record, again = records.get(unit), records_again.get(unit)
        if record is None:
            continue
        calls, calls_again = record.calls(), [] if again is None else again.calls()
        if [(len(c.inputs), len(c.outputs)) for c in calls] != [
            (len(c.inputs), len(c.outputs)) for c in calls_again
        ]:
            raise Unsupported(f"{_describe(unit.path)} is called differently on fewer samples")
        inputs, outputs = batch_dims_of(unit, record)
        # (tensor arguments all of one sample's shape and the same on fewer samples, as the
        # unit gets them (an input may be recorded unfolded): shared, though the batch size is
        # among their dimensions; see _SharedWithBatchRows)
        shared = not unit.shared and all(
            call.versions
            and [t.shape for t, _ in call.versions] == [t.shape for t, _ in call_again.versions]
            and all(tuple(t.shape) in samples for t, _ in call.versions)
            for call, call_again in zip(calls, calls_again)
        )
        shown = [
            (c, call, _layout_shown(call.given, again.given, size, fewer))
            for c, (call, again) in enumerate(zip(calls, calls_again))
            if call.given is not None and again.given is not None
        ]
        wrong = {
            (unit.path, c): sequence_first
            for c, call, sequence_first in shown
            if sequence_first is not None and sequence_first != call.transposed
        }
        if wrong:
            untold.update(wrong)
            continue
        pairs = []
        for call, call_again in zip(calls, calls_again):
            pairs += [
                (s, t, True, nth(inputs, i))
                for i, (s, t) in enumerate(zip(call.inputs, call_again.inputs))
            ]
            pairs += [
                (s, t, False, nth(outputs, i))
                for i, (s, t) in enumerate(zip(call.outputs, call_again.outputs))
            ]
        for full, part, may_be_shared, dim in pairs:
            kind = "an input" if may_be_shared else "an output"
            if part == (*full[:dim], fewer, *full[dim + 1 :]):
                continue
            if shared:
                raise _SharedWithBatchRows(
                    unit.path,
                    f"the inputs of {_describe(unit.path)} are shared by the samples, with the "
                    f"batch size ({size}) among their dimensions",
                )
            if may_be_shared and part == full:
                if full[0] == size and not by_rule(unit, record):
                    raise Unsupported(
                        f"{kind} of {_describe(unit.path)} is shared by the samples (shape "
                        f"{tuple(full)} with {size} samples and with {fewer}) but has the batch "
                        "size as leading dimension, so the per-module fallback would split it"
                    )
                continue
            if unit.path in expanding:  # (a shared (2, ...) input looks per-sample)
                raise Unsupported(
                    f"the inputs the samples share of {_describe(unit.path)} could not be told "
                    f"from per-sample ones on {fewer} samples, to check the batch dimension"
                )
            raise Unsupported(
                f"the batch is not the leading dimension of {kind} of {_describe(unit.path)}: "
                f"it has shape {tuple(full)} with {size} samples and {tuple(part)} with "
                f"{fewer} (a sequence-first (T, B, ...) layout, or shapes that depend on which "
                "samples are in the batch?)"
            )
        for call, call_again in zip(calls, calls_again):
            if call.folded > 1 and not same_output(call_again.args[0], call.args[0][:fewer]):
                raise Unsupported(_not_folded(unit, call, f"the first {fewer} samples alone"))
    if untold:
        paths = list(dict.fromkeys(path for path, _ in untold))
        raise _SequenceFirst(
            untold,
            f"the layout of the inputs of {', '.join(map(_describe, paths))}, sequence-first "
            f"(T, B, ...) or not, could not be told from their shapes with {size} samples, "
            f"and {fewer} samples show it",
        )
    if _folded(records):
        _check_folds(model, units, batch, output_fn, records, expanding)
    together = pytree.tree_leaves(output)
    if len(together) != len(alone) or not all(
        same_output(a, t[:fewer] if is_per_sample(t, size) else t)
        for t, a in zip(together, alone)
    ):
        raise Unsupported(
            f"the model's output for the first {fewer} samples differs when they are run "
            "alone: the samples are mixed (batch statistics computed outside a batch-norm "
            "module in eval mode?), the inputs are not per-sample along their first "
            f"dimension ({batch.layout()}), or the model is not deterministic in eval mode"
        )


def _recorded_again(
    model: nn.Module,
    units: list[_Unit],
    batch: Batch,
    output_fn: OutputFn,
    expanding: set[str],
    run: str,
) -> tuple[dict[_Unit, _Record], list[Any]]:
    """The units' records and the model's output leaves on ``batch``, for a check: without
    gradients, the embedding tables kept (:class:`_TablesKept`), only the shared inputs of the
    units at ``expanding`` expanded, and without the recorder's mode (the records are all a
    check reads). A model failing there raises :class:`Unsupported` (``run``: on what)."""
    recording = _Recorder(units, batch, expanding, watch=False)
    try:
        with torch.no_grad(), _TablesKept(), recording:
            output = pytree.tree_leaves(output_fn(batch.call(model)))
    except Exception as error:
        raise Unsupported(
            f"the batch dimension could not be checked: the model failed on {run} "
            f"({type(error).__name__}: {error})"
        ) from error
    return recording.records, output


def _structure(records: dict[_Unit, _Record]) -> tuple[Any, ...]:
    """What the forward pass recorded but the sizes: which units ran, and each call's numbers
    of tensors in and out and their ranks, whether it was expanded, folded or transposed, and
    which member of a tied unit ran."""
    return tuple(
        (
            unit.path,
            tuple(
                (
                    tuple(len(shape) for shape in call.inputs),
                    tuple(len(shape) for shape in call.outputs),
                    len(call.edges),
                    call.expanded,
                    call.folded > 1,
                    call.transposed,
                    call.member,
                )
                for call in record.calls()
            ),
        )
        for unit, record in records.items()
    )


def _folded(records: dict[_Unit, _Record]) -> bool:
    """Whether some call has positions folded into its batch dimension."""
    return any(call.folded > 1 for record in records.values() for call in record.calls())


def _not_folded(unit: _Unit, call: _Record, run: str) -> str:
    (size, positions, *rest) = call.args[0].shape
    return (
        f"an input of {_describe(unit.path)} has shape {(size * positions, *rest)}, with "
        f"{positions} rows per sample folded into the batch dimension, but its rows for "
        f"{run} differ: they are not each sample's {positions} positions one sample after "
        "another (positions first, (T B, ...)? or a number of rows that differs between "
        "samples?)"
    )


def _check_folds(
    model: nn.Module,
    units: list[_Unit],
    batch: Batch,
    output_fn: OutputFn,
    records: dict[_Unit, _Record],
    expanding: set[str],
) -> None:
    """Raise :class:`Unsupported` unless, for every call with positions folded into its batch
    dimension (``(B T, ...)``, :data:`.rules.FOLDABLE`), the model on the batch in reverse
    order (without gradients) gives the call an input whose blocks of ``T`` rows are the
    first pass's in reverse order. The check on the first samples alone
    (:func:`check_batch_layout`) only shows that the first samples' rows come first, as many as
    ``T`` per sample on average: rows packed one sample after another without padding, in
    numbers that differ between samples, can pass it. Reversed, the blocks of ``T`` rows are
    the same only where every sample has ``T`` rows (rows of distinct values). How rows fold
    depends on the data (the number of tokens each sample has), not only on the shapes, so the
    engine runs this for every pass it pulls back through (each chunk of samples), not once
    per shapes: one more forward pass without gradients."""
    records_again, _ = _recorded_again(
        model, units, batch.reversed(), output_fn, expanding, "the batch in reverse order"
    )
    for unit, record in records.items():
        again = records_again.get(unit)
        calls, calls_again = record.calls(), [] if again is None else again.calls()
        if len(calls) != len(calls_again):
            raise Unsupported(f"{_describe(unit.path)} is called differently in another order")
        for call, call_again in zip(calls, calls_again):
            if call.folded > 1 and not (
                call_again.args[0].shape == call.args[0].shape
                and same_output(call_again.args[0].flip(0), call.args[0])
            ):
                raise Unsupported(_not_folded(unit, call, "the samples in reverse order"))


#: The lookups that renormalise an embedding table with ``max_norm`` (see :class:`_TablesKept`).
_LOOKUPS = {f: inspect.signature(f) for f in (F.embedding, F.embedding_bag)}


class _TablesKept(TorchFunctionMode):
    """Inside the block, embeddings with ``max_norm`` do not renormalise their tables in place:
    for the checks' passes over some of the batch's samples, whose rows the pass over the whole
    batch renormalised already (again it would change no value, but bump the table's version,
    which that pass's graph saved for its backward when the table is tied to an output
    layer)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _LOOKUPS:  # (F.embedding, F.embedding_bag: called without max_norm)
            bound = _LOOKUPS[func].bind(*args, **(kwargs or {}))
            bound.arguments["max_norm"] = None
            return func(*bound.args, **bound.kwargs)
        return func(*args, **(kwargs or {}))


def _expanded(records: dict[_Unit, _Record]) -> list[str]:
    """The paths of the units with a call on inputs expanded over the batch."""
    return [
        unit.path
        for unit, record in records.items()
        if any(call.expanded for call in record.calls())
    ]


def check_expansion(
    model: nn.Module, units: list[_Unit], batch: Batch, output_fn: OutputFn, paths: list[str]
) -> None:
    """Raise :class:`Unsupported` if expanding the shared inputs of the units at ``paths`` over
    the batch (:func:`_expand_shared`), or their shared output (:func:`_shared_output`),
    changes the model's output: the model on the first two
    samples, with and without the expansion, without gradients. The values the units compute
    are the same either way, but the code after them sees a batch dimension of ``B`` where it
    saw 1 or none (a ``squeeze(0)`` that no longer squeezes, a mean over dimension 0). On the
    two samples the same units' inputs (or outputs) are expanded, as
    :func:`check_batch_layout` (on as many samples, or the whole batch) found."""
    few = batch.samples(0, 2)
    shared = ", ".join(map(_describe, paths))
    try:
        with torch.no_grad(), _TablesKept():
            plain = pytree.tree_leaves(output_fn(few.call(model)))
            with _Recorder(units, few, set(paths), watch=False):
                again = pytree.tree_leaves(output_fn(few.call(model)))
    except Exception as error:  # (the model may not take the expanded inputs)
        raise Unsupported(
            f"the inputs (or output) the samples share of {shared} could not be expanded over "
            f"the batch ({type(error).__name__}: {error})"
        ) from error
    if len(plain) != len(again) or not all(map(same_output, plain, again)):
        raise Unsupported(
            f"expanding the inputs (or output) the samples share of {shared} over the batch "
            "(for per-sample gradients) changes the model's output"
        )


#: How far :meth:`HookEngine._check_sums` lets the sums on two samples differ from plain
#: autograd's, relative to the parameter's largest entry, by its dtype (others, ``bfloat16`` and
#: ``float16``: ``1e-1``; float32 that may round to TensorFloat-32 on a GPU: ``1e-2``), plus the
#: dtype's rounding unit (TensorFloat-32's, ``2**-10``) times the largest entry of all
#: parameters: the same gradients through other kernels, rounded differently. (The second term
#: is for parameters whose sums are 0 but for rounding: an attention layer's key bias, to
#: which the softmax is blind, had 1.6e-25 from autograd against 3.1e-25 more per layer in
#: float32.) What the check is for gives errors of the order of the entries.
SUMS_TOLERANCE = {torch.float64: 1e-9, torch.float32: 1e-3}


def bytes_per_sample(
    num_vectors: int, kept_bytes: int, recorded_bytes: int, forward: bool, looped: bool
) -> int:
    """Working memory of one sample whose recorded module outputs take ``recorded_bytes``, of
    which ``kept_bytes`` have their output gradients kept whole (the others are reduced as
    they come, see :data:`.rules.REDUCTIONS`), plus, with ``forward``, the forward pass's
    saved activations (about twice the recorded outputs). A ``looped`` pull-back holds the
    ``K`` kept output gradients and one pass's temporaries (the recorded outputs once; measured
    on a reduced ResNet-18); a batched one holds the gradients of all ``K`` vectors at every
    recorded output until the pass ends (those reduced too: the reducers run after it)."""
    num_vectors = max(num_vectors, 1)
    held = num_vectors * kept_bytes + recorded_bytes if looped else num_vectors * recorded_bytes
    return held + (2 * recorded_bytes if forward else 0)


#: Modules with which, on CPU, one backward pass per vector is faster than one batched over the
#: vectors (``torch.func.vmap``, whose batching rules fold the vectors into the batch of these
#: layers' backward kernels): the batched pass streams ``K`` times the activations' gradients
#: through memory at once, the looped one reuses buffers of one vector's in the cache. Exact
#: Fisher (C=10, K=9, 2 threads), looped against batched: reduced ResNet-18 7.0x against 8.6x a
#: forward+backward at N=128 and the default 256 MiB budget, 8.2x against 8.7x at 128 MiB
#: (``benchmarks/results/memory_budget_xeon_looped.md``, ``..._batched.md``), 6.3x against 5.9x
#: at N=8 (one run);
#: ``benchmarks.models.TextTransformer`` (attention) 282 against 348 ms at N=128, 61 against
#: 39 ms at N=8. Recurrent layers are not here: their recurrence, redone in small steps while
#: recording, launches many small kernels, and batching them is as fast or faster
#: (``benchmarks.models.LSTMClassifier``, T=32, medians of 9, looped against batched: 158 against
#: 157 ms at N=128, 85 against 64 at N=32, 53 against 25 at N=8; with ``proj_size=32``: 171
#: against 156, 90 against 56, 59 against 25). Batched holds more: a peak of 165 against 64 MiB
#: at N=128 (8.5x against 3.3x a forward+backward's), within the default budget.
#: On a :func:`~.base.launch_bound` device the pass is always batched: the looped one launches
#: ``K`` times the kernels.
_LOOPED_ON_CPU = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.MultiheadAttention,
)


def loops_pull_back(model: nn.Module, device: torch.device) -> bool:
    """Whether the engine pulls the vectors back to ``model`` on ``device`` one at a time (see
    :data:`_LOOPED_ON_CPU`)."""
    if base.launch_bound(device):
        return False
    return any(isinstance(m, _LOOPED_ON_CPU) for m in model.modules())


def _pull_back(
    output: Tensor,
    edges: list[GradientEdge],
    vectors: Tensor,
    looped: bool,
    storage: dict[int, Tensor] | None = None,
    reducers: dict[int, Reducer] | None = None,
    shapes: list[tuple[torch.Size, bool]] | None = None,
) -> list[Tensor | None]:
    """``(K, *shape)`` gradients of ``<output, v_k>`` with respect to each edge's tensor, from
    one backward pass batched over the ``K`` vectors (:func:`.base.batched_grads`), or (``looped``)
    one pass per vector; those of the edges in ``reducers`` (by position) are reduced by it as
    they come (one vector at a time when looped), and only the reduced gradients are kept.
    The gradients come shaped as ``shapes`` says (each edge's recorded shape, and whether its
    call was sequence-first), where it is not the shape of the edge's tensor
    (:func:`_as_recorded`): a call's output with positions folded into its batch dimension
    comes unfolded, ``(K, B, T, ...)`` (see :data:`.rules.FOLDABLE`), a sequence-first call's
    transposed, ``(K, B, T, ...)`` too, and the output view whose base's edge was recorded,
    in the view's shape (:func:`_output_edge`).

    The looped gradients are views of ``(B, K, *shape[1:])`` storage (each sample's ``K``
    gradients contiguous, as the convolution rule wants them) taken from ``storage`` (by edge
    position) when it holds a large enough tensor, and left there for the next chunk of
    samples or batch (:class:`HookEngine` keeps it per model for as long as it lives: one
    ``fisher_diagonal`` call): reusing memory spares the page faults of fresh allocations (on
    CPU, writing a fresh buffer costs about five times as much as writing a used one)."""
    reducers = reducers or {}
    if not looped:
        grads = batched_grads(output, edges, vectors)
        with torch.no_grad():
            if shapes is not None:
                grads = [
                    None if g is None else _as_recorded(g, shape, transposed, vectors=True)
                    for g, (shape, transposed) in zip(grads, shapes)
                ]
            return [
                reducers[i](g) if g is not None and i in reducers else g
                for i, g in enumerate(grads)
            ]  # (None where a reducer fed an accumulator)
    storage = {} if storage is None else storage
    grads: list[Tensor | None] = [None] * len(edges)
    num_vectors = len(vectors)
    for k, v in enumerate(vectors):
        retain = k < num_vectors - 1
        pulled = torch.autograd.grad(output, edges, v, retain_graph=retain, allow_unused=True)
        for i, g in enumerate(pulled):
            if g is None:
                continue
            if shapes is not None:
                g = _as_recorded(g, *shapes[i], vectors=False)
            if i in reducers:
                with torch.no_grad():
                    g = reducers[i](g)
                if g is None:  # (fed to an accumulator: nothing to keep)
                    continue
            if grads[i] is None:  # (every pass reaches the same edges)
                grads[i] = _buffer(storage, i, g, num_vectors).transpose(0, 1)
            grads[i][k] = g
        pulled = g = None  # (free this pass's gradients before the next)
    return grads


def _buffer(storage: dict[int, Tensor], key: int, like: Tensor, num_vectors: int) -> Tensor:
    """A ``(B, K, *like.shape[1:])`` tensor for ``K`` gradients shaped as ``like``, a slice of
    ``storage[key]`` when that fits (else a new one, kept there)."""
    batch, rest = like.shape[0], like.shape[1:]
    held = storage.get(key)
    if (
        held is None
        or held.shape[0] < batch
        or held.shape[1:] != (num_vectors, *rest)
        or held.dtype != like.dtype
        or held.device != like.device
    ):
        held = storage[key] = like.new_empty(batch, num_vectors, *rest)
    return held[:batch]


class HookEngine:
    """Hook-based engine (see the module docstring).

    Args:
        fallback: engine used for models the decomposition does not cover (the reason is logged
            at info level to the ``"ewc_reg"`` logger); ``None`` raises ``ValueError`` instead.
    """

    name = "hooks"
    #: The chunk sizes of each model's last batch, by memory budget and selected parameters,
    #: and also by the shapes of one sample's inputs: for the pull-back of a recorded forward
    #: pass, and for a forward pass with its pull-back. Kept across calls (the next task's
    #: ``consolidate``): they only choose the first pass. Those of the same shapes let it be
    #: the first chunk's (a first chunk too large for more vectors than the last call's is
    #: taken again in smaller chunks); those of other shapes only whether the pass over the
    #: whole batch takes gradients.
    steps: ClassVar[
        weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], tuple[int, int]]]
    ] = weakref.WeakKeyDictionary()
    #: The recorded shapes whose batch layout :func:`check_batch_layout` has passed, per model,
    #: kept across calls too (a standard ResNet-18 at N=128 has 128 channels: without it, every
    #: call would pay a forward pass on 2 samples).
    layouts: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]]] = (
        weakref.WeakKeyDictionary()
    )

    #: The structures of the forward passes (:func:`_structure`, with the selected parameters'
    #: names and whether the batch had more than one sample) whose sums
    #: :meth:`_check_sums` has passed, per model: the check runs once per structure, not per
    #: shapes as the other checks (an LM whose batches are padded to their longest sequence
    #: would pay it for nearly every batch).
    sums_checked: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]]] = (
        weakref.WeakKeyDictionary()
    )
    #: The units whose shared inputs are expanded though they have the batch size among their
    #: dimensions (:class:`_SharedWithBatchRows`), and the calls, ``(unit path, call's
    #: position)``, whose layout the shapes could not tell, sequence-first or not
    #: (:class:`_SequenceFirst`), per model, as the layout check found them: kept across calls
    #: too, so that a later call takes them so at once (without, a model with ``(1, T)``
    #: position ids and ``T == B`` paid 2 more forward passes per call).
    shared_inputs: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[str]]] = (
        weakref.WeakKeyDictionary()
    )
    layouts_found: ClassVar[weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int], bool]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, fallback: Engine | None = None) -> None:
        self.fallback = fallback
        self._given_up: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # (to the fallback)
        # the layouts of the per-sample copies that passed the check, per model, and the models
        # whose loose parameters' modules are units instead (see __call__)
        self._copies: weakref.WeakKeyDictionary[nn.Module, dict[str, int]] = (
            weakref.WeakKeyDictionary()
        )
        self._nested: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # the models whose batched pull-back failed: one backward per vector for them
        self._looped: weakref.WeakSet[nn.Module] = weakref.WeakSet()
        # the looped pull-back's gradient buffers, reused by the chunks and the next batches
        self._storage: weakref.WeakKeyDictionary[nn.Module, dict[int, Tensor]] = (
            weakref.WeakKeyDictionary()
        )

    @classmethod
    def for_model(
        cls, model: nn.Module, params: dict[str, Tensor] | None, fallback: Engine | None
    ) -> Engine:
        """The engine for ``params`` of ``model`` (``None``: those with ``requires_grad``): a
        hook engine, or ``fallback`` (logged) if the module tree already rules it out
        (``ValueError`` without a fallback)."""
        engine = cls(fallback)
        reason = unsupported_reason(model, params)
        return engine if reason is None else engine._give_up(model, Unsupported(reason))

    def _give_up(self, model: nn.Module, problem: Unsupported) -> Engine:
        """The engine that takes the model from now on, the fallback (logged); without one
        (``backend="hooks"``), ``ValueError``."""
        if self.fallback is None:
            raise ValueError(
                f"the hooks engine cannot compute this model's Fisher: {problem}; use "
                'backend="functorch" (or "auto")'
            )
        logger.info("hooks engine: %s; using the %s engine", problem, self.fallback.name)
        self._given_up.add(model)
        return self.fallback

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
        """The batch's sums; after a failed attempt, a retry (the loose parameters' modules as
        units, or one backward per vector where the batched one failed) or the fallback."""
        args = (model, params, batch, output_fn, make_vectors, chunk_size, memory_budget)
        try:
            return self._attempt(*args)
        except BatchingFailed as failure:
            reason = str(failure)
        # (retried outside the handler: the failed attempt's frames, its graph among them, go)
        logger.info(
            "hooks engine: the pull-back batched over the vectors failed (%s); one backward "
            "pass per vector instead",
            reason,
        )
        self._looped.add(model)
        return self._attempt(*args)

    def _attempt(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
        memory_budget: int,
    ) -> dict[str, Tensor]:
        """:meth:`__call__` without the retry of a failed batched pull-back. (Every retry and
        fallback runs outside the exception handler, so that the failed attempt's frames, its
        forward pass's graph among them, are freed first.)"""
        args = (model, params, batch, output_fn, make_vectors, chunk_size, memory_budget)
        if model in self._given_up and self.fallback is not None:
            return self.fallback(*args)
        shared = self.shared_inputs.setdefault(model, set())
        sequence_first = self.layouts_found.setdefault(model, {})

        def sums(loose: dict[str, Tensor], layouts: dict[str, int]) -> dict[str, Tensor]:
            """:meth:`_sums`, tried again for each unit the layout check finds to have shared
            inputs with the batch size among their dimensions (:class:`_SharedWithBatchRows`),
            which are expanded from then on, or calls taken the wrong way, sequence-first or
            not (:class:`_SequenceFirst`), taken the other way from then on (in later calls
            too: :attr:`shared_inputs`, :attr:`layouts_found`; the retries run outside the
            handler, so that the failed attempt's frames are freed first)."""
            while True:
                try:
                    return self._sums(*args, loose, layouts)
                except _SharedWithBatchRows as problem:
                    if problem.path in shared:
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s; expanded over the batch", problem)
                    shared.add(problem.path)
                except _SequenceFirst as problem:
                    if sequence_first.keys() & problem.calls.keys():
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s; taken so", problem)
                    sequence_first.update(problem.calls)

        loose = {} if model in self._nested else loose_parameters(model, params)
        try:
            layouts = self._copies.get(model)
            if loose and layouts is None:
                layouts, problem = copies_layout(model, loose, batch, output_fn)
                if layouts is None:
                    raise Unsupported(problem)
                if batch.size > 1:  # (one sample cannot show the batch mixed up)
                    self._copies[model] = layouts
            return sums(loose, layouts or {})
        except Unsupported as problem:
            failure = type(problem)(str(problem))  # (not its traceback: the attempt's frames)
        if not loose:
            return self._give_up(model, failure)(*args)
        # The loose parameters' modules become units (plan): the whole model for the root.
        logger.debug("hooks engine: %s; the modules of %s become units", failure, list(loose))
        self._nested.add(model)
        try:
            return sums({}, {})
        except Unsupported as again:
            failure = type(again)(str(again))
        return self._give_up(model, failure)(*args)

    def _sums(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
        memory_budget: int,
        loose: dict[str, Tensor],
        layouts: dict[str, int],
        checking: bool = False,
        sequence_first: dict[str, frozenset[int]] | None = None,
    ) -> dict[str, Tensor]:
        """One forward pass over the batch (checks, vectors, and the sums when its pull-back
        fits the budget), else one more per chunk of samples (see the module docstring). When
        the model's last batch at this budget (in this call or an earlier one: :attr:`steps`)
        went in chunks and the vectors are :class:`~.base.RowWiseVectors`, the first pass is
        the first chunk's instead, and each chunk makes its own vectors. The
        ``loose`` parameters (:mod:`.loose`) are taken through per-sample copies in their
        ``layouts``. ``checking``: the run of :meth:`_check_sums`, without the checks, and
        leaving the caches of the engine's runs as they are, with the calls of the checked pass
        that were ``sequence-first`` (by unit) taken as such and no others."""
        units = plan(model, {n: p for n, p in params.items() if n not in loose})
        for unit in units:
            unit.shared = unit.path in self.shared_inputs.get(model, ())
            if sequence_first is not None:  # (the checked pass's)
                unit.sequence_first, unit.decided = sequence_first.get(unit.path, frozenset()), True
            else:
                found = self.layouts_found.get(model, {})
                calls = {c: first for (path, c), first in found.items() if path == unit.path}
                unit.sequence_first = frozenset(c for c, first in calls.items() if first)
                unit.batch_first = frozenset(c for c, first in calls.items() if not first)
        copied = [
            _Unit(LooseParameter(p, name), name, {name: name}, loose_parameter)
            for name, p in loose.items()
        ]
        looped = model in self._looped or loops_pull_back(model, next(iter(params.values())).device)
        cached = self.steps.setdefault(model, {})
        like = (memory_budget, tuple(params))  # (the last batch's steps, of any shapes)
        key = (*like, batch.sample_shapes())
        known = (chunk_size,) * 2 if chunk_size is not None else cached.get(key)
        hint = known or cached.get(like)
        whole = hint is None or hint[0] >= batch.size
        # The first pass: the whole batch, with gradients if they may fit, else without (it
        # only makes the vectors); or, when batches of these shapes go in chunks and each
        # chunk can make its own vectors, the first chunk, with gradients.
        row_wise = (
            known is not None
            and not whole
            and isinstance(make_vectors, RowWiseVectors)
            and known[1] > 1
        )
        first = batch.samples(0, known[1]) if row_wise else batch
        grad = whole or row_wise
        output, records, vmap_wrong = self._forward(
            model, units, copied, layouts, first, output_fn, grad
        )
        if vmap_wrong and not looped:
            logger.info(
                "hooks engine: the model calls torch.cdist, whose backward torch.func.vmap "
                "gets wrong for batched vectors; one backward pass per vector instead"
            )
            self._looped.add(model)
            looped = True
        calls = [call for record in records.values() for call in record.calls()]
        decided = {  # (the later passes, the checks' among them, take the same calls so)
            unit.path: frozenset(i for i, call in enumerate(record.calls()) if call.transposed)
            for unit, record in records.items()
        }
        for unit in records:
            unit.sequence_first, unit.decided = decided[unit.path], True
        # (with the calls taken as sequence-first: with T == B, the shapes are the same either way)
        shapes = (
            *(s for call in calls for s in (*call.inputs, *call.outputs)),
            tuple(call.transposed for call in calls),
        )
        checked = self.layouts.setdefault(model, set())
        if checking:  # (the checks' own run: they passed on the batch it comes from)
            pass
        elif shapes not in checked:  # (once per model and shapes: not again for every batch)
            check_batch_layout(model, units, first, output_fn, records, output)
            expanded = _expanded(records)
            if expanded:
                check_expansion(model, units, first, output_fn, expanded)
            structure = (tuple(params), min(first.size, 2), *_structure(records))
            passed = self.sums_checked.setdefault(model, set())
            if structure not in passed:  # (not again for every length of a sequence)
                self._check_sums(
                    model, params, first, output_fn, memory_budget, loose, layouts, decided
                )
                passed.add(structure)
            checked.add(shapes)
        elif _folded(records):  # (how rows fold depends on the data: checked every pass)
            _check_folds(model, units, first, output_fn, records, set(_expanded(records)))

        def vectors_of(output: Any, start: int, stop: int) -> Tensor:
            """The vectors of samples ``start`` to ``stop - 1``, from ``output``: theirs when
            ``row_wise``, else the whole batch's."""
            output = pytree.tree_map_only(Tensor, Tensor.detach, output)
            vectors = make_vectors(output, start, stop) if row_wise else make_vectors(output)
            # (a vector less saves a backward pass; batched, less than the test costs)
            return fewer_vectors(vectors) if looped else vectors

        vectors = vectors_of(output, 0, first.size)
        sums: dict[str, Tensor] = {}  # (each parameter's first terms, adopted: no zeros to add)
        recorded = sum(call.nbytes for call in calls) // first.size
        kept = sum(
            call.nbytes
            for unit, record in records.items()
            if reduction_of(unit, record) is None and accumulation_of(unit, record) is None
            for call in record.calls()
        ) // first.size
        del calls
        num_vectors = vectors.shape[0]
        steps = tuple(
            resolve_chunk_size(
                chunk_size,
                memory_budget,
                bytes_per_sample(num_vectors, kept, recorded, forward, looped),
            )
            for forward in (False, True)
        )
        if chunk_size is None:
            cached[key] = cached[like] = steps
        storage = {} if checking else self._storage.setdefault(model, {})
        done = 0
        if grad and steps[0] >= first.size:  # the first pass's graph serves
            self._accumulate(
                units + copied, records, output, vectors, sums, memory_budget, looped, storage
            )
            done = first.size
        del output, records
        step = steps[1]
        for start in range(done, batch.size, step):
            chunk = batch.samples(start, start + step)
            output, records, _ = self._forward(
                model, units, copied, layouts, chunk, output_fn, True
            )
            if _folded(records):
                _check_folds(model, units, chunk, output_fn, records, set(_expanded(records)))
            if row_wise:
                chunk_vectors = vectors_of(output, start, start + chunk.size)
            else:  # (the whole batch's, from the first pass)
                chunk_vectors = vectors[:, start : start + step]
            self._accumulate(
                units + copied, records, output, chunk_vectors, sums, memory_budget, looped, storage
            )
        zeros = zero_sums({n: p for n, p in params.items() if n not in sums})  # (no gradient)
        return {name: sums[name] if name in sums else zeros[name] for name in params}

    def _check_sums(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        memory_budget: int,
        loose: dict[str, Tensor],
        layouts: dict[str, int],
        sequence_first: dict[str, frozenset[int]],
    ) -> None:
        r"""Raise :class:`Unsupported` unless this engine's sums on the first two samples of
        ``batch``, for a random vector per sample, are the loop engine's (plain autograd, one
        sample at a time) to :data:`SUMS_TOLERANCE` (the calls of the checked pass that were
        ``sequence-first``, by unit, taken as such, and no others).

        The other checks test the assumptions of the decomposition one by one; this one tests
        its result, :math:`\sum_n \sum_k (J_n^\top v_{nk})^{\odot 2}`, against the
        definition, so that a way of breaking them no check foresaw (a tensor made from a
        unit's parameters that leaves it by an attribute rather than its output, a layer run
        inside ``torch.vmap`` or inside a derivative the forward pass takes, an output shared
        by the samples taken from one sample's copy after its expansion) sends the model to the
        fallback instead of giving a wrong Fisher. Run with the checks, once per model and
        structure of the forward pass (:attr:`sums_checked`); a model the loop engine cannot
        cut into samples is not checked."""
        few = batch.samples(0, min(batch.size, 2))
        drawn: list[Tensor] = []

        def vectors(output: Tensor) -> Tensor:  # (the same ones for both engines)
            if not drawn:
                generator = torch.Generator().manual_seed(0)
                shape = (1, *output.shape)  # (one: a plain backward pass, no vmap)
                drawn.append(torch.randn(shape, generator=generator, dtype=output.dtype))
            return drawn[0].to(output.device)

        with _TablesKept():  # (the whole batch's graph is alive: see _TablesKept)
            try:
                want = LoopEngine()(model, params, few, output_fn, vectors, None, memory_budget)
            except Exception as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                logger.debug("hooks engine: the loop engine failed on the model (%s)", error)
                return
            try:
                got = self._sums(
                    model,
                    params,
                    few,
                    output_fn,
                    vectors,
                    few.size,
                    memory_budget,
                    loose,
                    layouts,
                    checking=True,
                    sequence_first=sequence_first,
                )
            except (Unsupported, BatchingFailed, torch.OutOfMemoryError):
                raise
            except Exception as error:
                raise Unsupported(
                    f"the model failed on its first {few.size} samples alone, in the check of "
                    f"the sums ({type(error).__name__}: {error})"
                ) from error
        largest = {name: want[name].abs().max().item() for name in params}
        overall = max(largest.values(), default=0.0)
        for name, p in params.items():
            tolerance, eps = SUMS_TOLERANCE.get(p.dtype, 1e-1), torch.finfo(p.dtype).eps
            if _may_round_to_tf32(p):
                tolerance, eps = max(tolerance, 1e-2), max(eps, 2**-10)
            error = (got[name].double() - want[name].double()).abs().max().item()
            if not error <= tolerance * largest[name] + eps * overall:  # (NaN fails too)
                raise Unsupported(
                    f"on the first {few.size} samples the per-layer sums of parameter {name!r} "
                    f"differ from plain autograd's by {error:.3g} (largest entry "
                    f"{largest[name]:.3g}, of all parameters {overall:.3g}): the model breaks "
                    "the layer-wise decomposition in a way the other checks do not see"
                )

    @staticmethod
    def _forward(
        model: nn.Module,
        units: list[_Unit],
        copied: list[_Unit],
        layouts: dict[str, int],
        batch: Batch,
        output_fn: OutputFn,
        grad: bool,
    ) -> tuple[Any, dict[_Unit, _Record], bool]:
        """The recorded forward pass: its output, records, and whether it called a function of
        :data:`.base.VMAP_WRONG`; the parameters of the ``copied`` units (the loose ones) are
        replaced by their per-sample copies in their ``layouts``, each recorded as the unit's
        one output."""
        with torch.set_grad_enabled(grad), _Recorder(units, batch) as recorder:
            if copied:
                parameters = {u.path: u.module.parameter for u in copied}
                copies = per_sample_copies(parameters, batch.size, layouts)
                try:
                    output = output_fn(call_with(model, copies, batch))
                except Exception as error:  # (a shape this batch brings; the model's own
                    # errors come again without the copies)
                    raise Unsupported(
                        f"per-sample copies of parameters {list(copies)} failed in the model "
                        f"({type(error).__name__}: {error})"
                    ) from error
            else:
                try:
                    output = output_fn(batch.call(model))
                except Exception as error:
                    expanded = _expanded(recorder.records)
                    if not expanded or isinstance(error, torch.OutOfMemoryError):
                        raise  # (the model's own error; an expansion costs no memory)
                    raise Unsupported(  # (the model may not take the expanded inputs)
                        f"the model failed with the inputs (or output) the samples share of "
                        f"{', '.join(map(_describe, expanded))} expanded over the batch "
                        f"({type(error).__name__}: {error})"
                    ) from error
        recorder.check()
        records = recorder.records
        for unit in copied:
            copy = records[unit] = _Record((), {}, [])
            piece = copies[unit.path]
            copy.nbytes = piece.numel() * piece.element_size()
            if grad and piece.requires_grad:  # (a view made without gradients claims it too)
                copy.edges.append(get_gradient_edge(piece))
                copy.leaves.append(0)
                shape = piece.shape
                if layouts[unit.path] == SEQUENCE_FIRST:  # (its gradients come batch first)
                    copy.transposed, shape = True, torch.Size((shape[1], shape[0], *shape[2:]))
                copy.shapes.append(shape)
        return output, records, recorder.vmap_wrong

    @staticmethod
    def _accumulate(
        units: list[_Unit],
        records: dict[_Unit, _Record],
        output: Tensor,
        vectors: Tensor,
        sums: dict[str, Tensor],
        memory_budget: int,
        looped: bool,
        storage: dict[int, Tensor],
    ) -> None:
        """Pull ``vectors`` back to the recorded outputs and add each unit's sums to ``sums``
        (a parameter's first ones become its entry; ``storage``: see :func:`_pull_back`)."""
        live = [
            (u, records[u], [edge for call in records[u].calls() for edge in call.edges])
            for u in units
            if u in records
        ]
        live = [(unit, record, edges) for unit, record, edges in live if edges]
        if not live:
            return
        edges = [edge for _, _, unit_edges in live for edge in unit_edges]
        shapes = [
            (s, call.transposed)
            for _, record, _ in live
            for call in record.calls()
            for s in call.shapes
        ]
        reducers: dict[int, Reducer] = {}
        accumulators: dict[_Unit, Accumulator] = {}
        position = 0
        for unit, record, unit_edges in live:
            with torch.no_grad():
                accumulator = accumulator_of(unit, record, memory_budget)
                reduction = reduction_of(unit, record)
                if accumulator is not None:
                    accumulators[unit] = accumulator
                    keys: list[Any] = list(record.leaves)  # (joined calls: by call and leaf)
                    if record.more:
                        calls = enumerate(call for call in record.calls() if call.edges)
                        keys = [(i, leaf) for i, call in calls for leaf in call.leaves]
                    for offset, key in enumerate(keys):
                        reducers[position + offset] = functools.partial(feed, accumulator, key)
                elif reduction is not None:  # (each call's gradients by its own input)
                    offset = position
                    for call in record.calls():
                        if call.edges:
                            names = unit.names.keys()
                            reducers[offset] = reduction(unit.module, call.args[0], names)
                        offset += len(call.edges)
            position += len(unit_edges)
        grads = _pull_back(output, edges, vectors, looped, storage, reducers, shapes)
        del reducers
        position = 0
        totals, terms = [], []
        for unit, record, unit_edges in live:
            unit_grads = grads[position : position + len(unit_edges)]
            position += len(unit_edges)
            with torch.no_grad():
                if unit in accumulators:
                    found = accumulators[unit].sums()
                elif all(g is None for g in unit_grads):
                    continue
                else:
                    found = unit_sums(unit, record, unit_grads, memory_budget)
            for local, s in found.items():
                name = unit.names[local]
                if name in sums:
                    totals.append(sums[name])
                    terms.append(s)
                else:  # (the rules' sums are new tensors of their own)
                    sums[name] = s
        if totals:
            torch._foreach_add_(totals, terms)
