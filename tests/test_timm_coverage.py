"""The timm coverage benchmark: (where timm is installed) a run."""

from __future__ import annotations

import pytest

from benchmarks import timm_coverage


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("timm")
    table = timm_coverage.main(["--cases", "resnet10t", "--out", str(tmp_path / "cover.md")])
    assert (tmp_path / "cover.md").read_text() == table
    assert "| resnet10t | hooks | – |" in table and "1 of 1 ran: 1 on hooks" in table
