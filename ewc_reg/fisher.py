r"""The five diagonal Fisher estimators of van de Ven (2025), for any ``nn.Module``.

With outputs :math:`f_n = \mathrm{output\_fn}(\mathrm{model}(x_n))`, per-sample log-likelihood
gradients :math:`g_y(x_n) = \partial \log p(y|f_n) / \partial\theta` and ``N`` samples:

============  ==============================================================================
method        diagonal Fisher
============  ==============================================================================
exact         :math:`\frac1N \sum_n \sum_y p(y|f_n)\, g_y(x_n)^2` (expectation under the model)
sample        :math:`\frac1N \sum_n \frac1m \sum_{j=1}^m g_{\hat y_j}(x_n)^2`,
              :math:`\hat y_j \sim p(\cdot|f_n)` drawn with ``generator``
empirical     :math:`\frac1N \sum_n g_{y_n}(x_n)^2` with the data's labels
batched       :math:`\frac1{|\mathcal B|}\sum_{B\in\mathcal B}
              \big(\frac1{|B|}\sum_{n\in B} g_{y_n}(x_n)\big)^2`: squared mini-batch gradients
============  ==============================================================================

``n_samples=n`` restricts any of them to the first ``n`` samples the data yields ("EXACT(n)").
The first three are sums of squared pull-backs of output-space vectors (see
:mod:`ewc_reg.likelihoods`) computed by an engine (:mod:`ewc_reg.engines`); ``batched`` takes one
ordinary backward pass per mini-batch.

Beyond one classifier on one machine:

* ``params=`` restricts :math:`\theta` to some parameters (a head, adapters); gradients are
  taken with respect to those only.
* Outputs with positions, ``(B, *S, C)`` (per-token logits ``(B, T, V)``), are sequences of
  independent positions: :math:`\log p(y|f_n) = \sum_s \log p(y_s|f_{ns})`, with positions left
  out by an ``attention_mask`` or ``-100`` labels (``docs/sequences.md``).
* With ``torch.distributed`` initialised, each rank's data is a shard and every rank gets the
  Fisher of the union (:mod:`ewc_reg.distributed`, ``docs/distributed.md``).
"""

from __future__ import annotations

import logging
import math
import sys
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, TypeAlias

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parameter import is_lazy

from ._batches import Batch, check_cut, iter_batches
from ._model_state import (
    batch_norm_backward_fixed,
    differentiable_kernels,
    evaluating,
    in_own_precision,
    observers_frozen,
    parametrizations_uncached,
    running_eagerly,
)
from ._validation import check_choice, check_count
from .distributed import process_group_for, reduce_shards, shard_generator, unwrap_model
from .engines import BACKENDS, base, get_engine, zero_sums
from .engines.base import (
    DEFAULT_MEMORY_BUDGET,
    RowWiseVectors,
    VectorFn,
    accumulation_dtype,
    check_differentiable,
    default_memory_budget,
)
from .likelihoods import LIKELIHOODS, Likelihood, get_likelihood

__all__ = ["METHODS", "ParamSelection", "fisher_diagonal", "select_parameters"]

logger = logging.getLogger("ewc_reg")

#: The estimators ``fisher_diagonal`` accepts as ``method``.
METHODS = ("exact", "sample", "empirical", "batched")

#: Which parameters a Fisher covers: ``None`` (all with ``requires_grad``), a list of names as in
#: ``named_parameters()``, or a predicate ``(name, parameter) -> bool``.
ParamSelection: TypeAlias = "Iterable[str] | Callable[[str, nn.Parameter], bool] | None"


#: Largest ``K = |S| C`` that ``method="exact"`` accepts for outputs with positions by default.
MAX_EXACT_VECTORS = 1024


def _model_logits(output: Any) -> Any:
    """The default ``output_fn``: the model's output, or its ``.logits`` tensor when it has one
    (as Hugging Face models' outputs do)."""
    logits = getattr(output, "logits", None)
    return logits if not isinstance(output, Tensor) and isinstance(logits, Tensor) else output


@torch.inference_mode(False)  # called in an evaluation loop: autograd and ordinary tensors still
def fisher_diagonal(
    model: nn.Module,
    data: Iterable[Any],
    method: str = "exact",
    *,
    n_samples: int | None = None,
    mc_samples: int = 1,
    likelihood: str = "categorical",
    output_fn: Callable[[Any], Tensor] | None = None,
    generator: torch.Generator | None = None,
    chunk_size: int | None = None,
    progress: bool = False,
    backend: str = "auto",
    params: ParamSelection = None,
    memory_budget: int | None = None,
    max_exact_vectors: int = MAX_EXACT_VECTORS,
    process_group: dist.ProcessGroup | None = None,
    distributed: bool = True,
) -> dict[str, Tensor]:
    """Diagonal Fisher information of ``model`` on ``data``.

    It may be called under ``torch.no_grad()`` or ``torch.inference_mode()`` (from an
    evaluation loop, on data made there): autograd is on inside, and the result is made of
    ordinary tensors. Under ``torch.autocast`` (a mixed-precision training loop), autocast is
    off inside: the Fisher is computed in the model's own dtypes.

    Args:
        model: any module; it is put in eval mode during the computation and restored after.
            Hooks on its parameters' gradients (``p.register_hook``) are not called: they
            act on training's gradients, not on the function whose Fisher this is.
            A ``DistributedDataParallel``/``DataParallel`` wrapper, or that of
            ``torch.compile(model)``, is looked through: the Fisher is keyed by the wrapped
            module's parameter names (no ``module.`` or ``_orig_mod.`` prefix). Compiled
            code (a compiled model or submodule, ``model.compile()``) runs eagerly here.
        data: an iterable of batches, ``(inputs, targets, *rest)`` or dicts with ``"labels"``;
            for ``exact`` and ``sample``, which need no labels, also inputs alone (a tensor,
            ``(inputs,)`` or ``(inputs, None)``, or a dict without ``"labels"`` or with
            ``"labels": None``). One batch passed as the data (``(x, y)`` or ``[x, y, ...]``)
            is an error. In a distributed
            run, this rank's shard of the data (see ``process_group``).
        method: one of :data:`METHODS` (see the module docstring for the formulas).
        n_samples: use only the first ``n_samples`` samples the data yields (per rank, in a
            distributed run).
        mc_samples: labels drawn per sample for ``method="sample"``.
        likelihood: ``"categorical"``, ``"gaussian"`` or ``"bernoulli"``.
        output_fn: maps the model's output to ``(B, C)`` logits, e.g.
            ``lambda out: out[:, task_classes]``, or to ``(B, *S, C)`` per-position logits
            (sequences: ``(B, T, V)``; see ``docs/sequences.md``). By default the output
            itself, or its ``.logits`` when it has one (Hugging Face models).
        generator: random generator for ``method="sample"`` (reproducible draws). In a
            distributed run each rank draws from a stream derived from it and its rank
            (:func:`ewc_reg.distributed.shard_generator`), so seed it alike on every rank.
        chunk_size: samples pulled back at once; ``None`` chooses from ``memory_budget``.
        progress: show a progress bar over the batches read (tqdm when installed).
        backend: Fisher engine, one of ``"auto"`` and the names in
            :data:`ewc_reg.engines.ENGINES`.
        params: the parameters to compute the Fisher of (see :func:`select_parameters`);
            ``None`` means all with ``requires_grad``. Gradients are taken with respect to these
            only, so a head-only Fisher costs about as much as the head's backward pass.
        memory_budget: bytes the engine's per-chunk working memory may take when
            ``chunk_size=None``; the chunk is the largest that fits, and at least one sample.
            ``None``: :func:`ewc_reg.engines.base.default_memory_budget` (256 MiB on a CPU; on
            a CUDA device a quarter of the memory available there, at least 256 MiB), halved
            and the batch run again where the device runs out of memory, down to 256 MiB.
        max_exact_vectors: ``method="exact"`` on outputs with positions ``(B, *S, C)`` pulls
            back ``K = |S| C`` vectors per sample (the per-token expansion); it is allowed up to
            this ``K``, else a ``ValueError`` points to ``"sample"`` and ``"empirical"``.
            ``(B, C)`` outputs are not limited.
        process_group: with ``torch.distributed`` initialised, each rank's ``data`` is a shard:
            the per-parameter sums and the sample count (``batched``: the squared batch
            gradients and the batch count) are all-reduced over this group, ``None`` meaning
            the default group, and every rank returns the Fisher of the union of the shards.
            Without an initialised process group, ``None`` computes on ``data`` alone.
        distributed: ``False`` turns the reduction off: this rank's data only, no collectives
            (then ``process_group`` must be ``None``).

    Returns:
        One tensor per selected parameter, keyed as in ``named_parameters()``, shaped like the
        parameter, in the parameter's dtype promoted to at least float32.

    Raises:
        ValueError: bad arguments, empty data, labels outside the output's classes (for
            ``empirical`` and ``batched``; for every method with per-position labels, which
            mark the positions) or missing for ``empirical`` / ``batched``, or an output of
            the wrong shape.
        TypeError: a model that is not an ``nn.Module``, or data that is not an iterable of
            accepted batches.
        FloatingPointError: the Fisher contains NaN or Inf.
        RuntimeError: in a distributed run, another rank of the group failed.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    check_choice("method", method, METHODS)
    # (as plain ints: a NumPy integer reached torch as a NumPy bool, a TypeError)
    n_samples = check_count("n_samples", n_samples, allow_none=True)
    mc_samples = check_count("mc_samples", mc_samples)
    chunk_size = check_count("chunk_size", chunk_size, allow_none=True)
    memory_budget = check_count("memory_budget", memory_budget, allow_none=True)
    max_exact_vectors = check_count("max_exact_vectors", max_exact_vectors)
    check_choice("likelihood", likelihood, tuple(LIKELIHOODS))
    check_choice("backend", backend, BACKENDS)
    if output_fn is not None and not callable(output_fn):
        raise TypeError(f"output_fn must be callable or None, got {type(output_fn).__name__}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator)}")
    model = unwrap_model(model)
    group = process_group_for(process_group, distributed)
    params = select_parameters(model, params)
    lik = get_likelihood(likelihood)
    output_fn = output_fn or _model_logits
    device = next(iter(params.values())).device
    # (Hugging Face's encoder-decoder models: attention_mask masks the encoder's input)
    encoder_decoder = bool(getattr(getattr(model, "config", None), "is_encoder_decoder", False))
    if group is not None and method == "sample" and generator is not None:
        generator = shard_generator(generator, dist.get_rank(group))
    batches = (b.to(device) for b in iter_batches(data, n_samples))
    if encoder_decoder:
        batches = (_with_decoder_inputs(model, b) for b in batches)
    if progress:
        batches = _with_progress(batches, _batch_count(data, n_samples))

    def accumulate(sums: dict[str, Tensor]) -> int:
        """Add this rank's sums into ``sums``; return its sample (or batch) count."""
        if method == "batched":
            sums.update(zero_sums(params))
            return _accumulate_batched(
                model, params, batches, lik, output_fn, sums, encoder_decoder
            )
        engine = get_engine(backend, model, params)

        def make_vectors_for(batch: Batch) -> VectorFn:
            draws = _DrawsInOrder(lik, mc_samples, generator)

            def make_vectors(output: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
                """The vectors of samples ``start`` to ``stop - 1`` (the batch's end) from their
                output."""
                if start or stop is not None:
                    batch_rows = batch.samples(start, batch.size if stop is None else stop)
                else:
                    batch_rows = batch
                output = _checked_output(lik, output, batch_rows).detach()
                mask, targets = _positions(lik, output, batch_rows, encoder_decoder)
                # (in at least float32, then in the output's dtype: a float16 softmax gives 0
                # for a probability below 6e-8, and the exact Fisher of a sample with a logit
                # margin of 18 came out 0 where its factor, the root, is 1e-4)
                wide = output.to(accumulation_dtype(output.dtype))
                if method == "exact":
                    _check_exact_size(output, max_exact_vectors)
                    vectors = lik.exact_vectors(wide)
                elif method == "empirical":
                    vectors = lik.empirical_vectors(wide, _labels(targets, method))
                else:
                    vectors = lik.sample_vectors(wide, draws.rows(wide, start, batch_rows.size))
                vectors = vectors.to(output.dtype)
                if mask is None:
                    return vectors
                return torch.where(mask.unsqueeze(-1), vectors, vectors.new_zeros(()))

            return RowWiseVectors(make_vectors)

        count = 0
        checked: set = set()  # (the input shapes check_cut has passed)
        budget = memory_budget or default_memory_budget(device)
        halvable = memory_budget is None and chunk_size is None
        for batch in batches:
            check_cut(model, batch, output_fn, checked)
            vectors = make_vectors_for(batch)
            batch_sums, budget = _within_memory(
                partial(engine, model, params, batch, output_fn, vectors, chunk_size),
                budget,
                halvable,
            )
            if sums:
                torch._foreach_add_(list(sums.values()), [batch_sums[name] for name in sums])
            else:  # the first batch's sums: the engine's own new tensors
                sums.update((name, batch_sums[name]) for name in params)
            count += batch.size
        return count

    sums: dict[str, Tensor] = {}  # by parameter, in the order of `params`, once a batch is in
    try:
        with (
            evaluating(model),
            running_eagerly(),
            differentiable_kernels(),
            parametrizations_uncached(),
            observers_frozen(model),
            in_own_precision(device),
            batch_norm_backward_fixed(model),
        ):
            count = accumulate(sums)
    except Exception as error:
        if group is None:
            raise
        reduce_shards(sums, 0, group, device, error)  # re-raises here, lets the others raise
    if group is not None:
        if not sums:  # no data on this rank: it still takes part in the reduction
            sums.update(zero_sums(params))
        count = reduce_shards(sums, count, group, device)
    if count == 0:
        spent = (
            " (data is an iterator: one read to its end before, by a training loop say, yields "
            "nothing; pass a list or a DataLoader, which can be read again)"
            if isinstance(data, Iterator)
            else ""
        )
        raise ValueError(f"data yielded no samples{spent}; pass at least one non-empty batch")
    torch._foreach_div_(list(sums.values()), count)
    _check_finite(sums, device)
    return sums


def _check_finite(fisher: dict[str, Tensor], device: torch.device) -> None:
    """Raise ``FloatingPointError`` naming a parameter whose Fisher has a NaN or an Inf.

    One device sync: the sum of all the values is NaN or Inf when one of them is (or when it
    overflows: only then is each parameter checked on its own). A GPU sums each parameter's in
    one fused kernel (``_foreach_norm``, of order 1); the CPU one by one: there the fused
    kernel took 417 µs for the Split MNIST MLP's 6 tensors (1 thread; a Fisher call on 8
    samples took 3.1 ms), per-tensor sums 38 µs."""
    tensors = list(fisher.values())
    if base.launch_bound(device):
        totals = torch._foreach_norm(tensors, 1)
    else:
        totals = [t.sum() for t in tensors]
    if math.isfinite(torch.stack([t.to(device) for t in totals]).sum()):
        return
    for name, f in fisher.items():
        if not bool(torch.isfinite(f).all()):
            raise FloatingPointError(
                f"the Fisher of parameter {name!r} contains NaN or Inf; check the model's outputs "
                "and inputs for non-finite values (the Fisher must be finite)"
            )


#: What an uninitialized parameter is, for messages.
LAZY_NOTE = "such as nn.LazyLinear's, which take their shape at their first forward pass"


def select_parameters(model: nn.Module, params: ParamSelection = None) -> dict[str, Tensor]:
    """The parameters of ``model`` that ``params`` selects, in ``named_parameters()`` order.

    * ``None``: every parameter with ``requires_grad=True``;
    * a predicate ``(name, parameter) -> bool``: the parameters with ``requires_grad=True`` for
      which it returns true (frozen parameters are skipped without asking it);
    * names (a list, or one string): exactly those parameters. Naming a frozen parameter
      (``requires_grad=False``) is an error rather than a silent skip, since the caller
      evidently expects it to be protected.

    Uninitialized parameters (of lazy modules such as ``nn.LazyLinear`` that no forward pass
    has reached yet: a head for a later task) have no values to protect: ``None`` and a
    predicate skip them (the regularizer takes them in at the ``consolidate`` after their
    first forward pass), and naming one is an error.

    Raises:
        ValueError: unknown or frozen names, an empty selection, or complex parameters.
        TypeError: ``params`` of another type.
    """
    selected = selected_parameters(model, params)
    complex_ = [n for n, p in selected.items() if p.is_complex()]
    if complex_:  # (the squared gradients would be complex squares, not |g|^2 per real part)
        raise ValueError(
            f"parameters {complex_} are complex, which the Fisher here does not cover; keep "
            "such a parameter as a real tensor with a last dimension of 2 "
            "(torch.view_as_real) and make it complex in forward (torch.view_as_complex), "
            "or leave it out with params="
        )
    if not selected and params is None:
        lazy = any(is_lazy(p) for p in model.parameters())
        raise ValueError(
            "the model has no parameters with requires_grad=True"
            + (f" but uninitialized ones ({LAZY_NOTE}): run it on a batch first" if lazy else "")
        )
    if not selected:
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        raise ValueError(
            "params selected no parameters with requires_grad=True; the trainable parameters "
            f"are {trainable}"
        )
    return selected


def selected_parameters(model: nn.Module, params: ParamSelection) -> dict[str, Tensor]:
    """What :func:`select_parameters` selects, with its errors but one: an empty selection
    is returned (``{}``), not an error (a predicate whose parameters are all frozen, say)."""
    params = checked_selection(model, params)
    named = dict(model.named_parameters())
    if params is None:
        return {n: p for n, p in named.items() if p.requires_grad and not is_lazy(p)}
    if callable(params):
        return {
            n: p for n, p in named.items() if p.requires_grad and not is_lazy(p) and params(n, p)
        }
    wanted = set(params)
    lazy = [n for n in named if n in wanted and is_lazy(named[n])]
    if lazy:
        raise ValueError(
            f"params names {lazy} are uninitialized: parameters of lazy modules "
            f"({LAZY_NOTE}); run the model on a batch first, or leave them out"
        )
    frozen = [n for n in named if n in wanted and not named[n].requires_grad]
    if frozen:
        raise ValueError(
            f"params names {frozen} have requires_grad=False; set requires_grad=True to "
            "protect them, or leave them out"
        )
    return {n: p for n, p in named.items() if n in wanted}


def checked_selection(model: nn.Module, params: ParamSelection) -> ParamSelection:
    """``params`` after checking its type and, for names, that they name parameters of
    ``model`` (whether frozen or not); names come back as a tuple (one string: a 1-tuple, an
    iterator read once), ``None`` and a predicate as they are.

    Raises:
        TypeError: ``params`` that is not ``None``, a predicate or names, or names that are
            not strings (parameters instead of their names, say).
        ValueError: names that are not parameters of ``model``.
    """
    if isinstance(params, (Tensor, nn.Module)) or not (
        params is None or callable(params) or isinstance(params, Iterable)
    ):
        raise TypeError(
            "params must be None, a list of parameter names or a predicate "
            f"(name, parameter) -> bool, got {type(params).__name__}"
        )
    if params is None or callable(params):
        return params
    names = (params,) if isinstance(params, str) else tuple(params)
    not_str = [name for name in names if not isinstance(name, str)]
    if not_str:
        first = not_str[0]
        got = (
            f"a {type(first).__name__} of shape {tuple(first.shape)}"
            if isinstance(first, Tensor)  # (not its values: a weight matrix is long)
            else f"{first!r:.80}"
        )
        raise TypeError(
            f"params names must be strings (names as in named_parameters()), got {got}; to "
            "select parameters, pass their names, e.g. [n for n, p in model.named_parameters() "
            "if ...], or a predicate (name, param) -> bool"
        )
    named = dict(model.named_parameters())
    unknown = sorted(set(names) - set(named))
    if unknown:
        first_names = {id(p): name for name, p in named.items()}
        aliases = {
            name: first_names[id(p)]
            for name, p in model.named_parameters(remove_duplicate=False)
            if name in unknown
        }
        alias_text = "".join(
            f"; {alias!r} is the tensor {first!r} (named_parameters() gives a shared tensor "
            f"once, under its first name): select it as {first!r}"
            for alias, first in aliases.items()
        )
        raise ValueError(
            f"params names {unknown} are not parameters of the model{alias_text}; valid names "
            f"(from named_parameters()) are {list(named)}"
        )
    return tuple(map(str.__str__, names))  # (a str subclass's value: the names are saved)


def _accumulate_batched(
    model: nn.Module,
    params: dict[str, Tensor],
    batches: Iterable[Batch],
    lik: Likelihood,
    output_fn: Callable[[Any], Tensor],
    sums: dict[str, Tensor],
    encoder_decoder: bool,
) -> int:
    """Add the squared gradient of each batch-mean log-likelihood into ``sums``; return the
    number of batches (``encoder_decoder``: see :func:`_output_mask_key`)."""
    names = list(params)
    count = 0
    for batch in batches:
        with torch.enable_grad():
            output = _checked_output(lik, output_fn(batch.call(model)), batch)
            check_differentiable(output)
            mask, targets = _positions(lik, output, batch, encoder_decoder)
            targets = lik.check_targets(output, _labels(targets, "batched"))
            mean_ll = lik.log_likelihood(output, targets, mask).mean()
            grads = torch.autograd.grad(mean_ll, [params[n] for n in names], allow_unused=True)
        for name, g in zip(names, grads):
            if g is not None:
                sums[name] += g.to(sums[name].dtype).pow(2)
        count += 1
    return count


def _within_memory(
    compute: Callable[[int], dict[str, Tensor]], budget: int, halvable: bool
) -> tuple[dict[str, Tensor], int]:
    """``compute(budget)`` and the budget it ran with. Where the budget is ``halvable`` (the
    device's default: the caller set neither ``memory_budget`` nor ``chunk_size``) and the
    device runs out of memory, ``compute`` runs again with half the budget, down to
    :data:`~ewc_reg.engines.base.DEFAULT_MEMORY_BUDGET` (logged each time); the caller keeps
    the budget that ran for its later batches. The engines restore the model on every path,
    and ``sample``'s draws are kept per batch, so a retry computes what a first attempt would
    have. (Retried after the handler: the failed attempt's frames and their tensors are freed
    first.)"""
    while True:
        try:
            return compute(budget), budget
        except torch.OutOfMemoryError:
            if not halvable or budget <= DEFAULT_MEMORY_BUDGET:
                raise
        budget = max(DEFAULT_MEMORY_BUDGET, budget // 2)
        logger.info(
            "fisher_diagonal: the device ran out of memory; again with a memory budget of "
            "%d MiB",
            budget >> 20,
        )


class _DrawsInOrder:
    """The uniforms behind ``sample``'s labels for one batch, drawn from ``generator`` in sample
    order the first time a sample is asked for, and kept: each sample's labels are drawn once
    and are the same whatever the chunks, retries and fallbacks that ask for them."""

    def __init__(self, lik: Likelihood, m: int, generator: torch.Generator | None) -> None:
        self.lik, self.m, self.generator = lik, m, generator
        self.kept: Tensor | None = None

    def rows(self, output: Tensor, start: int, count: int) -> Tensor:
        """The uniforms of samples ``start`` to ``start + count - 1``, whose output is
        ``output``."""
        have = 0 if self.kept is None else self.kept.shape[0]
        if start + count > have:
            more = self.lik.uniforms(output, self.m, self.generator, count=start + count - have)
            self.kept = more if self.kept is None else torch.cat([self.kept, more])
        assert self.kept is not None
        return self.kept[start : start + count]


def _checked_output(lik: Likelihood, output: Any, batch: Batch) -> Tensor:
    """``lik.check_output`` for ``batch``; where it fails and no input tensor has as many
    rows as the labels, with a note saying so (the labels of another batch, say)."""
    try:
        return lik.check_output(output, batch.size)
    except ValueError as error:
        if batch.targets is not None and not batch.sample_shapes():
            error.add_note(
                f"ewc_reg: no input tensor has the labels' {batch.size} rows "
                f"({batch.layout()}): do the labels belong to these inputs?"
            )
        raise


def _labels(targets: Tensor | None, method: str) -> Tensor:
    """``targets``; ``ValueError`` for a batch of inputs only (``None``)."""
    if targets is None:
        raise ValueError(
            f"method={method!r} needs the data's labels, but a batch has inputs only; pass "
            "(inputs, targets) batches or dicts with 'labels', or use 'exact' or 'sample', "
            "which need none"
        )
    return targets


#: The inputs of a Hugging Face encoder-decoder model's decoder, one of which a batch with labels
#: needs (see :func:`_with_decoder_inputs`).
DECODER_INPUTS = ("decoder_input_ids", "decoder_inputs_embeds")


def _with_decoder_inputs(model: nn.Module, batch: Batch) -> Batch:
    """``batch`` for an encoder-decoder ``model`` (Hugging Face's, ``config.is_encoder_decoder``):
    where it has labels but no decoder inputs (:data:`DECODER_INPUTS`), as a seq2seq collator
    without a model or a tokenizer's ``text_target`` gives it, with the decoder inputs that
    Hugging Face's own training makes from the labels, ``decoder_input_ids =
    model.prepare_decoder_input_ids_from_labels(labels)`` (the labels shifted right, ``-100``
    made padding). The labels are not passed to the model (it would compute its loss), and
    BART, without them, fed its decoder the shifted *source*: a Fisher 4.95 off (relative) in
    a test, without an error; T5 and Marian failed. Only for a model that generates text
    (``model.can_generate()``: not an encoder-decoder classifier, whose labels do not feed its
    decoder) and has that method; others make their decoder inputs as they do. ``ValueError``
    where the method fails."""
    if batch.targets is None or any(key in batch.kwargs for key in DECODER_INPUTS):
        return batch
    prepare = getattr(model, "prepare_decoder_input_ids_from_labels", None)
    generates = getattr(model, "can_generate", None)
    if prepare is None or generates is None or not generates():
        return batch
    try:
        decoder_inputs = prepare(labels=batch.targets)
    except Exception as error:
        raise ValueError(
            "an encoder-decoder model's batch with labels and no decoder inputs: its "
            f"prepare_decoder_input_ids_from_labels failed ({type(error).__name__}: {error}); "
            "pass decoder_input_ids (the labels shifted right, as its training makes them)"
        ) from error
    kwargs = {**batch.kwargs, "decoder_input_ids": decoder_inputs}
    return Batch(batch.args, kwargs, batch.targets, batch.size)


def _output_mask_key(batch: Batch, encoder_decoder: bool) -> str | None:
    """The dict batch's entry that masks the output's positions: ``decoder_attention_mask`` if
    it has one, none in any other encoder-decoder batch (Hugging Face's: a model whose
    ``config.is_encoder_decoder``, or ``decoder_*`` entries; its ``attention_mask`` masks the
    encoder's input), else ``attention_mask``."""
    if "decoder_attention_mask" in batch.kwargs:
        return "decoder_attention_mask"
    if encoder_decoder or any(key.startswith("decoder_") for key in batch.kwargs):
        return None
    return "attention_mask"


def _per_position(targets: Tensor, output: Tensor) -> bool:
    """Whether ``targets`` look like labels with positions, ``(B, *S')`` for an output
    ``(B, *S, C)`` (of another shape or dtype than ``(B, *S)`` integers, for
    :func:`_positions`' error): at least as many dimensions as the positions (``(B, T, 1)``
    labels or soft ``(B, T, C)`` ones too), the same batch size."""
    return targets.dim() >= output.dim() - 1 and targets.shape[:1] == output.shape[:1]


def _positions(
    lik: Likelihood, output: Tensor, batch: Batch, encoder_decoder: bool
) -> tuple[Tensor | None, Tensor | None]:
    """The positions that count and the targets, for an output ``(B, *S, C)`` with positions.

    The mask ``(B, *S)`` is the dict batch's entry for the output's positions (if any:
    :func:`_output_mask_key`) and-ed with ``targets != lik.ignore_index`` (``-100`` for
    ``categorical``, when the targets have one entry per position); ignored targets are
    replaced by class 0 so that they validate, and contribute nothing, and the others are
    checked here, whatever the method (``exact`` and ``sample`` read them for the mask: a
    padding label other than ``-100``, such as ``-1``, would count its position). Targets
    that look like labels with positions (:func:`_per_position`) but are not ``(B, *S)``
    integers are a ``ValueError`` for every method (``exact`` and ``sample`` ignored them,
    and their ``-100``: unshifted labels, float ones). ``(B, C)`` outputs: no mask (``None``)
    and the targets unchanged (``exact`` and ``sample`` do not read them).
    """
    targets = batch.targets
    if output.dim() == 2:
        return None, targets
    mask = None
    key = _output_mask_key(batch, encoder_decoder)
    attention = None if key is None else batch.kwargs.get(key)
    positional = (
        targets is not None
        and targets.shape == output.shape[:-1]
        and not targets.is_floating_point()
    )
    if attention is not None and tuple(attention.shape) != tuple(output.shape[:-1]):
        if not (positional and lik.ignore_index is not None):
            remedy = (
                f"labels with one entry per output position, {lik.ignore_index} where a "
                "position is left out (they leave it out for every method), and keep "
                f"{key} as the model takes it"
                if lik.ignore_index is not None
                else "an output whose positions are the inputs' (then the mask fits both)"
            )
            raise ValueError(
                f"the batch's {key} has shape {tuple(attention.shape)}, but the output (after "
                f"output_fn) has positions {tuple(output.shape[:-1])}: it is the model's input "
                f"mask and cannot mark the output's positions. Give {remedy}"
            )
        attention = None  # (the model's own; the labels' ignore_index marks the positions)
    if attention is not None:
        mask = attention.bool()
    if targets is None:  # (inputs only: the attention mask alone)
        return mask, None
    if lik.ignore_index is not None and not positional and _per_position(targets, output):
        raise ValueError(
            f"the labels have shape {tuple(targets.shape)} and dtype {targets.dtype}, but the "
            f"output (after output_fn) has positions {tuple(output.shape[:-1])}: labels with "
            f"positions must be integer class indices, one per output position "
            f"({lik.ignore_index} where a position is left out: they mark the positions for "
            "every method); shift them as output_fn shifts the output, or give inputs alone"
        )
    if lik.ignore_index is not None and positional:
        # (in int64: an unsigned dtype wraps -100, and uint8's 156 would be left out)
        kept = targets.to(torch.int64) != lik.ignore_index
        targets = lik.check_targets(output, targets.masked_fill(~kept, 0))
        mask = kept if mask is None else mask & kept
    return mask, targets


def _check_exact_size(output: Tensor, max_exact_vectors: int) -> None:
    num_vectors = output[0].numel()  # |S| C
    if output.dim() > 2 and num_vectors > max_exact_vectors:
        raise ValueError(
            f"method='exact' on an output with positions, shape {tuple(output.shape)} = "
            f"(B, *S, C), pulls back K = |S|*C = {num_vectors} vectors per sample, more than "
            f"max_exact_vectors={max_exact_vectors}; use method='sample' with mc_samples=m "
            "(m pull-backs per sample, unbiased), or method='empirical' (one, with the data's "
            "labels), or raise max_exact_vectors"
        )


def _batch_count(data: Any, n_samples: int | None) -> int | None:
    """How many batches the Fisher will read from ``data``, where that is known: its length,
    or with ``n_samples`` the batches of a ``DataLoader`` (its ``batch_size``) that hold them;
    ``None`` where the length is unknown."""
    try:
        total = len(data)
    except Exception:  # (an IterableDataset's DataLoader raises TypeError, streams other errors)
        return None
    if n_samples is None:
        return total
    batch_size = getattr(data, "batch_size", None)
    if not isinstance(batch_size, int) or batch_size <= 0:
        return None
    return min(total, math.ceil(n_samples / batch_size))


def _with_progress(batches: Iterator[Batch], total: int | None) -> Iterator[Batch]:
    """``batches`` behind a progress bar over ``total`` batches (tqdm when installed)."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _plain_progress(batches, total)
    return iter(tqdm(batches, total=total, desc="Fisher", unit="batch", leave=False))


def _plain_progress(batches: Iterator[Batch], total: int | None) -> Iterator[Batch]:
    step = 1 if total is None else max(1, math.ceil(total / 20))
    for i, batch in enumerate(batches, 1):
        if i % step == 0 or i == total:
            print(f"\rFisher: {i}/{total or '?'} batches", end="", file=sys.stderr, flush=True)
        yield batch
    print(file=sys.stderr)
