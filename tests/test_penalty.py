"""The fused EWC penalty: value, gradient and double backward against plain autograd."""

from __future__ import annotations

import torch

from ewc_reg._penalty import ewc_penalty


def tensors(seed: int, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    shapes = [(3, 4), (5,), (2, 1, 3)]
    params = [torch.randn(s, generator=g, dtype=dtype).requires_grad_() for s in shapes]
    precision = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    center = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    return params, precision, center


def test_value_and_gradient_match_plain_autograd():
    params, precision, center = tensors(0)
    fused = ewc_penalty(params, precision, center, strength=2.5, offset=0.75)
    naive = 1.25 * (sum((a * (p - c) ** 2).sum() for p, a, c in zip(params, precision, center))
                    + 0.75)
    assert fused.item() == naive.item() or abs(fused.item() - naive.item()) < 1e-12
    for g_fused, g_naive in zip(
        torch.autograd.grad(3 * fused, params), torch.autograd.grad(3 * naive, params)
    ):
        torch.testing.assert_close(g_fused, g_naive, rtol=1e-14, atol=0)


def test_gradcheck_and_double_backward():
    params, precision, center = tensors(1)

    def fn(*p):
        return ewc_penalty(p, precision, center, strength=0.5, offset=1.0)

    assert torch.autograd.gradcheck(fn, params)
    assert torch.autograd.gradgradcheck(fn, params)


def test_low_precision_parameters_are_promoted_and_gradients_cast_back():
    params, precision, center = tensors(2, dtype=torch.bfloat16)
    value = ewc_penalty(params, precision, center)
    assert value.dtype == torch.float64
    grads = torch.autograd.grad(value, params)
    assert all(g.dtype == torch.bfloat16 for g in grads)


def test_backward_twice_through_a_retained_graph():
    params, precision, center = tensors(3)
    value = ewc_penalty(params, precision, center, strength=4.0)
    value.backward(retain_graph=True)
    first = [p.grad.clone() for p in params]
    value.backward(torch.tensor(0.5, dtype=torch.float64))  # recomputed, not the handed-over
    for p, a, c, g in zip(params, precision, center, first):
        torch.testing.assert_close(g, 4.0 * a * (p.detach() - c), rtol=1e-14, atol=0)
        torch.testing.assert_close(p.grad, 1.5 * g, rtol=1e-14, atol=0)


def test_a_handed_over_gradient_is_not_written_by_later_calls():
    params, precision, center = tensors(4)
    ewc_penalty(params, precision, center).backward()
    kept = [p.grad.clone() for p in params]
    with torch.no_grad():
        params[0].add_(1.0)
    torch.autograd.grad(ewc_penalty(params, precision, center), params)
    assert all(torch.equal(p.grad, k) for p, k in zip(params, kept))


def test_compiled_in_one_graph_with_the_same_value_and_gradient():
    """Inside ``torch.compile`` (AOTAutograd traces the node's forward and backward): no graph
    break (the eager backward reads ``grad_output`` to skip scaling by 1, which would break
    it), and the result of plain autograd, also for a loss scaled after the penalty."""
    torch._dynamo.reset()
    params, precision, center = tensors(3)

    def loss(scale: float) -> torch.Tensor:
        return scale * ewc_penalty(params, precision, center, strength=2.5, offset=0.75)

    compiled = torch.compile(loss, backend="aot_eager", fullgraph=True)
    try:
        for scale in (1.0, 3.0):
            naive = scale * 1.25 * (
                sum((a * (p - c) ** 2).sum() for p, a, c in zip(params, precision, center)) + 0.75
            )
            got = compiled(scale)
            torch.testing.assert_close(got, naive, rtol=1e-14, atol=0)
            for g_got, g_naive in zip(
                torch.autograd.grad(got, params), torch.autograd.grad(naive, params)
            ):
                torch.testing.assert_close(g_got, g_naive, rtol=1e-14, atol=0)
    finally:
        torch._dynamo.reset()
