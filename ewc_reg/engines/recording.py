"""What the hooks engine records of one forward pass (:mod:`.hooks` says why and how): the
units (:func:`plan`: the modules owning the selected parameters, tied ones joined), each call's
inputs, output edges and shapes (:class:`Record`), and the :class:`Recorder` (forward hooks on
the units and a torch-function mode) that makes them, expanding inputs and outputs the samples
share over the batch, and taking sequence-first calls and rows folded into the batch dimension
as batch-first ``(B, T, ...)``; it flags (:class:`Unsupported`) what breaks the layer-wise
decomposition during the pass."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Collection
from dataclasses import dataclass, field, replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._batches import Batch
from .base import VMAP_WRONG, describe, inside, modules_and_own_parameters, tensors_in
from .eval_norm import eval_batch_norm
from .functional import PRODUCTS, ProductCall
from .loose import loose_parameters
from .rules import (
    BATCH_DIMS,
    FOLDABLE,
    PIECES_ONLY,
    RECORDED_FORWARDS,
    CallRule,
    Rule,
    class_rule,
    feature_dims,
    global_forward_pre_hooks,
    hooks_outside,
    rule_for,
)
from .unit_sums import Tied, batch_dims_of, member_rule, nth, takes_calls_together


class Unsupported(Exception):
    """The model breaks an assumption of the layer-wise decomposition (see :mod:`.hooks`); the
    message says which."""


class SharedWithBatchRows(Unsupported):
    """A unit's inputs and outputs stay the same on fewer samples, but its output has the batch
    size as a dimension where the batch should be: inputs the samples share that
    :func:`_expand_shared` left as they are because the batch size is among their dimensions
    (nanoGPT's ``arange(T)`` with ``T == B``), to be expanded on the next attempt."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(message)
        self.path = path


class ExpansionFailed(Unsupported):
    """The model failed on the inputs or output the samples share of the units at ``paths``
    expanded over the batch (Hugging Face Swin's relative position bias, ``(1, heads, N, N)``,
    expanded to ``(B, heads, N, N)``, then added to the scores of ``B nW`` windows), or its
    output changed: those are left as they are on the next attempt (the units' outputs then
    without the batch: :class:`Batchless`)."""

    def __init__(self, message: str, paths: frozenset[str]) -> None:
        super().__init__(message)
        self.paths = paths


class UsedOutside(Unsupported):
    """Parameters of some units are used while their modules do not run (a parent calling
    ``F.linear(x, self.qkv.weight, bias)`` itself): ``names`` are those parameters, which may
    take shadowed per-sample copies (:data:`.loose.SHADOWED`), and ``paths`` their units'
    (tied units left out), whose parent modules may be made units of all the parameters inside
    them instead (:func:`plan`'s ``whole``)."""

    def __init__(self, message: str, paths: frozenset[str], names: frozenset[str]) -> None:
        super().__init__(message)
        self.paths, self.names = paths, names


class Batchless(Unsupported):
    """Units whose outputs have no batch dimension (a relative position MLP run on a table of
    coordinates, T5's bias table looked up with position buckets: computed from parameters and
    constants alone): ``names`` are the selected parameters inside them, which may take
    shadowed per-sample copies instead (:data:`.loose.SHADOWED`), their modules then no units."""

    def __init__(self, message: str, names: frozenset[str]) -> None:
        super().__init__(message)
        self.names = names


class WholeInputs(Unsupported):
    """Inputs of units on the per-module fallback that the samples share though they lead
    with the batch size (Hugging Face BART's decoder position ids ``(T,)`` with ``T == B``,
    beside per-sample token ids): the fallback would cut them per sample. ``inputs`` are
    those, by unit path, as ``(call, tensor)`` positions (the call's order in the forward
    pass, the tensor's among its arguments); the fallback passes them whole on the next
    attempt."""

    def __init__(self, inputs: dict[str, frozenset[tuple[int, int]]], message: str) -> None:
        super().__init__(message)
        self.inputs = inputs


class SequenceFirst(Unsupported):
    """Calls whose layout the shapes could not tell were taken the wrong way (see
    :func:`_sequence_first`): sequence-first ``(T, B, ...)`` with ``T == B``, taken as
    batch-first, or, taken as sequence-first, ``(B T, W, ...)`` rows folded into the batch
    dimension with ``W == B`` or a shared ``(1, T)`` input with ``T == B``; the layout check's
    pass on fewer samples tells (:func:`.batch_checks._layout_shown`). They are taken the other way
    on the next attempt."""

    def __init__(self, calls: dict[tuple[str, int], bool], message: str) -> None:
        super().__init__(message)
        self.calls = calls  # (unit path, call's position among its calls): sequence-first


class SamplesMixed(Unsupported):
    """The model's output for a few samples differs when they are run alone: it mixes the
    samples (batch statistics), its inputs are not per-sample along their first dimension, or it
    is not deterministic in eval mode. No engine computes the model's behaviour on the batch
    then: the fallback computes each sample's Fisher as a batch of one (warned)."""


@dataclass(eq=False)
class Unit:
    """A module owning selected parameters, with those of the modules inside it when some of
    them own selected parameters too (then without a rule): ``names`` maps the parameter names
    relative to the module (``"in_proj_weight"``, ``"out_proj.weight"``) to the names in
    ``params``."""

    module: nn.Module
    path: str
    names: dict[str, str]
    rule: Rule | CallRule | None
    # its inputs are shared by the samples even with the batch size among their dimensions
    # (expanded by _expand_shared all the same: see SharedWithBatchRows)
    shared: bool = False
    # its shared inputs or output may be expanded over the batch (not once the model failed on
    # them so: see ExpansionFailed)
    expand: bool = True
    # the (call, tensor) positions of inputs the per-module fallback passes whole, shared by
    # the samples though they lead with the batch size (see WholeInputs)
    whole: frozenset[tuple[int, int]] = frozenset()
    # the calls (by their order in the forward pass) taken as sequence-first wherever the batch
    # is their second dimension, those taken as batch-first whatever their shapes, and whether
    # all but the first are (the checks' passes follow the checked one: see _sequence_first)
    sequence_first: frozenset[int] = frozenset()
    batch_first: frozenset[int] = frozenset()
    decided: bool = False


@dataclass(eq=False)
class Record:
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
    pulled: list[Tensor] = field(default_factory=list)  # the kept pieces with edges, as made
    # its inputs, all shared, were expanded over the batch (or, without a rule, its output)
    expanded: bool = False
    folded: int = 1  # the positions per sample folded into its tensors' batch dimension
    transposed: bool = False  # sequence-first, (T, B, ...): recorded as (B, T, ...)
    given: torch.Size | None = None  # the input's shape, for a call that may be sequence-first
    member: int | None = None  # which of a Tied unit's modules was called
    # the positions among its tensor arguments of those the fallback passes whole (WholeInputs)
    whole: frozenset[int] = frozenset()
    # for a unit on the per-module fallback, the product its call ended in (see
    # .functional.ProductCall), if that was its only one, on its input; while it runs, what
    # Recorder._note_product noted
    product: Any = None
    more: list[Record] = field(default_factory=list)  # the unit's later calls

    def calls(self) -> list[Record]:
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
    (:func:`.batch_checks.check_expansion`). (Per-sample data folded into the batch dimension,
    ``(B T, D)``, has no sample's shape: expanded, it would cost ``B`` times the unit's work before
    failing.) An input with the batch size among its dimensions may be per-sample (``(B,)`` labels
    beside ``(B, T)`` inputs with ``T == B``) and is expanded only for a unit known to be
    ``shared`` (:class:`SharedWithBatchRows`)."""
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
    give each sample's copy; :func:`.batch_checks.check_expansion` checks that the model's output
    stays the same."""
    tensors = tensors_in(output)
    return batch_size > 1 and bool(tensors) and all(t.dim() and t.shape[0] == 1 for t in tensors)


def _unfold(t: Tensor, dim: int, positions: int) -> Tensor:
    """``t`` with its dimension ``dim`` of ``B T`` rows, sample ``n``'s positions in rows ``nT``
    to ``nT + T - 1``, split into ``(B, T)`` (``positions`` is ``T``; 1: ``t`` as it is)."""
    if positions == 1:
        return t
    return t.reshape(*t.shape[:dim], -1, positions, *t.shape[dim + 1 :])


def _on_fallback(unit: Unit) -> bool:
    """Whether ``unit`` goes to the per-module fallback whatever its calls: no rule, and not
    tied (a tied unit's rule is :func:`.tied.tied_sums`, tried per batch)."""
    return unit.rule is None and not isinstance(unit.module, Tied)


def _folds(unit: Unit, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int) -> int:
    """How many positions per sample a call ``module(x)`` has folded into its batch dimension,
    for a unit whose rule is in :data:`.rules.FOLDABLE`, or whose rule's recorded forward keeps
    pieces with the batch first and treats their positions alike (:data:`.rules.POSITIONWISE`:
    a recurrent layer, batch first, on ``(B H, W, in)`` rows of an image, each row a
    sequence), or of a call ``module(x, ...)`` of a unit without a rule (the per-module
    fallback: Swin's window attention on ``(B nW, N, C)`` windows): ``T`` where ``x`` has shape
    ``(B T, ...)`` for ``T > 1``, else 1 (:func:`.batch_checks.check_batch_layout` and
    :func:`.batch_checks.check_folds` check that its rows are the samples' positions, one
    sample after another)."""
    if not args or not isinstance(args[0], Tensor):
        return 1
    if unit.rule in FOLDABLE and (kwargs or len(args) != 1):
        return 1
    if not (_on_fallback(unit) or unit.rule in FOLDABLE or _joins_rows(unit)):
        return 1
    dim = first_batch_dim(unit)
    lead = args[0].shape[dim] if args[0].dim() > dim else 0
    return lead // batch_size if lead > batch_size and lead % batch_size == 0 else 1


def first_batch_dim(unit: Unit) -> int:
    """The batch dimension of the first input of the unit's calls as its rule takes them, ``1``
    for a sequence-first call of a rule with a recorded forward (:data:`.rules.BATCH_DIMS`),
    else ``0``."""
    if unit.rule not in RECORDED_FORWARDS or unit.rule not in BATCH_DIMS:
        return 0
    return nth(BATCH_DIMS[unit.rule](unit.module)[0], 0)


def _joins_rows(unit: Unit) -> bool:
    """Whether the unit's rule has a recorded forward that keeps pieces with the batch first and
    treats their positions alike (:data:`.rules.POSITIONWISE`): the pieces of a call on
    ``B T`` rows, unfolded to ``(B, T, ...)``, are those of the call on each sample's ``T``
    rows, positions side by side."""
    return unit.rule in RECORDED_FORWARDS and feature_dims(unit.rule, unit.module) is not None


def _unfolded_call(
    unit: Unit, args: tuple[Any, ...], kwargs: dict[str, Any], batch_size: int, folded: int
) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A call's arguments with ``folded`` rows per sample folded into its batch dimension as its
    rule gets them: ``x = args[0]`` unfolded, ``(B T, ...)`` to ``(B, T, ...)``; for a rule
    with a recorded forward (:func:`_joins_rows`), every tensor argument with ``B T`` rows at
    its batch dimension alike (a cell's state, a recurrent layer's initial states)."""
    if not _joins_rows(unit):  # (batch first)
        return (_unfold(args[0], 0, folded), *args[1:]), kwargs
    dims = BATCH_DIMS[unit.rule](unit.module)[0] if unit.rule in BATCH_DIMS else ()
    leaves, spec = pytree.tree_flatten((args, kwargs))
    position = 0
    for i, leaf in enumerate(leaves):
        if isinstance(leaf, Tensor):
            dim = nth(dims, position)
            position += 1
            if leaf.dim() > dim and leaf.shape[dim] == batch_size * folded:
                leaves[i] = _unfold(leaf, dim, folded)
    return pytree.tree_unflatten(leaves, spec)


def _transposable(
    unit: Unit, args: tuple[Any, ...], kwargs: dict[str, Any], member: int | None
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


def _sequence_first(unit: Unit, given: torch.Size | None, batch_size: int, call: int) -> bool:
    """Whether a unit's ``call``-th call in the forward pass, on an input of shape ``given``
    (:func:`_transposable`), is sequence-first, ``(T, B, *F)``: with ``T != B``, unless the
    call is known to be batch-first (``(B T, W, *F)`` with ``W == B``: the unit's
    ``batch_first``), or with any ``T`` for a call known to be sequence-first (its
    ``sequence_first``: :class:`SequenceFirst` found them, or they were in the pass the
    checks' passes follow, whose shapes may not tell); a unit ``decided`` has no others. Its
    rule gets ``x`` transposed to ``(B, T, *F)``, and the gradients at its output alike
    (:func:`.batch_checks.check_batch_layout` checks the layout on fewer samples)."""
    if given is None or given[1] != batch_size or call in unit.batch_first:
        return False
    return call in unit.sequence_first or (not unit.decided and given[0] != batch_size)


def as_recorded(g: Tensor, shape: torch.Size, transposed: bool, vectors: bool) -> Tensor:
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
    (:meth:`Recorder.check` sees whether it was modified in place)."""
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


def _tie(units: list[Unit]) -> list[Unit]:
    """``units`` with those sharing a selected parameter made one: a module registered twice
    (two paths, one module) is one unit; different modules (an embedding tied to an output
    layer) are the members of a :class:`~.unit_sums.Tied` unit, each of whose calls its rule
    (:mod:`.tied`) or the per-module fallback sees, so that a sample's gradient of the shared
    parameter is summed over all of them before squaring."""
    group_of: dict[str, int] = {}  # parameter name -> index of its group
    groups: list[list[Unit]] = []
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
        members: dict[int, Unit] = {}  # one per module (a module registered twice is one)
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
        tied.append(Unit(container, "+".join(paths), names, None))
    return tied


def plan(
    model: nn.Module,
    params: dict[str, Tensor],
    whole_parents: bool = True,
    whole: Collection[str] = (),
) -> list[Unit]:
    """The units computing the sums of ``params``: each module owning some of them, except that
    a module owning some and containing modules that own some (a parent) is a unit without a
    rule, for all of them, the outermost one where parents nest (``whole_parents``), or for
    its own (the modules inside it being units of theirs), and that the modules at the paths
    in ``whole`` (owning some of ``params`` or not) are units without a rule for all of them
    inside (the outermost where they nest; :class:`UsedOutside`); an
    ``nn.MultiheadAttention`` is one unit with the parameters of the modules inside it
    (``out_proj``) even when it owns none of ``params`` itself, and the modules sharing a
    parameter are one unit (:func:`_tie`); raises
    :class:`Unsupported` for the static problems :mod:`.hooks` lists."""
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
    for path, module, own in modules_and_own_parameters(model):
        in_script = script is not None and (path == script or inside(path, script))
        if isinstance(module, torch.jit.ScriptModule) and not in_script:
            script, in_script = path, True
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and (
            module.training or module.running_mean is None
        ):
            raise SamplesMixed(f"{describe(path)} normalises with batch statistics")
        if isinstance(module, nn.MultiheadAttention):
            attention = (path, module)
        # the parameters of the modules inside an attention module are its own (out_proj)
        unit_path, unit_module, prefix = path, module, ""
        if attention is not None and inside(path, attention[0]):
            (unit_path, unit_module), prefix = attention, path[len(attention[0]) + 1 :] + "."
        if path in whole and not (attention is not None and inside(path, attention[0])):
            owners.setdefault(unit_path, (unit_module, {}))
        for local, p in own:
            if id(p) not in wanted:
                continue
            if in_script:
                raise Unsupported(
                    f"{describe(script)} is TorchScript (torch.jit.script or torch.jit.trace): "
                    "the hooks of the modules inside it do not run"
                )
            owned.add(id(p))
            owners.setdefault(unit_path, (unit_module, {}))[1][prefix + local] = wanted[id(p)]
    missing = [name for key, name in wanted.items() if key not in owned]
    if missing:
        raise Unsupported(f"parameters {missing} are not registered on the model's modules")
    paths = list(owners)
    units: list[Unit] = []
    for i, (path, (module, names)) in enumerate(owners.items()):
        # (pre-order: the enclosing unit is the last)
        enclosing = units[-1].path if units else None
        if enclosing is not None and inside(path, enclosing) and (
            whole_parents or enclosing in whole
        ):
            prefix = path[len(enclosing) + 1 :] + "."
            units[-1].names.update({prefix + local: name for local, name in names.items()})
            continue
        if not names and not (i + 1 < len(paths) and inside(paths[i + 1], path)):
            continue  # (a whole module with none of params inside it)
        nested = path in whole or (i + 1 < len(paths) and inside(paths[i + 1], path))
        if nested and not path:
            inner = paths[1:4]
            raise Unsupported(
                "the root module owns parameters and contains modules that own parameters "
                f"({', '.join(map(repr, inner))})"
            )
        units.append(Unit(module, path, dict(names), None if nested else rule_for(module)))
    return _tie(units)


class Planner:
    """:func:`plan`, :func:`.loose.loose_parameters` and :meth:`problem`, each worked out once
    per model and arguments for as long as the planner lives: one Fisher call, in which the
    module tree, the modules' training flags and the parameters stay as they are (the hooks
    engine worked them out for the choice of engine and again for every batch, walking the
    modules twice each time: 0.05 ms for the Split MNIST MLP, 0.58 ms for the reduced
    ResNet-18, ``timeit`` on the AMD EPYC). :meth:`plan` hands out copies of its units, which
    the engine sets per pass; what raises is not kept."""

    def __init__(self) -> None:
        self._plans: dict[tuple[Any, ...], list[Unit]] = {}
        self._loose: dict[tuple[Any, ...], dict[str, Tensor]] = {}

    def loose(self, model: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
        """:func:`.loose.loose_parameters`."""
        key = (id(model), *((name, id(p)) for name, p in params.items()))
        if key not in self._loose:
            self._loose[key] = loose_parameters(model, params)
        return dict(self._loose[key])

    def plan(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        whole_parents: bool = True,
        whole: Collection[str] = (),
    ) -> list[Unit]:
        """:func:`plan`, as new units. Without loose parameters among ``params`` no module is a
        parent, and ``whole_parents`` changes nothing: the plans with and without it are one
        (:meth:`problem`'s serves the engine's first pass)."""
        if not whole and not self.loose(model, params):
            whole_parents = True
        key = (
            id(model),
            whole_parents,
            frozenset(whole),
            *((name, id(p)) for name, p in params.items()),
        )
        if key not in self._plans:
            self._plans[key] = plan(model, params, whole_parents, whole)
        return [replace(unit, names=dict(unit.names)) for unit in self._plans[key]]

    def problem(
        self, model: nn.Module, params: dict[str, Tensor] | None = None
    ) -> Unsupported | None:
        """Why :class:`.hooks.HookEngine` cannot handle ``params`` (default: ``model``'s
        parameters with ``requires_grad``), as far as the module tree tells (the rest is checked
        during the forward pass), or ``None``: the exception that says it (a
        :class:`SamplesMixed` for batch statistics). The :func:`.loose.loose_parameters` are
        not in the way (they get per-sample copies, or, failing that, their modules become
        units)."""
        if params is None:
            params = {n: p for n, p in model.named_parameters() if p.requires_grad}
        loose = self.loose(model, params)
        try:
            self.plan(model, {n: p for n, p in params.items() if n not in loose})
        except Unsupported as problem:
            return problem
        return None


#: The recorder's own bookkeeping in its hooks runs outside its torch-function mode: the
#: shapes, versions, sizes and autograd edges it reads are not the model's operations, and in the
#: mode each read cost a call of :meth:`Recorder.__torch_function__` (66 calls per forward pass of
#: the Split MNIST MLP, 5 of them the model's). Without them, side by side in one process (CPU,
#: 1 thread, a GPU's ways), an ``empirical`` Fisher call at N=8 took 0.90 of the time for the
#: MLP and the Transformer, 0.96 for the reduced ResNet-18, 0.97 for the LSTM and, at N=256,
#: the MLP.
#: What a hook hands the module (expanded inputs, separated outputs) or its rule (transposed
#: and unfolded inputs) is still made inside the mode, as the model's own tensors are.
_unwatched = torch._C.DisableTorchFunction


#: Noted for a call with more than one product (:meth:`Recorder._note_product`).
_SEVERAL = object()


def _of_parameter(t: Tensor, owner: dict[int, Any]) -> bool:
    """Whether ``t`` is one of the parameters in ``owner`` (by id) or a view of one."""
    return id(t) in owner or (t._base is not None and id(t._base) in owner)


class Recorder(TorchFunctionMode):
    """Hooks on the units' modules and a torch-function mode, for one forward pass."""

    def __init__(
        self,
        units: list[Unit],
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
        self.records: dict[Unit, Record] = {}  # (the first call's: its later ones in more)
        self.calling: dict[Unit, Record] = {}  # the record of each unit's latest call
        self.running: set[Unit] = set()
        self.owner = {
            id(unit.module.get_parameter(local)): (unit, local)
            for unit in units
            for local in unit.names
        }
        self.problem: str | None = None
        # the names of the parameters used outside their units' calls, by unit path
        self.used_outside: defaultdict[str, set[str]] = defaultdict(set)
        # the selected parameters of the units with outputs without the batch (Batchless)
        self.batchless: set[str] = set()
        self.vmap_wrong = False  # (whether a function of VMAP_WRONG was called)
        # the views of parameters made during the forward pass, by id (kept alive with it)
        self.made: dict[int, Tensor] = {}
        self.handles: list[torch.utils.hooks.RemovableHandle] = []
        self.forwards: list[nn.Module] = []  # modules whose forward runs in pieces
        # the output views recorded at their own edges, with their versions then
        self.views: list[tuple[Unit, Tensor, int]] = []

    def __enter__(self) -> Recorder:
        try:
            for unit in self.units:
                if unit.rule in RECORDED_FORWARDS:
                    self._record_in_pieces(unit)
                tied = isinstance(unit.module, Tied)
                members = list(unit.module) if tied else [unit.module]
                # (the module's own hooks outside the record, or inside: see hooks_outside)
                outside = [hooks_outside(member_rule(unit, i if tied else None))
                           for i in range(len(members))]
                for index, (module, out) in enumerate(zip(members, outside)):
                    member = index if tied else None
                    self.handles += [
                        module.register_forward_pre_hook(
                            lambda module, args, kwargs, unit=unit, member=member: self._before(
                                unit, args, kwargs, member
                            ),
                            prepend=not out,
                            with_kwargs=True,
                        ),  # (the arguments it returns, if any, replace the call's)
                        module.register_forward_hook(
                            lambda module, args, output, unit=unit: self._after(unit, output),
                            prepend=out,
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

    def _record_in_pieces(self, unit: Unit) -> None:
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
            # (a folded call's pieces, batch first, are kept, and their gradients come,
            # unfolded: (B, T, ...) for (B T, ...) rows)
            if pull_back and not piece.requires_grad and torch.is_grad_enabled():
                # (made of nothing selected, a recurrent layer's x W_ih + b_ih with both
                # frozen: the gradients the layer's other parameters take are still there)
                piece = piece.detach().requires_grad_()
            unfolded = _unfold(piece, 0, record.folded)
            record.kept[name] = unfolded
            with _unwatched():
                if pull_back and piece.requires_grad:
                    record.edges.append(self._edge(unit, piece))
                    record.pulled.append(piece)
                    record.leaves.append(name)
                    record.shapes.append(unfolded.shape)
                    record.nbytes += piece.numel() * piece.element_size()
            return piece

        def in_pieces(*args: Any, **kwargs: Any) -> Any:
            output = forward(module, args, kwargs, keep)
            return original(*args, **kwargs) if output is NotImplemented else output

        module.forward = in_pieces

    def _edge(self, unit: Unit, output: Tensor) -> GradientEdge:
        """The edge at which the gradient of the unit's ``output`` (or kept piece) is taken
        (:func:`_output_edge`); a view taken at its own edge is watched (:meth:`check`)."""
        edge, own = _output_edge(output)
        if own and output._base is not None:  # (a view: modified in place, it is bypassed)
            self.views.append((unit, output, output._version))
        return edge

    def _flag(self, problem: str) -> None:
        self.problem = self.problem or problem

    def _before(
        self, unit: Unit, args: tuple[Any, ...], kwargs: dict[str, Any], member: int | None
    ) -> tuple[tuple[Any, ...], dict[str, Any]] | None:
        """Record the unit's call (a later call of the same unit in its first call's ``more``);
        return its arguments with shared inputs expanded over the batch (see
        :func:`_expand_shared`), or ``None`` (the arguments as they are)."""
        with _unwatched():
            tensors = tensors_in((args, kwargs))
            call = len(self.records[unit].calls()) if unit in self.records else 0
            given = _transposable(unit, args, kwargs, member)
            transposed = _sequence_first(unit, given, self.batch_size, call)
            # (a sequence-first call with T == 1, (1, B, ...), is not taken for shared: see
            # _layout_shown; nor that of a rule whose first input is sequence-first, attention
            # or a recurrent layer with batch_first=False)
            dims = BATCH_DIMS.get(unit.rule) if unit.rule is not None else None
            expanding = (
                not transposed
                and unit.expand
                and (dims is None or dims(unit.module)[0][:1] != (1,))
                and (self.expanding is None or unit.path in self.expanding)
            )
        expanded = None
        if expanding:  # (watched: the expanded tensors are the module's arguments)
            expanded = _expand_shared(
                (args, kwargs), tensors, self.batch_size, self.sample_shapes, unit.shared
            )
        with _unwatched():
            if expanded is not None:
                args, kwargs = expanded
                tensors = tensors_in(expanded)
                given = None
            versions = [(t, t._version) for t in tensors]
            folded = 1
            if expanded is None and not transposed:
                folded = _folds(unit, args, kwargs, self.batch_size)
        # (watched: what the rule gets is made as the model would make it)
        if transposed:  # (the module runs on x as it is; its rule gets x transposed)
            args = (args[0].transpose(0, 1),)
            tensors = list(args)
        if folded > 1:  # (the module runs on x as it is; its rule gets x unfolded)
            args, kwargs = _unfolded_call(unit, args, kwargs, self.batch_size, folded)
            tensors = tensors_in((args, kwargs))
        with _unwatched():
            # (the lists and dicts as they are now: the caller may extend them after the call, as
            # a dense block appends each layer's output to the list it gave the layer)
            args, kwargs = pytree.tree_map(lambda leaf: leaf, (args, kwargs))
            record = Record(
                args,
                kwargs,
                versions,
                inputs=[t.shape for t in tensors],
                expanded=bool(expanded),
                folded=folded,
                transposed=transposed,
                given=given,
                member=member,
                whole=frozenset(i for c, i in unit.whole if c == call),
            )
            first = self.records.setdefault(unit, record)
            if first is not record:
                first.more.append(record)
            self.calling[unit] = record
            self.running.add(unit)
            return expanded

    def _after(self, unit: Unit, output: Any) -> Any:
        """Check and record the unit's output; for a unit going to the per-module fallback
        (without a rule, or whose rule's recorded forward declined the call) and with several
        differentiable output tensors, return the output with each of them cloned (see
        :func:`_separate_leaves`), and for a unit without a rule whose output the samples
        share, with its leading 1 expanded over the batch (see :func:`_shared_output`), else
        ``None`` (the output as it is)."""
        record = self.calling[unit]
        noted, record.product = record.product, None
        if noted is not None and noted is not _SEVERAL:  # (the output, the input as recorded)
            call, result = noted
            first = record.args[0] if record.args else None
            if call is not None and result is output and call.input is first:
                record.product = call
        separate = unit.rule is None or (unit.rule in RECORDED_FORWARDS and not record.kept)
        if separate and record.folded > 1 and _joins_rows(unit):  # (all its inputs unfolded)
            self._flag(
                f"the rule of {describe(unit.path)} declined a call on rows folded into the "
                "batch dimension"
            )
        if separate:
            output = _separate_leaves(output)  # (before the unit's call ends: see the mode)
        if (
            unit.rule is None
            and unit.expand
            and not (record.expanded or record.transposed)
            and (self.expanding is None or unit.path in self.expanding)
            and _shared_output(output, self.batch_size)
        ):
            output = pytree.tree_map_only(
                Tensor, lambda t: t.expand(self.batch_size, *t.shape[1:]), output
            )
            record.expanded = True
        with _unwatched():
            self._record_outputs(unit, record, output)
        return output if separate else None

    def _record_outputs(self, unit: Unit, record: Record, output: Any) -> None:
        """:meth:`_after`'s checks and record of the unit's output: its shapes, size and
        autograd edges (the call ends here)."""
        self.running.discard(unit)
        inputs, outputs = batch_dims_of(unit, record)
        # (a unit on the per-module fallback gets its inputs as they are, split where they have
        # the batch as leading dimension, whole elsewhere: the layout check, on fewer samples,
        # tells a shared (nW, N, N) mask of Swin's window attention from per-sample data)
        for i, shape in enumerate([] if _on_fallback(unit) else record.inputs):
            dim = nth(inputs, i)
            lead = shape[dim] if len(shape) >= 3 else 0  # 2-d masks (L, S) are shared
            if lead > self.batch_size and lead % self.batch_size == 0:
                self._flag(
                    f"an input of {describe(unit.path)} has shape {tuple(shape)}: its batch "
                    f"dimension is a multiple of the batch ({self.batch_size}), per-sample data "
                    "folded into the batch dimension (e.g. a (B * heads, L, S) attention mask)"
                )
        # (an output the recorded forward kept to pull back to already has its edge; where the
        # kept pieces are all the rule needs, no output has one)
        pieces_only = unit.rule in PIECES_ONLY and bool(record.kept)
        for i, leaf in enumerate(pytree.tree_leaves(output)):
            if not isinstance(leaf, Tensor):
                continue
            dim = nth(outputs, i)
            # (a folded call's output, (B T, ...) as its input, (L, B T, ...) for a recurrent
            # layer's final states: its gradients are unfolded as the pull-back brings them,
            # see _pull_back)
            shape, rows = leaf.shape, self.batch_size * record.folded
            if record.folded > 1 and leaf.dim() > dim and shape[dim] == rows:
                shape = _unfold(leaf, dim, record.folded).shape
            elif record.transposed:  # (sequence-first as its input: recorded batch first)
                if leaf.dim() < 2 or shape[1] != self.batch_size:
                    self._flag(
                        f"an output of {describe(unit.path)} has shape {tuple(shape)}, without "
                        f"the batch ({self.batch_size}) as dimension 1, as its sequence-first "
                        "input has"
                    )
                    continue
                shape = torch.Size((shape[1], shape[0], *shape[2:]))
            record.outputs.append(shape)
            if len(shape) <= dim or shape[dim] != self.batch_size:
                where = "leading dimension" if dim == 0 else f"dimension {dim}"
                self.batchless.update(unit.names.values())
                self._flag(
                    f"an output of {describe(unit.path)} has shape {tuple(leaf.shape)}, without "
                    f"the batch ({self.batch_size}) as {where}"
                )
            if leaf.is_floating_point():
                record.nbytes += leaf.numel() * leaf.element_size()
            pulled = any(leaf is piece for piece in record.pulled)
            if leaf.requires_grad and not (pieces_only or pulled):
                record.edges.append(self._edge(unit, leaf))
                record.leaves.append(i)
                record.shapes.append(shape)

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        kwargs = kwargs or {}
        if func is F.batch_norm:  # (its backward as a product: see .eval_norm)
            result = eval_batch_norm(args, kwargs, self._by_rule)
        else:
            result = func(*args, **kwargs)
        if getattr(func, "__name__", None) == "__get__":
            # (a property read, .T or .shape, is no use by itself; the view .T gives is, where a
            # function takes it: checked as the parameter there. Most reads are the engine's
            # own, of shapes and edges: 42 of an MLP's 66 operations here)
            if isinstance(result, Tensor):
                self._keep_view_made(result)
            return result
        self.vmap_wrong = self.vmap_wrong or func in VMAP_WRONG
        if func in PRODUCTS and self.running:
            self._note_product(func, args, kwargs, result)
        inputs = [t for t in tensors_in((args, kwargs)) if _of_parameter(t, self.owner)]
        if inputs:
            # (after a first problem too: every unit whose parameters are used outside is wanted)
            for leaf in inputs:
                unit, local = self.owner.get(id(leaf), (None, ""))
                if unit is None and leaf._base is not None and id(leaf._base) in self.owner:
                    # a view of the parameter; one this pass did not make was made beforehand
                    # (self.wt = w.t() in __init__: the fallback would swap w, not the view)
                    unit, local = self.owner[id(leaf._base)]
                    if id(leaf) not in self.made:
                        self._flag(
                            f"a view of parameter {local!r} of {describe(unit.path)} made "
                            "before the forward pass is used (engines that swap parameters "
                            "miss it)"
                        )
                        continue
                if unit is not None and unit not in self.running:
                    if not isinstance(unit.module, Tied):
                        self.used_outside[unit.path].add(unit.names[local])
                    self._flag(
                        f"parameter {local!r} of {describe(unit.path)} is used outside that "
                        "module's call"
                    )
            self._keep_view_made(result)
        return result

    def _by_rule(self, t: Tensor) -> bool:
        """Whether autograd need not give ``t``'s gradient: ``t`` is frozen, or a parameter of
        a running unit whose rule forms its sums from the gradients at the unit's outputs."""
        if not t.requires_grad:
            return True
        unit = self.owner.get(id(t), (None, ""))[0]
        return unit in self.running and unit.rule is not None

    def _note_product(
        self, func: Any, args: tuple[Any, ...], kwargs: dict[str, Any], result: Any
    ) -> None:
        """Note a call of one of :data:`.functional.PRODUCTS` for each running unit on the
        per-module fallback: the call and its result for its first, :data:`_SEVERAL` after."""
        with _unwatched():
            noted = None  # (made once, for the first unit whose call has no product yet)
            for unit in self.running:
                if not _on_fallback(unit):
                    continue
                record = self.calling[unit]
                if record.product is None:
                    noted = noted or (ProductCall.of(func, args, kwargs), result)
                    record.product = noted
                else:
                    record.product = _SEVERAL

    def _keep_view_made(self, result: Any) -> None:
        """Keep the views of parameters in ``result``: made during the pass (views of
        parameters come from parameters or views, so only operations on them are looked at)."""
        for leaf in tensors_in(result):
            if leaf._base is not None and id(leaf._base) in self.owner:
                self.made[id(leaf)] = leaf

    def check(self) -> None:
        """Raise :class:`Unsupported` for what the forward pass revealed (:class:`UsedOutside`
        where parameters were used outside their units' calls, whatever the first problem, else
        :class:`Batchless` where units' outputs had no batch dimension)."""
        for unit, record in self.records.items():
            calls = record.calls()
            if any(t._version != v for call in calls for t, v in call.versions):
                self._flag(f"the input of {describe(unit.path)} is modified in place after it")
            if not record.more or unit.rule is None or takes_calls_together(unit, record):
                continue
            if unit.rule in RECORDED_FORWARDS:
                self._flag(
                    f"{describe(unit.path)} is called more than once per forward pass, and "
                    "its rule records each call in pieces it cannot join"
                )
            elif any(len(call.edges) > 1 for call in calls):
                self._flag(
                    f"{describe(unit.path)} is called more than once per forward pass, with "
                    "several outputs"
                )
        for unit, view, version in self.views:
            if view._version != version:
                self._flag(
                    f"an output of {describe(unit.path)}, a view, is modified in place after it "
                    "(the gradient would bypass the edge where it is taken)"
                )
        if self.used_outside:
            names = frozenset().union(*self.used_outside.values())
            raise UsedOutside(self.problem or "", frozenset(self.used_outside), names)
        if self.batchless:
            raise Batchless(self.problem or "", frozenset(self.batchless))
        if self.problem is not None:
            raise Unsupported(self.problem)
