"""The fused EWC quadratic: value, gradient and double backward against plain autograd."""

from __future__ import annotations

import torch

from ewc_reg._penalty import quadratic_penalty


def tensors(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
    precision = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    center = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return params, precision, center


def test_value_and_gradient_match_plain_autograd():
    params, precision, center = tensors(0)
    fused = quadratic_penalty(params, precision, center)
    naive = sum((a * (p - c) ** 2).sum() for p, a, c in zip(params, precision, center))
    assert fused.item() == naive.item() or abs(fused.item() - naive.item()) < 1e-12
    for g_fused, g_naive in zip(
        torch.autograd.grad(3 * fused, params), torch.autograd.grad(3 * naive, params)
    ):
        torch.testing.assert_close(g_fused, g_naive, rtol=1e-14, atol=0)


def test_gradcheck_and_double_backward():
    params, precision, center = tensors(1)

    def fn(*p):
        return quadratic_penalty(p, precision, center)

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_low_precision_parameters_are_promoted_and_gradients_cast_back():
    params, precision, center = tensors(2, dtype=torch.bfloat16)
    value = quadratic_penalty(params, precision, center)
    assert value.dtype == torch.float64
    grads = torch.autograd.grad(value, params)
    assert all(g.dtype == torch.bfloat16 for g in grads)
