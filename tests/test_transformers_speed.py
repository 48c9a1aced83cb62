"""The Hugging Face transformers speed benchmark: its options' checks, and (where transformers
is installed) a run."""

from __future__ import annotations

import pytest

from benchmarks import transformers_speed


@pytest.mark.parametrize(
    "option, message",
    [
        (["--width", "6"], "--width must be a multiple of 4"),
        (["--length", "2"], "--length 3"),
        (["--repeats", "0"], "--repeats and --threads must be at least 1"),
        (["--models", "mpnet,nonesuch"], "--models: no classifier for ['nonesuch']"),
    ],
)
def test_bad_options_are_refused(option, message, capsys) -> None:
    with pytest.raises(SystemExit):
        transformers_speed.main(option)
    assert message in capsys.readouterr().err


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
