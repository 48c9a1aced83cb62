"""The fused EWC penalty: value, gradient and double backward against plain autograd."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ewc_reg._penalty import add_penalty_grad, ewc_penalty


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


def test_parameters_in_other_memory_orders():
    """Parameters stored ``channels_last``, or transposed, with the Fisher and the centre in
    the standard order or the same one: the value and gradient of the standard-order case
    (the dot products read the storage as it lies, where ``view(-1)`` cannot)."""
    g = torch.Generator().manual_seed(3)
    shapes = [(4, 3, 2, 5), (3, 6)]
    base = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]
    precision = [torch.rand(s, generator=g, dtype=torch.float64) for s in shapes]
    center = [torch.randn(s, generator=g, dtype=torch.float64) for s in shapes]

    def other_order(ts):
        return [ts[0].to(memory_format=torch.channels_last), ts[1].t().contiguous().t()]

    plain = [t.clone().requires_grad_() for t in base]
    want = ewc_penalty(plain, precision, center, 2.0, 0.5)
    want_grads = torch.autograd.grad(want, plain)
    for same_order in (False, True):
        params = [t.requires_grad_() for t in other_order([t.clone() for t in base])]
        assert not any(p.is_contiguous() for p in params)
        a, c = (other_order(precision), other_order(center)) if same_order else (precision, center)
        got = ewc_penalty(params, a, c, 2.0, 0.5)
        torch.testing.assert_close(got, want, rtol=1e-14, atol=0)
        for got_grad, want_grad in zip(torch.autograd.grad(got, params), want_grads):
            torch.testing.assert_close(got_grad, want_grad, rtol=1e-14, atol=0)


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


# --- add_penalty_grad: the gradient without a graph ------------------------------------------


def loss_of(params):
    """Some loss reaching only the first two parameters (the third gets no gradient)."""
    return sum((p.float().sin() * (i + 1)).sum() for i, p in enumerate(params[:2]))


@settings(max_examples=30, deadline=None)
@given(
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16]),
    strength=st.floats(0.0, 1e6),
    seed=st.integers(0, 2**16),
    frozen=st.booleans(),
    backward_first=st.booleans(),
)
def test_add_penalty_grad_equals_the_penalty_in_the_loss(
    dtype, strength, seed, frozen, backward_first
):
    """``.grad`` after ``loss.backward(); add_penalty_grad(...)`` equals ``.grad`` after
    ``(loss + penalty).backward()``: grads set by the loss, ``None`` (the third parameter), in
    the parameters' dtype when it is not the precision's, and none for a frozen parameter."""
    got, precision, center = tensors(seed, dtype)
    want = [p.detach().clone().requires_grad_() for p in got]
    if frozen:
        got[0].requires_grad_(False)
        want[0].requires_grad_(False)
    (loss_of(want) + ewc_penalty(want, precision, center, strength)).backward()
    if backward_first:
        loss_of(got).backward()
        add_penalty_grad(got, precision, center, strength)
    else:  # (grads all None first, then the loss adds to them)
        add_penalty_grad(got, precision, center, strength)
        loss_of(got).backward()
    for g, w, a, c in zip(got, want, precision, center):
        if w.grad is None:
            assert g.grad is None
            continue
        assert g.grad.dtype == w.grad.dtype == g.dtype
        # (the same terms, rounded in another order: a few units in the last place of the
        # larger of the loss's gradient and the penalty's)
        pull = strength * (a * (g.detach().double() - c)).abs().max()
        terms = w.grad.double().abs().max() + pull
        error = (g.grad.double() - w.grad.double()).abs().max()
        assert error <= 4 * torch.finfo(dtype).eps * terms


def test_add_penalty_grad_to_a_sparse_gradient():
    table = torch.nn.Embedding(6, 3, sparse=True).double()
    precision, center = [torch.rand(6, 3, dtype=torch.float64)], [torch.zeros(6, 3).double()]
    table(torch.tensor([1, 4])).sum().backward()
    add_penalty_grad([table.weight], precision, center, 2.0)
    expected = 2.0 * precision[0] * table.weight.detach()
    expected[[1, 4]] += 1.0
    torch.testing.assert_close(table.weight.grad.to_dense(), expected, rtol=1e-14, atol=0)


def _naive(params, precision, center, strength, offset):
    terms = sum((a * (p - c) ** 2).sum() for p, a, c in zip(params, precision, center))
    return 0.5 * strength * (terms + offset)


def test_torch_func_transforms_and_forward_mode_ad():
    """Inside ``torch.func.grad``/``vmap``/``jvp`` and forward-mode AD the penalty is plain
    operations with the same value and derivatives (the fused node raised PyTorch's
    "must override the setup_context staticmethod" and "implement the jvp function")."""
    import torch.autograd.forward_ad as fw

    params, precision, center = tensors(1)
    theta = [p.detach() for p in params]

    def penalty(*ps):
        return ewc_penalty(ps, precision, center, strength=2.5, offset=0.75)

    want = torch.autograd.grad(_naive(params, precision, center, 2.5, 0.75), params)
    got = torch.func.grad(penalty, argnums=tuple(range(3)))(*theta)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-14, atol=0)
    batch = [torch.stack([t, t + 1]) for t in theta]  # (two parameter sets)
    values = torch.func.vmap(penalty)(*batch)
    for i, value in enumerate(values):
        one = [b[i] for b in batch]
        torch.testing.assert_close(value, _naive(one, precision, center, 2.5, 0.75))
    tangents = [torch.ones_like(t) for t in theta]
    _, directional = torch.func.jvp(penalty, tuple(theta), tuple(tangents))
    torch.testing.assert_close(directional, sum((w * t).sum() for w, t in zip(want, tangents)))
    with fw.dual_level():
        duals = [fw.make_dual(t, u) for t, u in zip(theta, tangents)]
        tangent = fw.unpack_dual(penalty(*duals)).tangent
    torch.testing.assert_close(tangent, directional)


def test_a_scaled_penalty_under_create_graph_keeps_the_scale() -> None:
    """Under ``create_graph=True`` the backward is made of plain operations; it must still
    scale by ``grad_output`` (second-order code weighting the penalty: MAML, Hessian-vector
    products). ``gradgradcheck`` cannot see a backward that drops the scale: the wrong first
    derivative is consistent with its own derivative."""
    torch.manual_seed(0)
    p = torch.randn(5, dtype=torch.float64, requires_grad=True)
    a, mu = torch.rand(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    scaled = 3.0 * ewc_penalty([p], [a], [mu], strength=2.0)
    (g,) = torch.autograd.grad(scaled, p, create_graph=True)
    torch.testing.assert_close(g.detach(), 3.0 * 2.0 * a * (p.detach() - mu), rtol=1e-14, atol=0)
    (hvp,) = torch.autograd.grad(g.sum(), p)
    torch.testing.assert_close(hvp, 3.0 * 2.0 * a, rtol=1e-14, atol=0)
