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


def test_batched_pull_back_is_an_experiment_of_one_run(tmp_path):
    from ewc_reg.engines import hooks

    default = hooks._UNBATCHED_BACKWARD
    table = memory_budget.main(
        ["--budgets-mib", "64", "--samples", "2", "--repeats", "1", "--pull-back", "batched",
         "--out", str(tmp_path / "budget.md")]
    )
    assert "--pull-back batched" in table and "| 64 |" in table
    assert hooks._UNBATCHED_BACKWARD is default  # (restored)
