"""The penalty-cost benchmark runs and writes its table (no timing assertions)."""

from __future__ import annotations

from benchmarks import penalty_speed


def test_penalty_speed_writes_table(tmp_path):
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(["--repeats", "2", "--threads", "1", "--out", str(out)])
    assert out.read_text() == table
    for row in ("| step |", "| step + penalty |", "| penalty |", "Target ≤ 10%"):
        assert row in table
