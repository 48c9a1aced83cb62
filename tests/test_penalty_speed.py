"""The penalty-cost benchmark runs and writes its table (no timing assertions)."""

from __future__ import annotations

from benchmarks import penalty_speed


def test_penalty_speed_writes_table(tmp_path):
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(["--repeats", "2", "--threads", "1", "--out", str(out)])
    assert out.read_text() == table
    rows = ("| step |", "| step + penalty |", "| step + add_penalty_grad |", "| penalty |")
    rows += ("| read θ, μ, A once |", "by `add_penalty_grad()`")
    for row in (*rows, "Target ≤ 10%", "page faults", "operators"):
        assert row in table


def test_compiled_contenders_are_timed_with_the_backend_given(tmp_path):
    """``aot_eager`` traces as ``inductor`` would without needing a C++ compiler."""
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(
        ["--repeats", "2", "--threads", "1", "--compile", "aot_eager", "--out", str(out)]
    )
    assert "--compile aot_eager`" in table
    for row in ("| compiled step |", "| compiled step + penalty |", "Compiled with `aot_eager`"):
        assert row in table
    assert "| step + compiled add_penalty_grad |" in table
    assert "compiled" not in penalty_speed.main(
        ["--repeats", "2", "--threads", "1", "--out", str(out)]
    )


def test_allocator_settings_are_reported(monkeypatch):
    for key in [k for k in penalty_speed.os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert penalty_speed.allocator_settings().startswith("none set")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert penalty_speed.allocator_settings() == "`MALLOC_TRIM_THRESHOLD_=17179869184`"
