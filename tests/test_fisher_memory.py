"""The ResNet-18 memory benchmark runs and writes its table (no memory assertions: RSS is
shared with the test process)."""

from __future__ import annotations

import pytest

from benchmarks import fisher_memory


def test_fisher_memory_writes_table(tmp_path):
    pytest.importorskip("torchvision")  # (its ResNet)
    out = tmp_path / "memory.md"
    table = fisher_memory.main(["--sizes", "2", "--backends", "auto", "--out", str(out)])
    assert out.read_text() == table
    assert "| auto | 2 |" in table
