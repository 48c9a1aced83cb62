"""The timm speed benchmark: its baselines' switches, its command line, and (where timm is
installed) a run."""

from __future__ import annotations

import logging
import sys

import pytest
import torch
from torch import nn

from benchmarks import timm_speed
from ewc_reg import fisher_diagonal
from ewc_reg.engines import hooks, loose, recording, rules


def test_timm_rules_are_removed_in_the_block_only() -> None:
    names = timm_speed.rule_names()
    assert "timm.layers.norm_act.BatchNormAct2d" in names and "timm.layers.linear.Linear" in names
    entries = {name: rules.RULES[name] for name in names}
    with pytest.raises(RuntimeError, match="inside"):
        with timm_speed.without_timm_rules():
            assert not timm_speed.rule_names()
            raise RuntimeError("inside")
    assert {name: rules.RULES[name] for name in timm_speed.rule_names()} == entries


class Parent(nn.Module):
    """Owns a parameter next to a child owning some."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.ones(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale


def test_parents_are_whole_units_in_the_block_only() -> None:
    model = nn.Sequential(Parent())
    params = dict(model.named_parameters())

    def paths() -> list[str]:
        return [unit.path for unit in recording.plan(model, params, whole_parents=False)]

    assert paths() == ["0", "0.lin"]
    with pytest.raises(RuntimeError, match="inside"):
        with timm_speed.with_whole_parents():
            assert paths() == ["0"]
            raise RuntimeError("inside")
    assert paths() == ["0", "0.lin"]


class ReshapedScale(nn.Module):
    """Owns a scale it reshapes before it meets the batch: shadowed copies only."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(2, 2)
        self.scale = nn.Parameter(torch.rand(2) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x) * self.scale.reshape(1, 2)


def test_shadowed_copies_are_off_in_the_block_only(caplog) -> None:
    """In the block, the parent is a unit of its own parameters (the engine says so), with
    arrangements of its own; outside, the copies are shadowed and nothing is said."""
    model = nn.Sequential(ReshapedScale(), nn.Linear(2, 3)).double()
    data = [(torch.randn(4, 2, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    layouts, kept = loose.LAYOUTS, hooks.HookEngine.arrangements
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        want = timm_speed.fisher(model, data, "exact", None)
        assert not caplog.records
        with pytest.raises(RuntimeError, match="inside"):
            with timm_speed.without_shadows():
                assert loose.SHADOWED not in loose.LAYOUTS
                got = timm_speed.fisher(model, data, "exact", None)
                raise RuntimeError("inside")
    assert "['0.scale'] become units of their own parameters" in caplog.records[0].getMessage()
    assert loose.LAYOUTS == layouts and hooks.HookEngine.arrangements is kept
    assert all(torch.allclose(got[n], want[n], rtol=1e-10, atol=0) for n in want)


@pytest.mark.parametrize("engine", ["functorch", "loop"])
def test_the_engine_baselines_are_those_engines(engine: str) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 3))
    data = [(torch.randn(5, 3), torch.randint(0, 3, (5,)))]
    want = fisher_diagonal(model, data, "exact", backend=engine)
    got = timm_speed.fisher(model, data, "exact", engine)
    assert all(torch.equal(got[name], want[name]) for name in want)
    hooks_engine = fisher_diagonal(model, data, "exact", backend="hooks")
    got = timm_speed.fisher(model, data, "exact", None)
    assert all(torch.equal(got[name], hooks_engine[name]) for name in want)
    assert not all(torch.equal(got[name], want[name]) for name in want)  # (rounding differs)


def test_the_looped_baseline_loops_in_small_passes(looped_min_bytes, pull_back_modes) -> None:
    """``--baseline looped``: the pull-back loops over the vectors where the engine, on passes
    whose recorded outputs are smaller than ``hooks.looped_min_bytes()``, batches them."""
    model = nn.Sequential(nn.Conv2d(2, 3, 3), nn.Flatten(), nn.Linear(12, 3)).double()
    data = [(torch.randn(4, 2, 4, 4, dtype=torch.float64), torch.randint(0, 3, (4,)))]
    want = timm_speed.fisher(model, data, "exact", None)
    assert pull_back_modes == [False]
    got = timm_speed.fisher(model, data, "exact", "looped")
    assert pull_back_modes == [False, True]
    assert all(torch.allclose(got[n], want[n], rtol=1e-12, atol=0) for n in want)


def test_without_timm_the_error_says_how_to_install_it(monkeypatch, capsys, tmp_path) -> None:
    monkeypatch.setitem(sys.modules, "timm", None)  # (as if not installed)
    with pytest.raises(SystemExit) as exit_:
        timm_speed.main(["--out", str(tmp_path / "timm.md")])
    assert exit_.value.code == 2
    assert "install it with: pip install --no-deps timm" in capsys.readouterr().err
    assert not (tmp_path / "timm.md").exists()


def test_a_small_run_writes_its_table(tmp_path) -> None:
    pytest.importorskip("timm")
    table = timm_speed.main(
        ["--models", "mobilenetv3_small_050", "--batch-size", "2", "--image-size", "32",
         "--repeats", "1", "--out", str(tmp_path / "timm.md")]
    )
    assert (tmp_path / "timm.md").read_text() == table
    assert table.count("| mobilenetv3_small_050 |") == 2
