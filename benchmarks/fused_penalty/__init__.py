r"""A fused EWC penalty in C++, to measure the least that any implementation of the penalty
adds to a training step (``python -m benchmarks.penalty_speed --fused-floor``).

The library's penalty is eager PyTorch (:mod:`ewc_reg._penalty`), which makes about ten
passes over the parameters' size; a kernel that fuses them reads :math:`\theta, \mu, A`
once. :file:`kernel.cpp` is that kernel for contiguous float32 CPU tensors:

* :func:`add_grad`: ``G += λ A (θ − μ)`` in one pass (what ``add_penalty_grad`` does in two
  ``foreach`` kernels);
* :class:`FusedPenalty`: the penalty as an autograd node whose forward writes
  :math:`w = \lambda A(\theta - \mu)` and the value :math:`\frac12 \sum w (\theta - \mu)` in
  one pass and whose backward hands :math:`w` over (what the library's node does in four
  kernels).

It is built on first use with :func:`torch.utils.cpp_extension.load` (about 20 s; it needs a
C++ compiler and ``ninja``, ``pip install ninja``), and is not part of the library, which must
run where no compiler is.
"""

from __future__ import annotations

import functools
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from ewc_reg._penalty import _must_scale

SOURCE = Path(__file__).with_name("kernel.cpp")


class BuildError(RuntimeError):
    """The kernel could not be built here (no C++ compiler, no ``ninja``, a failed build)."""


@functools.cache
def kernel() -> Any:
    """The built extension (built once per process, cached on disk by PyTorch)."""
    from torch.utils import cpp_extension

    if not cpp_extension.is_ninja_available():
        raise BuildError("building the fused kernel needs ninja (pip install ninja)")
    try:
        return cpp_extension.load(
            name="ewc_reg_bench_fused_penalty",
            sources=[str(SOURCE)],
            extra_cflags=["-O3", "-fopenmp-simd"],
        )
    except (OSError, RuntimeError, ImportError) as error:  # (a compiler error is RuntimeError)
        raise BuildError(f"building the fused kernel failed: {error}") from error


def add_grad(
    params: list[Tensor], precision: list[Tensor], center: list[Tensor], strength: float
) -> None:
    """``p.grad += strength * A * (p - μ)`` for every parameter, one pass each."""
    kernel().add_grad([p.grad for p in params], params, center, precision, strength)


class FusedPenalty(torch.autograd.Function):
    r""":math:`\frac{\lambda}{2}\big(\sum A(\theta - \mu)^2 + c\big)`, differentiable in the
    parameters (first backward only: it hands its buffers over, as the library's node does)."""

    @staticmethod
    def forward(
        ctx: Any,
        strength: float,
        offset: float,
        precision: list[Tensor],
        center: list[Tensor],
        *params: Tensor,
    ) -> Tensor:
        weighted = [torch.empty_like(p) for p in params]
        value = kernel().weighted(weighted, list(params), center, precision, strength)
        ctx.weighted = weighted
        return params[0].new_full((), value + 0.5 * strength * offset)

    @staticmethod
    def backward(ctx: Any, grad_output: Tensor) -> tuple[Tensor | None, ...]:
        weighted, ctx.weighted = ctx.weighted, None
        if weighted is None:
            raise RuntimeError("FusedPenalty: a second backward is not supported")
        if _must_scale(grad_output):  # (as the library's node)
            torch._foreach_mul_(weighted, grad_output)
        return (None, None, None, None, *weighted)
