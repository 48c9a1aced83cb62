"""Smoke test of the speed benchmark (``python -m benchmarks.fisher_speed --quick``).

Runs in-process on tiny sizes; checks the report is produced and every Fisher agrees with the
torch.func engine's. No timing assertions.
"""

from __future__ import annotations

from pathlib import Path

import torch

from benchmarks import fisher_speed


def test_quick_benchmark_produces_report_and_agrees(tmp_path: Path) -> None:
    output = tmp_path / "fisher_speed.md"
    args = fisher_speed.parse_args(["--quick", "--threads", "1", "--out", str(output)])
    report = fisher_speed.run(args)

    assert output.read_text() == report.markdown
    assert "| model | C | N | contender |" in report.markdown
    assert "## Targets of issue #3" in report.markdown
    assert "× fwd+bwd (Split MNIST MLP C=2) | " in report.markdown
    assert "(of the minima: " in report.markdown  # (beside the ratio of medians)
    names = {row.name for row in report.rows}
    assert "plain fwd+bwd" in names and "naive loop (paper)" in names
    for backend in fisher_speed.TIMED_BACKENDS:
        assert f"ewc_reg [{backend}]" in names
    for row in report.rows:
        if row.name in ("plain fwd+bwd", "ewc_reg [functorch]", "naive loop (paper)"):
            assert not row.status, row.status
            assert row.seconds is not None and row.seconds > 0
    checked = [row for row in report.rows if row.agreement is not None]
    assert any(row.name == "naive loop (paper)" for row in checked)
    assert report.agreement_ok, [
        (row.workload.title, row.name, row.method, row.agreement) for row in checked
    ]


def test_quick_mode_writes_no_results_file_by_default() -> None:
    args = fisher_speed.parse_args(["--quick", "--models", "mlp"])
    assert args.out is None and args.repeats == 0
    assert fisher_speed.parse_args([]).out == fisher_speed.RESULTS_PATH


def test_the_report_goes_to_out_or_to_output_its_older_name(tmp_path: Path) -> None:
    """``--out`` as in the other benchmarks; ``--output``, in older commands, still works."""
    for option in ("--out", "--output"):
        assert fisher_speed.parse_args([option, str(tmp_path)]).out == tmp_path


def test_tf32_is_off_during_the_run_and_restored_after(monkeypatch) -> None:
    seen = []
    monkeypatch.setattr(
        fisher_speed, "_run",
        lambda args, command: seen.append(
            (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32)
        ),
    )
    before = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    try:
        fisher_speed.run(fisher_speed.parse_args(["--quick", "--models", "mlp"]))
        assert seen == [(False, False)]
        assert torch.backends.cuda.matmul.allow_tf32 and torch.backends.cudnn.allow_tf32
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = before


def test_extra_models_run_on_request_and_have_no_targets(tmp_path: Path) -> None:
    """ViT, LSTM and the weight-sharing models run only when named; the issue's targets are not
    computed for them."""
    assert fisher_speed.parse_args([]).models == list(fisher_speed.MODEL_KEYS)
    output = tmp_path / "more.md"
    models = ",".join(fisher_speed.EXTRA_MODEL_KEYS[1:])  # (all but the ViT)
    args = fisher_speed.parse_args(
        ["--quick", "--models", models, "--threads", "1", "--out", str(output)]
    )
    report = fisher_speed.run(args)
    assert {row.workload.model_key for row in report.rows} == set(
        fisher_speed.EXTRA_MODEL_KEYS[1:]
    )
    assert "LSTM text classifier" in report.markdown
    assert "LSTM (proj_size) text classifier" in report.markdown
    assert "LSTMCell stepped by hand" in report.markdown
    assert "one layer applied twice" in report.markdown
    assert "transposed convolutions" in report.markdown
    assert "3-d CNN" in report.markdown
    assert "reduced ResNet-18 in channels_last" in report.markdown
    assert "exact ≤ 6× fwd+bwd (LSTM" not in report.markdown
    assert report.agreement_ok
