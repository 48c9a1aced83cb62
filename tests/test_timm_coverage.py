"""The timm coverage benchmark: its check for timm, and (where timm is installed) a run."""

from __future__ import annotations

import sys

import pytest

from benchmarks import _coverage, timm_coverage


def test_without_timm_nothing_runs_and_the_error_says_how_to_install_it(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # (as if not installed)
    monkeypatch.setattr(_coverage, "run", lambda *args: pytest.fail("a case ran"))
    monkeypatch.setattr(timm_coverage, "RESULTS", tmp_path / "timm_coverage.md")
    with pytest.raises(SystemExit) as exit_:
        timm_coverage.main([])
    assert exit_.value.code == 2
    assert "install it with: pip install --no-deps timm" in capsys.readouterr().err
    assert not (tmp_path / "timm_coverage.md").exists()


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("timm")
    table = timm_coverage.main(["--cases", "resnet10t", "--out", str(tmp_path / "cover.md")])
    assert (tmp_path / "cover.md").read_text() == table
    assert "| resnet10t | hooks | – |" in table and "1 of 1 ran: 1 on hooks" in table
