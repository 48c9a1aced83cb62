r"""The EWC penalty as one fused autograd node.

.. math::

    P(\theta) = \frac{\lambda}{2}\Big(\sum_i A_i (\theta_i - \mu_i)^2 + c\Big), \qquad
    \partial P / \partial \theta_i = \lambda A_i (\theta_i - \mu_i),

over lists of parameter tensors, with a handful of ``torch._foreach_*`` kernels instead of a
Python loop of small ops per parameter (the penalty runs at every training step).

The penalty is memory-bound, so the node makes as few passes over the parameters as it can:
the forward computes :math:`d = \theta - \mu` and :math:`w = \lambda A d` (scaled by
:math:`\lambda` right away, while :math:`w` is still in cache, and kept for the backward) and
the dot products :math:`w \cdot d`. The first backward hands those buffers over as the
gradients (autograd can then adopt them as ``.grad`` without a copy), scaling them by
``grad_output`` only when it is not 1 (``loss.backward()`` on a loss that adds the penalty
gives 1; reading it costs no device sync on the CPU, so other devices, and code compiled with
``torch.compile``, always scale). A second backward through a retained graph recomputes
:math:`w`; under ``create_graph=True`` the backward uses plain differentiable ops, so double
backward works.

:func:`add_penalty_grad` gives the same gradient without autograd, added to ``.grad`` by two
kernels (the node's forward takes four, θ − μ, λA(θ − μ) in two and the dots, and autograd
adds its gradient to the loss's with one more per parameter).

Inside ``torch.func`` transforms and forward-mode AD the penalty is plain differentiable
operations instead (:func:`_plain_penalty`): the node has rules for neither.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor

from .engines.base import transformed


def _diffs(
    params: Sequence[Tensor], precision: Sequence[Tensor], center: Sequence[Tensor]
) -> list[Tensor]:
    r""":math:`d = \theta - \mu`, ``params`` promoted to the dtype of ``precision``."""
    promoted = [p if p.dtype == a.dtype else p.to(a.dtype) for p, a in zip(params, precision)]
    return torch._foreach_sub(promoted, center)


def _weighted_diffs(
    params: Sequence[Tensor], precision: list[Tensor], center: list[Tensor], strength: float
) -> tuple[list[Tensor], list[Tensor]]:
    r""":math:`d = \theta - \mu` (:func:`_diffs`) and
    :math:`\lambda A d = \partial P / \partial \theta`."""
    diffs = _diffs(params, precision, center)
    weighted = torch._foreach_mul(diffs, precision)
    torch._foreach_mul_(weighted, strength)
    return diffs, weighted


def _dot(w: Tensor, d: Tensor) -> Tensor:
    r""":math:`\sum_i w_i d_i` over tensors of one shape; over their storage as it lies when
    they are dense in another memory order than the standard one (``channels_last``)."""
    if not (w.is_contiguous() and d.is_contiguous()):
        order = sorted(range(w.dim()), key=w.stride, reverse=True)
        w, d = w.permute(order), d.permute(order)  # (views; reshape copies only if still needed)
    return torch.dot(w.reshape(-1), d.reshape(-1))


class _Penalty(torch.autograd.Function):
    @staticmethod
    def forward(
        ctx: Any,
        strength: float,
        offset: Tensor,
        precision: list[Tensor],
        center: list[Tensor],
        *params: Tensor,
    ) -> Tensor:
        diffs, weighted = _weighted_diffs(params, precision, center, strength)
        dots = [_dot(w, d) for w, d in zip(weighted, diffs)]
        if any(dot.device != offset.device for dot in dots):  # (a model spanning devices)
            dots = [dot.to(offset.device) for dot in dots]
        dots = torch.stack(dots)
        ctx.strength, ctx.precision, ctx.center = strength, precision, center
        ctx.weighted = weighted
        ctx.save_for_backward(*params)
        return 0.5 * (dots.sum() + strength * offset)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so autograd can record them
            scale = ctx.strength * grad_output
            theta = [p.to(a.dtype) for p, a in zip(params, ctx.precision)]
            grads = [(t - c) * a * scale for t, c, a in zip(theta, ctx.center, ctx.precision)]
        else:
            grads, ctx.weighted = ctx.weighted, None  # hand the buffers over (first backward)
            if grads is None:  # a later backward through a retained graph
                grads = _weighted_diffs(params, ctx.precision, ctx.center, ctx.strength)[1]
            if _must_scale(grad_output):
                torch._foreach_mul_(grads, grad_output)
        return (None, None, None, None, *(g.to(p.dtype) for g, p in zip(grads, params)))


_is_compiling = getattr(torch.compiler, "is_compiling", lambda: False)  # (not in every torch)


def _must_scale(grad_output: Tensor) -> bool:
    """Whether the backward must scale by ``grad_output``: unless it is 1, read where that is
    free (a CPU tensor, in eager mode: under ``torch.compile`` reading it breaks the graph)."""
    if grad_output.device.type != "cpu" or _is_compiling():
        return True
    return grad_output.item() != 1.0


@torch.no_grad()
def add_penalty_grad(
    params: Sequence[Tensor], precision: Sequence[Tensor], center: Sequence[Tensor], strength: float
) -> None:
    r"""Accumulate :math:`\partial P / \partial \theta = \lambda A (\theta - \mu)` into each
    parameter's ``.grad`` (setting it where it is ``None``), as ``ewc_penalty(...).backward()``
    would, without a graph: :math:`d = \theta - \mu`, then ``grad += λ A d``, two
    ``torch._foreach_*`` kernels (a parameter whose ``.grad`` is ``None``, of another dtype or
    sparse goes one at a time). Parameters without ``requires_grad`` are left alone, as
    autograd leaves them."""
    kept = [(p, a, c) for p, a, c in zip(params, precision, center) if p.requires_grad]
    if not kept:
        return
    params, precision, center = (list(t) for t in zip(*kept))
    diffs = _diffs(params, precision, center)
    direct = [
        i
        for i, (p, d) in enumerate(zip(params, diffs))
        if p.grad is not None and p.grad.dtype == d.dtype and not p.grad.is_sparse
    ]
    if direct:
        torch._foreach_addcmul_(
            [params[i].grad for i in direct],
            [precision[i] for i in direct],
            [diffs[i] for i in direct],
            value=strength,
        )
    for i in sorted(set(range(len(params))) - set(direct)):
        p = params[i]
        g = diffs[i].mul_(precision[i]).mul_(strength).to(p.dtype)
        p.grad = g if p.grad is None else g + p.grad  # (dense + sparse, not sparse + dense)


def ewc_penalty(
    params: Sequence[Tensor],
    precision: Sequence[Tensor],
    center: Sequence[Tensor],
    strength: float = 1.0,
    offset: Tensor | float = 0.0,
) -> Tensor:
    r""":math:`\frac{\lambda}{2}\big(\sum_i A_i(\theta_i-\mu_i)^2 + c\big)` over all tensors,
    differentiable in ``params``.

    ``precision`` (``A >= 0``) and ``center`` (``μ``) are constants shaped like ``params``;
    ``strength`` is :math:`\lambda` and ``offset`` the constant :math:`c`. The result is in the
    dtype of ``precision`` (``params`` are promoted to it; their gradients are cast back).
    """
    precision = list(precision)
    offset = torch.as_tensor(offset, dtype=precision[0].dtype, device=precision[0].device)
    if transformed():
        return _plain_penalty(params, precision, list(center), float(strength), offset)
    return _Penalty.apply(float(strength), offset, precision, list(center), *params)


def _plain_penalty(
    params: Sequence[Tensor],
    precision: list[Tensor],
    center: list[Tensor],
    strength: float,
    offset: Tensor,
) -> Tensor:
    r""":math:`\frac{\lambda}{2}\big(\sum_i A_i(\theta_i-\mu_i)^2 + c\big)` by ordinary
    differentiable operations, one parameter at a time, for code under a transform
    (:func:`~.engines.base.transformed`: every
    transform and forward-mode AD know them; slower than :class:`_Penalty`)."""
    total = strength * offset
    for p, a, c in zip(params, precision, center):
        d = p.to(a.dtype) - c
        total = total + strength * (a * d * d).sum().to(offset.device)
    return 0.5 * total
