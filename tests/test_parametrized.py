"""Layers whose weight (or bias) is made from other parameters, by ``torch.nn.utils.parametrize``
or the old ``torch.nn.utils.weight_norm``: their per-sample gradients of the made tensor
pulled back through how it is made (:mod:`ewc_reg.engines.parametrized`), against brute force
in float64, with the per-module fallback patched to fail."""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Callable, Iterator
from unittest import mock

import pytest
import torch
from torch import Tensor, nn
from torch.nn.utils import parametrizations, parametrize

from ewc_reg import fisher_diagonal
from ewc_reg.engines import parametrized, unit_sums

from .models import Doubled, Twice
from .reference import assert_close_dicts, brute_force_fisher


class _Scaled(nn.Module):
    """A parametrization with a parameter of its own: ``X * s`` per output row."""

    def __init__(self, rows: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(rows, 1, dtype=dtype) + 0.5)

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.s.reshape(-1, *[1] * (weight.dim() - 1))


def _old_weight_norm(layer: nn.Module, dim: int | None = 0) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # (deprecated, still in wide use)
        nn.utils.weight_norm(layer, dim=dim)


#: How each layer's tensors are made, applied to every layer of the model.
MAKERS: dict[str, Callable[[nn.Module], None]] = {
    "weight_norm": parametrizations.weight_norm,
    "weight_norm dim 1": lambda layer: parametrizations.weight_norm(layer, dim=1),
    "weight_norm and bias too": lambda layer: (
        parametrizations.weight_norm(layer),
        parametrizations.weight_norm(layer, "bias"),
    ),
    "spectral_norm": parametrizations.spectral_norm,
    "own parameter, two in a chain": lambda layer: (
        parametrize.register_parametrization(
            layer, "weight", _Scaled(layer.weight.shape[0], layer.weight.dtype)
        ),
        parametrize.register_parametrization(layer, "weight", nn.Tanh()),
    ),
    "old weight_norm": _old_weight_norm,
    "old weight_norm dim None": lambda layer: _old_weight_norm(layer, None),
}


def _model(kind: str) -> tuple[nn.Module, Tensor]:
    """A model of layers with products (1-d and 2-d convolutions, grouped, strided, reflected;
    a linear layer on a sequence) and its input, float64."""
    if kind == "conv2d":
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3, padding=1, padding_mode="reflect"),
            nn.Tanh(),
            nn.Conv2d(4, 4, 3, stride=2, groups=2),
            nn.Tanh(),
            nn.Flatten(),
            nn.Linear(4 * 2 * 2, 3),
        )
        x = torch.randn(6, 3, 6, 6)
    elif kind == "conv1d":
        model = nn.Sequential(nn.Conv1d(3, 4, 3), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 5, 3))
        x = torch.randn(6, 3, 7)
    else:  # (a linear layer on (B, T, in): its gradients summed over T before squaring)
        model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Flatten(), nn.Linear(4 * 3, 3))
        x = torch.randn(6, 3, 5)
    return model.double(), x.double()


def _assert_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float) -> None:
    """Each entry within ``rtol`` of the largest entry of all (a bias under ``weight_norm``
    has the Fisher 0 for its ``v``: both sides are rounding, ~1e-34)."""
    assert got.keys() == want.keys()
    overall = max(t.abs().max().item() for t in want.values())
    for name in want:
        error = (got[name] - want[name]).abs().max().item()
        assert error <= rtol * overall, f"{name}: error {error:.3g} of {overall:.3g}"


#: The two ways such a layer's sums are made: each call's recorded product pulled back through
#: the graph that made its weight (:mod:`ewc_reg.engines.functional`; tried first), or the
#: made tensors pulled back by ``torch.func.vjp``
#: (:func:`ewc_reg.engines.parametrized.made_sums`: where no product was recorded, as for a
#: convolution with ``padding_mode="reflect"``, which pads its input first).
WAYS = ("recorded", "made")


@contextlib.contextmanager
def _pulled_back(way: str) -> Iterator[None]:
    """Inside, the per-module fallback fails, and for ``"made"`` the recorded products
    decline; at the end, the sums of ``way`` must have been asked for."""
    refused = AssertionError("per-module fallback")
    with contextlib.ExitStack() as stack:
        stack.enter_context(mock.patch.object(unit_sums, "_fallback_sums", side_effect=refused))
        if way == "made":
            stack.enter_context(mock.patch.object(unit_sums, "functional_sums", return_value=None))
        used = "functional_sums" if way == "recorded" else "made_sums"
        wrapped = mock.patch.object(unit_sums, used, wraps=getattr(unit_sums, used))
        spy = stack.enter_context(wrapped)
        yield
    assert spy.called


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("maker", list(MAKERS))
@pytest.mark.parametrize("kind", ["conv2d", "conv1d", "sequence"])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_made_tensors_are_pulled_back_through_how_they_are_made(
    maker, kind, method, way
) -> None:
    """Every layer's weight made by ``maker``: the per-sample gradients of the made tensor,
    pulled back through how it is made, match brute force (they went to the per-module
    fallback, which took 2.5 times the functorch engine's time on a ResNet-18 under
    ``weight_norm``)."""
    torch.manual_seed(0)
    model, x = _model(kind)
    for layer in model:
        if isinstance(layer, (nn.Conv1d, nn.Conv2d, nn.Linear)):
            MAKERS[maker](layer)
    model.eval()
    y = torch.randint(0, 3, (x.shape[0],))
    with _pulled_back(way):
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    _assert_close(got, brute_force_fisher(model, x, y, method), 1e-10)


@pytest.mark.parametrize("way", WAYS)
def test_orthogonal_weights(way) -> None:
    """``parametrizations.orthogonal`` (a matrix exponential of the original) on a square
    linear layer."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrizations.orthogonal(model[0])
    model.eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with _pulled_back(way):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("budget", [1, 2**16])
def test_some_parameters_and_small_chunks(budget, way) -> None:
    """A selection of some of the tensors a weight is made of (``v`` without ``g``) and the
    bias beside them, a few samples at a time (one at a time for a budget of 1 byte)."""
    torch.manual_seed(0)
    model, x = _model("conv2d")
    for layer in (model[0], model[2]):
        parametrizations.weight_norm(layer)
    model.eval()
    y = torch.randint(0, 3, (x.shape[0],))
    names = ["0.parametrizations.weight.original1", "0.bias", "2.parametrizations.weight.original0"]
    with _pulled_back(way):
        got = fisher_diagonal(
            model, [(x, y)], "exact", backend="hooks", params=names, memory_budget=budget
        )
    want = brute_force_fisher(model, x, y, "exact")
    assert_close_dicts(got, {name: want[name] for name in names}, 1e-10)


class _Doubled(nn.Module):
    def forward(self, weight: Tensor) -> Tensor:
        return Doubled.apply(weight)


def test_a_parametrization_vmap_cannot_run_goes_to_the_fallback(caplog) -> None:
    """A parametrization whose pull-back ``vmap`` cannot run: its layer goes to the per-module
    fallback (logged once; remembered), and the Fisher is right."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(model[0], "weight", _Doubled())
    model.eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    assert model[0] in parametrized.unvmappable
    assert "vmap failed on what makes the tensors" in caplog.text


def test_a_hooked_parametrized_layer_goes_to_the_fallback() -> None:
    """A forward hook on a parametrized layer may change what it computes: the per-module
    fallback runs it with the hook."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrizations.weight_norm(model[0])
    model[0].register_forward_hook(lambda module, args, out: 2 * out)
    model.eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    assert parametrized.made_tensors(model[0]) is None
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("way", WAYS)
def test_float32_agrees_with_the_functorch_engine(way) -> None:
    """In float32, within 1e-5 of the functorch engine (the issue's target)."""
    torch.manual_seed(0)
    model, x = _model("conv2d")
    for layer in model:
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            parametrizations.weight_norm(layer)
    model.float().eval()
    x, y = x.float(), torch.randint(0, 3, (x.shape[0],))
    with _pulled_back(way):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    want = fisher_diagonal(model, [(x, y)], "exact", backend="functorch")
    _assert_close(got, want, 1e-5)


def test_a_parametrization_with_a_parameter_is_part_of_its_layers_unit() -> None:
    """The parameters of a parametrization (and the tensors it makes the weight of) are the
    parametrized layer's: one unit, taken at once (the parametrization was a unit of its own,
    without the batch in its output, and the layer's parameters went through per-sample
    copies and shadowed copies before the engine found a way)."""
    from ewc_reg.engines.recording import plan

    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    parametrize.register_parametrization(model[0], "weight", _Scaled(4, torch.float64))
    for whole_parents in (False, True):
        units = plan(model, dict(model.named_parameters()), whole_parents=whole_parents)
        assert len(units) == 2
        assert (units[0].path, sorted(units[0].names)) == (
            "0",
            ["bias", "parametrizations.weight.0.s", "parametrizations.weight.original"],
        )


def _twice(kind: str) -> tuple[nn.Module, Tensor]:
    """A float64 :class:`Twice` of a square linear layer or a convolution, and its input."""
    torch.manual_seed(0)
    if kind == "linear":
        model, x = Twice(nn.Linear(4, 4), 4), torch.randn(6, 4)
    else:
        model, x = Twice(nn.Conv2d(2, 3, 3, padding=1), 6 * 16), torch.randn(6, 4, 4, 4)
    return model.double(), x


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("maker", ["weight_norm", "spectral_norm", "old weight_norm"])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_a_made_layer_called_twice(maker, kind, way) -> None:
    """Each sample's gradient of the made weight is summed over the layer's calls (their
    products joined along positions) before it is pulled back: the per-module fallback took
    such layers before."""
    model, x = _twice(kind)
    MAKERS[maker](model.layer)
    model.eval()
    x, y = x.double(), torch.randint(0, 3, (6,))
    with _pulled_back(way):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    _assert_close(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("way", WAYS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize("bias", [False, True])
def test_a_pruned_layer_called_twice(kind, bias, way) -> None:
    """A pruned layer called more than once (its class's rule takes one call): its weight,
    ``weight_orig * weight_mask``, pulled back like a made one over its calls joined."""
    from torch.nn.utils import prune

    model, x = _twice(kind)
    prune.l1_unstructured(model.layer, "weight", 0.5)
    if bias:
        prune.random_unstructured(model.layer, "bias", 0.5)
    model.eval()
    x, y = x.double(), torch.randint(0, 3, (6,))
    with _pulled_back(way):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    _assert_close(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class _SetScale(nn.Module):
    """A parametrization with a state the model sets before each call."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = 1.0

    def forward(self, weight: Tensor) -> Tensor:
        return weight * self.scale


class _Rescaled(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(4, 4), nn.Linear(4, 3)
        parametrize.register_parametrization(self.layer, "weight", _SetScale())

    def forward(self, x: Tensor) -> Tensor:
        chain = self.layer.parametrizations.weight
        chain[0].scale = 1.0
        h = torch.tanh(self.layer(x))
        chain[0].scale = -2.0
        return self.head(torch.tanh(self.layer(h)))


def test_a_parametrization_whose_state_changes_between_calls() -> None:
    """Each call's weight as that call made it: the recorded products are pulled back through
    each call's own graph (the made tensors, made once again afterwards with the last call's
    state, were wrong, and the check of the sums refused the model)."""
    torch.manual_seed(0)
    model = _Rescaled().double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    with _pulled_back("recorded"):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
