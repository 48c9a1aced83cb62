"""The Hugging Face transformers coverage benchmark: a case that cannot be made, its check for
transformers, and (where transformers is installed) a run."""

from __future__ import annotations

import sys

import pytest

from benchmarks import _coverage, transformers_coverage


def test_an_architecture_that_cannot_be_made_is_reported(monkeypatch) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # (as if not installed)
    result = transformers_coverage.measure_architecture("bert")
    assert list(result) == ["error"] and result["error"].startswith("ModuleNotFoundError")


def test_without_transformers_nothing_runs_and_the_error_says_how_to_install_it(
    monkeypatch, capsys, tmp_path
) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # (as if not installed)
    monkeypatch.setattr(_coverage, "run", lambda *args: pytest.fail("a case ran"))
    with pytest.raises(SystemExit) as exit_:
        transformers_coverage.main(["--cases", "bert", "--out", str(tmp_path / "hf.md")])
    assert exit_.value.code == 2
    assert "install it with: pip install --no-deps transformers" in capsys.readouterr().err
    assert not (tmp_path / "hf.md").exists()


def test_no_architecture_is_both_text_and_images() -> None:
    assert not transformers_coverage.TEXT.keys() & transformers_coverage.IMAGES.keys()


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "transformers.md"
    table = transformers_coverage.main(["--cases", "bert,swin", "--out", str(out)])
    assert out.read_text() == table
    assert "2 of 2 ran: 2 on hooks" in table
    assert "| bert | hooks | – |" in table and "| swin | hooks |" in table


def test_the_batch_and_length_options_make_the_inputs(tmp_path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "transformers.md"
    table = transformers_coverage.main(
        ["--cases", "bert", "--batch-size", "4", "--length", "4", "--out", str(out)]
    )
    assert "B=4 · T=4 (text)" in table and "| bert | hooks | – |" in table
    inputs = transformers_coverage.inputs("bert", 5, 7)
    assert inputs["input_ids"].shape == inputs["attention_mask"].shape == (5, 7)
