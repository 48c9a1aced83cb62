"""The product-ways benchmark runs, writes its table, and reports the engine's own picks
(timings are not asserted: the test process shares the machine)."""

from __future__ import annotations

from benchmarks import product_ways
from ewc_reg.engines import rules


def test_product_ways_writes_table_with_the_engines_picks(tmp_path):
    out = tmp_path / "product_ways.md"
    constants = (rules.LINEAR_GRAM_COST, rules.LINEAR_GRAM_READS, rules._gram_is_faster)
    table = product_ways.main(["--quick", "--repeats", "1", "--out", str(out)])
    assert out.read_text() == table
    assert (rules.LINEAR_GRAM_COST, rules.LINEAR_GRAM_READS, rules._gram_is_faster) == constants
    shapes = list(product_ways.shapes(quick=True))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "---" not in line]
    assert len(rows) == len(shapes) + 2  # (a header per family)
    picked = [line.split("|")[-3].strip() for line in rows if not line.startswith("| K ")]
    second = {"convolution": "Gram", "Linear": "squared_products"}
    first = {"convolution": "direct", "Linear": "own products"}
    want = [
        second[s.family] if product_ways._picks_second(s) else first[s.family] for s in shapes
    ]
    assert picked == want


def test_both_ways_of_each_shape_give_the_same_sums():
    """The two calls timed for a shape compute the same sums (they differ in speed only)."""
    for shape in product_ways.shapes(quick=True):
        first, second = product_ways._ways(shape, product_ways.torch.device("cpu"))
        a, b = first(), second()
        assert (a - b).abs().max() <= 1e-5 * a.abs().max()


def test_a_quick_run_writes_only_where_out_says(monkeypatch, tmp_path):
    """A smoke test must not replace the grid's committed table; a full run writes it (nothing
    is timed here: no shapes)."""
    monkeypatch.setattr(product_ways, "RESULTS", tmp_path / "product_ways.md")
    monkeypatch.setattr(product_ways, "run", lambda *args: [])
    table = product_ways.main(["--quick"])
    assert table.startswith("# The two ways") and not product_ways.RESULTS.exists()
    assert product_ways.main([]) == product_ways.RESULTS.read_text()
