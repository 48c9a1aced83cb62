"""The hooked-layers benchmark runs and writes its table (timings are not asserted: the test
process shares the machine)."""

from __future__ import annotations

import torch

from benchmarks import hooked_speed
from benchmarks.models import ReducedResNet18
from ewc_reg.engines.recording import plan


def test_hooked_speed_writes_table(tmp_path):
    out = tmp_path / "hooked_speed.md"
    table = hooked_speed.main(["--quick", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == table
    rows = [line for line in table.splitlines() if line.startswith("| ")]
    assert len(rows) == 1 + len(hooked_speed.METHODS) * (1 + len(hooked_speed.VARIANTS))


def test_the_variants_differ_only_in_the_way_their_layers_are_computed():
    """The hooked model keeps every rule, the fallback variant loses those of its convolution
    and linear layers, and so do the pruned, weight-normalized and masked ones; the first three give
    the same Fisher, and each of the last two the same on both its backends."""
    variants = hooked_speed._variants(ReducedResNet18(10).eval())
    rules = {
        name: [unit.rule is None for unit in plan(m, dict(m.named_parameters()))]
        for name, (m, _) in variants.items()
    }
    assert rules["no hooks"] == rules["hooked"] and not any(rules["hooked"])
    for name in ("on the per-module fallback", "pruned", "weight_norm", "masked"):
        assert sum(rules[name]) > 0
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    fishers = {
        name: hooked_speed.fisher_diagonal(m, [(x, y)], backend=backend)
        for name, (m, backend) in variants.items()
    }
    pairs = [("no hooks", "hooked"), ("no hooks", "on the per-module fallback")]
    made = ("pruned", "weight_norm", "masked")
    pairs += [(name, f"{name}, functorch engine") for name in made]
    for first, other in pairs:
        assert fishers[first].keys() == fishers[other].keys()
        for name, f in fishers[first].items():
            torch.testing.assert_close(fishers[other][name], f, rtol=1e-4, atol=1e-12)
