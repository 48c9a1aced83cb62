"""The memory-budget benchmark runs and writes its table (timings and peaks are not asserted:
the test process shares the machine)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import memory_budget
from benchmarks._paths import engine_ways, pull_back
from ewc_reg import fisher_diagonal
from ewc_reg.engines import base, hooks


def test_memory_budget_writes_table(tmp_path):
    out = tmp_path / "budget.md"
    table = memory_budget.main(
        ["--budgets-mib", "0.5", "64", "--samples", "4", "--repeats", "1", "--out", str(out)]
    )
    assert out.read_text() == table
    assert "| 0.5 |" in table and "| 64 |" in table and "| default (256) |" in table


@pytest.mark.parametrize("kind", ["looped", "batched"])
def test_a_forced_pull_back_holds_for_the_run_only(tmp_path, kind):
    default = hooks.loops_pull_back
    table = memory_budget.main(
        ["--budgets-mib", "64", "--samples", "2", "--repeats", "1", "--pull-back", kind,
         "--out", str(tmp_path / "budget.md")]
    )
    assert f"--pull-back {kind}" in table and "| 64 |" in table
    assert hooks.loops_pull_back is default  # (restored)


@pytest.mark.parametrize(
    ("kind", "make_model", "expected"),
    [
        ("auto", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), True),  # (CPU)
        ("auto", lambda: nn.Sequential(nn.Flatten(), nn.Linear(9, 3)), False),
        ("looped", lambda: nn.Sequential(nn.Flatten(), nn.Linear(9, 3)), True),
        ("batched", lambda: nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten()), False),
    ],
)
def test_pull_back_forces_the_engine(pull_back_modes, kind, make_model, expected):
    data = [(torch.randn(4, 1, 3, 3), torch.randint(0, 3, (4,)))]
    with pull_back(kind):
        fisher_diagonal(make_model(), data, "exact", backend="hooks")
    assert pull_back_modes == [expected]
    with pytest.raises(ValueError, match="pull-back must be one of"):
        with pull_back("sometimes"):
            pass


def test_engine_ways_hold_in_the_block_only():
    cpu = torch.device("cpu")
    with engine_ways("launch-bound"):
        assert base.launch_bound(cpu)
        assert not hooks.loops_pull_back(nn.Conv2d(1, 2, 3), cpu)
    with engine_ways("cpu"):
        assert not base.launch_bound(torch.device("cuda"))
    with engine_ways("device"):
        assert base.launch_bound(torch.device("cuda")) and not base.launch_bound(cpu)
    assert not base.launch_bound(cpu)
    assert hooks.loops_pull_back(nn.Conv2d(1, 2, 3), cpu)
    with pytest.raises(ValueError, match="ways must be one of"):
        with engine_ways("gpu"):
            pass
