"""The Hugging Face transformers speed benchmark: its options' checks, and (where transformers
is installed) a run."""

from __future__ import annotations

import sys
from types import SimpleNamespace

import pytest

from benchmarks import transformers_speed


def test_without_transformers_the_error_says_how_to_install_it(monkeypatch, capsys) -> None:
    monkeypatch.setitem(sys.modules, "transformers", None)  # (as if not installed)
    with pytest.raises(SystemExit) as exit_:
        transformers_speed.main(["--out", "/nonexistent/speed.md"])
    assert exit_.value.code == 2
    assert "install it with: pip install --no-deps transformers" in capsys.readouterr().err


@pytest.mark.parametrize(
    "baseline, file",
    [("loop", "transformers_speed.md"), ("functorch", "transformers_functorch_speed.md")],
)
def test_each_baseline_has_its_own_report(monkeypatch, tmp_path, baseline, file) -> None:
    """Without ``--out`` the functorch baseline's table does not replace the loop baseline's
    (nothing is timed here: no rows, and transformers' version stood in for)."""
    monkeypatch.setattr(transformers_speed, "RESULTS", tmp_path)
    monkeypatch.setattr(transformers_speed, "run", lambda *args: [])
    monkeypatch.setattr(transformers_speed._coverage, "require", lambda parser, packages: None)
    monkeypatch.setattr(transformers_speed, "metadata", SimpleNamespace(version=lambda name: "0"))
    table = transformers_speed.main(["--baseline", baseline])
    assert [path.name for path in tmp_path.iterdir()] == [file]
    assert (tmp_path / file).read_text() == table and f"against `{baseline}`" in table


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("transformers")
    out = tmp_path / "speed.md"
    table = transformers_speed.main(
        ["--batch-size", "3", "--length", "4", "--width", "8", "--repeats", "1", "--threads",
         "1", "--out", str(out)]
    )
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| mpnet |")]
    assert [row.split(" | ")[1] for row in rows] == ["`exact`", "`empirical`"]
    assert all(float(row.split(" | ")[-1].rstrip(" |")) < 1e-4 for row in rows)
