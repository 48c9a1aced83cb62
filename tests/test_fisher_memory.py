"""The ResNet-18 memory benchmark runs and writes its table (no memory assertions: RSS is
shared with the test process)."""

from __future__ import annotations

import pytest

from benchmarks import fisher_memory


def test_fisher_memory_writes_table(tmp_path):
    out = tmp_path / "memory.md"
    table = fisher_memory.main(["--sizes", "2", "--backends", "auto", "--out", str(out)])
    assert out.read_text() == table
    assert "| auto | 2 |" in table


@pytest.mark.parametrize(
    "option, message",
    [
        (["--sizes", "32", "0"], "argument --sizes: 0 is less than 1"),
        (["--threads", "0"], "argument --threads: 0 is less than 1"),
        (["--backends", "auto", "fast"], "argument --backends: invalid choice: 'fast'"),
    ],
)
def test_bad_options_are_refused(capsys, option, message):
    with pytest.raises(SystemExit):
        fisher_memory.main(option)
    assert message in capsys.readouterr().err


def test_the_help_names_the_command(capsys):
    with pytest.raises(SystemExit):
        fisher_memory.main(["--help"])
    assert capsys.readouterr().out.startswith("usage: python -m benchmarks.fisher_memory ")
