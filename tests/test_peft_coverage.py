"""The PEFT coverage benchmark: a case that cannot be built, and (where peft is installed) a
run."""

from __future__ import annotations

import pytest

from benchmarks import peft_coverage


def test_every_case_is_reported_even_when_it_cannot_be_built(monkeypatch) -> None:
    def broken(batch: int) -> None:
        raise ImportError("No module named 'peft'")

    monkeypatch.setitem(peft_coverage.CASES, "broken", broken)
    assert peft_coverage.measure_case("broken") == {
        "error": "ImportError: No module named 'peft'"
    }


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("peft")
    table = peft_coverage.main(["--cases", "mlp_lora", "--out", str(tmp_path / "peft.md")])
    assert (tmp_path / "peft.md").read_text() == table
    assert "| mlp_lora | hooks | – |" in table and "1 of 1 ran: 1 on hooks" in table
    assert "B=3" in table


@pytest.mark.parametrize("batch_size", [1, 4])
def test_every_case_builds_a_batch_of_the_size_asked(batch_size) -> None:
    """(The models need peft, transformers or timm; the data is checked where they build.)"""
    pytest.importorskip("peft")
    for name, build in peft_coverage.CASES.items():
        try:
            _, [batch] = build(batch_size)
        except ImportError:
            continue
        tensors = list(batch.values()) if isinstance(batch, dict) else list(batch)
        assert {len(t) for t in tensors} == {batch_size}, name
