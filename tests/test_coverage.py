"""What the coverage benchmarks read from the library's log, on torch models, and how their
size options reach each case."""

from __future__ import annotations

import json

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


def test_the_sizes_reach_the_case_the_child_process_and_the_header(
    monkeypatch, capsys, tmp_path
) -> None:
    """A benchmark's size options (``--batch-size``) go to the child process's command line,
    from there to the case's measurement, and to the report's header; a size below its least
    value is refused."""
    sizes = {"batch_size": (3, 1, "samples per batch")}

    def measure_case(name: str, batch_size: int) -> dict:
        return {"engine": "hooks", "fallbacks": [], "difference": 0.0, "auto_s": batch_size,
                "loop_s": 0.0}

    def header(threads: int, batch_size: int) -> tuple[str, str, str]:
        return "Title", f"B={batch_size}", "case"

    common = ("description", "benchmarks.fake", ["a"], measure_case, header, tmp_path / "o.md")
    assert _coverage.main(["--one", "a", "--batch-size", "5"], *common, sizes) is None
    assert '"auto_s": 5' in capsys.readouterr().out
    commands = []

    class Done:
        stdout = json.dumps(measure_case("a", 0))

    monkeypatch.setattr(
        _coverage.subprocess, "run", lambda command, **kwargs: commands.append(command) or Done
    )
    table = _coverage.main(["--batch-size", "4"], *common, sizes)
    assert commands[0][-2:] == ["--batch-size", "4"] and "B=4" in table
    with pytest.raises(SystemExit):
        _coverage.main(["--batch-size", "0"], *common, sizes)
    assert "--batch-size must be at least 1" in capsys.readouterr().err
