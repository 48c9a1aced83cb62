"""The eval-mode batch norm whose input gradient is one product (``engines.eval_norm``): the
same values as ``F.batch_norm``, the same input gradient as its backward (float64, also
batched over vectors and channels-last), PyTorch's own where it does not apply, and used by
the hook engine's recorded forward only where the weight and bias take their sums from a rule."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc_reg.engines import base, eval_norm

from .models import cnn, randomize_bn
from .test_hooks_engine import check_against_references

SHAPES = {2: (4, 3), 3: (4, 3, 5), 4: (4, 3, 5, 2), 5: (2, 3, 2, 3, 4)}


def statistics(channels: int = 3) -> tuple[Tensor, ...]:
    """Running mean and variance, weight and bias (float64)."""
    return (
        torch.randn(channels, dtype=torch.float64),
        torch.rand(channels, dtype=torch.float64) + 0.5,
        torch.randn(channels, dtype=torch.float64),
        torch.randn(channels, dtype=torch.float64),
    )


def frozen(t: Tensor) -> bool:
    return True


@pytest.mark.parametrize("dims", sorted(SHAPES))
@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("channels_last", [False, True])
def test_values_and_input_gradient_are_batch_norms(dims, affine, channels_last) -> None:
    mean, var, weight, bias = statistics()
    if not affine:
        weight = bias = None
    x = torch.randn(SHAPES[dims], dtype=torch.float64)
    if channels_last and dims in (4, 5):
        x = x.contiguous(memory_format=torch.channels_last if dims == 4 else torch.channels_last_3d)
    x.requires_grad_()
    got = eval_norm.eval_batch_norm((x, mean, var, weight, bias), {"eps": 1e-3}, frozen)
    want = F.batch_norm(x, mean, var, weight, bias, eps=1e-3)
    assert type(got.grad_fn).__name__ == "_EvalBatchNormBackward"
    assert torch.equal(got, want)
    vectors = torch.randn(3, *x.shape, dtype=torch.float64)
    for batched in (False, True):  # (one vector, or all at once under vmap)
        pulled = [vectors] if batched else list(vectors)
        got_grads = [
            torch.autograd.grad(got, x, v, retain_graph=True, is_grads_batched=batched)[0]
            for v in pulled
        ]
        want_grads = [
            torch.autograd.grad(want, x, v, retain_graph=True, is_grads_batched=batched)[0]
            for v in pulled
        ]
        for g, w in zip(got_grads, want_grads):
            torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_scales_in_float32(dtype) -> None:
    """A half-precision batch norm's input gradient is the product in float32, rounded once
    (PyTorch's kernel also computes in float32): within one rounding of PyTorch's."""
    mean, var, weight, bias = (t.to(dtype) for t in statistics(16))
    x = torch.randn(8, 16, 3, dtype=dtype, requires_grad=True)
    v = torch.randn(8, 16, 3, dtype=dtype)
    got = eval_norm.eval_batch_norm((x, mean, var, weight, bias), {}, frozen)
    assert type(got.grad_fn).__name__ == "_EvalBatchNormBackward"
    (grad,) = torch.autograd.grad(got, x, v)
    scale = (var.float() + 1e-5).rsqrt() * weight.float()
    assert grad.dtype == dtype
    assert torch.equal(grad, (v.float() * scale.view(-1, 1)).to(dtype))
    (want,) = torch.autograd.grad(F.batch_norm(x, mean, var, weight, bias), x, v)
    torch.testing.assert_close(grad, want)


def test_keyword_arguments_and_defaults() -> None:
    """Called as ``nn.BatchNorm*`` and users call it: positional or by keyword."""
    mean, var, weight, bias = statistics()
    x = torch.randn(4, 3, dtype=torch.float64, requires_grad=True)
    kwargs = {"running_mean": mean, "running_var": var, "bias": bias, "weight": weight}
    got = eval_norm.eval_batch_norm((x,), kwargs, frozen)
    assert type(got.grad_fn).__name__ == "_EvalBatchNormBackward"
    assert torch.equal(got, F.batch_norm(x, **kwargs))


def _pytorch_s(got: Tensor) -> bool:
    return type(got.grad_fn).__name__ != "_EvalBatchNormBackward"


def test_pytorch_s_own_where_it_does_not_apply() -> None:
    """Batch statistics, a weight whose gradient autograd must give, a launch-bound device
    and a ``torch.func`` transform take ``F.batch_norm`` itself."""
    mean, var, weight, bias = statistics()
    x = torch.randn(4, 3, 5, dtype=torch.float64, requires_grad=True)
    args = (x, mean, var, weight, bias)
    want = F.batch_norm(*args)
    updated = (x, mean.clone(), var.clone(), weight, bias, True)  # (batch statistics)
    assert _pytorch_s(eval_norm.eval_batch_norm(updated, {}, frozen))
    weight.requires_grad_()
    got = eval_norm.eval_batch_norm(args, {}, lambda t: not t.requires_grad)
    assert _pytorch_s(got) and torch.equal(got, want)
    with mock.patch.object(base, "launch_bound", lambda device: True):
        assert _pytorch_s(eval_norm.eval_batch_norm(args, {}, frozen))
    batched = torch.func.vmap(
        lambda row: eval_norm.eval_batch_norm((row[None], mean, var), {}, frozen)[0]
    )(x.detach())
    torch.testing.assert_close(batched, F.batch_norm(x.detach(), mean, var), rtol=0, atol=0)


class OwnNorm(nn.Module):
    """A batch norm of one's own (no rule: the per-module fallback), calling ``F.batch_norm``
    on its own parameters, whose gradients the fallback takes from autograd."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(channels) + 0.5)
        self.shift = nn.Parameter(torch.randn(channels))
        self.register_buffer("mean", torch.randn(channels))
        self.register_buffer("var", torch.rand(channels) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, self.mean, self.var, self.gain, self.shift)


def test_the_recorded_forward_takes_it_for_batch_norms_with_rules() -> None:
    """In the hook engine's recorded forward the batch norms with rules take the product, and
    a batch norm of one's own on the fallback, PyTorch's: both Fishers match the references."""
    model = cnn()
    own = OwnNorm(3)
    model[1] = nn.Sequential(model[1], own)
    model = model.double()
    randomize_bn(model)
    function = eval_norm._EvalBatchNorm
    with (
        mock.patch.object(function, "forward", wraps=function.forward) as forward,
        mock.patch.object(function, "backward", wraps=function.backward) as backward,
    ):
        check_against_references(model, torch.randn(5, 2, 5, 5).double(), via_rules=False)
    weights = [call.args[4] for call in forward.call_args_list]  # (ctx, x, mean, var, weight)
    assert weights and all(w is model[1][0].weight for w in weights)
    assert backward.call_count >= 3  # (K = 3 vectors, one at a time on the CPU)
