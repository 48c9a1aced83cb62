r"""Per-layer rules for the hook engine: diagonal sums from a layer's input and output gradients.

A rule sees one call :math:`y = \phi(x; \theta)` of a layer on a batch, its input ``x`` (leading
dimension ``B``) and the gradients of the pulled-back vectors with respect to its output,
``G`` of shape ``(K, B, *y.shape[1:])`` (:math:`G_{nk} = (\partial f(x_n)/\partial y_n)^\top
v_{nk}`). It returns, for each of the layer's parameters named in ``names``,

.. math::

    \sum_{n=1}^{B} \sum_{k=1}^{K} \Big(\big(\partial y_n / \partial\theta\big)^\top
    G_{nk}\Big)^{\odot 2},

in the accumulation dtype, keyed by the layer's own parameter names. ``G`` may have any strides (the
engine's looped pull-back stores it ``(B, K, ...)``); a rule with a reduction in :data:`REDUCTIONS`
gets ``G`` reduced by it instead, which the engine applies to each vector's gradients as they come
(all sums here are sums over the vectors of per-vector terms). Where the per-sample gradients
:math:`(\partial y_n/\partial\theta)^\top G_{nk}` must be materialised they are built for a chunk of
samples at a time, so that the chunk's temporaries stay within ``budget`` bytes.

A rule in :data:`CALL_RULES` (``nn.MultiheadAttention``, in :mod:`.attention`: several inputs,
masks, two outputs) sees the whole recorded call instead, ``(args, kwargs)``, and ``G`` of each
output leaf that got gradients, by its position among the output's pytree leaves; it may decline
a call (``None``), and the engine then uses its per-module fallback. Such a rule may come with a
recorded forward (:data:`RECORDED_FORWARDS`), which the engine runs in place of the module's
``forward`` while it records: it computes the same output in pieces and keeps some of them by
name, the rule then getting their values and ``G`` of those it pulled back to. A rule with an
accumulation (:data:`ACCUMULATIONS`: ``Linear``, the attention) has its sums built by an
:class:`Accumulator` fed any number of vectors at a time, which the engine feeds each vector's
gradients as the looped pull-back makes them.

Rules are looked up by the module's exact class (a subclass may override ``forward``) in
:data:`RULES`, or for a class of another library, which is not imported here, by its qualified
name (``"transformers.pytorch_utils.Conv1D"``), or, for Hugging Face's RMS norms, by what they
compute (:func:`is_hugging_face_rms_norm`), or for a subclass of a ruled class that defines
nothing but how it is made (``__init__``, ``extra_repr``: :data:`CONSTRUCTION_ONLY`), by its
base's; :func:`rule_for` also requires that the
module's parameters (those of the modules inside it included) are among those the rule knows
(``weight`` and ``bias`` for most) and that nobody sets its ``forward``, registers forward
hooks for every module, or hooks a module whose rule is in :data:`CALL_RULES` (each may change
what the rule takes the module to compute). The forward hooks and pre-hooks of a module with
another rule stay outside what the rule computes: the engine records the call's arguments
after the module's pre-hooks have run and its output before its forward hooks run
(:func:`hooks_outside`), so that what the hooks do to the inputs and outputs is part of the
network around the module, as the pull-back sees it.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import math
from collections.abc import Callable, Collection, Iterator
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules import module as modules

from . import base
from .base import accumulation_dtype

#: ``rule(module, x, G, names, budget) -> {name: sum}`` for the module's parameters ``names``
#: (see the module docstring).
Rule = Callable[[nn.Module, Tensor, Tensor, Collection[str], int], dict[str, Tensor]]

#: Maps one vector's (or several: any leading dimensions) output gradients
#: ``(..., B, *y.shape[1:])`` to the smaller ``(..., B, *r)`` a rule needs (the engine's
#: reducers feeding an :class:`Accumulator` return ``None``: nothing to keep).
Reducer = Callable[[Tensor], "Tensor | None"]

#: ``reduction(module, x, names) -> reducer``: prepared once per call (say, :math:`\hat x`).
Reduction = Callable[[nn.Module, Tensor, Collection[str]], Reducer]

#: ``rule(module, args, kwargs, G, kept, names, budget) -> {name: sum} | None`` for the rules of
#: :data:`CALL_RULES`: ``G`` maps the positions of the output's pytree leaves that got gradients,
#: and the names of the kept pieces pulled back to, to those gradients; ``kept`` maps the names
#: of the pieces its recorded forward kept to the pieces; ``None`` declines the call.
CallRule = Callable[
    [
        nn.Module,
        tuple[Any, ...],
        dict[str, Any],
        dict[int | str, Tensor],
        dict[str, Tensor],
        Collection[str],
        int,
    ],
    "dict[str, Tensor] | None",
]

#: ``forward(module, args, kwargs, keep) -> output``, or ``NotImplemented`` to let the module
#: run as usual: ``keep(name, tensor, pull_back)`` records a piece (and returns it).
RecordedForward = Callable[
    [nn.Module, tuple[Any, ...], dict[str, Any], Callable[[str, Tensor, bool], Tensor]], Any
]

#: Rules by module class (or a class's qualified name, ``module.QualName``), each with a
#: predicate on the module's settings it can handle and the names of the parameters it knows
#: (recursively: ``"out_proj.weight"``), or a function of the module giving them.
RULES: dict[
    type[nn.Module] | str,
    tuple[
        Rule | CallRule,
        Callable[[nn.Module], bool],
        frozenset[str] | Callable[[nn.Module], Collection[str]],
    ],
] = {}

#: For the rules of :data:`CALL_RULES` whose tensors do not all lead with the batch: a function
#: of the module giving the batch dimension of each tensor input and each output leaf (by
#: position; those past the end lead with it), as when its recorded forward runs (a recurrent
#: layer's final states ``(layers, B, H)``: 1; its input and output when sequence-first: 1).
BATCH_DIMS: dict[CallRule, Callable[[nn.Module], tuple[tuple[int, ...], tuple[int, ...]]]] = {}

#: The rules that take the whole recorded call (see the module docstring).
CALL_RULES: set[CallRule] = set()

#: The recorded forwards of rules of :data:`CALL_RULES` (see the module docstring).
RECORDED_FORWARDS: dict[CallRule, RecordedForward] = {}

#: The rules of :data:`RECORDED_FORWARDS` that need the gradients of the pieces their recorded
#: forward pulls back to only: the engine pulls back to none of their module's outputs (a
#: norm-activation layer's output, past its activation: :mod:`.norm_act`).
PIECES_ONLY: set[CallRule] = set()


class Accumulator(Protocol):
    """Running sums of one recorded call, fed the output gradients a few vectors at a time."""

    def add(self, key: int | str, grads: Tensor) -> None:
        """Add the terms of ``grads`` ``(..., B, *shape)`` (any number of vectors in front) of
        the output leaf or kept piece ``key``."""

    def sums(self) -> dict[str, Tensor]:
        """The sums so far, keyed by the module's own parameter names."""


#: ``start(module, args, kwargs, kept, names, budget) -> Accumulator`` (or ``None``, declining
#: the call, as the rule would).
Accumulation = Callable[
    [nn.Module, tuple[Any, ...], dict[str, Any], dict[str, Tensor], Collection[str], int],
    "Accumulator | None",
]


def feed_all(
    accumulator: Accumulator | None, grads: dict[int | str, Tensor]
) -> dict[str, Tensor] | None:
    """A whole-call rule's sums from its accumulator fed all the gradients at once (``None``
    where the accumulation declined the call)."""
    if accumulator is None:
        return None
    for key, g in grads.items():
        accumulator.add(key, g)
    return accumulator.sums()


#: Rules whose sums add up over the vectors, with the accumulator the engine feeds instead of
#: calling the rule: with the looped pull-back, each vector's gradients as they come, so that
#: the ``K`` of them are never kept (less memory, no copies into ``(B, K, ...)`` buffers).
ACCUMULATIONS: dict[Rule | CallRule, Accumulation] = {}

#: Rules whose ``G`` is reduced as the pull-back produces it, one vector at a time (then ``G``
#: is ``(K, B, *r)``): the engine keeps the small reduced gradients instead of the layer's
#: whole output gradients. A reduction gives per-sample gradients (linear in ``G``, not yet
#: squared), so those of several calls of the layer add up (the engine sums them for a layer
#: called more than once per forward pass).
REDUCTIONS: dict[Rule, Reduction] = {}

#: ``several(module, xs, grads, names, budget) -> {name: sum}``: a rule's sums over several calls
#: of its layer (their inputs ``xs`` and output gradients ``grads``, as the rule takes them).
SeveralCalls = Callable[
    [nn.Module, list[Tensor], list[Tensor], Collection[str], int], dict[str, Tensor]
]

#: Rules that also take several calls of their layer at once (a convolution's per-sample
#: gradient is a sum over the output positions of all its calls), for a layer called more than
#: once per forward pass.
SEVERAL_CALLS: dict[Rule, SeveralCalls] = {}

#: Rules of layers that treat every position alike: for ``x: (B, *S, *F)`` and ``y: (B, *S,
#: *D)``, position ``s`` of ``y`` depends on position ``s`` of ``x`` only, through the same
#: parameters, and a sample's gradient is the sum over positions (``Linear``: ``F = (in,)``,
#: ``D = (out,)``; an embedding: ``F = ()``). A function of the module gives ``len(F)`` and
#: ``len(D)`` (``None`` for a module the rule handles otherwise). Several calls of such a
#: layer are one call on their positions side by side: the engine joins the calls of a layer
#: called more than once per forward pass (``(B, S_1 + S_2 + ..., *F)``, ``G`` alike) and the
#: rule sums per-sample gradients over the calls before squaring. For a rule of
#: :data:`CALL_RULES`, the positions are those of the pieces its recorded forward keeps, batch
#: first; so a call on ``k`` rows per sample folded into the batch dimension (``(B k, T, in)``
#: into a recurrent layer) is the call on its pieces unfolded, ``(B, k, T, ...)``.
POSITIONWISE: dict[Rule | CallRule, Callable[[nn.Module], tuple[int, int] | None]] = {}

#: Rules of layers called as ``module(x)`` that treat every index of the leading dimensions of
#: ``x`` alike (the position-wise layers, and the layer and RMS norms, which normalise trailing
#: dimensions), and take any number of them, each with a function of the module giving the
#: number of trailing feature dimensions of ``x`` (``Linear``: 1; an embedding: 0; a layer
#: norm: those of its ``normalized_shape``). A call on per-sample data folded into the batch
#: dimension, ``x`` of shape ``(B T, *F)`` with sample ``n`` in rows ``nT`` to ``nT + T - 1``
#: (``hidden.view(-1, D)`` before a feed-forward block, windows of an image), is the call on
#: ``x`` of shape ``(B, T, *F)``, its output gradients alike; so is a call on a
#: sequence-first ``x`` of shape ``(T, B, *F)``, transposed (the engine unfolds or
#: transposes both: :mod:`.hooks`).
FOLDABLE: dict[Rule, Callable[[nn.Module], int]] = {}


def register(
    *types: type[nn.Module] | str,
    accepts: Callable[[nn.Module], bool] = lambda module: True,
    reduce: Reduction | None = None,
    params: Collection[str] | Callable[[nn.Module], Collection[str]] = ("weight", "bias"),
    whole_call: bool = False,
    forward: RecordedForward | None = None,
    pieces_only: bool = False,
    accumulate: Accumulation | None = None,
    batch_dims: Callable[[nn.Module], tuple[tuple[int, ...], tuple[int, ...]]] | None = None,
    positionwise: Callable[[nn.Module], tuple[int, int] | None] | None = None,
    several_calls: SeveralCalls | None = None,
    foldable: Callable[[nn.Module], int] | None = None,
) -> Callable[[Any], Any]:
    """Decorator adding a rule to :data:`RULES` for the module classes ``types``, knowing the
    parameters ``params`` (its reduction, if any, to :data:`REDUCTIONS`; with ``whole_call``,
    the rule to :data:`CALL_RULES`, its recorded ``forward``, if any, to
    :data:`RECORDED_FORWARDS` (with ``pieces_only``, the rule to :data:`PIECES_ONLY`) and its
    ``batch_dims`` to :data:`BATCH_DIMS`; its
    accumulation, if any, to :data:`ACCUMULATIONS`; its feature dimensions, if
    ``positionwise``, to :data:`POSITIONWISE`; its ``several_calls``, if any, to
    :data:`SEVERAL_CALLS`; its ``foldable`` feature dimensions, if any, to :data:`FOLDABLE`)."""

    def add(rule: Any) -> Any:
        for cls in types:
            RULES[cls] = (rule, accepts, params if callable(params) else frozenset(params))
        if reduce is not None:
            REDUCTIONS[rule] = reduce
        if whole_call:
            CALL_RULES.add(rule)
        if forward is not None:
            RECORDED_FORWARDS[rule] = forward
        if pieces_only:
            PIECES_ONLY.add(rule)
        if accumulate is not None:
            ACCUMULATIONS[rule] = accumulate
        if batch_dims is not None:
            BATCH_DIMS[rule] = batch_dims
        if positionwise is not None:
            POSITIONWISE[rule] = positionwise
        if several_calls is not None:
            SEVERAL_CALLS[rule] = several_calls
        if foldable is not None:
            FOLDABLE[rule] = foldable
        return rule

    return add


def feature_dims(rule: Rule | CallRule | None, module: nn.Module) -> tuple[int, int] | None:
    """The numbers of feature dimensions of the input and output of ``module``, if ``rule``
    treats positions alike on it (see :data:`POSITIONWISE`), else ``None``."""
    dims = POSITIONWISE.get(rule) if rule is not None else None
    return None if dims is None else dims(module)


def qualified_name(module: nn.Module) -> str:
    """The qualified name of ``module``'s class (``"timm.layers.linear.Linear"``), by which the
    rules of other libraries' layers are registered."""
    return _class_name(type(module))


def _class_name(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _in_transformers(*paths: str) -> tuple[str, ...]:
    """The qualified names of Hugging Face transformers' classes at ``paths`` under
    ``transformers.models`` (``"bart.modeling_bart.BartScaledWordEmbedding"``)."""
    return tuple(f"transformers.models.{path}" for path in paths)


#: What a subclass of a ruled class may define and keep its base's rule: how it is made and
#: printed, not what it computes (Hugging Face EfficientNet's ``EfficientNetDepthwiseConv2d``,
#: an ``nn.Conv2d`` with an ``__init__`` of its own; PoolFormer's ``nn.GroupNorm``).
CONSTRUCTION_ONLY = frozenset(
    {
        "__init__",
        "__module__",
        "__qualname__",
        "__doc__",
        "__annotations__",
        "__firstlineno__",
        "__static_attributes__",
        "__dict__",
        "__weakref__",
        "__constants__",
        "extra_repr",
        "reset_parameters",
    }
)


def _ruled_base(cls: type) -> Any:
    """The :data:`RULES` key of ``cls``'s nearest ruled base class (by class or qualified
    name), when ``cls`` and the classes between define nothing beyond
    :data:`CONSTRUCTION_ONLY` (any other name, a helper its base's ``forward`` calls among
    them, may change what it computes), else ``None``."""
    for between, ruled in itertools.pairwise(cls.__mro__):
        if set(vars(between)) - CONSTRUCTION_ONLY:
            return None
        for key in (ruled, _class_name(ruled)):
            if key in RULES:
                return key
    return None


def class_entry(cls: type) -> tuple[Any, Any, Any] | None:
    """The :data:`RULES` entry of ``cls`` (by class or qualified name), or of a base class it
    adds nothing to but how it is made (:func:`_ruled_base`), or ``None``."""
    entry = RULES.get(cls) or RULES.get(_class_name(cls))
    if entry is None:
        base = _ruled_base(cls)
        entry = None if base is None else RULES[base]
    return entry


def _entry(module: nn.Module) -> tuple[Any, Any, Any] | None:
    """The :data:`RULES` entry of ``module``'s class (:func:`class_entry`), or for a Hugging
    Face RMS norm (:func:`is_hugging_face_rms_norm`) theirs, or ``None``."""
    entry = class_entry(type(module))
    if entry is None and is_hugging_face_rms_norm(module):
        entry = RULES[HUGGING_FACE_RMS_NORM]
    return entry


def class_rule(module: nn.Module) -> Rule | CallRule | None:
    """The rule of ``module``'s class, whatever the module's settings, parameters and hooks
    (what it computes is not checked: :func:`rule_for` is)."""
    entry = _entry(module)
    return None if entry is None else entry[0]


def rule_for(module: nn.Module) -> Rule | CallRule | None:
    """The rule computing ``module``'s sums, or ``None`` when it has none (see the module
    docstring)."""
    entry = _entry(module)
    if entry is None or global_forward_hooks():
        return None
    if "forward" in vars(module):  # (its own forward, set on the instance)
        return None
    rule, accepts, known = entry
    if rule in CALL_RULES and (module._forward_hooks or module._forward_pre_hooks):
        return None
    if not accepts(module):
        return None
    names = {name for name, _ in module.named_parameters()}
    return rule if names <= _known_names(module, known) else None


def _known_names(
    module: nn.Module, known: frozenset[str] | Callable[[nn.Module], Collection[str]]
) -> set[str]:
    """The names of the parameters a :data:`RULES` entry's rule knows, for ``module``."""
    return set(known(module) if callable(known) else known)


def pruned_rule(module: nn.Module) -> tuple[Rule, dict[str, str]] | None:
    """The rule of a module pruned by ``torch.nn.utils.prune``, and its pruned parameters'
    names with those of the tensors made of them (``{"weight_orig": "weight"}``), or
    ``None``. Such a module's pre-hooks make each pruned tensor ``t = t_orig * t_mask`` (its
    buffer) before every call, so its parameters' names are not its class rule's and it has
    no rule (:func:`rule_for`); it computes what its class's rule knows, with ``t`` for the
    tensor of that name. So for a module with no other hooks whose class has a rule that is
    neither a whole call's nor one of reduced gradients (:data:`REDUCTIONS`: a pruned norm
    stays on the per-module fallback). On that fallback, five pruned convolutions of the
    reduced ResNet-18 took 1.66 s of a 2.5 s call, all the others' rules 0.22 s."""
    from torch.nn.utils import prune

    hooks = list(module._forward_pre_hooks.values())
    if not hooks or module._forward_hooks or global_forward_hooks() or "forward" in vars(module):
        return None
    if not all(isinstance(hook, prune.BasePruningMethod) for hook in hooks):
        return None
    made = {f"{hook._tensor_name}_orig": hook._tensor_name for hook in hooks}
    entry = _entry(module)
    if entry is None or entry[0] in CALL_RULES or entry[0] in REDUCTIONS or not entry[1](module):
        return None  # (a rule of reduced gradients takes what its reduction gives, not G)
    rule, _, known = entry
    names = {made.get(name, name) for name, _ in module.named_parameters()}
    masks = all(isinstance(getattr(module, f"{t}_mask", None), Tensor) for t in made.values())
    return (rule, made) if masks and names <= _known_names(module, known) else None


def hooks_outside(rule: Rule | CallRule | None) -> bool:
    """Whether a module's own forward pre-hooks and hooks lie outside what is recorded of its
    calls (its rule is ``rule``): the arguments recorded after its pre-hooks, the output
    before its hooks, and the per-module fallback running its ``forward`` alone. So for a
    module with a rule (which :func:`rule_for` gives a hooked module only where this holds);
    a module without one has its hooks inside, so that its fallback runs them as the model
    did (a pre-hook making the weight from other parameters, as ``torch.nn.utils.prune``
    does)."""
    return rule is not None


def global_forward_hooks() -> bool:
    """Whether forward hooks registered for every module
    (``torch.nn.modules.module.register_module_forward_hook``) are set: they may change any
    layer's output, as a module's own hooks may (pre-hooks for every module keep a model off
    the hook engine: :func:`.recording.plan`)."""
    return bool(getattr(modules, "_global_forward_hooks", None))


def global_forward_pre_hooks() -> bool:
    """Whether forward pre-hooks registered for every module are set."""
    return bool(getattr(modules, "_global_forward_pre_hooks", None))


def global_backward_pre_hooks() -> bool:
    """Whether backward pre-hooks registered for every module are set."""
    return bool(getattr(modules, "_global_backward_pre_hooks", None))


@functools.lru_cache(maxsize=64)
def _forward_signature(cls: type[nn.Module]) -> inspect.Signature:
    return inspect.signature(cls.forward)


def call_arguments(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict:
    """A recorded call's arguments by the names of the module's ``forward``, defaults
    included (for the rules of :data:`CALL_RULES`: a call may pass its inputs by keyword)."""
    call = _forward_signature(type(module)).bind(module, *args, **kwargs)
    call.apply_defaults()
    return call.arguments


def acc_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a layer's sums accumulate in (float32 for a half-precision weight)."""
    return accumulation_dtype(module.weight.dtype)


def added(total: Tensor | None, term: Tensor) -> Tensor:
    """``total + term``, added in place; ``term`` itself (not a copy) where ``total`` is
    ``None``: the first terms are the running sums, with no zeros made to add them to."""
    return term if total is None else total.add_(term)


#: Sums over more terms than this (a ``Linear``'s contraction over a batch of 1e5 samples, an
#: embedding row looked up in every sample) go in two levels: blocks of about :math:`\sqrt n`
#: terms each, then the blocks' sums. A matmul with few rows and columns, and ``index_add_``,
#: add their terms in sequence, and in float32 the error grows with their number: a 4-6-3 MLP's
#: first-layer weights were 2.0e-5 off at one batch of 1e5 samples, an embedding's rows
#: 1.3e-4, where the functorch engine's sums stay at ~1e-7.
SEQUENTIAL_TERMS = 1024


def _block(terms: int) -> int:
    """The terms per block of a two-level sum of ``terms`` (all of them up to
    :data:`SEQUENTIAL_TERMS`)."""
    return max(terms, 1) if terms <= SEQUENTIAL_TERMS else math.isqrt(terms - 1) + 1


def sample_products(a: Tensor, b: Tensor) -> Tensor:
    r"""``(B, m), (B, n) -> (m, n)``: :math:`a^\top b`, in two levels (:data:`SEQUENTIAL_TERMS`):
    one matmul per block of samples, its result added to the others' (not ``addmm_``: that
    adds each product into the running sum)."""
    step = _block(a.shape[0])
    total = a[:step].mT @ b[:step]
    for start in range(step, a.shape[0], step):
        total += a[start : start + step].mT @ b[start : start + step]
    return total


def add_rows(table: Tensor, index: Tensor, values: Tensor) -> Tensor:
    r"""``table.index_add_(0, index, values)`` (``(R, *D), (P,), (P, *D)``: :math:`T_r \mathrel{+}=
    \sum_{p: i_p = r} V_p`), in two levels (:data:`SEQUENTIAL_TERMS`): the terms of each block
    summed per row, then those sums added into ``table``."""
    terms = index.numel()
    if terms <= SEQUENTIAL_TERMS:
        return table.index_add_(0, index, values)
    rows = table.shape[0]
    block = torch.arange(terms, device=index.device) // _block(terms)
    keys, where = torch.unique(block * rows + index, return_inverse=True)
    partial = values.new_zeros(keys.numel(), *values.shape[1:]).index_add_(0, where, values)
    return table.index_add_(0, keys % rows, partial)


def square_sum(per_sample: Tensor) -> Tensor:
    """``(K, B, *shape) -> (*shape)``: the sum of squares over vectors and samples."""
    return per_sample.square().sum((0, 1))


def sum_or_squeeze(t: Tensor, dim: int) -> Tensor:
    """``t.sum(dim)``; a dimension of size 1 is squeezed instead (reducing it is slow)."""
    return t.squeeze(dim) if t.shape[dim] == 1 else t.sum(dim)


def sample_chunks(batch: int, bytes_per_sample: int, budget: int) -> Iterator[slice]:
    """Slices of ``batch`` samples, as many per slice as fit in ``budget`` bytes (one at
    least)."""
    step = max(1, budget // max(bytes_per_sample, 1))
    for start in range(0, batch, step):
        yield slice(start, start + step)


#: Matmul multiply-adds that cost about as much time as one memory pass over one number, and the
#: passes each way of :func:`squared_products` makes per number it writes: the direct way's
#: ``K O P`` products, the Gram way's ``T (O + P)`` pair products (see :func:`_gram_is_faster`).
#: Fitted to 75 convolutions timed on the CPU (2 threads, B=32; K=9 and K=3; 3x3 and 1x1
#: kernels; 16 to 256 channels; 4 to 36 positions): these pick the faster way in 65 and lose
#: 10 ms in all, where the constants before (100, 4 and 3, set before the Gram way made its pair
#: products row by row) picked it in 46 and lost 255 ms, taking the Gram way up to 4.6 times
#: as slow (K=9, 64 channels, 1x1, 25 positions: 6.5 against 1.4 ms). The reduced ResNet-18's
#: layers keep their ways (the Gram way for its last stage).
MATMUL_SPEEDUP = 20
DIRECT_PASSES = 2
GRAM_PASSES = 4

#: Temporaries of one chunk of :func:`squared_products` are kept within this many bytes (or the
#: memory budget, if smaller). Smaller chunks are slower (the convolutions of a reduced ResNet-18
#: on 64 samples, 2 CPU threads: chunks of 8, 16, 32, 64 and 128 MiB took 1.60, 1.35, 1.10, 1.01
#: and 1 times as long as the last), larger ones gained nothing measurable over the whole Fisher
#: and cost memory. Only on CPU: on a GPU small chunks leave it idle between kernel launches, so
#: there the memory budget alone bounds the chunks.
CHUNK_BYTES = 32 * 2**20


def chunk_budget(budget: int, device: torch.device, cap: int = CHUNK_BYTES) -> int:
    """The bytes a rule's chunk of temporaries may take: ``budget``, and on CPU at most ``cap``
    (see :data:`CHUNK_BYTES`; not on a :func:`~.base.launch_bound` device)."""
    return budget if base.launch_bound(device) else min(budget, cap)


def _pairs(t: Tensor, weight: float = 1.0) -> Tensor:
    """``(..., L, L) -> (..., T)``: the entries ``(l, m)`` with ``l <= m``, row after row, those
    off the diagonal times ``weight``; ``T = L (L+1)/2``. On CPU a slice per row (one
    ``index_select`` was 5-17 times slower there); on a :func:`~.base.launch_bound` device one
    gather (two kernels with the weight, where the slices launch ``3 L``)."""
    positions = t.shape[-1]
    if base.launch_bound(t.device):
        rows, columns = _pair_indices(positions, t.device)
        out = t[..., rows, columns]
        return out if weight == 1.0 else out.mul_(_pair_weights(positions, t.device, weight))
    out = t.new_empty(*t.shape[:-2], positions * (positions + 1) // 2)
    start = 0
    for row in range(positions):
        stop = start + positions - row
        out[..., start] = t[..., row, row]
        if weight == 1.0:
            out[..., start + 1 : stop] = t[..., row, row + 1 :]
        else:
            torch.mul(t[..., row, row + 1 :], weight, out=out[..., start + 1 : stop])
        start = stop
    return out


def _outer_pairs(u: Tensor) -> Tensor:
    """``(..., L, P) -> (..., T, P)``: the products of rows ``u_l u_m`` for ``l <= m``, in
    :func:`_pairs`' order. On CPU ``u`` is copied into standard strides first, so that each
    row's products are one contiguous block (the patches come ``(..., P, L)``: reading them
    in place and writing ``(..., P, T)`` took 2.4-3 times as long for the reduced ResNet-18's
    last stage, 2 threads); on a :func:`~.base.launch_bound` device two gathers and one
    product."""
    positions = u.shape[-2]
    if base.launch_bound(u.device):
        rows, columns = _pair_indices(positions, u.device)
        return u[..., rows, :] * u[..., columns, :]
    u = u.contiguous()
    out = u.new_empty(*u.shape[:-2], positions * (positions + 1) // 2, u.shape[-1])
    start = 0
    for row in range(positions):
        stop = start + positions - row
        torch.mul(u[..., row : row + 1, :], u[..., row:, :], out=out[..., start:stop, :])
        start = stop
    return out


@functools.lru_cache(maxsize=64)  # (a few kinds of layers per model)
def _pair_indices(positions: int, device: torch.device) -> tuple[Tensor, Tensor]:
    """The row and column indices of the pairs ``l <= m``, in :func:`_pairs`' order."""
    rows, columns = torch.triu_indices(positions, positions, device=device)
    return rows, columns


@functools.lru_cache(maxsize=64)
def _pair_weights(positions: int, device: torch.device, weight: float) -> Tensor:
    """1 for the pairs ``l = m``, ``weight`` for the others, in :func:`_pairs`' order."""
    rows, columns = _pair_indices(positions, device)
    return torch.where(rows == columns, 1.0, weight)


def per_sample_products(grads: Tensor, patches: Tensor, chunk: slice) -> Tensor:
    r"""The per-sample, per-vector gradients :math:`D_{nkj} = G_{nkj} U_{nj}^\top` of the
    samples of ``chunk``, ``(b, g, K, O, P)``, in one batched matmul: ``grads`` is
    ``(K, B, g, O, L)`` (any strides) and ``patches`` the chunk's inputs, ``(b, g, P, L)`` or
    ``(b, g P, L)``."""
    g = grads[:, chunk].transpose(0, 1)  # (b, K, g, O, L)
    b, num_vectors, groups, out, positions = g.shape
    if groups > 1:
        g = g.transpose(1, 2)  # (b, g, K, O, L)
    u = patches.reshape(b * groups, -1, positions)
    products = torch.bmm(g.reshape(b * groups, num_vectors * out, positions), u.mT)
    return products.view(b, groups, num_vectors, out, -1)


def _gram_is_faster(num_vectors: int, out: int, patch: int, positions: int) -> bool:
    """Whether :func:`squared_products` takes its Gram way: its estimated cost (memory passes,
    :data:`GRAM_PASSES` per pair product, plus matmul multiply-adds divided by
    :data:`MATMUL_SPEEDUP`) below the direct way's (:data:`DIRECT_PASSES` per product)."""
    pairs = positions * (positions + 1) // 2
    direct_cost = num_vectors * out * patch * (DIRECT_PASSES + positions / MATMUL_SPEEDUP)
    gram_cost = pairs * (GRAM_PASSES * (out + patch) + out * patch / MATMUL_SPEEDUP)
    return gram_cost < direct_cost


def squared_products(
    grads: Tensor, patches_of: Callable[[slice], Tensor], patch: int, budget: int
) -> Tensor:
    r"""Weight sums of a layer whose per-sample gradient is a product over ``L`` positions.

    ``grads`` is ``(K, B, g, O, L)`` (any strides; ``(B, K, ...)`` storage is read without a
    copy for ``g = 1``) and ``patches_of(chunk)`` gives the chunk's inputs ``(b, g, P, L)``
    (``P = patch``); the per-sample, per-vector gradient of group ``j`` is
    :math:`D_{nkj} = G_{nkj} U_{nj}^\top` (``(O, P)``) and the result, ``(g, O, P)``, is
    :math:`\sum_{n,k} D_{nkj}^{\odot 2}`. Two ways, whichever is estimated faster
    (:func:`_gram_is_faster`):

    * direct: :math:`D` for a chunk of samples in one batched matmul (``K O P L``
      multiply-adds), squared and summed (four passes over ``K O P`` numbers, in cache);
    * Gram: expanding the square, :math:`\sum_{n,k} D_{nk}[o,p]^2 = \sum_n \sum_{l,m}
      A_n[o,l,m]\, U_n[p,l] U_n[p,m]` with :math:`A_n[o,l,m] = \sum_k G_{nk}[o,l]
      G_{nk}[o,m]`; both factors are symmetric in ``(l, m)``, so only the ``T = L (L+1)/2``
      pairs ``l <= m`` are kept, the others counted twice in :math:`A`: one matmul
      contracting over samples and pairs (``O P T`` multiply-adds; ``(O + P) T`` numbers per
      sample, written and read). For ``L = 1`` (a ``Linear`` on ``(B, in)``) this is
      :math:`(\sum_k G_k^{\odot 2})^\top x^{\odot 2}`.
    """
    num_vectors, batch, groups, out, positions = grads.shape
    size = grads.element_size()
    total = None  # (the first chunk's sums, the others added to them: see added())
    pairs = positions * (positions + 1) // 2
    budget = chunk_budget(budget, grads.device)
    if not _gram_is_faster(num_vectors, out, patch, positions):
        per_sample = groups * (num_vectors * out * (patch + positions) + patch * positions)
        for chunk in sample_chunks(batch, per_sample * size, budget):
            products = per_sample_products(grads, patches_of(chunk), chunk).square_()
            term = products.sum((0, 2)) if groups > 1 else products.sum((0, 1, 2))[None]
            total = added(total, term)
        assert total is not None  # (a batch has samples)
        return total
    per_sample = groups * (positions * (num_vectors * out + patch) + 2 * (out + patch) * pairs)
    for chunk in sample_chunks(batch, per_sample * size, budget):
        u = patches_of(chunk).permute(1, 0, 3, 2)  # (g, b, L, P)
        b = u.shape[1]
        if positions == 1:
            gram = grads[:, chunk, ..., 0].square().sum(0).permute(1, 2, 0)  # (g, O, b)
            outer = u[..., 0, :].square()  # (g, b, P)
        else:
            g = grads[:, chunk].permute(2, 3, 1, 4, 0)  # (g, O, b, L, K)
            gram = _pairs(g @ g.mT, weight=2.0)  # (g, O, b, T); the pairs l < m count twice
            outer = _outer_pairs(u)  # (g, b, T, P)
        term = torch.bmm(
            gram.reshape(groups, out, b * pairs), outer.reshape(groups, b * pairs, patch)
        )
        total = added(total, term)
    assert total is not None
    return total


class LinearSums:
    r"""Running sums of :math:`y = x W^\top + b` with ``x: (B, *S, in)``, fed ``G`` of any
    number of vectors at a time (an :class:`Accumulator`; ``names``: which of ``"weight"`` and
    ``"bias"`` to sum).

    Per-sample gradients :math:`\partial_W = \sum_s G_{nks} x_{ns}^\top` (summed over the
    extra dimensions ``S`` before squaring, by :func:`_linear_weight`) and :math:`\partial_b =
    \sum_s G_{nks}`. For ``x: (B, in)`` only the squares :math:`Q = \sum_k G_{nk}^{\odot 2}`
    ``(B, out)`` add up; at the end the bias sums are :math:`\sum_n Q_n` and the weight sums
    one matmul :math:`Q^\top x^{\odot 2}`. The first terms fed are the sums (no zeros made to
    add them to)."""

    def __init__(
        self, x: Tensor, out: int, names: Collection[str], acc: torch.dtype, budget: int
    ) -> None:
        self.x = x.to(acc).reshape(x.shape[0], -1, x.shape[-1])  # (B, S, in)
        self.out, self.names, self.acc, self.budget = out, names, acc, budget
        self.squares: Tensor | None = None  # S = 1: (B, out)
        self.weight: Tensor | None = None  # S > 1: (out, in)
        self.bias: Tensor | None = None  # S > 1: (out,)

    def add(self, key: int | str | None, grads: Tensor) -> None:
        batch, positions, _ = self.x.shape
        g = grads.to(self.acc).reshape(-1, batch, positions, grads.shape[-1])  # (K, B, S, out)
        if positions == 1:
            self.squares = added(self.squares, sum_or_squeeze(g[:, :, 0].square(), 0))
            return
        if "bias" in self.names:
            self.bias = added(self.bias, square_sum(sum_or_squeeze(g, 2)))
        if "weight" in self.names:
            self.weight = added(self.weight, _linear_weight(g, self.x, self.budget))

    def sums(self) -> dict[str, Tensor]:
        q = self.squares
        if q is not None:
            return {
                name: q.sum(0) if name == "bias" else sample_products(q, self.x[:, 0].square())
                for name in self.names
            }
        found = {"weight": self.weight, "bias": self.bias}
        shapes = {"weight": (self.out, self.x.shape[-1]), "bias": (self.out,)}
        return {  # (zeros for a call never fed a gradient)
            name: self.x.new_zeros(shapes[name]) if found[name] is None else found[name]
            for name in self.names
        }


def _linear_sums(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> LinearSums:
    return LinearSums(args[0], module.out_features, names, acc_dtype(module), budget)


@register(
    nn.Linear,
    "transformers.models.falcon.modeling_falcon.FalconLinear",
    "timm.layers.linear.Linear",
    accumulate=_linear_sums,
    positionwise=lambda module: (1, 1),
    foldable=lambda module: 1,
)
def linear(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r""":math:`y = x W^\top + b` with ``x: (B, *S, in)`` and ``G: (K, B, *S, out)``: the
    :class:`LinearSums` of all ``K`` vectors at once. Also the rule of Hugging Face's
    ``FalconLinear`` and timm's ``Linear``, ``nn.Linear`` subclasses whose own ``forward``
    computes the same (matched by their classes' qualified names; without it Falcon's 8
    projections per layer, and the classifier of timm's MobileNets and EfficientNets, went to
    the per-module fallback)."""
    return feed_all(_linear_sums(module, (x,), {}, {}, names, budget), {0: grads})


@register(nn.Bilinear, whole_call=True)
def bilinear(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r""":math:`y_o = x_1^\top W_o x_2 + b_o` with ``x_1: (B, *S, in1)``, ``x_2: (B, *S,
    in2)``: the per-sample weight gradient is :math:`\sum_s G_{nks} (x_{1,ns} \otimes
    x_{2,ns})^\top`, a product over the ``S`` positions with the outer products of the two
    inputs as patches ``(in1 * in2, S)`` (:func:`squared_products`, a chunk of samples at a
    time); the bias gradient is :math:`\sum_s G_{nks}`."""
    if 0 not in grads:
        return None
    acc = acc_dtype(module)
    call = call_arguments(module, args, kwargs)
    first, second = call["input1"].to(acc), call["input2"].to(acc)
    batch, features = first.shape[0], module.in1_features * module.in2_features
    g = grads[0].to(acc)
    g = g.reshape(g.shape[0], batch, -1, module.out_features).transpose(2, 3)  # (K, B, out, S)
    sums = {}
    if "weight" in names:
        first = first.reshape(batch, -1, module.in1_features)
        second = second.reshape(batch, -1, module.in2_features)

        def outer_products(chunk: slice) -> Tensor:  # (b, 1, in1 * in2, S)
            products = first[chunk].mT.unsqueeze(2) * second[chunk].mT.unsqueeze(1)
            return products.reshape(products.shape[0], 1, features, -1)

        weight = squared_products(g.unsqueeze(2), outer_products, features, budget)
        sums["weight"] = weight.reshape(module.weight.shape)
    if "bias" in names:
        sums["bias"] = square_sum(sum_or_squeeze(g, -1))
    return sums


class _TransposedWeight:
    """An :class:`Accumulator` giving the sums of another with the weight's transposed (for a
    layer that stores its weight ``(in, out)``)."""

    def __init__(self, sums: Accumulator) -> None:
        self.inner = sums

    def add(self, key: int | str, grads: Tensor) -> None:
        self.inner.add(key, grads)

    def sums(self) -> dict[str, Tensor]:
        sums = self.inner.sums()
        if "weight" in sums:
            sums["weight"] = sums["weight"].mT
        return sums


def _gpt_conv1d_sums(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> _TransposedWeight:
    return _TransposedWeight(LinearSums(args[0], module.nf, names, acc_dtype(module), budget))


@register(
    "transformers.pytorch_utils.Conv1D",
    accumulate=_gpt_conv1d_sums,
    positionwise=lambda module: (1, 1),
    foldable=lambda module: 1,
)
def gpt_conv1d(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Hugging Face's ``Conv1D``, the linear layer of GPT and GPT-2: :math:`y = x W + b` with
    the weight stored ``(in, out)`` (``nf`` outputs), matched by its class's qualified name
    (``transformers`` is not imported). The :class:`LinearSums` of ``nn.Linear``, whose weight
    sum is the transpose of this layer's."""
    return feed_all(_gpt_conv1d_sums(module, (x,), {}, {}, names, budget), {0: grads})


#: Temporaries of one chunk of :func:`_linear_weight`'s direct products are kept within this
#: many bytes on CPU (smaller than :data:`CHUNK_BYTES`: for the in-projection of the attention of
#: ``benchmarks.models.TextTransformer`` (K=9, S=32, 192x64) chunks of 16, 32 and 64 samples
#: (7, 14 and 28 MiB of products) took 16, 15 and 28 ms).
LINEAR_CHUNK_BYTES = 16 * 2**20

#: Time of :func:`squared_products`' Gram way per ``T (O + P)`` number over that of
#: :func:`_linear_weight`'s direct products per ``K O P`` number. Fitted (with
#: :data:`LINEAR_GRAM_READS`) to 26 shapes timed on the CPU (2 threads; K=9 with B=128 and K=944
#: with B=8, S from 4 to 32, O and P 64 or 256): 1 to 2 picked the faster way in 25 of them,
#: losing 0.5 ms in all. (It was 11 until the Gram way made its pair products row by row from
#: ``x`` as it lies, instead of with strides: with 11, 6 of the 26 took the slower way, up to
#: 3.3 times as slow, 11.3 against 3.5 ms for S=8, 64 to 256 features.)
LINEAR_GRAM_COST = 1.5

#: Time of :func:`squared_products`' Gram way per ``K O S`` gradient number (it contracts over
#: the ``K`` vectors in ``(S, K) (K, S)`` products, one per sample and output unit) over that of
#: the direct products per ``K O P`` number: it matters with many vectors (the exact Fisher of a
#: language model, ``K = S (V - 1)``). CPU, 2 threads, B=8, S=16, 64x64: 131 ms against 24 ms
#: for K=944, where the Gram way was picked by ``LINEAR_GRAM_COST`` alone; with this term the
#: faster way was picked in all 16 shapes timed (K from 9 to 944, S from 4 to 32, O and P
#: 64 or 256), against 11 of 16 without it.
LINEAR_GRAM_READS = 5


def _squared_products_are_faster(num_vectors: int, out: int, patch: int, positions: int) -> bool:
    """Whether :func:`_linear_weight` hands its sums to :func:`squared_products` (always for
    ``S = 1``; else where ``K O (P - LINEAR_GRAM_READS * S) > LINEAR_GRAM_COST * T (O + P)``,
    ``T = S (S+1)/2``) rather than forming its own products."""
    pairs = positions * (positions + 1) // 2
    gram_reads = LINEAR_GRAM_READS * positions
    return positions == 1 or (
        num_vectors * out * (patch - gram_reads) > LINEAR_GRAM_COST * pairs * (out + patch)
    )


def _linear_weight(grads: Tensor, x: Tensor, budget: int) -> Tensor:
    r"""``(K, B, S, out), (B, S, in) -> (out, in)``: :math:`\sum_{n,k} (\sum_s G_{nks}
    x_{ns}^\top)^{\odot 2}`.

    Either :func:`squared_products` with ``L = S`` (where :func:`_squared_products_are_faster`),
    or the products :math:`G_{nk}^\top x_n` (``(out, in)``) for a chunk of samples in one
    ``bmm`` over the ``(k, n)`` pairs, squared and summed over them (``x`` repeated ``K``
    times). On CPU (2 threads, K=9, B=128, interleaved medians of 31) the products took 22.7 ms
    where the Gram way took 5.8 (S=8, 64 to 256 features), 69.4 against 42.5 (S=16, 256 to 256)
    and 7.7 against 6.7 (S=32, 64 to 64, where the products are picked: see
    :data:`LINEAR_GRAM_COST`)."""
    num_vectors, batch, positions, out = grads.shape
    patch = x.shape[-1]
    if _squared_products_are_faster(num_vectors, out, patch, positions):
        return squared_products(
            grads.mT.unsqueeze(2),  # (K, B, 1, out, S)
            lambda chunk: x[chunk].mT.unsqueeze(1),  # (b, 1, in, S)
            patch,
            budget,
        )[0]
    budget = chunk_budget(budget, grads.device, LINEAR_CHUNK_BYTES)
    per_sample = num_vectors * (out * patch + positions * patch) * grads.element_size()
    result = None
    samples_first = grads.stride(1) > grads.stride(0)  # (B, K, ...) storage: read as it lies
    for chunk in sample_chunks(batch, per_sample, budget):
        g = grads[:, chunk]  # (K, b, S, out)
        b = g.shape[1]
        if samples_first:
            g, u = g.transpose(0, 1), x[chunk].unsqueeze(1).expand(b, num_vectors, -1, -1)
        else:
            u = x[chunk].expand(num_vectors, b, positions, patch)
        products = torch.bmm(
            g.reshape(num_vectors * b, positions, out).mT,
            u.reshape(num_vectors * b, positions, patch),
        )
        result = added(result, products.square_().sum(0))
    assert result is not None  # (a batch has samples)
    return result


def _affine_parts(
    xhat: Tensor, names: Collection[str], per_sample: Callable[[Tensor], Tensor]
) -> Reducer:
    r"""Reducer of the normalisation layers :math:`y = \hat x \odot w + b`: their per-sample
    gradients are ``per_sample`` (a sum over the dimensions the affine parameters are broadcast
    over) of :math:`G \odot \hat x` for ``w`` and of :math:`G` for ``b``; it maps
    ``(..., B, *y.shape[1:])`` to those of the parameters in ``names`` (``weight`` first),
    stacked: ``(..., B, n, *D)``."""

    def reduce(grads: Tensor) -> Tensor:
        grads = grads.to(xhat.dtype)
        parts = [per_sample(grads * xhat)] if "weight" in names else []
        if "bias" in names:
            parts.append(per_sample(grads))
        return torch.stack(parts, dim=grads.dim() - xhat.dim() + 1)

    return reduce


def affine_sums(
    parts: Tensor, x: Tensor, names: Collection[str], trailing: int
) -> dict[str, Tensor]:
    """The sums from :func:`_affine_parts`' ``(K, B, n, *D)`` (``len(D) = trailing``): all
    ``n`` parts squared and summed at once, then taken apart."""
    stacked = [name for name in ("weight", "bias") if name in names]
    dim = parts.dim() - trailing - 1
    return dict(zip(stacked, square_sum(parts).unbind(dim - 2)))


def _per_channel(x_dims: int) -> Callable[[Tensor], Tensor]:
    """``(..., B, C, *spatial) -> (..., B, C)`` for inputs of ``x_dims`` dimensions."""

    def reduce(t: Tensor) -> Tensor:
        lead = t.dim() - x_dims
        return sum_or_squeeze(t.reshape(*t.shape[: lead + 2], -1), -1)

    return reduce


def _per_trailing(x_dims: int, dims: int) -> Callable[[Tensor], Tensor]:
    """``(..., B, *S, *D) -> (..., B, *D)`` for ``len(D) = dims`` and inputs of ``x_dims``
    dimensions."""

    def reduce(t: Tensor) -> Tensor:
        lead = t.dim() - x_dims
        return sum_or_squeeze(
            t.reshape(*t.shape[: lead + 1], -1, *t.shape[t.dim() - dims :]), lead + 1
        )

    return reduce


def batch_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    r"""The reducer of an eval-mode batch norm's output gradients (see :func:`_affine_parts`):
    the per-sample, per-channel sums :math:`\sum_{\text{spatial}} G \odot \hat x` and
    :math:`\sum_{\text{spatial}} G`.

    One vector at a time (``empirical``, ``sample`` with one draw, and every vector of a
    pull-back looped over them) the batch norm's own backward kernel gives both in one pass
    over ``G`` and ``x``, with the samples taken as channels: ``(1, B C, *spatial)``, each
    channel's running statistics repeated ``B`` times (no :math:`\hat x` is made, and its
    sums are per sample and channel). For the reduced ResNet-18's ``empirical`` Fisher
    (a GPU's ways, N=8) that is 405 computing operators instead of 445, with the squares and
    sums after it 6 per layer instead of 8 (:math:`\hat x`, the batch norm's forward and
    its ``empty``, a product, two sums and a stack before). Several vectors at once (a
    pull-back batched over them) take :math:`\hat x` and :func:`_affine_parts`' products,
    which broadcast ``x`` over the vectors where the kernel would need it copied for each;
    so does an input in another memory order than the standard one (``channels_last``),
    which the kernel's rows would need copied, and the gradients with it, for every vector
    (reduced ResNet-18 in ``channels_last``, exact, C=10, N=128, 2 threads: those copies
    took 0.22 s of 2.9)."""
    acc = acc_dtype(module)
    x = x.to(acc)
    mean, var = module.running_mean.to(acc), module.running_var.to(acc)
    wanted = ("weight" in names, "bias" in names)
    batch, channels = x.shape[:2]
    rows = (1, batch * channels, -1)  # (reshaped: standard strides, as the CPU kernel needs)

    @functools.cache  # (once per call of the layer, on first need)
    def statistics() -> tuple[Tensor, Tensor]:  # (B C,) each: a channel's, per sample
        return mean.repeat(batch), var.repeat(batch)

    @functools.cache
    def several() -> Reducer:  # (x̂ broadcast over the vectors)
        xhat = F.batch_norm(x, mean, var, eps=module.eps)
        return _affine_parts(xhat, names, _per_channel(x.dim()))

    def reduce(grads: Tensor) -> Tensor:
        lead = grads.dim() - x.dim()
        if math.prod(grads.shape[:lead]) == 1 and x.is_contiguous():
            _, weight, bias = torch.ops.aten.native_batch_norm_backward(
                grads.to(acc).reshape(rows),
                x.reshape(rows),
                None,
                *statistics(),
                None,
                None,
                False,
                module.eps,
                [False, *wanted],
            )
            parts = torch.stack([t for t in (weight, bias) if t is not None])  # (n, B C)
            return parts.view(len(parts), batch, channels).transpose(0, 1).reshape(
                *grads.shape[:lead], batch, len(parts), channels
            )
        return several()(grads)

    return reduce


@register(
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, reduce=batch_norm_parts
)
def batch_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Batch norm in eval mode (running statistics; the engine rejects batch statistics):
    :math:`\hat x = (x - \mu)/\sqrt{\sigma^2 + \epsilon}` per channel (dimension 1), then
    :math:`\partial_w = \sum_{\text{spatial}} G \odot \hat x`, :math:`\partial_b =
    \sum_{\text{spatial}} G` (``grads``: those, reduced by :func:`_affine_parts`)."""
    return affine_sums(grads, x, names, 1)


def group_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    xhat = F.group_norm(x.to(acc_dtype(module)), module.num_groups, eps=module.eps)
    return _affine_parts(xhat, names, _per_channel(x.dim()))


@register(
    nn.GroupNorm,
    "timm.layers.norm.GroupNorm",
    "timm.layers.norm.GroupNorm1",
    "timm.models.metaformer.GroupNorm1NoBias",
    reduce=group_norm_parts,
)
def group_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Group norm: :math:`\hat x` normalised per sample and group, affine per channel
    (dimension 1), as for batch norm. Also timm's ``GroupNorm`` and ``GroupNorm1``, subclasses
    whose own ``forward`` computes the same, and PoolFormerV2's ``GroupNorm1NoBias`` (by
    qualified name)."""
    return affine_sums(grads, x, names, 1)


def _instance_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    acc = acc_dtype(module)
    running = module.running_mean is not None and not module.training
    if running:  # (its tracked statistics, as batch norm in eval mode)
        mean, var = module.running_mean.to(acc), module.running_var.to(acc)
        xhat = F.instance_norm(x.to(acc), mean, var, use_input_stats=False, eps=module.eps)
    else:
        xhat = F.instance_norm(x.to(acc), eps=module.eps)
    return _affine_parts(xhat, names, _per_channel(x.dim()))


@register(
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    accepts=lambda module: module.affine,
    reduce=_instance_norm_parts,
)
def instance_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Instance norm, affine: :math:`\hat x` normalised per sample and channel (or by the
    tracked statistics in eval mode), affine per channel (dimension 1), as for batch norm."""
    return affine_sums(grads, x, names, 1)


def normalized_dims(module: nn.Module) -> int:
    """The number of trailing dimensions a layer or RMS norm normalises."""
    return len(module.normalized_shape)


def layer_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    xhat = F.layer_norm(x.to(acc_dtype(module)), module.normalized_shape, eps=module.eps)
    return _affine_parts(xhat, names, _per_trailing(x.dim(), normalized_dims(module)))


@register(
    nn.LayerNorm,
    "timm.layers.norm.LayerNorm",
    "timm.models.metaformer.LayerNormNoBias",
    reduce=layer_norm_parts,
    foldable=normalized_dims,
)
def layer_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Layer norm over the trailing ``normalized_shape`` dimensions ``D`` of ``(B, *S, *D)``:
    :math:`\partial_w = \sum_S G \odot \hat x`, :math:`\partial_b = \sum_S G`. Also timm's
    ``LayerNorm``, a subclass whose own ``forward`` computes the same, and MetaFormer's
    ``LayerNormNoBias`` (by qualified name)."""
    return affine_sums(grads, x, names, normalized_dims(module))


def _deberta_layer_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    # (x̂ as the layer computes it, in float32 and back to x's type: in a float64 model, x̂ in
    # float64 would differ from the model's by float32's rounding, which the sums check rejects)
    h = x.float()
    centered = h - h.mean(-1, keepdim=True)
    variance = centered.square().mean(-1, keepdim=True)
    xhat = (centered / torch.sqrt(variance + module.variance_epsilon)).to(x.dtype)
    return _affine_parts(xhat.to(acc_dtype(module)), names, _per_trailing(x.dim(), 1))


@register(
    "transformers.models.deberta.modeling_deberta.DebertaLayerNorm",
    accepts=lambda module: (
        isinstance(getattr(module, "variance_epsilon", None), float) and module.weight.dim() == 1
    ),
    reduce=_deberta_layer_norm_parts,
)
def deberta_layer_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Hugging Face DeBERTa's layer norm over the last dimension, :math:`\hat x` computed in
    float32 (the epsilon inside the square root, as ``F.layer_norm``), then
    :math:`w \odot \hat x + b` in the input's type (by qualified name):
    :math:`\partial_w = \sum_S G \odot \hat x`, :math:`\partial_b = \sum_S G`."""
    return affine_sums(grads, x, names, 1)


def channel_layer_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    channels_last = x.to(acc_dtype(module)).movedim(1, -1)
    xhat = F.layer_norm(channels_last, module.normalized_shape, eps=module.eps)
    return _affine_parts(xhat.movedim(-1, 1), names, _per_channel(x.dim()))


@register(
    "timm.layers.norm.LayerNorm2d",
    "timm.models.metaformer.LayerNorm2dNoBias",
    "torchvision.models.convnext.LayerNorm2d",
    *_in_transformers(
        "eomt.modeling_eomt.EomtLayerNorm2d",
        "eomt_dinov3.modeling_eomt_dinov3.EomtDinov3LayerNorm2d",
        "videomt.modeling_videomt.VideomtLayerNorm2d",
    ),
    reduce=channel_layer_norm_parts,
)
def channel_layer_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Layer norm over the channels, dimension 1, of ``(B, C, *spatial)`` (the ``LayerNorm2d``
    of timm, of torchvision's ConvNeXt and of Hugging Face's EoMT and VideoMT, which permute
    the channels last and back around ``F.layer_norm``, and MetaFormer's
    ``LayerNorm2dNoBias``; by qualified name): :math:`\hat x` normalised per sample and
    position, affine per channel, as for batch norm."""
    return affine_sums(grads, x, names, 1)


#: Hugging Face's layer norms with a ``data_format``, ConvNeXt's and the 19 copies of it in
#: transformers 5.25 (SAM's, SegGPT's, DINOv3-ConvNeXt's, ...), by qualified name: an
#: ``nn.LayerNorm`` subclass whose ``forward`` permutes ``"channels_first"`` inputs
#: ``(B, C, H, W)`` channels last and back around the layer norm, and takes
#: ``"channels_last"`` ones ``(B, H, W, C)`` as they are.
FORMATTED_LAYER_NORMS = _in_transformers(
    "convnext.modeling_convnext.ConvNextLayerNorm",
    "convnextv2.modeling_convnextv2.ConvNextV2LayerNorm",
    "deepseek_ocr2.modeling_deepseek_ocr2.DeepseekOcr2SamLayerNorm",
    "deepseek_vl_hybrid.modeling_deepseek_vl_hybrid.DeepseekVLHybridLayerNorm",
    "dinov3_convnext.modeling_dinov3_convnext.DINOv3ConvNextLayerNorm",
    "edgetam.modeling_edgetam.EdgeTamLayerNorm",
    "edgetam_video.modeling_edgetam_video.EdgeTamVideoLayerNorm",
    "got_ocr2.modeling_got_ocr2.GotOcr2LayerNorm",
    "lw_detr.modeling_lw_detr.LwDetrLayerNorm",
    "pp_formulanet.modeling_pp_formulanet.PPFormulaNetLayerNorm",
    "rf_detr.modeling_rf_detr.RfDetrLayerNorm",
    "sam.modeling_sam.SamLayerNorm",
    "sam2.modeling_sam2.Sam2LayerNorm",
    "sam2_video.modeling_sam2_video.Sam2VideoLayerNorm",
    "sam3_tracker.modeling_sam3_tracker.Sam3TrackerLayerNorm",
    "sam3_tracker_video.modeling_sam3_tracker_video.Sam3TrackerVideoLayerNorm",
    "sam_hq.modeling_sam_hq.SamHQLayerNorm",
    "seggpt.modeling_seggpt.SegGptLayerNorm",
    "slanext.modeling_slanext.SLANeXtLayerNorm",
    "unlimited_ocr.modeling_unlimited_ocr.UnlimitedOcrSamLayerNorm",
)


def _channels_first(module: nn.Module) -> bool:
    return module.data_format == "channels_first"


def _formatted_layer_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    parts = channel_layer_norm_parts if _channels_first(module) else layer_norm_parts
    return parts(module, x, names)


@register(
    *FORMATTED_LAYER_NORMS,
    accepts=lambda module: module.data_format in ("channels_first", "channels_last"),
    reduce=_formatted_layer_norm_parts,
)
def formatted_layer_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    """A layer norm of :data:`FORMATTED_LAYER_NORMS`: :func:`channel_layer_norm` on
    ``"channels_first"`` inputs, :func:`layer_norm` on ``"channels_last"`` ones."""
    return affine_sums(grads, x, names, 1 if _channels_first(module) else normalized_dims(module))


def _rms_norm_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    xhat = F.rms_norm(x.to(acc_dtype(module)), module.normalized_shape, eps=module.eps)
    return _affine_parts(xhat, names, _per_trailing(x.dim(), normalized_dims(module)))


def rms_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""RMS norm :math:`\hat x = x / \sqrt{\mathrm{mean}_D(x^2) + \epsilon}` over the trailing
    dimensions ``D``: :math:`\partial_w = \sum_S G \odot \hat x`. Also timm's ``RmsNorm``
    (by qualified name), which computes the same with the same attributes."""
    return affine_sums(grads, x, names, normalized_dims(module))


if hasattr(nn, "RMSNorm"):  # torch >= 2.4
    register(
        nn.RMSNorm, "timm.layers.norm.RmsNorm", reduce=_rms_norm_parts, foldable=normalized_dims
    )(rms_norm)


#: The :data:`RULES` key of Hugging Face's RMS norms, which are recognised by what they compute
#: (:func:`is_hugging_face_rms_norm`), not by name: transformers 5.25 has 189 classes named
#: ``*RMSNorm``, 171 of them Llama's, copied.
HUGGING_FACE_RMS_NORM = "transformers.*RMSNorm"


def _rms_epsilon(module: nn.Module) -> float | None:
    """A Hugging Face RMS norm's epsilon: ``variance_epsilon`` (Llama's and its copies) or
    ``eps`` (Gemma's)."""
    eps = getattr(module, "variance_epsilon", getattr(module, "eps", None))
    return eps if isinstance(eps, float) else None


def _inverse_rms(x: Tensor, eps: float) -> Tensor:
    r""":math:`1 / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last dimension, kept as size 1."""
    return (x.square().mean(-1, keepdim=True) + eps).rsqrt()


def _rms_normalized(x: Tensor, eps: float) -> Tensor:
    r""":math:`\hat x = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last dimension."""
    return x * _inverse_rms(x, eps)


@functools.lru_cache(maxsize=64)
def _rms_norm_precision(cls: type[nn.Module]) -> str | None:
    r"""How ``cls``'s ``forward`` computes :math:`w \odot \hat x` or :math:`(1 + w) \odot \hat x`
    with :math:`\hat x = x / \sqrt{\mathrm{mean}(x^2) + \epsilon}` over the last dimension, as
    Llama's, Gemma's and T5's RMS norms do: ``"float32"`` with :math:`\hat x` in float32
    whatever the input's type (Llama's, Gemma's), ``"input"`` with only the mean square in
    float32 and :math:`x` scaled in its own type (T5's), ``None`` where it computes something
    else. Checked, once per class, on a module of the class with a random weight,
    :math:`\epsilon = 1/4` (large, so that it matters where it is added) and a random
    ``(2, 3, 8)`` input in float64, to 1e-5 (the two ways differ by float32's rounding of
    :math:`x`, below that). Either form has the per-sample gradient :math:`G \odot \hat x`
    for ``w``."""
    try:
        module = cls.__new__(cls)
        nn.Module.__init__(module)
        generator = torch.Generator().manual_seed(0)
        module.weight = nn.Parameter(torch.randn(8, generator=generator, dtype=torch.float64))
        for name in ("variance_epsilon", "eps"):
            setattr(module, name, 0.25)
        x = torch.randn(2, 3, 8, generator=generator, dtype=torch.float64)
        with torch.no_grad():
            y = cls.forward(module, x)
    except Exception:  # (a forward that needs more than these attributes)
        return None
    if not isinstance(y, Tensor) or y.shape != x.shape:
        return None
    weight = module.weight.detach()
    for scale in (weight, 1 + weight):
        if torch.allclose(y.double(), scale * _rms_normalized(x, 0.25), rtol=1e-5, atol=1e-5):
            in_input = _rms_normalized_as(x, 0.25, "input")
            return "input" if torch.allclose(y, scale * in_input, rtol=0, atol=0) else "float32"
    return None


def _rms_normalized_as(x: Tensor, eps: float, precision: str) -> Tensor:
    r""":math:`\hat x` (:func:`_rms_normalized`) as a Hugging Face RMS norm of ``precision``
    (:func:`_rms_norm_precision`) computes it, in float32 or in ``x``'s type."""
    if precision == "float32":
        return _rms_normalized(x.float(), eps)
    return x * _inverse_rms(x.float(), eps)


def is_hugging_face_rms_norm(module: nn.Module) -> bool:
    """Whether ``module`` is a Hugging Face RMS norm with a rule: a class of ``transformers``
    named ``*RMSNorm`` (or ``*T5LayerNorm``: T5's, MT5's, LongT5's, UMT5's) with one
    parameter, a 1-d ``weight``, a float epsilon (:func:`_rms_epsilon`), a ``forward`` of one
    input, and the computation :func:`_rms_norm_precision` checks. (Gated and adaptive RMS
    norms, with a second input, and those with a bias have none.)"""
    cls = type(module)
    named = cls.__name__.endswith(("RMSNorm", "T5LayerNorm"))
    if not (cls.__module__.startswith("transformers.") and named):
        return False
    own = dict(module.named_parameters())
    signature = list(_forward_signature(cls).parameters.values())[1:]  # (after self)
    return (
        list(own) == ["weight"]
        and own["weight"].dim() == 1
        and _rms_epsilon(module) is not None
        and len(signature) == 1
        and signature[0].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        and _rms_norm_precision(cls) is not None
    )


def _hugging_face_rms_norm_parts(
    module: nn.Module, x: Tensor, names: Collection[str]
) -> Reducer:
    # (x̂ in the norm's own precision: in a float64 Llama, x̂ in float64 differed from the
    # model's, in float32, by 1e-8, which the sums check rejects; T5's scales x in float64)
    precision = _rms_norm_precision(type(module)) or "float32"
    xhat = _rms_normalized_as(x, _rms_epsilon(module), precision)
    return _affine_parts(xhat.to(acc_dtype(module)), names, _per_trailing(x.dim(), 1))


@register(
    HUGGING_FACE_RMS_NORM,
    reduce=_hugging_face_rms_norm_parts,
    params=("weight",),
    foldable=lambda module: 1,
)
def hugging_face_rms_norm(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Hugging Face's RMS norms (:func:`is_hugging_face_rms_norm`: Llama's, Mistral's, Qwen's,
    Gemma's, T5's and their copies) over the last dimension: :math:`\partial_w = \sum_S G \odot
    \hat x` (``grads``: those, reduced by :func:`_affine_parts`), for :math:`w \odot \hat x`
    and :math:`(1 + w) \odot \hat x` alike."""
    return affine_sums(grads, x, names, 1)


def _per_sample_total(x_dims: int) -> Callable[[Tensor], Tensor]:
    """``(..., B, *rest) -> (..., B, 1)`` for inputs of ``x_dims`` dimensions."""

    def reduce(t: Tensor) -> Tensor:
        lead = t.dim() - x_dims
        return t.reshape(*t.shape[: lead + 1], -1).sum(-1, keepdim=True)

    return reduce


def _prelu_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    negative = x.to(acc_dtype(module)).clamp(max=0)
    shared = module.weight.numel() == 1
    return _affine_parts(negative, names, (_per_sample_total if shared else _per_channel)(x.dim()))


@register(nn.PReLU, reduce=_prelu_parts, params=("weight",))
def prelu(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""PReLU :math:`y = \max(x, 0) + w \min(x, 0)`, one slope per channel (dimension 1) or
    one for all: :math:`\partial_w = \sum G \odot \min(x, 0)` over the dimensions ``w`` is
    broadcast over (``grads``: those, reduced by :func:`_affine_parts`)."""
    return affine_sums(grads, x, names, 1)


#: timm's layer scales ``y = x * gamma`` (not in place) by qualified name, each with the name of
#: its parameter and the shape it is broadcast in, aligned to the trailing dimensions of ``x``:
#: ``LayerScale``'s ``(C,)`` scales the last dimension, ``timm.layers``' ``LayerScale2d`` views
#: its ``(C,)`` as ``(1, C, 1, 1)``, the ``LayerScale2d`` of SwiftFormer and FastViT hold
#: ``(C, 1, 1)``, and MetaFormer's ``Scale`` (PoolFormer, ConvFormer, CAFormer) views its
#: ``scale`` as its ``shape``, ``(C, 1, 1)`` or ``(C,)``; Hugging Face's DINOv2 layer scale
#: and its 10 copies in transformers 5.25, ``hidden_state * self.lambda1`` with ``(C,)``.
LAYER_SCALES: dict[str, tuple[str, Callable[[nn.Module], tuple[int, ...]]]] = {
    "timm.layers.layer_scale.LayerScale": ("gamma", lambda module: tuple(module.gamma.shape)),
    "timm.layers.layer_scale.LayerScale2d": ("gamma", lambda module: (*module.gamma.shape, 1, 1)),
    "timm.models.swiftformer.LayerScale2d": ("gamma", lambda module: tuple(module.gamma.shape)),
    "timm.models.fastvit.LayerScale2d": ("gamma", lambda module: tuple(module.gamma.shape)),
    "timm.models.metaformer.Scale": ("scale", lambda module: tuple(module.shape)),
    **{
        name: ("lambda1", lambda module: tuple(module.lambda1.shape))
        for name in _in_transformers(
            "dinov2.modeling_dinov2.Dinov2LayerScale",
            "dinov2_with_registers.modeling_dinov2_with_registers.Dinov2WithRegistersLayerScale",
            "dinov3_vit.modeling_dinov3_vit.DINOv3ViTLayerScale",
            "eomt.modeling_eomt.EomtLayerScale",
            "eomt_dinov3.modeling_eomt_dinov3.EomtDinov3LayerScale",
            "radio.modeling_radio.RadioLayerScale",
            "rf_detr.modeling_rf_detr.RfDetrDinov2LayerScale",
            "sam3.modeling_sam3.Sam3ViTLayerScale",
            "sapiens2.modeling_sapiens2.Sapiens2LayerScale",
            "tipsv2.modeling_tipsv2.Tipsv2VisionLayerScale",
            "videomt.modeling_videomt.VideomtLayerScale",
        )
    },
}


def _scale_name(module: nn.Module) -> str:
    """The name of the parameter of a layer scale of :data:`LAYER_SCALES`."""
    return LAYER_SCALES[qualified_name(module)][0]


def _layer_scale_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    x = x.to(accumulation_dtype(getattr(module, _scale_name(module)).dtype))
    shape = LAYER_SCALES[qualified_name(module)][1](module)
    lead = x.dim() - 1 - len(shape)  # (the dimensions of x after the batch before gamma's)
    summed = [*range(1, 1 + lead), *(1 + lead + i for i, size in enumerate(shape) if size == 1)]

    def reduce(grads: Tensor) -> Tensor:  # (..., B, *rest) -> (..., B, gamma.numel())
        products = grads.to(x.dtype) * x
        vectors = products.dim() - x.dim()
        products = products.sum([vectors + d for d in summed]) if summed else products
        return products.reshape(*products.shape[: vectors + 1], -1)

    return reduce


@register(
    *LAYER_SCALES,
    accepts=lambda module: not getattr(module, "inplace", False),
    reduce=_layer_scale_parts,
    params=lambda module: (_scale_name(module),),
)
def layer_scale(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""timm's layer scales :math:`y = x \odot \gamma` (:data:`LAYER_SCALES`):
    :math:`\partial_\gamma = \sum G \odot x` over the dimensions :math:`\gamma` is broadcast
    over (``grads``: those, reduced per sample). In place (``inplace=True``) the recorded input
    is overwritten: no rule."""
    name = _scale_name(module)
    return {name: square_sum(grads).reshape(getattr(module, name).shape)}


def _response(x: Tensor, spatial: tuple[int, ...], channels: int, eps: float) -> Tensor:
    r"""ConvNeXt-V2's global response :math:`x \odot N(x)`: :math:`N` the L2 norm of each
    channel over the ``spatial`` dimensions, over its mean over the ``channels`` one (plus
    ``eps``)."""
    norms = x.norm(p=2, dim=spatial, keepdim=True)
    return x * (norms / (norms.mean(dim=channels, keepdim=True) + eps))


#: timm's and Hugging Face's layers :math:`y = w \odot h(x) + b` (``+ x`` too, which holds
#: no parameter), by qualified name: ``h``, the names of ``w`` and ``b``, and the sum of a
#: per-sample product over the dimensions ``w`` and ``b`` are broadcast over (for inputs of
#: ``x_dims`` dimensions): timm's ConvNeXt-V2 ``GlobalResponseNorm`` (``(C,)``, on the
#: channels of ``(B, H, W, C)``, or of ``(B, C, H, W)`` with ``channels_last=False``) and
#: Hugging Face's (``(1, 1, 1, C)`` on ``(B, H, W, C)``, ``eps`` 1e-6): :func:`_response`,
#: MetaFormer's ``StarReLU`` (:math:`h = \max(x, 0)^2`, scalars), HGNet's
#: ``LearnableAffineBlock`` (:math:`h = x`, scalars) and MobileBERT's ``NoNorm``
#: (:math:`h = x`, ``(C,)`` on the last dimension).
AFFINES_OF_INPUT: dict[
    str,
    tuple[
        Callable[[nn.Module, Tensor], Tensor],
        tuple[str, str],
        Callable[[nn.Module, int], Callable[[Tensor], Tensor]],
    ],
] = {
    "timm.layers.grn.GlobalResponseNorm": (
        lambda module, x: _response(x, module.spatial_dim, module.channel_dim, module.eps),
        ("weight", "bias"),
        lambda module, x_dims: (
            _per_trailing(x_dims, 1) if module.channel_dim == -1 else _per_channel(x_dims)
        ),
    ),
    "timm.models.metaformer.StarReLU": (
        lambda module, x: F.relu(x).square(),
        ("scale", "bias"),
        lambda module, x_dims: _per_sample_total(x_dims),
    ),
    "timm.models.hgnet.LearnableAffineBlock": (
        lambda module, x: x,
        ("scale", "bias"),
        lambda module, x_dims: _per_sample_total(x_dims),
    ),
    "transformers.models.mobilebert.modeling_mobilebert.NoNorm": (
        lambda module, x: x,
        ("weight", "bias"),
        lambda module, x_dims: _per_trailing(x_dims, 1),
    ),
    "transformers.models.convnextv2.modeling_convnextv2.ConvNextV2GRN": (
        lambda module, x: _response(x, (1, 2), -1, 1e-6),
        ("weight", "bias"),
        lambda module, x_dims: _per_trailing(x_dims, 1),
    ),
}


def _roles(module: nn.Module) -> dict[str, str]:
    """The names of the parameters of a layer of :data:`AFFINES_OF_INPUT`, each to its role in
    :func:`_affine_parts`: ``"weight"`` (``w``) or ``"bias"`` (``b``)."""
    w, b = AFFINES_OF_INPUT[qualified_name(module)][1]
    return {w: "weight", b: "bias"}


def _affine_of_input_parts(module: nn.Module, x: Tensor, names: Collection[str]) -> Reducer:
    h, (w, _), per_sample = AFFINES_OF_INPUT[qualified_name(module)]
    x = x.to(accumulation_dtype(getattr(module, w).dtype))
    roles = _roles(module)
    return _affine_parts(h(module, x), {roles[name] for name in names}, per_sample(module, x.dim()))


@register(
    *AFFINES_OF_INPUT,
    accepts=lambda module: not getattr(module, "inplace", False),
    reduce=_affine_of_input_parts,
    params=lambda module: AFFINES_OF_INPUT[qualified_name(module)][1],
)
def affine_of_input(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""timm's layers :math:`y = w \odot h(x) + b` (:data:`AFFINES_OF_INPUT`):
    :math:`\partial_w = \sum G \odot h(x)`, :math:`\partial_b = \sum G` over the dimensions
    they are broadcast over (``grads``: those, reduced by :func:`_affine_parts`). In place
    (``StarReLU(inplace=True)``) the recorded input is overwritten: no rule."""
    roles = _roles(module)
    sums = affine_sums(grads, x, {roles[name] for name in names}, 1)
    return {name: sums[roles[name]].reshape(getattr(module, name).shape) for name in names}


#: The settings of the embedding rules (:func:`embedding`, :func:`scaled_embedding`): one
#: lookup per position, no feature dimensions in, one out.
_LOOKUPS: dict[str, Any] = {
    "accepts": lambda module: not module.scale_grad_by_freq,
    "positionwise": lambda module: (0, 1),
    "foldable": lambda module: 0,
}


@register(nn.Embedding, **_LOOKUPS)
def embedding(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Embedding lookup :math:`y_{ns} = W_{i_{ns}}` with indices ``(B, *S)``.

    The per-sample gradient of row ``r`` is :math:`\sum_{s: i_{ns} = r} G_{nks}`: the pairs
    (sample, row) are made unique, ``G`` is summed per pair, squared, summed over vectors and
    scattered onto the rows (the ``padding_idx`` row gets no gradient). Memory is that of ``G``.
    """
    acc = acc_dtype(module)
    rows, dim = module.weight.shape
    grads = grads.to(acc).reshape(grads.shape[0], -1, dim)  # (K, B*S, D)
    pairs, which = _sample_row_pairs(x, rows)
    per_pair = grads.new_zeros(grads.shape[0], pairs.numel(), dim).index_add_(1, which, grads)
    weight = add_rows(grads.new_zeros(rows, dim), pairs % rows, per_pair.square().sum(0))
    if module.padding_idx is not None:
        weight[module.padding_idx] = 0
    return {"weight": weight}


#: Hugging Face's scaled word embeddings whose ``forward`` is the lookup times ``embed_scale``
#: (a float or a 0-d buffer), by qualified name (``transformers`` is not imported): the 24
#: classes of transformers 5.24 named ``*ScaledWordEmbedding`` with that ``forward`` exactly
#: (T5Gemma2's, which also swaps in an embedding of its own for one token, is not one).
SCALED_EMBEDDINGS = _in_transformers(
    "bart.modeling_bart.BartScaledWordEmbedding",
    "bigbird_pegasus.modeling_bigbird_pegasus.BigBirdPegasusScaledWordEmbedding",
    "biogpt.modeling_biogpt.BioGptScaledWordEmbedding",
    "blenderbot.modeling_blenderbot.BlenderbotScaledWordEmbedding",
    "diffusion_gemma.modeling_diffusion_gemma.DiffusionGemmaTextScaledWordEmbedding",
    "embedding_gemma2.modeling_embedding_gemma2.EmbeddingGemma2TextScaledWordEmbedding",
    "gemma.modeling_gemma.GemmaTextScaledWordEmbedding",
    "gemma2.modeling_gemma2.Gemma2TextScaledWordEmbedding",
    "gemma3.modeling_gemma3.Gemma3TextScaledWordEmbedding",
    "gemma3n.modeling_gemma3n.Gemma3nTextScaledWordEmbedding",
    "gemma4.modeling_gemma4.Gemma4TextScaledWordEmbedding",
    "gemma4_unified.modeling_gemma4_unified.Gemma4UnifiedTextScaledWordEmbedding",
    "m2m_100.modeling_m2m_100.M2M100ScaledWordEmbedding",
    "mbart.modeling_mbart.MBartScaledWordEmbedding",
    "minicpm3.modeling_minicpm3.MiniCPM3ScaledWordEmbedding",
    "nllb_moe.modeling_nllb_moe.NllbMoeScaledWordEmbedding",
    "pegasus_x.modeling_pegasus_x.PegasusXScaledWordEmbedding",
    "plbart.modeling_plbart.PLBartScaledWordEmbedding",
    "pp_formulanet.modeling_pp_formulanet.PPFormulaNetScaledWordEmbedding",
    "seamless_m4t.modeling_seamless_m4t.SeamlessM4TScaledWordEmbedding",
    "seamless_m4t_v2.modeling_seamless_m4t_v2.SeamlessM4Tv2ScaledWordEmbedding",
    "trocr.modeling_trocr.TrOCRScaledWordEmbedding",
    "vaultgemma.modeling_vaultgemma.VaultGemmaTextScaledWordEmbedding",
    "xglm.modeling_xglm.XGLMScaledWordEmbedding",
)


@register(*SCALED_EMBEDDINGS, **_LOOKUPS)
def scaled_embedding(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""A scaled word embedding :math:`y_{ns} = c\, W_{i_{ns}}` (:data:`SCALED_EMBEDDINGS`):
    :func:`embedding` with ``G`` times :math:`c`."""
    return embedding(module, x, grads * embedding_scale(module, grads), names, budget)


def embedding_scale(module: nn.Module, like: Tensor) -> Tensor:
    """A scaled word embedding's ``embed_scale``, as a tensor of ``like``'s dtype and device."""
    return torch.as_tensor(module.embed_scale, dtype=like.dtype, device=like.device)


def _sample_row_pairs(x: Tensor, rows: int) -> tuple[Tensor, Tensor]:
    """The (sample, row) pairs that indices ``x`` ``(B, *S)`` into a table of ``rows`` rows
    make, unique: their keys ``sample * rows + row`` ``(P,)`` and each index's pair
    ``(B * prod(S),)``."""
    batch = x.shape[0]
    sample = torch.arange(batch, device=x.device).unsqueeze(1)
    keys = (sample * rows + x.reshape(batch, -1)).reshape(-1)
    return torch.unique(keys, return_inverse=True)


@register(
    nn.EmbeddingBag,
    accepts=lambda module: module.mode in ("sum", "mean") and not module.scale_grad_by_freq,
    params=("weight",),
    whole_call=True,
)
def embedding_bag(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r"""Bags of embeddings :math:`y_n = \sum_l c_{nl} W_{i_{nl}}` with indices ``(B, L)`` (one
    bag per sample; a call with ``offsets`` is declined), :math:`c_{nl}` the per-sample
    weights (``mode="sum"``) or :math:`1/L_n` (``"mean"``, :math:`L_n` the bag's indices but
    ``padding_idx``'s, which get 0).

    The per-sample gradient of row ``r`` is :math:`C_{nr} G_{nk}` with :math:`C_{nr} =
    \sum_{l: i_{nl} = r} c_{nl}`, so the sum is :math:`\sum_n C_{nr}^2 \sum_k G_{nk}^{\odot 2}`:
    one number per (sample, row) pair, times the sample's squares ``(B, D)``."""
    call = call_arguments(module, args, kwargs)
    x, offsets, weights = call["input"], call["offsets"], call["per_sample_weights"]
    if offsets is not None or x.dim() != 2 or 0 not in grads:
        return None
    acc = acc_dtype(module)
    rows, dim = module.weight.shape
    scale = weights.to(acc) if weights is not None else x.new_ones(x.shape, dtype=acc)
    if module.padding_idx is not None:
        scale = scale * (x != module.padding_idx)
    if module.mode == "mean":
        counts = x.shape[1] if module.padding_idx is None else (x != module.padding_idx).sum(1)
        scale = scale / torch.as_tensor(counts, device=x.device).clamp(min=1).reshape(-1, 1)
    squares = grads[0].to(acc).square().sum(0)  # (B, D)
    pairs, which = _sample_row_pairs(x, rows)
    per_pair = scale.new_zeros(pairs.numel()).index_add_(0, which, scale.reshape(-1))
    per_pair = per_pair.square().unsqueeze(1) * squares[pairs // rows]
    return {"weight": add_rows(squares.new_zeros(rows, dim), pairs % rows, per_pair)}
