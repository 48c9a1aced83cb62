"""What the coverage benchmarks read from the library's log, on torch models, and how their
size options reach each case."""

from __future__ import annotations

import json
import sys

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


def _measured(name: str, batch_size: int = 3) -> dict:
    """A case's result as the child process prints it (``auto_s``: the batch size it got)."""
    return {"engine": "hooks", "fallbacks": [], "difference": 0.0, "auto_s": batch_size,
            "loop_s": 0.0}


def _header(threads: int, batch_size: int) -> tuple[str, str, str]:
    return "Title", f"B={batch_size}", "case"


SIZES = {"batch_size": (3, 1, "samples per batch")}


@pytest.fixture
def children(monkeypatch) -> list[list[str]]:
    """The command lines of the child processes ``_coverage.run`` starts (none is started: each
    prints its case's result at once)."""
    commands: list[list[str]] = []

    class Done:
        stdout = json.dumps(_measured("a"))

    monkeypatch.setattr(
        _coverage.subprocess, "run", lambda command, **kwargs: commands.append(command) or Done
    )
    return commands


def _main(argv: list[str], out, cases=None) -> str | None:
    """``_coverage.main`` of a benchmark ``benchmarks.fake`` of cases ``a`` and ``b`` (needing
    no package) whose default report is ``out``."""
    cases = cases or {"a": (), "b": ()}
    return _coverage.main(argv, "Fake.", "benchmarks.fake", cases, _measured, _header, out, SIZES)


def test_the_sizes_reach_the_case_the_child_process_and_the_header(
    children, capsys, tmp_path
) -> None:
    """A benchmark's size options (``--batch-size``) go to the child process's command line,
    from there to the case's measurement, and to the report's header; a size below its least
    value is refused."""
    out = tmp_path / "o.md"
    assert _main(["--one", "a", "--batch-size", "5"], out) is None
    assert '"auto_s": 5' in capsys.readouterr().out
    table = _main(["--batch-size", "4"], out)
    assert children[0][-2:] == ["--batch-size", "4"] and "B=4" in table
    with pytest.raises(SystemExit):
        _main(["--batch-size", "0"], out)
    assert "argument --batch-size: 0 is less than 1" in capsys.readouterr().err


def test_only_a_full_run_writes_the_default_report(children, tmp_path) -> None:
    """Without ``--out``, a run of some of the cases, or at other sizes, is printed only: it
    would replace the committed table of all the cases. ``--out`` writes any run."""
    out = tmp_path / "default.md"
    for argv in (["--cases", "a"], ["--batch-size", "4"]):
        assert "| a | hooks |" in _main(argv, out)
        assert not out.exists()
    table = _main(["--cases", "a", "--out", str(tmp_path / "a.md")], out)
    assert (tmp_path / "a.md").read_text() == table and not out.exists()
    assert _main([], out) == out.read_text()
    out.unlink()
    assert _main(["--cases", "b,a"], out) == out.read_text()  # (all the cases, named)


@pytest.mark.parametrize(
    "cases, message",
    [
        ("a,c,d", "argument --cases: no case c, d; the cases are a, b"),
        (",", "argument --cases: ',' names no case; the cases are a, b"),
    ],
)
def test_unknown_cases_are_refused_before_any_runs(
    children, capsys, tmp_path, cases, message
) -> None:
    with pytest.raises(SystemExit) as exit_:
        _main(["--cases", cases], tmp_path / "o.md")
    assert exit_.value.code == 2 and message in capsys.readouterr().err
    assert not children and not (tmp_path / "o.md").exists()


def test_a_missing_package_is_refused_before_any_runs(
    children, capsys, monkeypatch, tmp_path
) -> None:
    """The packages of the cases chosen must import; the error names the command that
    installs one that does not, and nothing runs or is written."""
    monkeypatch.setitem(sys.modules, "peft", None)  # (as if not installed)
    out = tmp_path / "o.md"
    assert _main(["--cases", "a"], out, {"a": (), "b": ("peft",)}) is not None  # (a needs none)
    with pytest.raises(SystemExit) as exit_:
        _main([], out, {"a": (), "b": ("peft",)})
    error = capsys.readouterr().err
    assert exit_.value.code == 2 and "needs peft, which does not import here" in error
    assert "install it with: pip install --no-deps peft" in error
    assert len(children) == 1 and not out.exists()
