r"""Parameters the hook engine cannot give a unit: those of a module that contains other modules
with parameters (a ViT's class token and position embedding, a ConvNeXt block's layer scale).

Such a parameter :math:`p` is used by its module's own ``forward`` (``expand``, ``+``, ``*``),
with no module call to record. But these uses broadcast :math:`p` over the batch, so the
forward pass can take per-sample copies instead: :math:`p` expanded to
:math:`P = (p, \dots, p)` with the batch in one of the :data:`LAYOUTS` (``(B, *p.shape[1:])``
where ``p.shape[0] == 1``, ``(B, *p.shape)``, with dimensions of size 1 after ``B``, or
``(p.shape[0], B, *p.shape[2:])`` where ``p.shape[1] == 1``, sequence-first). The
output is unchanged, and the gradient with respect to :math:`P_n` is sample ``n``'s gradient
with respect to :math:`p`:

.. math::

    \sum_n \sum_k \big(J_n^\top v_{nk}\big)_p^{\odot 2}
    = \sum_n \sum_k \Big(\frac{\partial \langle f(x_n), v_{nk}\rangle}{\partial P_n}\Big)^{\odot 2}.

Whether a model's uses do broadcast this way is checked on two samples, layout after layout
(:func:`copies_layout`), before the copies are trusted; a parameter used otherwise (indexed,
say, as a Swin window's relative position table) makes its module one unit instead
(:func:`.recording.plan`).
"""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

import torch
from torch import Tensor, nn

from .._batches import Batch
from .base import (
    OutputFn,
    accumulation_dtype,
    modules_and_own_parameters,
    swapped_call,
    tensors_in,
)
from .rules import ACCUMULATIONS, CALL_RULES, feed_all
from .shadows import Shadows


def loose_parameters(model: nn.Module, params: dict[str, Tensor]) -> dict[str, Tensor]:
    """The parameters of ``params`` registered directly on a module (the root included) that
    contains other modules owning some of ``params``, by name. ``nn.MultiheadAttention`` (a
    unit with its ``out_proj``) is not such a module."""
    name_of = {id(p): name for name, p in params.items()}
    owned: dict[str, list[str]] = {}  # module path -> names of its own selected parameters
    attention: list[str] = []
    for path, module, own in modules_and_own_parameters(model):
        if isinstance(module, nn.MultiheadAttention):
            attention.append(path)
        for _, p in own:
            if id(p) in name_of:
                owned.setdefault(path, []).append(name_of[id(p)])
    # (the modules some other owner lies inside: each owner's proper ancestors, "" the root's;
    # linear in the owners, where asking each pair took 3,400 checks per call for the reduced
    # ResNet-18 and grows with the square of a model's layers)
    outer = set()
    for path in owned:
        parts = path.split(".") if path else []
        outer.update(".".join(parts[:depth]) for depth in range(len(parts)))
    return {
        name: params[name]
        for path, names in owned.items()
        if path not in attention and path in outer
        for name in names
    }


#: The layouts tried for the per-sample copies, in this order: ``-1`` replaces a leading
#: dimension of size 1 by the batch (a ViT's ``(1, T, D)`` position embedding; a parameter
#: without one gets the batch in front), ``r >= 0`` puts the batch in front with ``r``
#: dimensions of size 1 after it, so that it lines up with the batch of an operand of higher
#: rank (``(D,)`` scaling a ``(B, T, D)`` sequence: ``r = 1``), and :data:`SEQUENCE_FIRST`
#: replaces a second dimension of size 1 by the batch (a ``(T_max, 1, D)`` position embedding
#: added to a sequence-first ``(T, B, D)`` sequence); last, :data:`SHADOWED` copies
#: ``(B, *p.shape)`` that the model does not take: the operations on the parameter are
#: shadowed on them up to where they meet the batch (:mod:`.shadows`: a ConvNeXt block's
#: ``gamma.reshape(1, C, 1, 1)``).
SEQUENCE_FIRST = -2
SHADOWED = -3
LAYOUTS = (-1, 0, 1, 2, 3, SEQUENCE_FIRST, SHADOWED)


def per_sample_copies(
    loose: dict[str, Tensor], batch_size: int, layouts: dict[str, int]
) -> dict[str, Tensor]:
    """Each parameter expanded to its per-sample copies in its layout of ``layouts`` (see
    :data:`LAYOUTS`; a view: no memory; :data:`SHADOWED` as ``0``), by name; ``ValueError``
    for a parameter without a second dimension of size 1 in :data:`SEQUENCE_FIRST`."""
    copies = {}
    for name, p in loose.items():
        layout = layouts[name]
        if layout == SEQUENCE_FIRST:
            if p.dim() < 2 or p.shape[1] != 1:
                raise ValueError(f"{name!r} of shape {tuple(p.shape)}: no dimension 1 of size 1")
            copies[name] = p.expand(p.shape[0], batch_size, *p.shape[2:])
        elif layout == -1 and p.dim() and p.shape[0] == 1:
            copies[name] = p.expand(batch_size, *p.shape[1:])
        else:
            ones = (1,) * max(layout, 0)
            copies[name] = p.reshape(1, *ones, *p.shape).expand(batch_size, *ones, *p.shape)
    return copies


def call_with(
    model: nn.Module, copies: dict[str, Tensor], batch: Batch, layouts: dict[str, int]
) -> Any:
    """``model`` called on ``batch`` with the parameters in ``copies`` replaced, those in the
    :data:`SHADOWED` layout shadowed (:class:`.shadows.Shadows`)."""
    shadowed = {name for name in copies if layouts[name] == SHADOWED}
    replaced = {name: copy for name, copy in copies.items() if name not in shadowed}
    if not shadowed:
        return swapped_call(model, replaced, batch.args, batch.kwargs)
    inputs = tensors_in((batch.args, batch.kwargs))
    with Shadows({model.get_parameter(name): copies[name] for name in shadowed}, inputs):
        return swapped_call(model, replaced, batch.args, batch.kwargs)


def copies_layout(
    model: nn.Module, loose: dict[str, Tensor], batch: Batch, output_fn: OutputFn
) -> tuple[dict[str, int], str]:
    """Each parameter's first layout of :data:`LAYOUTS` whose per-sample copies give its
    per-sample gradients (:func:`per_sample_problem`), by name, for those that have one, and
    why the first trial failed (``""`` when every parameter has a layout). The parameters still
    without a layout are tried together, layout after layout, and where the model cannot take
    their copies together, those of each kind together (the same shape, on modules of the same
    class under the same name: a ViT's ``(1, 1, D)`` class token takes ``-1``, its blocks'
    layer scales ``(D,)`` scaling ``(B, T, D)`` take ``1``, and BEiT's query biases, joined to
    the key's ``(D,)`` zeros by ``torch.cat``, none); parameters given different layouts, or
    tried apart, are checked together once more, and where that fails, none gets copies."""
    layouts: dict[str, int] = {}
    first = ""
    regrouped = False  # (whether some parameters were tried apart from others)
    for layout in LAYOUTS:
        trying = {name: p for name, p in loose.items() if name not in layouts}
        if not trying:
            break
        failing, problem, raised = per_sample_problem(
            model, trying, batch, output_fn, dict.fromkeys(trying, layout)
        )
        first = first or problem
        kinds: dict[tuple[Any, ...], dict[str, Tensor]] = {}
        if raised:  # (the model raised on them together: each kind apart)
            for name, p in trying.items():
                kinds.setdefault(_kind(model, name, p), {})[name] = p
        if len(kinds) > 1:
            regrouped, failing = True, set()
            for alike in kinds.values():
                failing |= per_sample_problem(
                    model, alike, batch, output_fn, dict.fromkeys(alike, layout)
                )[0]
        layouts.update((name, layout) for name in trying if name not in failing)
    if layouts and (regrouped or len(set(layouts.values())) > 1):
        copied = {name: loose[name] for name in layouts}
        failing, problem, _ = per_sample_problem(model, copied, batch, output_fn, layouts)
        if failing:
            return {}, problem
    return layouts, first if len(layouts) < len(loose) else ""


def _kind(model: nn.Module, name: str, p: Tensor) -> tuple[Any, ...]:
    """What :func:`copies_layout` groups parameters by: shape, the class of the module owning
    parameter ``name``, and the name there."""
    path, _, local = name.rpartition(".")
    return p.shape, type(model.get_submodule(path)), local


def per_sample_problem(
    model: nn.Module,
    loose: dict[str, Tensor],
    batch: Batch,
    output_fn: OutputFn,
    layouts: dict[str, int],
) -> tuple[set[str], str, bool]:
    r"""The parameters of ``loose`` whose per-sample copies in ``layouts`` do not give their
    per-sample gradients, why (the first's; ``""`` where there is none), and whether the model
    raised an error on the copies.

    On the first two samples (one when the batch has one) and a fixed random weighting ``w`` of
    the outputs, the gradients of :math:`\langle f, w\rangle` with respect to the copies must
    equal those of each sample alone with respect to the parameters (to 1e-3 relative, or 16
    rounding units in low precision: the batched and single computations round differently;
    and to :math:`10^{-2} \sqrt{\epsilon}` of the largest gradient of them all, 1.5e-10 in
    float64: a gradient that is zero but for rounding, as that of a bias added to every score a
    softmax takes, is rounding on both sides: 18 rounding units of the largest in a relative
    position MLP of MaxViT). Copies the model cannot take (a shape or index error) fail all of
    them."""
    size = min(batch.size, 2)
    few = batch.samples(0, size)
    names = list(loose)
    failing: dict[str, str] = {}
    try:
        with torch.enable_grad():
            copies = per_sample_copies(loose, size, layouts)
            output = output_fn(call_with(model, copies, few, layouts))
            weights = torch.randn(
                output.shape, generator=torch.Generator().manual_seed(0), dtype=output.dtype
            ).to(output.device)
            batched = torch.autograd.grad(
                (output * weights).sum(), [copies[n] for n in names], allow_unused=True
            )
            for n in range(size):
                one = few.samples(n, n + 1)
                alone = output_fn(one.call(model))
                single = torch.autograd.grad(
                    (alone * weights[n : n + 1]).sum(), [loose[m] for m in names], allow_unused=True
                )
                wanted = [
                    torch.zeros_like(loose[name]) if want is None else want
                    for name, want in zip(names, single)
                ]
                largest = max(want.abs().max().item() for want in wanted)
                for name, got, want in zip(names, batched, wanted):
                    if got is None:
                        got = torch.zeros_like(loose[name])
                    else:  # (sample n's copy)
                        got = got[:, n] if layouts[name] == SEQUENCE_FIRST else got[n]
                        got = got.reshape(loose[name].shape)
                    eps = torch.finfo(want.dtype).eps
                    scale = max(want.abs().max().item(), torch.finfo(want.dtype).tiny)
                    rtol = max(1e-3, 16 * eps)  # (bf16: 0.125)
                    atol = max(1e-2 * rtol * scale, 1e-2 * eps**0.5 * largest)
                    if not torch.allclose(got, want, rtol=rtol, atol=atol):
                        failing.setdefault(
                            name,
                            f"parameter {name!r} is not used as one value broadcast over the "
                            "samples (per-sample copies of it change its per-sample gradients)",
                        )
    except Exception as error:  # (copies the model cannot take: a shape or index error)
        problem = (
            f"per-sample copies of parameters {names} failed in the model "
            f"({type(error).__name__}: {error})"
        )
        return set(names), problem, True
    return set(failing), next(iter(failing.values()), ""), False


class LooseParameter:
    """Stands in the hook engine's plan for a loose parameter, as its unit's module: the rule
    :func:`loose_parameter` sums the squares of the gradients of its per-sample copies."""

    def __init__(self, parameter: Tensor, name: str) -> None:
        self.parameter, self.name = parameter, name


class LooseSums:
    """The accumulator of a loose parameter, fed the gradients of its per-sample copies
    ``(..., B, *copy.shape[1:])``; its sums are keyed by the parameter's full name."""

    def __init__(self, loose: LooseParameter) -> None:
        self.name, self.shape = loose.name, loose.parameter.shape
        self.total = loose.parameter.new_zeros(
            loose.parameter.numel(), dtype=accumulation_dtype(loose.parameter.dtype)
        )

    def add(self, key: int | str, grads: Tensor) -> None:
        self.total += grads.to(self.total.dtype).reshape(-1, self.total.numel()).square().sum(0)

    def sums(self) -> dict[str, Tensor]:
        return {self.name: self.total.view(self.shape)}


def _loose_sums(
    loose: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> LooseSums:
    return LooseSums(loose)


def loose_parameter(
    loose: Any,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor]:
    """The sums of a :class:`LooseParameter` from the gradients ``grads[0]`` of its per-sample
    copies (a whole-call rule of no module class: the engine adds its units itself)."""
    return feed_all(LooseSums(loose), grads)


CALL_RULES.add(loose_parameter)
ACCUMULATIONS[loose_parameter] = _loose_sums
