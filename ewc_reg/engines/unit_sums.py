r"""A unit's sums for the hook engine (:mod:`.hooks`): from the records of its module's calls
in one forward pass and the gradients the pull-back brought to their outputs (and to the pieces
its rule's recorded forward kept).

A unit called once takes its rule (:mod:`.rules`) on that call. A unit called more than once
(a layer applied to its own output, a shared block, a siamese encoder, a recurrent cell
stepped by hand; the members of a :class:`Tied` unit) sums each sample's gradient over its
calls before squaring,

.. math::

    J_n^\top v = \sum_t \big(\partial y^{(t)}_n / \partial\theta\big)^\top G^{(t)}_n ,

where :math:`G^{(t)}` is all the gradient that reaches call :math:`t`'s output, the later
calls' included (backpropagation through time). Its rule takes the calls together: a
reduction's per-sample gradients add up (:data:`.rules.REDUCTIONS`), a convolution joins its
calls' patches (:data:`.rules.SEVERAL_CALLS`), and a rule that treats positions alike gets
the calls joined, positions side by side (:data:`.rules.POSITIONWISE`; accumulating rules
through :class:`_JoinedCalls`). A :class:`Tied` unit takes a rule of :mod:`.tied` (an
embedding tied to an output layer). A unit without a rule, or whose rule declines, gets the
functorch engine on its module alone, over all its calls (:func:`_fallback_sums`).
"""

from __future__ import annotations

import contextlib
import functools
import logging
import weakref
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils import _pytree as pytree

from .._batches import Batch
from .base import describe
from .functional import functional_sums
from .functorch import FunctorchEngine
from .loop import LoopEngine
from .parametrized import made_sums, made_tensors
from .rules import (
    ACCUMULATIONS,
    BATCH_DIMS,
    CALL_RULES,
    FOLDABLE,
    REDUCTIONS,
    SEVERAL_CALLS,
    Accumulation,
    Accumulator,
    CallRule,
    Reduction,
    Rule,
    feature_dims,
    global_backward_pre_hooks,
    hooks_outside,
    pruned_rule,
    rule_for,
)
from .tied import tied_sums

if TYPE_CHECKING:
    from .recording import Record, Unit

#: Where the per-module fallback is logged: a child of the ``"ewc_reg"`` logger, whose
#: messages say which engine computes a model, as this one says which modules of a model on the
#: hooks engine are slower than a rule would make them.
logger = logging.getLogger("ewc_reg.fallback")

#: The modules whose per-module fallback has been logged: once each, not for every batch.
announced: weakref.WeakSet[nn.Module] = weakref.WeakSet()


class Tied(nn.ModuleList):
    """Modules sharing a parameter (tied weights), as one unit: ``forward(member, *args,
    **kwargs)`` calls the ``member``-th (the per-module fallback calls it so)."""

    def forward(self, member: int, *args: Any, **kwargs: Any) -> Any:
        return self[member](*args, **kwargs)


def member_rule(unit: Unit, member: int | None) -> Rule | CallRule | None:
    """The rule of the unit's module, or of its ``member``-th module for a :class:`Tied` unit
    (whose members' rules :mod:`.tied` takes)."""
    return unit.rule if member is None else rule_for(unit.module[member])


def feed(accumulator: Accumulator, key: Any, grads: Tensor) -> None:
    """Feed one edge's gradients to a unit's accumulator (a reducer that keeps nothing)."""
    accumulator.add(key, grads)


def accumulation_of(unit: Unit, record: Record) -> Accumulation | None:
    """The accumulation the unit's rule takes for its call, or for its calls joined (see
    :data:`.rules.ACCUMULATIONS`), or ``None``."""
    if unit.rule is None:
        return None
    if by_rule(unit, record) or (record.more and _join_dims(unit, record) is not None):
        return ACCUMULATIONS.get(unit.rule)
    return None


def accumulator_of(unit: Unit, record: Record, memory_budget: int) -> Accumulator | None:
    """The accumulator of the unit's rule for its call (fed by output leaf or kept piece), or
    for its calls joined (a :class:`_JoinedCalls`, fed by ``(call, leaf)``), or ``None`` (no
    accumulation, or it declined the call)."""
    start = accumulation_of(unit, record)
    if start is None:
        return None
    names = unit.names.keys()
    if not record.more:
        args = record.args if unit.rule in CALL_RULES else record.args[:1]
        return start(unit.module, args, record.kwargs, record.kept, names, memory_budget)
    sizes = _join_dims(unit, record)
    assert sizes is not None  # (accumulation_of takes several calls only when they join)
    features, dims = sizes
    live = [call for call in record.calls() if call.edges]
    if unit.rule in CALL_RULES:
        args, kwargs = live[0].args, live[0].kwargs
        kept = {
            name: torch.cat([_positions(call.kept[name], 0, features) for call in live], 1)
            for name in live[0].kept
        }
    else:
        x = torch.cat([_positions(call.args[0], 0, features) for call in live], 1)
        args, kwargs, kept = (x,), {}, {}
    inner = start(unit.module, args, kwargs, kept, names, memory_budget)
    assert inner is not None  # (every call was recorded in pieces: none is declined)
    return _JoinedCalls(inner, live, dims)


class _JoinedCalls:
    """The :class:`~.rules.Accumulator` of a unit called more than once whose rule treats
    positions alike, over its calls joined (the rule's accumulator ``inner`` was started on
    their inputs, or kept pieces, side by side): fed each call's gradients of a vector (or of
    all, batched) by ``(call, leaf)``, it joins those of each leaf the same way, zeros for a
    call the pull-back did not reach, and feeds them on when the next vector's come (every
    pass reaches the same edges) or the sums are asked for. A rule of
    :data:`.rules.CALL_RULES` is fed its kept pieces' gradients only (its output leaves' reach
    it through them)."""

    def __init__(self, inner: Accumulator, calls: list[Record], dims: int) -> None:
        self.inner, self.calls, self.dims = inner, calls, dims
        self.pending: dict[tuple[int, int | str], Tensor] = {}

    def add(self, key: tuple[int, int | str], grads: Tensor) -> None:
        if key in self.pending:
            self._flush()
        self.pending[key] = grads

    def _flush(self) -> None:
        some_key, some = next(iter(self.pending.items()))
        first = self.calls[some_key[0]]
        lead = some.dim() - len(_leaf_shape(first, some_key[1]))  # (vectors in front)
        leaves = [leaf for leaf in self.calls[0].leaves if isinstance(leaf, str)] or [0]
        for leaf in leaves:
            parts = []
            for index, call in enumerate(self.calls):
                g = self.pending.get((index, leaf))
                if g is None:
                    g = some.new_zeros(*some.shape[:lead], *_leaf_shape(call, leaf))
                parts.append(_positions(g, lead, self.dims))
            self.inner.add(leaf, torch.cat(parts, lead + 1))
        self.pending.clear()

    def sums(self) -> dict[str, Tensor]:
        if self.pending:
            self._flush()
        return self.inner.sums()


def _leaf_shape(call: Record, leaf: int | str) -> torch.Size:
    """The shape of a call's output leaf or kept piece ``leaf``."""
    return call.kept[leaf].shape if isinstance(leaf, str) else call.shapes[call.leaves.index(leaf)]


def batch_dims_of(unit: Unit, record: Record) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """The batch dimensions of the unit's tensor inputs and output leaves (by position; those
    past the end: 0): as :data:`.rules.BATCH_DIMS` says when the rule's recorded forward ran
    (it kept pieces), else all leading (a call the rule declines goes to the per-module
    fallback, which needs that)."""
    dims = BATCH_DIMS.get(unit.rule) if unit.rule is not None and record.kept else None
    return ((), ()) if dims is None else dims(unit.module)


def nth(dims: tuple[int, ...], position: int) -> int:
    """The batch dimension at ``position`` of :func:`batch_dims_of`' ``dims`` (past the end: 0)."""
    return dims[position] if position < len(dims) else 0


def by_rule(unit: Unit, record: Record) -> bool:
    """Whether the unit's sums come from its rule: it has one and was called once, as
    ``module(x)`` or in any way for a rule that takes the whole call
    (:data:`.rules.CALL_RULES`)."""
    if record.more:
        return False
    return unit.rule in CALL_RULES or (unit.rule is not None and _plain_calls(record))


def _plain_calls(record: Record) -> bool:
    """Whether every call of the unit was ``module(x)``, one tensor and nothing else."""
    return all(
        len(call.args) == 1 and isinstance(call.args[0], Tensor) and not call.kwargs
        for call in record.calls()
    )


def _takes_rows(rule: Rule, record: Record) -> bool:
    """Whether ``rule`` takes the call's ``x`` as recorded: rows folded into its batch
    dimension (``(B, T, ...)`` for ``(B T, ...)`` rows: :func:`.recording._folds`) only for a
    rule that sums a sample's gradient over its positions (:data:`.rules.FOLDABLE`); else they
    are the per-module fallback's, which folds them again (a pruned convolution given such
    ``x`` took it as a 3-d convolution's input, and the hooks engine refused the model)."""
    return record.folded == 1 or rule in FOLDABLE


def takes_calls_together(unit: Unit, record: Record) -> bool:
    """Whether the rule of a unit called more than once takes all its calls: it reduces the
    output gradients to per-sample gradients, which add up (:data:`.rules.REDUCTIONS`), takes
    several calls (:data:`.rules.SEVERAL_CALLS`), or treats positions alike
    (:func:`_join_dims`)."""
    several = unit.rule in REDUCTIONS or unit.rule in SEVERAL_CALLS
    return (several and _plain_calls(record)) or _join_dims(unit, record) is not None


def reduction_of(unit: Unit, record: Record) -> Reduction | None:
    """The reduction of the unit's output gradients its rule takes (see
    :data:`.rules.REDUCTIONS`) on every call, or ``None``."""
    if unit.rule is None or unit.rule in CALL_RULES or not _plain_calls(record):
        return None
    return REDUCTIONS.get(unit.rule)


def unit_sums(
    unit: Unit, record: Record, grads: list[Tensor | None], memory_budget: int
) -> dict[str, Tensor]:
    r"""One unit's sums: its rule when it has one and was called once as ``module(x)`` (a rule
    of :data:`.rules.CALL_RULES`: called once in any way, unless it declines the call); for a
    unit called more than once, its rule on the reduced gradients of all the calls summed
    (:data:`.rules.REDUCTIONS`), on all the calls (:data:`.rules.SEVERAL_CALLS`), or on the
    calls joined (:func:`_joined_sums`); else the functorch engine on the module alone
    (:func:`_fallback_sums`). ``grads`` are those of the edges of all the unit's calls, in
    order (reduced, where the rule has a reduction)."""
    if unit.rule in CALL_RULES and by_rule(unit, record):
        given = {leaf: g for leaf, g in zip(record.leaves, grads) if g is not None}
        sums = unit.rule(
            unit.module,
            record.args,
            record.kwargs,
            given,
            record.kept,
            unit.names.keys(),
            memory_budget,
        )
        if sums is not None:
            return sums
    elif by_rule(unit, record):
        return unit.rule(unit.module, record.args[0], grads[0], unit.names.keys(), memory_budget)
    elif (unit.rule in REDUCTIONS or unit.rule in SEVERAL_CALLS) and _plain_calls(record):
        xs, gs = _inputs_and_gradients(record, grads)
        if unit.rule in REDUCTIONS:  # (reduced to per-sample gradients: they add up)
            summed = functools.reduce(torch.add, gs)
            return unit.rule(unit.module, xs[0], summed, unit.names.keys(), memory_budget)
        several = SEVERAL_CALLS[unit.rule]
        return several(unit.module, xs, gs, unit.names.keys(), memory_budget)
    elif unit.rule not in CALL_RULES and (dims := _join_dims(unit, record)) is not None:
        return _joined_sums(unit, record.calls(), grads, dims, memory_budget)
    elif isinstance(unit.module, Tied) and _plain_calls(record):
        names = unit.names.keys()
        sums = tied_sums(unit.module, record.calls(), grads, names, memory_budget)
        if sums is not None:
            return sums
    elif _plain_calls(record) and any(g is not None for g in grads):
        names = unit.names.keys()
        pruned = None if record.more else pruned_rule(unit.module)
        if pruned is not None and _takes_rows(pruned[0], record):
            return _pruned_sums(unit, record.args[0], grads[0], *pruned, memory_budget)
        # (the products each call ended in, pulled back through the graph that made its
        # weight: a parametrization's state as it was in that call; 0.89 of the time of the
        # made tensors' pull-back for a reduced ResNet-18 under weight_norm)
        reached = _calls_with_gradients(record, grads)
        if all(call.product is not None for call, _ in reached):
            products, gs = [call.product for call, _ in reached], [g for _, g in reached]
            sums = functional_sums(unit.module, products, gs, names, memory_budget)
            if sums is not None:
                return sums
        made = made_tensors(unit.module)  # (rows folded into the batch dimension, say)
        if made is not None and all(_takes_rows(made[0], call) for call in record.calls()):
            xs, gs = _inputs_and_gradients(record, grads)  # (calls joined along positions)
            if (sums := made_sums(unit.module, *made, xs, gs, names, memory_budget)) is not None:
                return sums
    return _fallback_sums(unit, record.calls(), grads, memory_budget)


def _calls_with_gradients(
    record: Record, grads: list[Tensor | None]
) -> list[tuple[Record, Tensor]]:
    """The unit's calls whose outputs got gradients, with those (``grads``: those of the calls
    with an edge, one each, in order)."""
    live = [call for call in record.calls() if call.edges]
    return [(call, g) for call, g in zip(live, grads) if g is not None]


def _inputs_and_gradients(
    record: Record, grads: list[Tensor | None]
) -> tuple[list[Tensor], list[Tensor]]:
    """The inputs ``x`` of a unit's calls ``module(x)`` whose outputs got gradients, and
    those (:func:`_calls_with_gradients`)."""
    reached = _calls_with_gradients(record, grads)
    return [call.args[0] for call, _ in reached], [g for _, g in reached]


def _pruned_sums(
    unit: Unit, x: Tensor, grads: Tensor, rule: Rule, made: dict[str, str], memory_budget: int
) -> dict[str, Tensor]:
    r"""The sums of a pruned module (:func:`.rules.pruned_rule`) from its class's rule: for a
    tensor made as :math:`t = t_{orig} \odot m` from its parameter :math:`t_{orig}` and mask
    :math:`m`, each per-sample gradient is the rule's for :math:`t` times :math:`m`, so its
    sums are the rule's times :math:`m^{\odot 2}`."""
    sums = rule(unit.module, x, grads, [made.get(n, n) for n in unit.names], memory_budget)
    return {
        local: sums[local]
        if local not in made
        else sums[made[local]] * getattr(unit.module, f"{made[local]}_mask").square()
        for local in unit.names
    }


def _join_dims(unit: Unit, record: Record) -> tuple[int, int] | None:
    """The feature dimensions (:func:`.rules.feature_dims`) with which the calls of a unit are
    joined into one call of its rule, or ``None`` where they cannot be: the rule treats
    positions alike and every call was ``module(x)`` (for a rule of
    :data:`.rules.CALL_RULES`: was recorded in the same pieces by its recorded forward)."""
    dims = feature_dims(unit.rule, unit.module)
    if unit.rule in CALL_RULES:  # (the same pieces in every call: self-attention in each)
        plain = bool(record.kept) and all(c.kept.keys() == record.kept.keys() for c in record.more)
    else:
        plain = _plain_calls(record)
    return dims if plain else None


def _joined_sums(
    unit: Unit,
    calls: list[Record],
    grads: list[Tensor | None],
    sizes: tuple[int, int],
    memory_budget: int,
) -> dict[str, Tensor]:
    r"""The sums of a unit whose rule treats positions alike (and takes no accumulator:
    :class:`_JoinedCalls`), called :math:`m` times, from one call of the rule on the calls'
    positions side by side: :math:`x = [x^{(1)}, \dots, x^{(m)}]` of shape
    ``(B, S_1 + ... + S_m, *F)`` and ``G`` alike (``sizes``: the numbers of feature
    dimensions of ``x`` and of ``G``), so that the rule sums each sample's gradient over the
    positions of all the calls before squaring. A call whose output got no gradient adds
    nothing (such a layer has one output)."""
    features, dims = sizes
    live = [call for call in calls if call.edges]
    pairs = [(call.args[0], g) for call, g in zip(live, grads) if g is not None]
    x = torch.cat([_positions(x, 0, features) for x, _ in pairs], 1)
    joined = torch.cat([_positions(g, 1, dims) for _, g in pairs], 2)
    return unit.rule(unit.module, x, joined, unit.names.keys(), memory_budget)


def _positions(t: Tensor, lead: int, trailing: int) -> Tensor:
    """``(*L, B, *S, *F) -> (*L, B, S', *F)`` for ``len(L) = lead``, ``len(F) = trailing``:
    the positions ``S`` flattened into one dimension (``S' = 1`` without any)."""
    return t.reshape(*t.shape[: lead + 1], -1, *t.shape[t.dim() - trailing :])


def _whole(call: Record, args: tuple[Any, ...], batch_size: int) -> Any:
    """A call's ``(args, call.kwargs)`` for the per-module fallback, with the inputs it passes whole
    (``call.whole``: the samples share them though they lead with the batch size) given a
    leading dimension of ``batch_size`` over which they are repeated, so that cutting the
    batch per sample gives every sample all of each (:class:`_Calls` takes the first of that
    dimension off again)."""
    return _at_tensors(
        args, call.kwargs, call.whole, lambda t: t.unsqueeze(0).expand(batch_size, *t.shape)
    )


def _at_tensors(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    positions: frozenset[int],
    change: Callable[[Tensor], Tensor],
) -> Any:
    """``(args, kwargs)`` with the tensors at ``positions`` (among their tensors, in order)
    replaced by ``change`` of them."""
    if not positions:
        return args, kwargs
    leaves, spec = pytree.tree_flatten((args, kwargs))
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, Tensor)]
    for position in positions:
        leaves[tensors[position]] = change(leaves[tensors[position]])
    return pytree.tree_unflatten(leaves, spec)


class _Calls(nn.Module):
    """A module called once per recorded call: ``forward(calls)`` for ``calls`` a list of
    ``(args, kwargs)``, returning the list of outputs. A call whose first argument was recorded
    unfolded, ``(b, T, ...)`` for rows ``(b T, ...)`` (``folds[i] = T``), gets it folded again,
    and its outputs of ``b T`` rows come unfolded, as recorded. The inputs it passes whole
    (``whole[i]``, positions among the call's tensors), repeated over a leading dimension
    (:func:`_whole`), come as the model made them: the first of that dimension, whatever
    part of the batch the call is given (one sample of it under ``vmap`` or the loop engine,
    all of it)."""

    def __init__(
        self,
        module: nn.Module,
        folds: list[int],
        whole: list[frozenset[int]],
        outside: list[bool],
    ) -> None:
        super().__init__()
        self.module = module
        self.folds = folds
        self.whole = whole
        self.outside = outside  # (per call: its module's hooks outside the record, not run)

    def forward(self, calls: list[tuple[tuple[Any, ...], dict[str, Any]]]) -> list[Any]:
        outputs = []
        for (args, kwargs), folds, whole, outside in zip(
            calls, self.folds, self.whole, self.outside
        ):
            args, kwargs = _at_tensors(args, kwargs, whole, lambda t: t[0])
            run = self.module
            if isinstance(run, Tied):
                run, args = run[args[0]], args[1:]
            if outside:  # (its forward alone: the arguments recorded after its pre-hooks)
                run = run.forward
            with _without_backward_pre_hooks(run):
                if folds == 1:
                    outputs.append(run(*args, **kwargs))
                    continue
                output = run(args[0].flatten(0, 1), *args[1:], **kwargs)
            outputs.append(pytree.tree_map(functools.partial(_unfolded, args[0].shape[:2]), output))
        return outputs


@contextlib.contextmanager
def _without_backward_pre_hooks(run: Callable[..., Any]) -> Any:
    """``run`` (a module, called with its hooks) without its backward pre-hooks, its own and
    the global ones, while in the block: the gradient recorded at its output, the vectors
    pulled back through it here, has been through them already (its forward hooks ran
    before the record; ``Module.__call__`` wraps the output for the backward hooks after).
    Its submodules keep theirs, which act inside. Where it has none, it is left alone."""
    hooked = isinstance(run, nn.Module) and (
        getattr(run, "_backward_pre_hooks", None) or global_backward_pre_hooks()
    )
    if not hooked:
        yield
        return
    # (an instance attribute over the method: no hooks; past a __setattr__ of the module's)
    object.__setattr__(run, "_get_backward_pre_hooks", list)
    try:
        yield
    finally:
        object.__delattr__(run, "_get_backward_pre_hooks")


def _unfolded(rows: torch.Size, leaf: Any) -> Any:
    """``leaf`` of ``b T`` rows as ``(b, T, ...)`` (``rows = (b, T)``); others as they are."""
    if isinstance(leaf, Tensor) and leaf.dim() and leaf.shape[0] == rows[0] * rows[1]:
        return leaf.unflatten(0, tuple(rows))
    return leaf


def _flat(t: Tensor, lead: int) -> Tensor:
    """``t`` with its dimensions after the first ``lead`` flattened into one (made where there
    are none: an output of one number per sample, ``(B,)``, is ``(B, 1)``)."""
    return t.reshape(*t.shape[:lead], -1)


def _fallback_sums(
    unit: Unit, calls: list[Record], grads: list[Tensor | None], memory_budget: int
) -> dict[str, Tensor]:
    r"""The sums of a unit without a rule (or whose rule declines), from the functorch engine
    on its module alone: the function of its parameters that maps every sample's recorded
    inputs of all the unit's calls to its output leaves that got gradients, flattened and
    concatenated into one ``(B, C')`` output, with ``G`` alike as the vectors. A unit called
    :math:`m` times (a cell in a loop, a layer applied to two inputs) thus gets
    :math:`\sum_{n,k} \big(\sum_{t=1}^m (\partial y^{(t)}_n / \partial\theta)^\top
    G^{(t)}_{nk}\big)^{\odot 2}`, its per-sample gradients summed over the calls before
    squaring: :math:`G^{(t)}` is all the gradient that reaches call :math:`t`'s output, through
    the later calls too, so the sum is the gradient of the whole network (backpropagation
    through time). Attention in there uses the math kernel of
    ``scaled_dot_product_attention``: ``vmap`` has no batching rule for the fused ones and
    calls them once per sample and vector (about 15% slower for the attention of
    ``benchmarks.models.TextTransformer`` on CPU). A module on which ``vmap`` failed is
    remembered and goes to the loop engine next time. The first time a module comes here, it
    is logged at info level (:data:`announced`): it is where a model is slower than its
    rules would make it."""
    known = next(g for g in grads if g is not None)
    shapes = [shape for call in calls for shape in call.shapes]
    vectors = torch.cat(
        [
            _flat(g if g is not None else known.new_zeros(known.shape[0], *shape), 2)
            for g, shape in zip(grads, shapes)
        ],
        dim=2,
    )
    batch_size = vectors.shape[1]
    live = [call for call in calls if call.edges]

    def flat_output(outputs: list[Any]) -> Tensor:
        flat = []
        for call, out in zip(live, outputs):
            leaves = pytree.tree_leaves(out)
            flat += [_flat(leaves[i], 1) for i in call.leaves]
        return torch.cat(flat, dim=1)

    outside = [hooks_outside(member_rule(unit, call.member)) for call in live]
    module = _Calls(
        unit.module, [call.folded for call in live], [call.whole for call in live], outside
    )
    params: dict[str, Tensor] = {}  # (a tied parameter once, by its first name)
    for local in unit.names:
        p = unit.module.get_parameter(local)
        if all(p is not q for q in params.values()):
            params[f"module.{local}"] = p
    calls_of = [
        _whole(call, (call.args if call.member is None else (call.member, *call.args)), batch_size)
        for call in live
    ]
    batch = Batch((calls_of,), {}, None, batch_size)
    # (a Tied unit is made anew for each batch: its first module stands for it)
    remembered = unit.module[0] if isinstance(unit.module, Tied) else unit.module
    if remembered not in announced:
        announced.add(remembered)
        members = unit.module if isinstance(unit.module, Tied) else [unit.module]
        logger.info(
            "hooks engine: no rule covers the calls of %s (%s): its per-sample gradients come "
            "from torch.func on the module alone (the per-module fallback)",
            describe(unit.path),
            ", ".join(type(m).__name__ for m in members),
        )
    vmappable = remembered not in FunctorchEngine.unvmappable
    engine = FunctorchEngine() if vmappable else LoopEngine(batched_vectors=True)
    try:
        with sdpa_kernel([SDPBackend.MATH]):  # (vmap loops over the fused attention kernels)
            sums = engine(
                module, params, batch, flat_output, lambda _: vectors, None, memory_budget
            )
    finally:
        if module in FunctorchEngine.unvmappable:
            FunctorchEngine.unvmappable.add(remembered)
    return {name.removeprefix("module."): s for name, s in sums.items()}
