"""Smoke test of the tied language-model benchmark (``python -m benchmarks.lm_speed --quick``):
the table is written and every engine's Fisher of the tied model agrees with the functorch
engine's. No timing assertions."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from benchmarks import lm_speed
from benchmarks.models import TiedLanguageModel
from ewc_reg import fisher_diagonal
from ewc_reg.engines import unit_sums

from .test_hooks_engine import LlamaRMSNorm


def test_quick_run_writes_the_table_and_agrees(tmp_path) -> None:
    out = tmp_path / "lm.md"
    rows = lm_speed.main(["--quick", "--models", "toy", "--threads", "1", "--out", str(out)])
    table = out.read_text()
    assert "| model | method | contender | median ms | × fwd+bwd |" in table
    names = {(row.method, row.name) for row in rows}
    want = {("", "plain fwd+bwd")} | {
        (method, name)
        for method in lm_speed.METHODS
        for name, _, declined in lm_speed.CONTENDERS
        if "rms" not in declined  # (the toy model has no RMS norm)
    } | {(method, lm_speed.UNTIED) for method in lm_speed.METHODS}
    assert names == want
    for row in rows:
        assert row.seconds > 0 and f"| {row.name} |" in table
        if row.agreement is not None:
            assert row.agreement < 1e-5, (row.method, row.name, row.agreement)
    assert sum(row.agreement is not None for row in rows) == 2 * (len(lm_speed.CONTENDERS) - 1)


@pytest.mark.parametrize(
    ("declined", "fallback_paths"),
    [((), []), (("tied",), ["embedding+head"]), (("rms",), ["norm"])],
)
def test_a_rule_can_be_declined_for_a_comparison(monkeypatch, declined, fallback_paths) -> None:
    """With a rule declined its layers go to the per-module fallback: the same Fisher. The
    toy model's final norm is a (stand-in for) Hugging Face's RMS norm here."""
    torch.manual_seed(0)
    model = TiedLanguageModel(vocab_size=30, max_len=5, d_model=8, num_layers=1)
    model.norm = LlamaRMSNorm(8)
    nn.init.uniform_(model.norm.weight, 0.5, 1.5)
    model = model.double().eval()
    assert lm_speed.has_rms_norms(model)
    tokens = torch.randint(0, 30, (3, 6))
    data = [(tokens[:, :-1], tokens[:, 1:])]
    with_rules = fisher_diagonal(model, data, "empirical", backend="hooks")
    fallback, calls = unit_sums._fallback_sums, []

    def counting(unit, *args, **kwargs):
        calls.append(unit.path)
        return fallback(unit, *args, **kwargs)

    monkeypatch.setattr(unit_sums, "_fallback_sums", counting)
    with lm_speed.declining(declined):
        without = fisher_diagonal(model, data, "empirical", backend="hooks")
    assert calls == fallback_paths
    assert lm_speed.max_relative_difference(without, with_rules) < 1e-12
    assert not lm_speed.has_rms_norms(TiedLanguageModel(30, 5, 8, num_layers=1))


def test_untied_copy_gives_each_module_its_own_parameter() -> None:
    model = TiedLanguageModel(vocab_size=30, max_len=5, d_model=8, num_layers=1)
    untied = lm_speed.untied_copy(model)
    assert model.head.weight is model.embedding.weight
    assert untied.head.weight is not untied.embedding.weight
    assert torch.equal(untied.head.weight, model.embedding.weight)
    assert isinstance(untied.head.weight, nn.Parameter)
    assert len(list(untied.parameters())) == len(list(model.parameters())) + 1
