"""What the coverage benchmarks read from the library's log, on torch models."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import _coverage


class Gate(nn.Module):
    """A module with a parameter and no rule: the per-module fallback."""

    def __init__(self) -> None:
        super().__init__()
        self.g = nn.Parameter(torch.randn(4))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(self.g)


class RootParameter(nn.Module):
    """The root owns a parameter it uses as a matrix on rows folded into the batch dimension
    positions first (no per-sample copies), next to a child owning some: functorch."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = torch.tanh(self.lin(x)).reshape(len(x), 2, 2).transpose(0, 1).flatten(0, 1)
        return (rows @ self.w.T).unflatten(0, (2, len(x))).sum(0)


@pytest.mark.parametrize(
    "make, engine, fallbacks",
    [
        (lambda: nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)), "hooks", []),
        (lambda: nn.Sequential(nn.Linear(4, 4), Gate(), nn.Linear(4, 3)), "hooks", ["Gate"]),
        (RootParameter, "functorch", []),
    ],
)
def test_measure_reads_the_engine_and_the_fallbacks(make, engine, fallbacks) -> None:
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(3, 4, dtype=torch.float64), torch.randint(0, 3, (3,))
    result = _coverage.measure(model, [(x, y)])
    assert result["engine"] == engine and result["fallbacks"] == fallbacks
    assert result["difference"] < 1e-12


def test_relative_difference_floors_tiny_entries() -> None:
    want = {"a": torch.tensor([1.0, 2.0]), "b": torch.tensor([1e-20])}
    got = {"a": torch.tensor([1.0, 2.2]), "b": torch.tensor([3e-20])}
    assert _coverage.relative_difference(got, want) == pytest.approx(0.1)


def test_a_module_of_the_fallback_on_the_loop_engine_does_not_move_the_model() -> None:
    hooks_then_loop = [
        ("ewc_reg", "functorch engine: vmap failed on this model (...); using the loop engine"),
    ]
    assert _coverage.engine_and_fallbacks(hooks_then_loop) == ("hooks", [])
    functorch_then_loop = [
        ("ewc_reg", "hooks engine: the root module owns ...; using the functorch engine"),
        *hooks_then_loop,
    ]
    assert _coverage.engine_and_fallbacks(functorch_then_loop) == ("loop", [])


def test_a_fisher_of_zeros_is_compared_and_shown() -> None:
    zeros = {"a": torch.zeros(2)}
    assert _coverage.relative_difference(zeros, zeros) == 0.0
    assert _coverage.relative_difference({"a": torch.ones(2)}, zeros) == float("inf")
    row = _coverage._row("m", {"engine": "hooks", "fallbacks": [], "difference": 0.0,
                               "fisher_is_zero": True, "auto_s": 1.0, "loop_s": 1.0})
    assert "(the Fisher is 0)" in row
