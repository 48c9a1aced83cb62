"""Modules without a rule whose call ends in one ``F.linear``/``F.conv*d`` on their input, with
a weight made from their parameters (:mod:`ewc_reg.engines.functional`): against brute force in
float64, with the per-module fallback patched to fail and the new path spied on; and the
modules that must stay on the fallback."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc_reg import fisher_diagonal
from ewc_reg.engines import parametrized, unit_sums

from .models import Doubled, Twice
from .reference import assert_close_dicts, brute_force_fisher


class MaskedLinear(nn.Linear):
    """A linear layer with a fixed binary mask on its weight (PackNet, Piggyback)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.5).to(self.weight))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


class MaskedConv(nn.Module):
    """A convolution with a masked weight, called with keyword settings."""

    def __init__(self, dims: int, cin: int, cout: int, **settings: object) -> None:
        super().__init__()
        self.dims, self.settings = dims, settings
        groups = int(settings.get("groups", 1))
        self.weight = nn.Parameter(torch.randn(cout, cin // groups, *(3,) * dims) / 3)
        self.bias = nn.Parameter(torch.randn(cout))
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.3).float())

    def forward(self, x: Tensor) -> Tensor:
        conv = (F.conv1d, F.conv2d, F.conv3d)[self.dims - 1]
        return conv(x, self.weight * self.mask, bias=self.bias, **self.settings)


class PlainLinear(nn.Module):
    """``F.linear`` on its own parameters (the weight is the parameter itself)."""

    def __init__(self, n_in: int, n_out: int, bias: bool) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(n_out, n_in) / n_in**0.5)
        self.bias = nn.Parameter(torch.randn(n_out)) if bias else None

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class MergedLowRank(nn.Module):
    """A frozen weight plus a trainable low-rank update, merged in the call; a made bias."""

    def __init__(self, n_in: int, n_out: int) -> None:
        super().__init__()
        self.base = nn.Parameter(torch.randn(n_out, n_in), requires_grad=False)
        self.a = nn.Parameter(torch.randn(2, n_in))
        self.b = nn.Parameter(torch.randn(n_out, 2))
        self.shift = nn.Parameter(torch.randn(n_out))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.base + 0.5 * self.b @ self.a, torch.tanh(self.shift))


class _Binarizer(torch.autograd.Function):
    """Piggyback's threshold with a straight-through gradient (an old-style Function)."""

    @staticmethod
    def forward(ctx: object, scores: Tensor, threshold: float) -> Tensor:
        return (scores > threshold).to(scores.dtype)

    @staticmethod
    def backward(ctx: object, grad: Tensor) -> tuple[Tensor, None]:
        return grad, None


class PiggybackConv(nn.Conv2d):
    """Piggyback: a frozen weight masked by thresholded real-valued scores, which learn."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.scores = nn.Parameter(torch.rand_like(self.weight) * 0.02)
        self.weight.requires_grad_(False)

    def forward(self, x: Tensor) -> Tensor:
        mask = _Binarizer.apply(self.scores, 0.01)
        return F.conv2d(x, self.weight * mask, self.bias, self.stride, self.padding)


class HatLinear(nn.Linear):
    """HAT: a task's attention mask, a sigmoid of its embedding, on the layer's outputs (its
    weight's rows and its bias)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)
        self.embedding = nn.Parameter(torch.randn(3, self.out_features))
        self.task = 1

    def forward(self, x: Tensor) -> Tensor:
        mask = torch.sigmoid(4 * self.embedding[self.task])
        return F.linear(x, self.weight * mask[:, None], self.bias * mask)


def _head(features: int) -> nn.Module:
    return nn.Sequential(nn.Tanh(), nn.Flatten(), nn.Linear(features, 3))


#: Models and their inputs, float64.
MODELS = {
    "masked linear": lambda: (nn.Sequential(MaskedLinear(5, 4), _head(4)), (6, 5)),
    "masked linear on a sequence": lambda: (
        nn.Sequential(MaskedLinear(5, 4), _head(12)),
        (6, 3, 5),
    ),
    "plain linear": lambda: (nn.Sequential(PlainLinear(5, 4, True), _head(4)), (6, 5)),
    "plain linear, no bias": lambda: (nn.Sequential(PlainLinear(5, 4, False), _head(4)), (6, 5)),
    "merged low rank": lambda: (nn.Sequential(MergedLowRank(5, 4), _head(4)), (6, 5)),
    "piggyback conv, hat linear": lambda: (
        nn.Sequential(PiggybackConv(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), HatLinear(48, 3)),
        (6, 2, 4, 4),
    ),
    "conv1d": lambda: (nn.Sequential(MaskedConv(1, 2, 4, stride=2), _head(4 * 3)), (6, 2, 7)),
    "conv2d same, dilated": lambda: (
        nn.Sequential(MaskedConv(2, 2, 4, padding="same", dilation=2), _head(4 * 25)),
        (6, 2, 5, 5),
    ),
    "conv2d grouped, padded": lambda: (
        nn.Sequential(MaskedConv(2, 4, 4, padding=1, groups=2), _head(4 * 16)),
        (6, 4, 4, 4),
    ),
    "conv3d": lambda: (
        nn.Sequential(MaskedConv(3, 2, 2, padding=(1, 0, 1)), _head(2 * 16 * 2)),
        (6, 2, 4, 4, 4),
    ),
}


@contextlib.contextmanager
def _on_products() -> Iterator[None]:
    """Inside, the per-module fallback fails; at the end, the products' sums must have been
    asked for."""
    refused = AssertionError("per-module fallback")
    with (
        mock.patch.object(unit_sums, "_fallback_sums", side_effect=refused),
        mock.patch.object(
            unit_sums, "functional_sums", wraps=unit_sums.functional_sums
        ) as spy,
    ):
        yield
    assert spy.called


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_products_of_made_weights(name, method) -> None:
    """A module whose call ends in a product on its input, its weight made from its
    parameters (masked, merged, or the parameter itself): the class's products pulled back
    through how the weight was made, against brute force (they went to the per-module
    fallback: 3.3 times the time of a masked reduced ResNet-18's plain twin, against 1.2)."""
    torch.manual_seed(0)
    model, shape = MODELS[name]()
    model.double().eval()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    with _on_products():
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


class _ScaledInput(PlainLinear):
    def forward(self, x: Tensor) -> Tensor:  # (a parameter on the input: not a product of it)
        return F.linear(x * self.weight[0, 0], self.weight, self.bias)


class _ScaledOutput(PlainLinear):
    def forward(self, x: Tensor) -> Tensor:  # (the output is not the product's)
        return F.linear(x, self.weight, self.bias) * 2


class _TwoProducts(PlainLinear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(torch.tanh(F.linear(x, self.weight)), self.weight.T[:4, :4], self.bias)


@pytest.mark.parametrize("module", [_ScaledInput, _ScaledOutput, _TwoProducts])
def test_other_calls_stay_on_the_fallback(module) -> None:
    """A parameter used on the input, an output that is not the product's, or two products:
    the per-module fallback, and the Fisher right."""
    torch.manual_seed(0)
    model = nn.Sequential(module(4, 4, True), _head(4)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with mock.patch.object(unit_sums, "functional_sums", wraps=unit_sums.functional_sums) as spy:
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert not spy.called
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


def test_some_of_the_parameters() -> None:
    """A selection without some of the parameters the weight is made of (a low-rank update's
    ``a``): those asked for are pulled back to, the others left out."""
    torch.manual_seed(0)
    model, shape = MODELS["merged low rank"]()
    model.double().eval()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    names = ["0.b", "1.2.weight"]
    with _on_products():
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks", params=names)
    want = brute_force_fisher(model, x, y, "exact")
    assert_close_dicts(got, {name: want[name] for name in names}, 1e-10)


class _DoubledLinear(PlainLinear):
    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, Doubled.apply(self.weight), self.bias)


def test_a_weight_vmap_cannot_pull_back_through_goes_to_the_fallback(caplog) -> None:
    """The batched pull-back through what made the weight fails: the per-module fallback
    (logged; the module remembered), and the Fisher right."""
    torch.manual_seed(0)
    model = nn.Sequential(_DoubledLinear(4, 4, True), _head(4)).double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    assert model[0] in parametrized.unvmappable
    assert "vmap failed on what makes the tensors of _DoubledLinear" in caplog.text


def test_float32_agrees_with_the_functorch_engine() -> None:
    torch.manual_seed(0)
    model, shape = MODELS["conv2d grouped, padded"]()
    model.float().eval()
    x, y = torch.randn(*shape), torch.randint(0, 3, (shape[0],))
    with _on_products():
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, fisher_diagonal(model, [(x, y)], "exact", backend="functorch"), 1e-5)


class _VectorLinear(nn.Module):
    """``F.linear`` with a 1-d weight: one number per sample, no output dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight)


class _Column(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def test_a_linear_with_a_vector_weight_stays_on_the_fallback() -> None:
    """``F.linear(x, w)`` with ``w`` of shape ``(in,)``: not a layer's product."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), _VectorLinear(), _Column(), nn.Linear(1, 3))
    model.double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with mock.patch.object(unit_sums, "functional_sums", wraps=unit_sums.functional_sums) as spy:
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert not spy.called
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class _AlternatingMask(MaskedLinear):
    """Its mask flips at every call: each call's weight is made differently."""

    def forward(self, x: Tensor) -> Tensor:
        self.mask = 1 - self.mask
        return super().forward(x)


@pytest.mark.parametrize("layer", ["masked linear", "masked conv", "alternating mask"])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_masked_layer_called_twice(layer, method) -> None:
    """Each call's products are pulled back through the graph that made that call's weight,
    all at once, so that each sample's gradients add up over the calls before squaring (the
    per-module fallback took such layers before)."""
    torch.manual_seed(0)
    if layer == "masked conv":
        model, x = Twice(MaskedConv(2, 2, 3, padding=1), 6 * 16), torch.randn(6, 4, 4, 4)
    else:
        module = MaskedLinear if layer == "masked linear" else _AlternatingMask
        model, x = Twice(module(4, 4), 4), torch.randn(6, 4)
    model.double().eval()
    x, y = x.double(), torch.randint(0, 3, (6,))
    with _on_products():
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)
