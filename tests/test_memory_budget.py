"""The memory-budget benchmark runs and writes its table (timings and peaks are not asserted:
the test process shares the machine)."""

from __future__ import annotations

from benchmarks import memory_budget


def test_memory_budget_writes_table(tmp_path):
    out = tmp_path / "budget.md"
    table = memory_budget.main(
        ["--budgets-mib", "0.5", "64", "--samples", "4", "--repeats", "1", "--out", str(out)]
    )
    assert out.read_text() == table
    assert "| 0.5 |" in table and "| 64 |" in table
