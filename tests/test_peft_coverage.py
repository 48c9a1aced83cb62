"""The PEFT coverage benchmark: a case that cannot be built, the check for the packages its
cases need, and (where peft is installed) a run."""

from __future__ import annotations

import sys

import pytest

from benchmarks import _coverage, peft_coverage


def test_every_case_is_reported_even_when_it_cannot_be_built(monkeypatch) -> None:
    def broken(batch: int) -> None:
        raise ImportError("No module named 'peft'")

    monkeypatch.setitem(peft_coverage.CASES, "broken", broken)
    assert peft_coverage.measure_case("broken") == {
        "error": "ImportError: No module named 'peft'"
    }


@pytest.mark.parametrize(
    "blocked, cases",
    [("peft", "mlp_lora"), ("timm", "mlp_lora,vit_lora"), ("transformers", "gpt2_lora")],
)
def test_the_packages_of_the_cases_chosen_must_import(
    monkeypatch, capsys, tmp_path, blocked, cases
) -> None:
    """peft for every case, and timm or transformers for those built on their models: without
    one of them nothing runs, nothing is written, and the error says how to install it."""
    monkeypatch.setitem(sys.modules, blocked, None)  # (as if not installed)
    monkeypatch.setattr(_coverage, "run", lambda *args: pytest.fail("a case ran"))
    with pytest.raises(SystemExit) as exit_:
        peft_coverage.main(["--cases", cases, "--out", str(tmp_path / "peft.md")])
    assert exit_.value.code == 2
    assert f"needs {blocked}, which does not import here" in capsys.readouterr().err
    assert not (tmp_path / "peft.md").exists()


def test_every_case_says_the_packages_it_needs() -> None:
    assert peft_coverage.PACKAGES.keys() == peft_coverage.CASES.keys()
    assert peft_coverage.PACKAGES["mlp_lora"] == ("peft",)
    assert peft_coverage.PACKAGES["vit_dora"] == ("peft", "timm")
    assert peft_coverage.PACKAGES["llama_lora"] == ("peft", "transformers")


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
