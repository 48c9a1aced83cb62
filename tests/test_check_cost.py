"""The check-cost benchmark runs and writes its table (timings are not asserted: the test
process shares the machine)."""

from __future__ import annotations

from benchmarks import check_cost
from ewc_reg.engines.hooks import HookEngine


def test_check_cost_writes_table(tmp_path):
    out = tmp_path / "check_cost.md"
    check = HookEngine._check_sums
    table = check_cost.main(["--quick", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + 3 * len(check_cost.METHODS)  # (the header, then model × method)
    assert "| reduced ResNet-18 | exact |" in table
    assert HookEngine._check_sums is check  # (the run without it restores it)


def test_a_quick_run_writes_only_where_out_says(monkeypatch, tmp_path):
    """A smoke test leaves no report behind; a full run writes one (nothing is timed here)."""
    monkeypatch.setattr(check_cost, "RESULTS", tmp_path / "check_cost.md")
    monkeypatch.setattr(check_cost, "run", lambda *args: {})
    table = check_cost.main(["--quick"])
    assert table.startswith("# The hooks engine's") and not check_cost.RESULTS.exists()
    assert check_cost.main([]) == check_cost.RESULTS.read_text()
