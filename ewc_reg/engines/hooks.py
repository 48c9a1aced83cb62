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
attention in passes large enough (:func:`loops_pull_back`), in one pass per vector (``G``
then lies in reused ``(B, K, ...)`` buffers, and layers with a reduction in
:data:`.rules.REDUCTIONS`, the normalisations, keep only their per-sample reduced gradients);
and the rules of :mod:`.rules` turn ``(x, G)`` into
:math:`\sum_n \sum_k ((\partial y_n/\partial\theta)^\top G_{nk})^{\odot 2}`
(for ``Linear`` without per-sample gradients at all; :mod:`.unit_sums` takes a unit's
recorded calls to its sums). A layer whose weight is made from other parameters, by pruning
(:func:`.rules.pruned_rule`), a parametrization or the old ``weight_norm``
(:mod:`.parametrized`), or by a ``forward`` of its own that ends in one ``F.linear`` or
``F.conv*d`` on its input (a masked layer: :mod:`.functional`), takes its class's per-sample
products pulled back through how the weight was made. Any other parametrised module without
a rule (or whose rule declines the
call) is handled by :class:`~.functorch.FunctorchEngine` applied to that module alone, with
its recorded input and ``G`` as the vectors (its output tensors cloned while recording when
there are several: :func:`.recording._separate_leaves`). The parameters of a module that contains
modules owning selected parameters (a ViT's class token, a ConvNeXt block's layer scale:
:mod:`.loose`) are replaced by per-sample copies during the forward pass, when
:func:`.loose.copies_layout` finds a way of doing so that keeps the per-sample gradients, and the
vectors are pulled back to the copies too (copies the model's operations cannot take, as a ConvNeXt
block's layer scale reshaped to ``(1, C, 1, 1)``, are shadowed up to where they meet the batch:
:mod:`.shadows`); the modules of the loose parameters without such a way (a table added to windows
folded into the batch dimension) are units without a rule for their own parameters, the modules
inside them keeping their units and rules (the fallback recomputes the forward for the gradients of
its own parameters alone). A module that uses the parameters of a unit inside it itself is one unit
without a rule for all of them (the modules inside it are not hooked): the parent of each unit
flagged :class:`.recording.UsedOutside`, then its parent where that is flagged in turn, but never
the root (:class:`Arrangement`). Where that fails too, each parent is a unit of all the parameters
inside it, the outermost where they nest, before the engine gives up. An ``nn.MultiheadAttention``
is always one unit for its parameters and those of ``out_proj`` (whose weight it uses without
calling it), and has a rule (:func:`.attention.multihead_attention`, which sees the whole recorded
call: query, key, value, masks) unless it has ``add_bias_kv`` or ``add_zero_attn``; while recording,
its call is redone in pieces (:func:`.attention.attention_in_pieces`), and the vectors are pulled
back to the in-projection's outputs as well.

The decomposition is valid only if (checked; otherwise :class:`.recording.Unsupported` is raised):

* every parameter in ``params`` (the selected ones: the others are constants, wherever they
  are and however they are used) is registered on a module (modules sharing one, tied weights,
  are one unit, whose rule in :mod:`.tied` or fallback sees all their calls:
  :func:`.recording._tie`), and, where a module's parameters get no per-sample copies, the root
  module does not own selected parameters next to children owning some (the unit would be the whole
  model), and none lies inside a TorchScript module (``torch.jit.script`` or ``trace``: the hooks of
  the modules inside one do not run);
* each unit's selected parameters (those of the modules inside it included) are used only
  while its module runs (not, say, with ``F.linear(h, self.embed.weight)`` in a parent's
  ``forward``: the parent is then made a whole unit, :class:`Arrangement`, unless it is the
  root); uses are seen by a :class:`~torch.overrides.TorchFunctionMode` during the
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
  (:func:`.recording._sequence_first`); a unit whose inputs all lead with 1, or all have one
  sample's shape of a per-sample input without a batch dimension, shared by the samples, such as a
  position embedding on ``position_ids`` of shape ``(1, T)`` or ``(T,)``, is called on them expanded
  over the batch, once a check on two samples shows that the model's output stays the same:
  :func:`.recording._expand_shared`; ``(T,)`` with ``T == B`` once the unit's inputs and output stay
  the same on two samples: :class:`.recording.SharedWithBatchRows`; a unit without a rule whose
  output the samples share, every tensor of it leading with 1, has it expanded over the batch where
  it is recorded, checked alike: :func:`.recording._shared_output`; where the model fails on
  the expanded inputs or output, or its output changes, they are left as they are, the units'
  outputs then without the batch, their parameters taking shadowed per-sample copies:
  :class:`.recording.ExpansionFailed`), recorded inputs are not modified in place afterwards,
  nor outputs that are views other than reshapes of their bases (the gradient of a reshape is taken
  at its base: :func:`.recording._output_edge`), and no batch norm uses batch statistics (it would
  mix the samples). Unit inputs are per-sample (the batch leading) or shared by all samples; a unit
  whose rule treats the leading dimensions alike (:data:`.rules.FOLDABLE`: linear layers,
  embeddings, layer and RMS norms) may also be called on per-sample data folded into the batch
  dimension, ``x`` of shape ``(B T, ...)`` with sample ``n``'s positions in rows ``nT`` to
  ``nT + T - 1`` (``hidden.view(-1, D)``, as OPT's layers; Swin's windows): its rule gets ``x``
  unfolded to ``(B, T, ...)`` and the gradients at its output alike, once the checks below show the
  rows to be so; so may a unit whose rule's recorded forward keeps pieces that treat positions alike
  (:func:`.recording._joins_rows`: recurrent layers and cells, attention, each of a sample's rows a
  sequence, as Sequencer's LSTMs along an image's rows), its tensor inputs with ``B T`` rows at
  their batch dimensions and its pieces unfolded alike; any other input of three or more
  dimensions whose leading dimension is a multiple of the batch larger than it (a 3-d
  ``attn_mask`` of shape ``(B * heads, L, S)``) is taken for folded per-sample data the
  decomposition cannot split.
  Since a sequence-first ``(T, B, ...)`` layout with ``T == B``, or a layer run on a shared
  table of ``B`` rows, would pass the checks above, :func:`.batch_checks.check_batch_layout` records
  the units again on fewer samples to tell (once per model and recorded shapes; where calls are
  folded, also on the batch in reverse order, on every pass, since how rows fold depends on
  the data: :func:`.batch_checks.check_folds`). A call of a :data:`.rules.FOLDABLE` layer whose
  layout the shapes could not tell and was taken the wrong way (sequence-first with ``T == B``,
  taken as batch-first; rows folded into the batch dimension, ``(B T, W, ...)`` with
  ``W == B``, taken as sequence-first) is taken the other way on the next attempt
  (:class:`.recording.SequenceFirst`); the passes after the first, the checks' among them, take the
  same calls as sequence-first as the first did. An input of a unit on the per-module fallback
  that the pass on fewer samples shows shared, though it leads with the batch size (BART's
  decoder positions ``(T,)`` with ``T == B``), is passed whole to every sample by the fallback
  from the next attempt on (:class:`.recording.WholeInputs`).

These checks test the assumptions one by one. With them, once per model and structure of the
forward pass (which units ran, how, on tensors of which ranks; :func:`.batch_checks.structure_of`),
:meth:`HookEngine._check_sums` tests the result: the sums on two samples against the loop
engine's, so that a way of breaking the decomposition that no check looks for (a tensor made
from a unit's parameters leaving it by an attribute, a layer run inside ``torch.vmap`` or
inside a derivative the forward pass takes) raises :class:`.recording.Unsupported` too.

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

The code: :mod:`.recording` makes the units and records a forward pass (the recorder's hooks
and torch-function mode), :mod:`.batch_checks` checks the batch layout on other samples, the
rules of :mod:`.rules` (through :mod:`.unit_sums`) turn the records into sums, and this module
runs the passes: chunks, the pull-back, the check of the sums, and the fallback.
"""

from __future__ import annotations

import functools
import logging
import warnings
import weakref
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, get_gradient_edge
from torch.nn.modules import module as module_globals
from torch.utils import _pytree as pytree

from .._batches import Batch, _may_round_to_tf32
from . import base
from .base import (
    BatchingFailed,
    Engine,
    OutputFn,
    RowWiseVectors,
    VectorFn,
    batched_grads,
    check_differentiable,
    describe,
    fewer_vectors,
    resolve_chunk_size,
    zero_sums,
)
from .batch_checks import (
    Precisions,
    TablesKept,
    check_batch_layout,
    check_expansion,
    check_folds,
    expanded_units,
    has_folded_calls,
    structure_of,
)
from .loop import LoopEngine
from .loose import (
    SEQUENCE_FIRST,
    SHADOWED,
    LooseParameter,
    call_with,
    copies_layout,
    loose_parameter,
    per_sample_copies,
    per_sample_problem,
)
from .recording import (
    Batchless,
    ExpansionFailed,
    Planner,
    Record,
    Recorder,
    SamplesMixed,
    SequenceFirst,
    SharedWithBatchRows,
    Unit,
    Unsupported,
    UsedOutside,
    WholeInputs,
    as_recorded,
)
from .rules import Accumulator, Reducer
from .unit_sums import accumulation_of, accumulator_of, feed, reduction_of, unit_sums

logger = logging.getLogger("ewc_reg")


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
#: ``K`` times the kernels (NVIDIA H200, reduced ResNet-18, C=10, N=128: looped 53.8, 18.4,
#: 10.0 and 9.0x a forward+backward at budgets of 256 MiB, 1, 4 and 16 GiB,
#: ``memory_budget_looped_cuda.md``; batched 45.1, 15.8, 5.8 and 5.3x in another process,
#: ``memory_budget_cuda.md``).
_LOOPED_ON_CPU = (
    nn.modules.conv._ConvNd,
    nn.modules.batchnorm._BatchNorm,
    nn.MultiheadAttention,
)

#: Per thread of torch's (:func:`torch.get_num_threads`), the least mean size in bytes of the
#: recorded outputs of one pass (each recorded call's output, for the samples the pass takes: its
#: chunk, or the whole batch when smaller) with which the pull-back loops over the vectors
#: (:func:`looped_min_bytes`); below it the pull-back is batched, also for the modules of
#: :data:`_LOOPED_ON_CPU`. Each kernel of a looped pass then works on little data and its fixed
#: costs, and the engine's per-vector work on each layer's gradients, dominate; the batched pass
#: runs each kernel once on ``K`` times the samples. Small passes come from small batches, from
#: thin layers, or from models whose gradients at every layer fill the memory budget with a few
#: samples (many layers, large images). With more threads each kernel is faster and its fixed
#: costs weigh more, so the crossover grows with them. Exact Fisher, C=10 (K=9), float32, looped
#: against batched, medians of 5 side by side (the mean size per pass in brackets, KiB):
#:
#: * 2 threads, timm models at 64x64, N=32: efficientnet_b0 (152) 3.35 against 1.76 s,
#:   mobilenetv3_small_050 (241) 0.407 against 0.227 s, regnetx_002 (233) 0.786 against
#:   0.488 s, repvgg_a0 (188) 2.85 against 1.93 s; resnet18 at 224x224, N=8 (473) 5.18 against
#:   4.69 s; the reduced ResNet-18 at N=12 (439) 0.327 against 0.292 s, at N=16 (585) 0.401
#:   against 0.401 s; the other way: the reduced ResNet-18 at N=128 (841, chunks of 23) 2.960
#:   against 3.045 s, timm's resnet18 at N=32 (850) 1.361 against 1.416 s,
#:   ``benchmarks.models.TextTransformer`` at N=128 (1733) 0.246 against 0.279 s (at N=24, 325:
#:   0.063 against 0.052 s). On the wrong side of 512 KiB: convnext_atto (348), looped 0.998
#:   against 1.121 s (``benchmarks/results/timm_pull_back_speed.md`` for the timm models).
#: * 1 thread: efficientnet_b0 (152) 3.98 against 2.62 s, mobilenetv3_small_050 (241) 0.439
#:   against 0.295 s, regnetx_002 (233) 1.589 against 0.865 s, repvgg_a0 (188) 3.22 against
#:   2.65 s, the Transformer at N=16 (216) 0.047 against 0.047 s; the other way: the reduced
#:   ResNet-18 at N=8 (293) 0.334 against 0.342 s, at N=12 (439) 0.504 against 0.524 s,
#:   convnext_atto (348) 1.629 against 2.055 s, the Transformer at N=24 (325) 0.066 against
#:   0.083 s.
LOOPED_MIN_BYTES_PER_THREAD = 256 * 2**10

#: The thread count up to which :func:`looped_min_bytes` grows: more threads were not measured.
LOOPED_THREADS_MEASURED = 2


def looped_min_bytes() -> int:
    """The least mean size of a pass's recorded outputs for a looped pull-back on the CPU, for
    torch's thread count now (see :data:`LOOPED_MIN_BYTES_PER_THREAD`): 256 KiB with 1 thread,
    512 KiB with 2 or more."""
    threads = min(torch.get_num_threads(), LOOPED_THREADS_MEASURED)
    return LOOPED_MIN_BYTES_PER_THREAD * threads


def loops_pull_back(
    model: nn.Module, device: torch.device, output_bytes: int | None = None
) -> bool:
    """Whether the engine pulls the vectors back to ``model`` on ``device`` one at a time, in
    passes whose recorded outputs take ``output_bytes`` on average (``None``: not known yet,
    taken as large; see :data:`_LOOPED_ON_CPU` and :func:`looped_min_bytes`)."""
    if base.launch_bound(device) or (
        output_bytes is not None and output_bytes < looped_min_bytes()
    ):
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
    (:func:`.recording.as_recorded`): a call's output with positions folded into its batch dimension
    comes unfolded, ``(K, B, T, ...)`` (see :data:`.rules.FOLDABLE`), a sequence-first call's
    transposed, ``(K, B, T, ...)`` too, and the output view whose base's edge was recorded,
    in the view's shape (:func:`.recording._output_edge`).

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
                    None if g is None else as_recorded(g, shape, transposed, vectors=True)
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
                g = as_recorded(g, *shapes[i], vectors=False)
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
    ``storage[key]`` when that fits (else a new one, kept there).

    Its memory follows ``like``'s: ``(B, K, C, *S)`` in the standard order, and for a
    channels-last gradient (a convolutional model in ``torch.channels_last``, whose backward
    gives its gradients so) ``(B, *S, K, C)``, so that copying each vector's gradient in
    moves runs of ``C`` numbers rather than transposing them, and each sample's ``K C``
    numbers at a position lie together, as the convolution's products read them."""
    batch, rest = like.shape[0], like.shape[1:]
    # the order in memory of the buffer's dimensions (B, K, C, *S)
    spatial = range(3, like.dim() + 1)
    order = (0, *spatial, 1, 2) if base.channels_last(like) else tuple(range(like.dim() + 1))
    held = storage.get(key)
    if (
        held is None
        or held.shape[0] < batch
        or held.shape[1:] != (num_vectors, *rest)
        or held.dtype != like.dtype
        or held.device != like.device
        or not held.permute(order).is_contiguous()
    ):
        shape = (batch, num_vectors, *rest)
        held = like.new_empty([shape[d] for d in order]).permute(_inverse(order))
        storage[key] = held
    return held[:batch]


def _inverse(order: tuple[int, ...]) -> tuple[int, ...]:
    """The permutation that undoes ``order``."""
    return tuple(sorted(range(len(order)), key=order.__getitem__))


def _sums_by_rows(
    model: nn.Module,
    params: dict[str, Tensor],
    batch: Batch,
    output_fn: OutputFn,
    make_vectors: VectorFn,
) -> dict[str, Tensor]:
    r""":math:`\sum_n \sum_k (J_n^\top v_{nk})^{\odot 2}` by plain autograd on the whole
    ``batch``: sample ``n``'s gradient is that of :math:`\langle f_n, v_{nk}\rangle`, its rows
    of the output alone, one backward pass per sample and vector (for a model whose samples do
    not depend on each other, as the other checks make sure; for :meth:`HookEngine._check_sums`
    where the model cannot run one sample alone)."""
    names = list(params)
    with torch.enable_grad():
        output = output_fn(batch.call(model))
    vectors = make_vectors(output.detach())  # (K, B, *S, C)
    sums = zero_sums(params)
    num_vectors = vectors.shape[0]
    for n in range(batch.size):
        for k in range(num_vectors):
            last = n == batch.size - 1 and k == num_vectors - 1
            grads = torch.autograd.grad(
                output[n], [params[name] for name in names], vectors[k, n],
                retain_graph=not last, allow_unused=True,
            )
            for name, g in zip(names, grads):
                if g is not None:
                    sums[name] += g.to(sums[name].dtype).square()
    return sums


@dataclass(frozen=True)
class Arrangement:
    """How :class:`HookEngine` splits a model's parameters into units (:func:`.recording.plan`).

    Attributes:
        layouts: the loose parameters (:func:`.loose.loose_parameters`) taken through
            per-sample copies, with their layouts (:data:`.loose.LAYOUTS`); the modules of the
            others are units of their own parameters. Also, in :data:`.loose.SHADOWED`
            copies, the parameters of units whose outputs have no batch dimension
            (:class:`.recording.Batchless`) and those used outside their units where no
            parent can be made a whole unit (:class:`.recording.UsedOutside`): their modules
            are then no units.
        whole_parents: whether every parent (a module owning parameters next to modules
            inside it that own some) is a unit of all the parameters inside it instead.
        whole: the modules that are units of all the parameters inside them: the parents of
            units whose parameters are used outside their calls (:class:`.recording.UsedOutside`:
            a BEiT attention's ``F.linear(x, self.qkv.weight, bias)``).
    """

    layouts: dict[str, int]
    whole_parents: bool = False
    whole: frozenset[str] = frozenset()

    @staticmethod
    def parents_of(paths: frozenset[str]) -> frozenset[str] | None:
        """The parent modules of the units at ``paths``, or ``None`` when one is the root
        (which cannot be a unit: the model is no longer decomposed)."""
        parents = frozenset(path.rpartition(".")[0] for path in paths)
        return None if "" in parents else parents

    def with_whole(self, parents: frozenset[str]) -> Arrangement:
        """This arrangement with the modules at ``parents`` whole units as well."""
        return Arrangement(self.layouts, self.whole_parents, self.whole | parents)

    def with_layouts(self, layouts: dict[str, int]) -> Arrangement:
        """This arrangement with the parameters of ``layouts`` taken through per-sample copies
        as well (see :attr:`layouts`)."""
        return Arrangement({**self.layouts, **layouts}, self.whole_parents, self.whole)


def tree_signature(model: nn.Module) -> tuple[Any, ...]:
    """What the hooks engine's per-model caches presume unchanged: each module's path, identity
    and class, its forward and backward hooks (their handles' ids), and which ``forward`` of its
    own its instance has, if any (the function's identity: one replaced by another was taken
    for the first, and its calls' layouts with them); and the global module hooks. (A walk over
    the modules once per call: the Planner's first walk costs about as much.)"""

    def hooks(owner: Any) -> tuple[tuple[int, ...], ...]:
        return tuple(tuple(getattr(owner, kind, None) or ()) for kind in _HOOK_DICTS)

    def own_forward(module: nn.Module) -> int | None:
        forward = module.__dict__.get("forward")
        return None if forward is None else id(getattr(forward, "__func__", forward))

    return (
        tuple(
            (path, id(module), type(module), hooks(module), own_forward(module))
            for path, module in model.named_modules(remove_duplicate=False)
        ),
        tuple(tuple(getattr(module_globals, kind, None) or ()) for kind in _GLOBAL_HOOKS),
    )


def function_key(output_fn: OutputFn) -> Any:
    """What the checks and arrangements kept for a model are kept by, of the ``output_fn``
    they were made with: its code (a lambda made again at the same place, for each call or
    each task's classes, is the same), else its type. (Kept without it, an ``output_fn``
    reading a parameter of the root after one that did not got that parameter a Fisher of 0:
    it was found unused and checked so.)"""
    return getattr(output_fn, "__code__", None) or type(output_fn)


#: The hook dictionaries of a module (:func:`tree_signature`), and the global ones.
_HOOK_DICTS = (
    "_forward_hooks",
    "_forward_pre_hooks",
    "_backward_hooks",
    "_backward_pre_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks",
    "_global_forward_pre_hooks",
    "_global_backward_hooks",
    "_global_backward_pre_hooks",
)


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
    #: The recorded shapes (with the selected parameters and the units whose calls they are)
    #: whose batch layout :func:`.batch_checks.check_batch_layout` has passed, per model, kept
    #: across calls too (a standard ResNet-18 at N=128 has 128 channels: without it,
    #: every call would pay a forward pass on 2 samples).
    layouts: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]]] = (
        weakref.WeakKeyDictionary()
    )

    #: The structures of the forward passes (:func:`.batch_checks.structure_of`, with the selected
    #: parameters' names and whether the batch had more than one sample) whose sums
    #: :meth:`_check_sums` has passed, per model: the check runs once per structure, not per
    #: shapes as the other checks (an LM whose batches are padded to their longest sequence
    #: would pay it for nearly every batch).
    sums_checked: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[tuple[Any, ...]]]] = (
        weakref.WeakKeyDictionary()
    )
    #: The units whose shared inputs are expanded though they have the batch size among their
    #: dimensions (:class:`.recording.SharedWithBatchRows`), and the calls, ``(unit path, call's
    #: position)``, whose layout the shapes could not tell, sequence-first or not
    #: (:class:`.recording.SequenceFirst`), per model, as the layout check found them: kept across
    #: calls too, so that a later call takes them so at once (without, a model with ``(1, T)``
    #: position ids and ``T == B`` paid 2 more forward passes per call).
    shared_inputs: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[str]]] = (
        weakref.WeakKeyDictionary()
    )
    layouts_found: ClassVar[weakref.WeakKeyDictionary[nn.Module, dict[tuple[str, int], bool]]] = (
        weakref.WeakKeyDictionary()
    )
    #: The inputs the per-module fallback passes whole, though they lead with the batch size,
    #: by unit path, as ``(call, tensor)`` positions (:class:`.recording.WholeInputs`), per
    #: model, kept across calls too.
    whole_inputs: ClassVar[
        weakref.WeakKeyDictionary[nn.Module, dict[str, set[tuple[int, int]]]]
    ] = weakref.WeakKeyDictionary()
    #: The units whose shared inputs or output are left as they are, not expanded over the
    #: batch, since the model failed on them expanded or its output changed
    #: (:class:`.recording.ExpansionFailed`), per model, kept across calls too.
    unexpanded: ClassVar[weakref.WeakKeyDictionary[nn.Module, set[str]]] = (
        weakref.WeakKeyDictionary()
    )
    #: The :class:`Arrangement` that worked, per model and selected parameters' names, kept
    #: across calls too: finding one (:func:`.loose.copies_layout`'s trials, a failed pass per
    #: step up to a whole unit) took 39% of a call's time on timm's ``eva02_tiny`` (B=8,
    #: ``empirical``); a later call whose batches it fails goes on from it to the next ways.
    arrangements: ClassVar[
        weakref.WeakKeyDictionary[nn.Module, dict[frozenset[str], Arrangement]]
    ] = weakref.WeakKeyDictionary()
    #: Why the engine gave a model up, per model, by the selected parameters' names, the batch
    #: size and one sample's input shapes, kept across calls too: a later call's batch of these
    #: goes to the fallback at once (the attempts cost timm's ``eva02_tiny``, whose rotary
    #: table ``(T, D)`` with ``T == B`` cannot be told from per-sample data, 0.7 of a
    #: functorch call each time: ``empirical``, B=16, one thread).
    #: (Kept as a new exception of the same kind, plain or :class:`.recording.SamplesMixed`,
    #: without the failed attempt's frames.)
    failures: ClassVar[
        weakref.WeakKeyDictionary[nn.Module, dict[tuple[Any, ...], Unsupported]]
    ] = (
        weakref.WeakKeyDictionary()
    )

    #: Each model's :func:`tree_signature` when its entries in the caches above were made: a
    #: call that finds another forgets them (a module inserted or replaced, a forward hook
    #: registered, since: the checks kept for the model were of another function; a module
    #: that mixes the samples, inserted after a first call, gave a Fisher 83% off).
    signatures: ClassVar[weakref.WeakKeyDictionary[nn.Module, tuple[Any, ...]]] = (
        weakref.WeakKeyDictionary()
    )

    def __init__(self, fallback: Engine | None = None) -> None:
        self.fallback = fallback
        # (the module tree's analyses, worked out once per call: see Planner)
        self.planner = Planner()
        self._given_up: weakref.WeakSet[nn.Module] = weakref.WeakSet()  # (to the fallback)
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
        signature = tree_signature(model)
        if cls.signatures.get(model) != signature:
            for cache in (
                cls.steps,
                cls.layouts,
                cls.sums_checked,
                cls.shared_inputs,
                cls.layouts_found,
                cls.whole_inputs,
                cls.unexpanded,
                cls.arrangements,
                cls.failures,
            ):
                cache.pop(model, None)
            cls.signatures[model] = signature
        engine = cls(fallback)
        problem = engine.planner.problem(model, params)
        return engine if problem is None else engine._give_up(model, problem)

    def _give_up(self, model: nn.Module, problem: Unsupported) -> Engine:
        """The engine that takes the model from now on, the fallback (logged); without one
        (``backend="hooks"``), ``ValueError``."""
        if self.fallback is None:
            raise ValueError(
                f"the hooks engine cannot compute this model's Fisher: {problem}; use "
                'backend="functorch" (or "auto")'
            )
        if isinstance(problem, SamplesMixed):
            warnings.warn(
                f"ewc_reg: {problem}. The {self.fallback.name} engine computes each sample's "
                "Fisher with the sample run alone, as a batch of one, which is not what the "
                "model computes on the batch; if the batch dimension of the inputs is not "
                "their first, the result is wrong (see docs/fisher.md, 'Models that mix the "
                "samples')",
                stacklevel=2,
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
        failures = self.failures.setdefault(model, {})
        selection = (frozenset(params), function_key(output_fn))
        key = (*selection, batch.size, batch.sample_shapes())
        if key in failures:
            known = failures[key]
            failure = type(known)(f"{known} (found on an earlier batch of these shapes)")
            return self._give_up(model, failure)(*args)
        shared = self.shared_inputs.setdefault(model, set())
        unexpanded = self.unexpanded.setdefault(model, set())
        whole = self.whole_inputs.setdefault(model, {})
        sequence_first = self.layouts_found.setdefault(model, {})

        def sums(arrangement: Arrangement) -> dict[str, Tensor]:
            """:meth:`_sums`, tried again for each unit the layout check finds to have shared
            inputs with the batch size among their dimensions
            (:class:`.recording.SharedWithBatchRows`), which are expanded from then on, or calls
            taken the wrong way, sequence-first or not (:class:`.recording.SequenceFirst`), taken
            the other way from then on, or units whose shared inputs or output the model failed
            on expanded (:class:`.recording.ExpansionFailed`), left as they are from then on, or
            inputs of units on the per-module fallback that the samples share though they lead
            with the batch size (:class:`.recording.WholeInputs`), passed whole from then on (in
            later calls too: :attr:`shared_inputs`, :attr:`layouts_found`, :attr:`unexpanded`,
            :attr:`whole_inputs`; the retries run outside the handler, so that the failed
            attempt's frames are freed first)."""
            while True:
                try:
                    return self._sums(*args, arrangement)
                except SharedWithBatchRows as problem:
                    if problem.path in shared:
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s; expanded over the batch", problem)
                    shared.add(problem.path)
                except SequenceFirst as problem:
                    if sequence_first.keys() & problem.calls.keys():
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s; taken so", problem)
                    sequence_first.update(problem.calls)
                except ExpansionFailed as problem:
                    if problem.paths <= unexpanded:
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s; left as they are", problem)
                    unexpanded.update(problem.paths)
                except WholeInputs as problem:
                    if all(inputs <= whole.get(p, set()) for p, inputs in problem.inputs.items()):
                        raise Unsupported(str(problem)) from None
                    logger.debug("hooks engine: %s", problem)
                    for path, inputs in problem.inputs.items():
                        whole.setdefault(path, set()).update(inputs)

        loose = self.planner.loose(model, params)
        found = self.arrangements.setdefault(model, {})

        def derived() -> Arrangement:
            """The loose parameters' copies in the layouts that fit this batch."""
            layouts, problem = copies_layout(model, loose, batch, output_fn) if loose else ({}, "")
            if problem:
                logger.debug(
                    "hooks engine: %s; the modules of %s become units of their own parameters",
                    problem,
                    [name for name in loose if name not in layouts],
                )
            return Arrangement(layouts)

        # The arrangement of an earlier batch, and where it fails on this one (its copies'
        # layouts may not fit inputs of another rank, (B, T, D) after (B, D)), one derived
        # afresh; then, failing that, the loose parameters' modules as units of their own
        # parameters (plan; the root cannot be one), and failing that too, each parent a unit
        # of all the parameters inside it (the outermost where they nest).
        known = found.get(selection)
        stages: list[Arrangement | None] = [known] if known is not None else []
        if known is None or (known.layouts and not known.whole_parents):
            stages.append(None)  # (None: derived() when it is tried)
        if loose and not (known is not None and known.whole_parents):
            stages += [Arrangement({}), Arrangement({}, whole_parents=True)]
        tried: list[Arrangement] = []
        failure = Unsupported("")
        unshadowable: set[str] = set()  # (parameters whose shadowed copies failed the check)

        def shadowing(
            arrangement: Arrangement, problem: Unsupported, names: frozenset[str]
        ) -> Arrangement | None:
            """``arrangement`` with the parameters ``names`` in shadowed per-sample copies
            (logged), or ``None`` where there are none to add or their check fails."""
            new = sorted(names - arrangement.layouts.keys() - unshadowable)
            layouts = dict.fromkeys(new, SHADOWED)
            trial = {name: params[name] for name in new}
            if not trial or per_sample_problem(model, trial, batch, output_fn, layouts)[0]:
                unshadowable.update(new)
                return None
            logger.debug("hooks engine: %s; %s take shadowed per-sample copies", problem, new)
            return arrangement.with_layouts(layouts)

        for stage in stages:
            arrangement = derived() if stage is None else stage
            if arrangement in tried:  # (a derived one may be a later stage's)
                continue
            tried.append(arrangement)
            if len(tried) > 1:
                logger.debug(
                    "hooks engine: %s; %s",
                    failure,
                    "the parents become units of all the parameters inside them"
                    if arrangement.whole_parents
                    else f"the modules of {list(loose)} become units of their own parameters",
                )
            while True:
                paths: frozenset[str] | None = None  # (the units of parameters used outside)
                try:
                    result = sums(arrangement)
                except UsedOutside as problem:
                    failure, names, paths = Unsupported(str(problem)), problem.names, problem.paths
                except Batchless as problem:
                    failure, names = Unsupported(str(problem)), problem.names
                except Unsupported as problem:
                    failure = type(problem)(str(problem))  # (not its traceback: the attempt's)
                    break
                else:
                    if batch.size > 1 or not arrangement.layouts:  # (one sample cannot show
                        found[selection] = arrangement  # the batch mixed up)
                    return result
                # (parameters used outside their units: their parents whole units, as long as
                # there are parents to climb to (shadowed copies of a large weight, BEiT-base's
                # qkv, took 2.0 times the whole attention on the fallback); else, and for
                # units without the batch, shadowed copies, checked outside the handler: the
                # failed attempt's frames, its forward pass's graph among them, are freed first)
                parents = None if paths is None else arrangement.parents_of(paths)
                if parents is not None and not (
                    arrangement.whole_parents or parents <= arrangement.whole
                ):
                    arrangement = arrangement.with_whole(parents)
                    logger.debug(
                        "hooks engine: %s; %s become units of all the parameters inside them",
                        failure,
                        sorted(parents),
                    )
                    continue
                shadowed = shadowing(arrangement, failure, names)
                if shadowed is None:
                    break
                arrangement = shadowed
        failures[key] = (SamplesMixed if isinstance(failure, SamplesMixed) else Unsupported)(
            str(failure)
        )
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
        arrangement: Arrangement,
        checking: bool = False,
        sequence_first: dict[str, frozenset[int]] | None = None,
    ) -> dict[str, Tensor]:
        """One forward pass over the batch (checks, vectors, and the sums when its pull-back
        fits the budget), else one more per chunk of samples (see the module docstring). When
        the model's last batch at this budget (in this call or an earlier one: :attr:`steps`)
        went in chunks and the vectors are :class:`~.base.RowWiseVectors`, the first pass is
        the first chunk's instead, and each chunk makes its own vectors. The parameters are
        split into units as ``arrangement`` says (the loose ones of its ``layouts`` taken
        through per-sample copies: :mod:`.loose`). ``checking``: the run of
        :meth:`_check_sums`, without the checks, and leaving the caches of the engine's runs as
        they are, with the calls of the checked pass that were ``sequence-first`` (by unit)
        taken as such and no others."""
        layouts = arrangement.layouts
        loose = {n: params[n] for n in layouts}
        selected = {n: p for n, p in params.items() if n not in loose}
        units = self.planner.plan(model, selected, arrangement.whole_parents, arrangement.whole)
        for unit in units:
            unit.shared = unit.path in self.shared_inputs.get(model, ())
            unit.expand = unit.path not in self.unexpanded.get(model, ())
            unit.whole = frozenset(self.whole_inputs.get(model, {}).get(unit.path, ()))
            if sequence_first is not None:  # (the checked pass's)
                unit.sequence_first, unit.decided = sequence_first.get(unit.path, frozenset()), True
            else:
                found = self.layouts_found.get(model, {})
                calls = {c: first for (path, c), first in found.items() if path == unit.path}
                unit.sequence_first = frozenset(c for c, first in calls.items() if first)
                unit.batch_first = frozenset(c for c, first in calls.items() if not first)
        copied = [
            Unit(LooseParameter(p, name), name, {name: name}, loose_parameter)
            for name, p in loose.items()
        ]
        device = next(iter(params.values())).device
        # (until the passes' sizes are known: a pull-back in small passes is batched, see below)
        looped = model in self._looped or loops_pull_back(model, device)
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
        # (with the calls taken as sequence-first: with T == B, the shapes are the same either
        # way; by unit and selection: the calls of other units may have the same shapes)
        selection = (tuple(params), function_key(output_fn))
        shapes = (
            *selection,
            tuple((unit.path, len(record.calls())) for unit, record in records.items()),
            *(s for call in calls for s in (*call.inputs, *call.outputs)),
            tuple(call.transposed for call in calls),
        )
        checked = self.layouts.setdefault(model, set())
        if checking:  # (the checks' own run: they passed on the batch it comes from)
            pass
        elif shapes not in checked:  # (once per model, selection and shapes: not every batch)
            check_batch_layout(model, units, first, output_fn, records, output)
            expanded = expanded_units(records)
            if expanded:
                check_expansion(model, units, first, output_fn, expanded)
            structure = (*selection, min(first.size, 2), *structure_of(records))
            passed = self.sums_checked.setdefault(model, set())
            if structure not in passed:  # (not again for every length of a sequence)
                self._check_sums(
                    model, params, first, output_fn, memory_budget, arrangement, decided
                )
                passed.add(structure)
            checked.add(shapes)
        elif has_folded_calls(records):  # (how rows fold depends on the data: checked every pass)
            check_folds(model, units, first, output_fn, records, set(expanded_units(records)))

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
        output_bytes = recorded // max(len(calls), 1)  # (a recorded output's, per sample)
        kept = sum(
            call.nbytes
            for unit, record in records.items()
            if reduction_of(unit, record) is None and accumulation_of(unit, record) is None
            for call in record.calls()
        ) // first.size
        del calls
        num_vectors = vectors.shape[0]

        def chunk_steps(looped: bool) -> tuple[int, ...]:
            """Samples per chunk without and with the forward pass."""
            return tuple(
                resolve_chunk_size(
                    chunk_size,
                    memory_budget,
                    bytes_per_sample(num_vectors, kept, recorded, forward, looped),
                )
                for forward in (False, True)
            )

        steps = chunk_steps(looped)
        per_pass = min(batch.size, steps[1]) * output_bytes
        if looped and model not in self._looped and not loops_pull_back(model, device, per_pass):
            looped = False  # (small passes: batched, see looped_min_bytes)
            steps = chunk_steps(looped)
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
            if has_folded_calls(records):
                check_folds(model, units, chunk, output_fn, records, set(expanded_units(records)))
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
        arrangement: Arrangement,
        sequence_first: dict[str, frozenset[int]],
    ) -> None:
        r"""Raise :class:`.recording.Unsupported` unless this engine's sums on the first two samples
        of ``batch``, for a random vector per sample, are the loop engine's (plain autograd, one
        sample at a time) to :data:`SUMS_TOLERANCE` of the parameter's type, or of the lowest
        precision the model casts it to (:class:`.batch_checks.Precisions`), the calls of the
        checked pass that were ``sequence-first``, by unit, taken as such, and no others.

        The other checks test the assumptions of the decomposition one by one; this one tests
        its result, :math:`\sum_n \sum_k (J_n^\top v_{nk})^{\odot 2}`, against the
        definition, so that a way of breaking them no check foresaw (a tensor made from a
        unit's parameters that leaves it by an attribute rather than its output, a layer run
        inside ``torch.vmap`` or inside a derivative the forward pass takes, an output shared
        by the samples taken from one sample's copy after its expansion) sends the model to the
        fallback instead of giving a wrong Fisher. Run with the checks, once per model and
        structure of the forward pass (:attr:`sums_checked`). Where the model fails on one
        sample alone (a ``squeeze()`` that takes a batch of one for no batch), the reference
        is plain autograd on the two samples together, one backward pass per sample
        (:func:`_sums_by_rows`); such models were not checked before, and two that break the
        decomposition (a ``Linear`` on an input the samples share, a derivative taken in the
        forward pass) got a wrong Fisher without an error. Where that fails too (an output
        that is no tensor), the check is left to the engine's own pass, which fails on such
        data or output with its own error."""
        few = batch.samples(0, min(batch.size, 2))
        drawn: list[Tensor] = []

        def vectors(output: Tensor) -> Tensor:  # (the same ones for both engines)
            if not drawn:
                generator = torch.Generator().manual_seed(0)
                shape = (1, *output.shape)  # (one: a plain backward pass, no vmap)
                drawn.append(torch.randn(shape, generator=generator, dtype=output.dtype))
            return drawn[0].to(output.device)

        precisions = Precisions(params)
        with TablesKept():  # (the whole batch's graph is alive: see TablesKept)
            try:
                with precisions:
                    want = LoopEngine()(model, params, few, output_fn, vectors, None, memory_budget)
            except Exception as error:
                if isinstance(error, torch.OutOfMemoryError):
                    raise
                logger.debug("hooks engine: the loop engine failed on the model (%s)", error)
                try:
                    with precisions:
                        want = _sums_by_rows(model, params, few, output_fn, vectors)
                except Exception as failure:  # (bad data or output: the pass says how)
                    if isinstance(failure, torch.OutOfMemoryError):
                        raise
                    logger.debug("hooks engine: plain autograd failed on the model (%s)", failure)
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
                    arrangement,
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
            dtype = precisions.lowest.get(name, p.dtype)  # (cast lower: autograd's to that)
            tolerance, eps = SUMS_TOLERANCE.get(dtype, 1e-1), torch.finfo(dtype).eps
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
        units: list[Unit],
        copied: list[Unit],
        layouts: dict[str, int],
        batch: Batch,
        output_fn: OutputFn,
        grad: bool,
    ) -> tuple[Any, dict[Unit, Record], bool]:
        """The recorded forward pass: its output, records, and whether it called a function of
        :data:`.base.VMAP_WRONG`; the parameters of the ``copied`` units (the loose ones) are
        replaced by their per-sample copies in their ``layouts``, each recorded as the unit's
        one output."""
        with torch.set_grad_enabled(grad), Recorder(units, batch) as recorder:
            copies: dict[str, Tensor] = {}
            try:
                if copied:
                    parameters = {u.path: u.module.parameter for u in copied}
                    copies = per_sample_copies(parameters, batch.size, layouts)
                    output = output_fn(call_with(model, copies, batch, layouts))
                else:
                    output = output_fn(batch.call(model))
            except Exception as error:
                # (the model may not take the expanded inputs, first, or the copies, a shape
                # this batch brings: tried again without the expansions, it shows which; its
                # own errors come again without either; an expansion costs no memory)
                expanded = expanded_units(recorder.records)
                if expanded and not isinstance(error, torch.OutOfMemoryError):
                    raise ExpansionFailed(
                        f"the model failed with the inputs (or output) the samples share of "
                        f"{', '.join(map(describe, expanded))} expanded over the batch "
                        f"({type(error).__name__}: {error})",
                        frozenset(expanded),
                    ) from error
                if not copied:
                    raise
                raise Unsupported(
                    f"per-sample copies of parameters {list(copies)} failed in the model "
                    f"({type(error).__name__}: {error})"
                ) from error
        recorder.check()
        if grad:
            check_differentiable(output)
        records = recorder.records
        for unit in copied:
            copy = records[unit] = Record((), {}, [])
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
        units: list[Unit],
        records: dict[Unit, Record],
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
        accumulators: dict[Unit, Accumulator] = {}
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
