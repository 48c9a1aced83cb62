"""The checks that the batch is the batch dimension of every unit's tensors
(:func:`check_batch_layout`), that the rows folded into it are the samples' positions
(:func:`check_folds`), and that inputs and outputs the samples share may be expanded over it
(:func:`check_expansion`): each records the units again on other samples, without gradients
(:mod:`.hooks` says when they run)."""

from __future__ import annotations

import inspect
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._batches import Batch, is_per_sample, same_output
from .base import OutputFn, describe, tensors_in
from .recording import (
    Batchless,
    ExpansionFailed,
    Record,
    Recorder,
    SamplesMixed,
    SequenceFirst,
    SharedWithBatchRows,
    Unit,
    Unsupported,
    WholeInputs,
    first_batch_dim,
)
from .unit_sums import batch_dims_of, by_rule, nth


def _refolded(shape: torch.Size, folded: int) -> torch.Size:
    """A recorded shape ``(B, T, ...)`` of a call with ``T > 1`` positions folded into its batch
    dimension as the call had it, ``(B T, ...)``; else ``shape``."""
    return torch.Size((shape[0] * shape[1], *shape[2:])) if folded > 1 else shape


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


def check_batch_layout(
    model: nn.Module,
    units: list[Unit],
    batch: Batch,
    output_fn: OutputFn,
    records: dict[Unit, Record],
    output: Any,
) -> None:
    """Raise :class:`.recording.Unsupported` if the batch is not the batch dimension of the units'
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
    been taken the wrong way, sequence-first or not, raises :class:`.recording.SequenceFirst`
    instead): inputs from ``(B, *rest)`` to ``(B', *rest)`` or not at all (shared by the samples),
    outputs from ``(B, *rest)`` to ``(B', *rest)`` (an input of a unit on the per-module
    fallback that stays the same though it leads with ``B`` raises
    :class:`.recording.WholeInputs`: the fallback is to pass it whole); a call's input with
    positions folded
    into the batch dimension (:data:`.rules.FOLDABLE`) must be, for the first ``B'``
    samples, the first rows of the whole batch's (positions first, ``(T B, ...)``, are not),
    and its blocks of rows must follow the samples in reverse order (:func:`check_folds`).
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
    expanding = set(expanded_units(records))
    first_samples = batch.samples(0, fewer)  # (the model may not take another batch size)
    samples = set(batch.sample_shapes())
    records_again, alone = _recorded_again(
        model, units, first_samples, output_fn, expanding, f"{fewer} samples"
    )
    untold: dict[tuple[str, int], bool] = {}  # (calls taken the wrong way: see SequenceFirst)
    # (the parameters of the units with outputs the samples may share, and the first why)
    batchless: set[str] = set()
    why_batchless = ""
    # (the inputs the per-module fallback is to pass whole, by unit, and the first why)
    whole: dict[str, set[tuple[int, int]]] = {}
    why_whole = ""
    for unit in units:
        record, again = records.get(unit), records_again.get(unit)
        if record is None:
            continue
        calls, calls_again = record.calls(), [] if again is None else again.calls()
        if [(len(c.inputs), len(c.outputs)) for c in calls] != [
            (len(c.inputs), len(c.outputs)) for c in calls_again
        ]:
            raise Unsupported(f"{describe(unit.path)} is called differently on fewer samples")
        inputs, outputs = batch_dims_of(unit, record)
        # (tensor arguments all of one sample's shape and the same on fewer samples, as the
        # unit gets them (an input may be recorded unfolded): shared, though the batch size is
        # among their dimensions; see SharedWithBatchRows)
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
        # (a call whose outputs the samples may share, their rows taken for folded positions:
        # PEFT's DoRA calls lora_A on an identity matrix (6, 6), taken for 2 rows per sample
        # with 3 samples and 3 with 2, beside its call on the batch)
        outputs_then = next(
            (
                then
                for call, call_again in zip(calls, calls_again)
                if (then := [_refolded(s, call.folded) for s in call.outputs])
                and then == [_refolded(s, call_again.folded) for s in call_again.outputs]
            ),
            None,
        )
        if outputs_then is not None:
            why_batchless = why_batchless or (
                f"the outputs of a call of {describe(unit.path)} have the same shapes, "
                f"{[tuple(s) for s in outputs_then]}, with {size} samples and with {fewer}"
            )
            batchless.update(unit.names.values())
            continue
        pairs = []  # (an input's with its (call, tensor) position; an output's with None)
        for c, (call, call_again) in enumerate(zip(calls, calls_again)):
            pairs += [
                (s, t, (c, i), nth(inputs, i))
                for i, (s, t) in enumerate(zip(call.inputs, call_again.inputs))
            ]
            pairs += [
                (s, t, None, nth(outputs, i))
                for i, (s, t) in enumerate(zip(call.outputs, call_again.outputs))
            ]
        for full, part, where, dim in pairs:
            may_be_shared = where is not None
            kind = "an input" if may_be_shared else "an output"
            if part == (*full[:dim], fewer, *full[dim + 1 :]):
                continue
            if shared:
                raise SharedWithBatchRows(
                    unit.path,
                    f"the inputs of {describe(unit.path)} are shared by the samples, with the "
                    f"batch size ({size}) among their dimensions",
                )
            if may_be_shared and part == full:
                if full[0] == size and not by_rule(unit, record) and where not in unit.whole:
                    whole.setdefault(unit.path, set()).add(where)
                    why_whole = why_whole or (
                        f"{kind} of {describe(unit.path)} is shared by the samples (shape "
                        f"{tuple(full)} with {size} samples and with {fewer}) but has the batch "
                        "size as leading dimension"
                    )
                continue
            if unit.path in expanding:  # (a shared (2, ...) input looks per-sample)
                raise Unsupported(
                    f"the inputs the samples share of {describe(unit.path)} could not be told "
                    f"from per-sample ones on {fewer} samples, to check the batch dimension"
                )
            problem = (
                f"the batch is not the leading dimension of {kind} of {describe(unit.path)}: "
                f"it has shape {tuple(full)} with {size} samples and {tuple(part)} with "
                f"{fewer} (a sequence-first (T, B, ...) layout, or shapes that depend on which "
                "samples are in the batch?)"
            )
            if not may_be_shared and part == full:  # (an output the samples may share)
                why_batchless = why_batchless or problem
                batchless.update(unit.names.values())
                break
            raise Unsupported(problem)
        first = first_batch_dim(unit)
        for call, call_again in zip(calls, calls_again):
            if call.folded > 1 and not same_output(
                call_again.args[0], call.args[0].narrow(first, 0, fewer)
            ):
                raise Unsupported(_not_folded(unit, call, f"the first {fewer} samples alone"))
    if batchless:
        raise Batchless(why_batchless, frozenset(batchless))
    if untold:
        paths = list(dict.fromkeys(path for path, _ in untold))
        raise SequenceFirst(
            untold,
            f"the layout of the inputs of {', '.join(map(describe, paths))}, sequence-first "
            f"(T, B, ...) or not, could not be told from their shapes with {size} samples, "
            f"and {fewer} samples show it",
        )
    if whole:
        inputs = {path: frozenset(where) for path, where in whole.items()}
        raise WholeInputs(inputs, f"{why_whole}: the per-module fallback passes it whole")
    if has_folded_calls(records):
        check_folds(model, units, batch, output_fn, records, expanding)
    # (an output that is no tensor, (logits, aux_loss), is refused when the vectors are made)
    if isinstance(output, Tensor) and _differ([output], alone, size, fewer):
        # (the model itself, or the shared inputs expanded here? only the first is warned of)
        mixed = not expanding or _mixes_samples(model, batch, first_samples, output_fn)
        raise (SamplesMixed if mixed else Unsupported)(
            f"the model's output for the first {fewer} samples differs when they are run "
            "alone: the samples are mixed (batch statistics computed outside a batch-norm "
            "module in eval mode?), the inputs are not per-sample along their first "
            f"dimension ({batch.layout()}), or the model is not deterministic in eval mode"
        )


def _differ(together: list[Any], alone: list[Any], size: int, fewer: int) -> bool:
    """Whether the output leaves ``alone`` of the first ``fewer`` samples differ from their rows
    of the output leaves ``together`` of all ``size`` (leaves that are not per-sample whole)."""
    return len(together) != len(alone) or not all(
        same_output(a, t[:fewer] if is_per_sample(t, size) else t) for t, a in zip(together, alone)
    )


def _mixes_samples(model: nn.Module, batch: Batch, part: Batch, output_fn: OutputFn) -> bool:
    """Whether the model as it is (no unit's shared inputs expanded, nothing recorded) gives the
    samples of ``part``, the first of ``batch``, another output alone than in ``batch``."""
    with torch.no_grad(), TablesKept():
        together = pytree.tree_leaves(output_fn(batch.call(model)))
        alone = pytree.tree_leaves(output_fn(part.call(model)))
    return _differ(together, alone, batch.size, part.size)


def _recorded_again(
    model: nn.Module,
    units: list[Unit],
    batch: Batch,
    output_fn: OutputFn,
    expanding: set[str],
    run: str,
) -> tuple[dict[Unit, Record], list[Any]]:
    """The units' records and the model's output leaves on ``batch``, for a check: without
    gradients, the embedding tables kept (:class:`TablesKept`), only the shared inputs of the
    units at ``expanding`` expanded, and without the recorder's mode (the records are all a
    check reads). A model failing there raises :class:`.recording.Unsupported` (``run``: on
    what)."""
    recording = Recorder(units, batch, expanding, watch=False)
    try:
        with torch.no_grad(), TablesKept(), recording:
            output = pytree.tree_leaves(output_fn(batch.call(model)))
    except Exception as error:
        raise Unsupported(
            f"the batch dimension could not be checked: the model failed on {run} "
            f"({type(error).__name__}: {error})"
        ) from error
    return recording.records, output


def structure_of(records: dict[Unit, Record]) -> tuple[Any, ...]:
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


def has_folded_calls(records: dict[Unit, Record]) -> bool:
    """Whether some call has positions folded into its batch dimension."""
    return any(call.folded > 1 for record in records.values() for call in record.calls())


def _not_folded(unit: Unit, call: Record, run: str) -> str:
    (size, positions, *rest) = call.args[0].shape
    return (
        f"an input of {describe(unit.path)} has shape {(size * positions, *rest)}, with "
        f"{positions} rows per sample folded into the batch dimension, but its rows for "
        f"{run} differ: they are not each sample's {positions} positions one sample after "
        "another (positions first, (T B, ...)? or a number of rows that differs between "
        "samples?)"
    )


def check_folds(
    model: nn.Module,
    units: list[Unit],
    batch: Batch,
    output_fn: OutputFn,
    records: dict[Unit, Record],
    expanding: set[str],
) -> None:
    """Raise :class:`.recording.Unsupported` unless, for every call with positions folded into its
    batch dimension (``(B T, ...)``, :data:`.rules.FOLDABLE`), the model on the batch in reverse
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
        if unit not in units:  # (the per-sample copies of loose parameters: no module calls)
            continue
        again = records_again.get(unit)
        calls, calls_again = record.calls(), [] if again is None else again.calls()
        if len(calls) != len(calls_again):
            raise Unsupported(f"{describe(unit.path)} is called differently in another order")
        first = first_batch_dim(unit)
        for call, call_again in zip(calls, calls_again):
            if call.folded > 1 and not (
                call_again.args[0].shape == call.args[0].shape
                and same_output(call_again.args[0].flip(first), call.args[0])
            ):
                raise Unsupported(_not_folded(unit, call, "the samples in reverse order"))


#: The lookups that renormalise an embedding table with ``max_norm`` (see :class:`TablesKept`).
_LOOKUP_SIGNATURES = {f: inspect.signature(f) for f in (F.embedding, F.embedding_bag)}


class TablesKept(TorchFunctionMode):
    """Inside the block, embeddings with ``max_norm`` do not renormalise their tables in place:
    for the checks' passes over some of the batch's samples, whose rows the pass over the whole
    batch renormalised already (again it would change no value, but bump the table's version,
    which that pass's graph saved for its backward when the table is tied to an output
    layer)."""

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        if func in _LOOKUP_SIGNATURES:  # (F.embedding, F.embedding_bag: called without max_norm)
            bound = _LOOKUP_SIGNATURES[func].bind(*args, **(kwargs or {}))
            bound.arguments["max_norm"] = None
            return func(*bound.args, **bound.kwargs)
        return func(*args, **(kwargs or {}))


class Precisions(TorchFunctionMode):
    """Inside the block, the lowest floating-point precision each of ``params`` is cast to by
    the operations that take it, by name, in :attr:`lowest` (only those cast below their own:
    Gemma's RMS norm computes ``x̂ (1 + w)`` with ``w.float()`` in a float64 model, so plain
    autograd's gradient of ``w`` is a float32 product, about ``1e-7`` from a rule's float64
    one, which is no worse)."""

    def __init__(self, params: dict[str, Tensor]) -> None:
        super().__init__()
        self.names = {id(p): name for name, p in params.items()}
        self.lowest: dict[str, torch.dtype] = {}

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        result = func(*args, **(kwargs or {}))
        for given in tensors_in((args, kwargs)):
            name = self.names.get(id(given))
            if name is None:
                continue
            for made in tensors_in(result):
                lowest = self.lowest.get(name, given.dtype)
                if made.is_floating_point() and _eps(made.dtype) > _eps(lowest):
                    self.lowest[name] = made.dtype
        return result


def _eps(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps if dtype.is_floating_point else 0.0


def expanded_units(records: dict[Unit, Record]) -> list[str]:
    """The paths of the units with a call on inputs expanded over the batch."""
    return [
        unit.path
        for unit, record in records.items()
        if any(call.expanded for call in record.calls())
    ]


def check_expansion(
    model: nn.Module, units: list[Unit], batch: Batch, output_fn: OutputFn, paths: list[str]
) -> None:
    """Raise :class:`.recording.ExpansionFailed` if expanding the shared inputs of the units at
    ``paths`` over the batch (:func:`.recording._expand_shared`), or their shared output
    (:func:`.recording._shared_output`), changes the model's output: the model on the first two
    samples, with and without the expansion, without gradients. The values the units compute
    are the same either way, but the code after them sees a batch dimension of ``B`` where it
    saw 1 or none (a ``squeeze(0)`` that no longer squeezes, a mean over dimension 0). On the
    two samples the same units' inputs (or outputs) are expanded, as
    :func:`check_batch_layout` (on as many samples, or the whole batch) found."""
    few = batch.samples(0, 2)
    shared = ", ".join(map(describe, paths))
    try:
        with torch.no_grad(), TablesKept():
            plain = pytree.tree_leaves(output_fn(few.call(model)))
            with Recorder(units, few, set(paths), watch=False):
                again = pytree.tree_leaves(output_fn(few.call(model)))
    except Exception as error:  # (the model may not take the expanded inputs)
        raise ExpansionFailed(
            f"the inputs (or output) the samples share of {shared} could not be expanded over "
            f"the batch ({type(error).__name__}: {error})",
            frozenset(paths),
        ) from error
    if len(plain) != len(again) or not all(map(same_output, plain, again)):
        raise ExpansionFailed(
            f"expanding the inputs (or output) the samples share of {shared} over the batch "
            "(for per-sample gradients) changes the model's output",
            frozenset(paths),
        )
