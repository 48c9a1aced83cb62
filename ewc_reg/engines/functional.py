r"""Modules without a rule whose call ends in one ``F.linear`` or ``F.conv1d``/``2d``/``3d``
on their input, with a weight (and bias) made from their parameters during the call: a layer
that masks its weight (PackNet, Piggyback, HAT, SupSup: ``F.conv2d(x, self.weight *
self.mask, self.bias, ...)``), adds a low-rank update to it, or calls ``F.linear`` on its own
parameters (a ``MyLinear`` of one's own).

Such a module's output is :math:`y = x W^\top + b` (or the convolution), so each sample's
gradients of :math:`W` and :math:`b` are the class rules' products of output gradients and
inputs (:func:`.parametrized.linear_factors`, :func:`.convolution.conv_factors`), and its
parameters' are those pulled back through the part of the forward pass that made :math:`W`
and :math:`b` from them, which autograd recorded: one ``torch.autograd.grad`` with
``is_grads_batched=True`` per chunk of samples (or none, where :math:`W` is a parameter). A
module called more than once has each call's products pulled back through the graph that
made that call's :math:`W`, in the same ``autograd.grad``, so that each sample's gradients
add up over the calls before they are squared,

.. math::

    \partial_\theta = \sum_t \big(\partial W^{(t)}/\partial\theta\big)^\top D^{(t)}_{nk}.

The recorder notes the products called during a call of a unit on the per-module fallback
(:meth:`.recording.Recorder.__torch_function__`) and keeps the call (:class:`ProductCall`)
where it was the only one, its input was the module's input and its output the module's.
The pull-back reaches the module's parameters only: one of another module used to make the
weight is flagged as used outside its module (if selected), and a weight made from the batch
mixes the samples, which the layout check finds (:mod:`.batch_checks`).

With every convolution and linear layer of the reduced ResNet-18 masked (C=10, N=32, one
thread; ``benchmarks/results/hooked_speed.md``), ``exact`` takes 7.6 times a forward+backward,
against 9.3 on the functorch engine; on the per-module fallback, where such layers went
before, it took 3.3 times the unmasked model's time (one measurement).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Collection
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import accumulation_dtype
from .convolution import conv_factors
from .parametrized import linear_factors, product_sums, unless_vmap_fails

#: The products a call may end in, with their numbers of spatial dimensions (0: ``F.linear``).
PRODUCTS: dict[Callable[..., Tensor], int] = {F.linear: 0, F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}

#: Their arguments after the input, weight and bias, with their defaults.
_CONV_SETTINGS = (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1))


@dataclass(frozen=True)
class ProductCall:
    """A call of one of :data:`PRODUCTS`: ``input``, ``weight``, ``bias`` (``None`` without),
    and for a convolution its settings as an ``nn.Conv*d`` keeps them (``kernel_size``,
    ``stride``, ... as tuples)."""

    spatial: int
    input: Tensor
    weight: Tensor
    bias: Tensor | None
    settings: dict[str, Any]

    @staticmethod
    def of(
        func: Callable[..., Tensor], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> ProductCall | None:
        """The call ``func(*args, **kwargs)`` of one of :data:`PRODUCTS`, or ``None`` where its
        arguments are not tensors where they should be, or of other ranks than a layer's on
        a batch (``F.linear`` with a 1-d weight, an unbatched input)."""
        spatial = PRODUCTS[func]
        settings_names = [name for name, _ in _CONV_SETTINGS] if spatial else []
        given = dict(zip(("input", "weight", "bias", *settings_names), args), **kwargs)
        x, weight, bias = given.get("input"), given.get("weight"), given.get("bias")
        if not (isinstance(x, Tensor) and isinstance(weight, Tensor)):
            return None
        if bias is not None and not (isinstance(bias, Tensor) and bias.dim() == 1):
            return None
        batched = x.dim() == spatial + 2 if spatial else x.dim() >= 2
        if weight.dim() != spatial + 2 or not batched:
            return None  # (a 1-d weight of F.linear, an input without the batch)
        settings: dict[str, Any] = {}
        if spatial:
            for name, default in _CONV_SETTINGS:
                value = given.get(name, default)
                if name != "groups" and not isinstance(value, str):
                    value = tuple(value) if isinstance(value, (tuple, list)) else (value,) * spatial
                settings[name] = value
            settings["kernel_size"] = tuple(weight.shape[2:])
            settings["padding_mode"] = "zeros"
            settings["in_channels"] = weight.shape[1] * settings["groups"]
            settings["out_channels"] = weight.shape[0]
        return ProductCall(spatial, x, weight, bias, settings)


class _Settings:
    """A convolution's settings where :func:`.convolution.conv_factors` reads a module's."""

    def __init__(self, settings: dict[str, Any]) -> None:
        vars(self).update(settings)


def functional_sums(
    module: nn.Module,
    calls: list[ProductCall],
    grads: list[Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r"""The sums of the module's parameters ``names`` (relative to it) from its calls that each
    ended in the product of ``calls``, and the gradients ``grads`` of their outputs (see the
    module docstring): each call's products pulled back through the graph that made that
    call's weight and bias, all in one ``autograd.grad``, so that each sample's gradients add
    up over the calls before they are squared. ``None`` where the calls' weights (or biases)
    are not all one of those parameters, or all made from parameters, of one shape, or where
    ``vmap`` failed on the pull-back (:func:`.parametrized.unless_vmap_fails`)."""
    params = {name: module.get_parameter(name) for name in names}
    direct: dict[str, str] = {}  # (tensors that are a parameter: its gradients are D's)
    made: list[str] = []  # (tensors made from parameters during the calls)
    for kind in ("weight", "bias"):
        tensors = [getattr(call, kind) for call in calls]
        if all(t is None for t in tensors):
            continue
        if any(t is None or t.shape != tensors[0].shape for t in tensors):
            return None
        param = next((n for n, p in params.items() if p is tensors[0]), None)
        if param is not None and all(t is tensors[0] for t in tensors):
            direct[kind] = param
        elif all(t.grad_fn is not None for t in tensors):
            made.append(kind)
        elif any(t.grad_fn is not None or any(t is p for p in params.values()) for t in tensors):
            return None  # (a parameter, or made, in some calls and not in others)
        # (else a constant in every call: a buffer, a detached tensor)
    if not (direct or made):
        return None
    wanted = {name: p for name, p in params.items() if p.requires_grad}
    acc = accumulation_dtype(calls[0].weight.dtype)
    shapes = {kind: getattr(calls[0], kind).shape for kind in (*direct, *made)}
    outputs = [getattr(call, kind) for call in calls for kind in made]

    def pull(products: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        found: dict[str, Tensor] = {}
        for kind, name in direct.items():
            found[name] = functools.reduce(torch.add, (d[kind] for d in products))
        if made and wanted:
            cotangents = [
                d[kind].to(getattr(call, kind).dtype)
                for call, d in zip(calls, products)
                for kind in made
            ]
            pulled = torch.autograd.grad(
                outputs,
                list(wanted.values()),
                cotangents,
                retain_graph=True,
                allow_unused=True,
                is_grads_batched=True,
            )
            for name, g in zip(wanted, pulled):
                if g is not None:
                    found[name] = g.to(acc) if name not in found else found[name] + g.to(acc)
        return found

    factors = [
        conv_factors(_Settings(call.settings), [call.input], [g], acc)
        if call.spatial
        else linear_factors(module, [call.input], [g], acc)
        for call, g in zip(calls, grads)
    ]
    return unless_vmap_fails(module, lambda: product_sums(factors, shapes, pull, budget))

