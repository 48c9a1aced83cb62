r"""The EWC quadratic as one fused autograd node.

.. math::

    Q(\theta) = \sum_i A_i (\theta_i - \mu_i)^2, \qquad
    \partial Q / \partial \theta_i = 2 A_i (\theta_i - \mu_i),

over lists of parameter tensors, with a handful of ``torch._foreach_*`` kernels instead of a
Python loop of small ops per parameter (the penalty runs at every training step). Under
``create_graph=True`` the backward uses plain differentiable ops, so double backward works.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor


class _Quadratic(torch.autograd.Function):
    @staticmethod
    def forward(ctx: Any, precision: list[Tensor], center: list[Tensor], *params: Tensor) -> Tensor:
        theta = [p.to(a.dtype) for p, a in zip(params, precision)]
        diffs = torch._foreach_sub(theta, center)
        weighted = torch._foreach_mul(diffs, precision)  # A(θ−μ): half the gradient
        ctx.precision, ctx.center = precision, center
        ctx.save_for_backward(*params)
        ctx.weighted = weighted
        dots = [torch.dot(w.reshape(-1), d.reshape(-1)) for w, d in zip(weighted, diffs)]
        return torch.stack(dots).sum()

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        params = ctx.saved_tensors
        scale = 2 * grad_output
        if torch.is_grad_enabled():  # create_graph=True: plain ops, so autograd can record them
            theta = [p.to(a.dtype) for p, a in zip(params, ctx.precision)]
            grads = [(t - c) * a * scale for t, c, a in zip(theta, ctx.center, ctx.precision)]
        else:
            grads = torch._foreach_mul(ctx.weighted, scale)
        return (None, None, *(g.to(p.dtype) for g, p in zip(grads, params)))


def quadratic_penalty(
    params: Sequence[Tensor], precision: Sequence[Tensor], center: Sequence[Tensor]
) -> Tensor:
    r""":math:`\sum_i A_i(\theta_i-\mu_i)^2` summed over all tensors, differentiable in ``params``.

    ``precision`` (``A >= 0``) and ``center`` (``μ``) are constants shaped like ``params``; the
    result is in their dtype (``params`` are promoted to it).
    """
    return _Quadratic.apply(list(precision), list(center), *params)
