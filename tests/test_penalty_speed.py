"""The penalty-cost benchmark runs and writes its table (no timing assertions)."""

from __future__ import annotations

import pytest
import torch

from benchmarks import fused_penalty, penalty_speed
from ewc_reg._penalty import ewc_penalty


def test_penalty_speed_writes_table(tmp_path):
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(["--repeats", "2", "--threads", "1", "--out", str(out)])
    assert out.read_text() == table
    rows = ("| step |", "| step + penalty |", "| step + add_penalty_grad |", "| penalty |")
    rows += ("| read θ, μ, A once |", "by `add_penalty_grad()`")
    for row in (*rows, "Target ≤ 10%", "page faults", "operators"):
        assert row in table


def test_compiled_contenders_are_timed_with_the_backend_given(tmp_path):
    """``aot_eager`` traces as ``inductor`` would without needing a C++ compiler."""
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(
        ["--repeats", "2", "--threads", "1", "--compile", "aot_eager", "--out", str(out)]
    )
    assert "--compile aot_eager`" in table
    for row in ("| compiled step |", "| compiled step + penalty |", "Compiled with `aot_eager`"):
        assert row in table
    assert "| step + compiled add_penalty_grad |" in table
    assert "compiled" not in penalty_speed.main(
        ["--repeats", "2", "--threads", "1", "--out", str(out)]
    )


def test_allocator_settings_are_reported(monkeypatch):
    for key in [k for k in penalty_speed.os.environ if k.startswith("MALLOC_")]:
        monkeypatch.delenv(key)
    monkeypatch.delenv("GLIBC_TUNABLES", raising=False)
    monkeypatch.delenv("LD_PRELOAD", raising=False)
    assert penalty_speed.allocator_settings().startswith("none set")
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", "17179869184")
    assert penalty_speed.allocator_settings() == "`MALLOC_TRIM_THRESHOLD_=17179869184`"


def _fused_kernel():
    """The benchmark's C++ kernel, or a skip where it cannot be built (no compiler or ninja;
    the bench extra installs ninja, so CI builds it)."""
    try:
        return fused_penalty.kernel()
    except fused_penalty.BuildError as error:
        pytest.skip(str(error))


def test_fused_kernel_gives_the_library_penalty_and_gradient():
    """The C++ node and ``add_grad`` against the library's node (itself tested in float64):
    the floor they time is of the same computation."""
    _fused_kernel()
    torch.manual_seed(0)
    shapes = [(7, 5), (3,), (40000,), (2, 3, 4)]  # (one of several parallel chunks)
    params = [torch.randn(s, requires_grad=True) for s in shapes]
    precision = [torch.rand(s) for s in shapes]
    center = [torch.randn(s) for s in shapes]
    expected_value = ewc_penalty(params, precision, center, 3.0, offset=0.25)
    expected = torch.autograd.grad(expected_value, params)
    value = fused_penalty.FusedPenalty.apply(3.0, 0.25, precision, center, *params)
    torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=0)  # (float32 sums)
    for got, want in zip(torch.autograd.grad(2 * value, params), expected):
        torch.testing.assert_close(got, 2 * want)
    grads = [torch.randn(s) for s in shapes]
    for p, g in zip(params, grads):
        p.grad = g.clone()
    fused_penalty.add_grad(params, precision, center, 3.0)
    for p, g, want in zip(params, grads, expected):
        torch.testing.assert_close(p.grad, g + want)


def test_fused_kernel_refuses_what_it_does_not_handle():
    kernel = _fused_kernel()
    a, b = torch.ones(4), torch.ones(4)
    with pytest.raises(RuntimeError, match="float32 contiguous CPU tensors only"):
        kernel.weighted([torch.empty(4)], [a.double()], [b], [b], 1.0)
    with pytest.raises(RuntimeError, match="float32 contiguous CPU tensors only"):
        kernel.add_grad([torch.ones(2, 2).t()], [torch.ones(2, 2)], [b[:4].view(2, 2)], [a], 1.0)
    with pytest.raises(RuntimeError, match="tensors of different sizes"):
        kernel.add_grad([torch.ones(3)], [a], [b], [b], 1.0)


def test_fused_floor_contenders_are_timed(tmp_path):
    _fused_kernel()
    out = tmp_path / "penalty.md"
    table = penalty_speed.main(
        ["--repeats", "2", "--threads", "1", "--fused-floor", "--out", str(out)]
    )
    assert "--fused-floor`" in table
    for row in (
        "| step + fused penalty (C++) |",
        "| step + fused add_penalty_grad (C++) |",
        "Fused by hand in C++",
    ):
        assert row in table
    assert "C++" not in penalty_speed.main(["--repeats", "2", "--threads", "1", "--out", str(out)])


def test_fused_floor_where_the_kernel_cannot_be_built_is_a_clear_error(monkeypatch, capsys):
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    fused_penalty.kernel.cache_clear()
    try:
        with pytest.raises(SystemExit):
            penalty_speed.main(["--fused-floor"])
    finally:
        fused_penalty.kernel.cache_clear()
    error = capsys.readouterr().err
    assert "argument --fused-floor: building the fused kernel needs ninja" in error
