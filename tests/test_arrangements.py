"""How the hooks engine splits a model into units when some parameters sit on parents (modules
that contain modules owning parameters): per-sample copies for those that take them, units of
their own parameters for the modules of the others, and whole units (of every parameter inside)
only for the parents whose children's parameters they use themselves. Each model is checked
against brute force in float64, and the engine's log says which arrangement it ended on."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc_reg import fisher_diagonal
from ewc_reg._batches import Batch
from ewc_reg.engines import hooks
from ewc_reg.engines.loose import SHADOWED, copies_layout, loose_parameters
from ewc_reg.engines.recording import Unsupported, plan

from .reference import assert_close_dicts, brute_force_fisher, positions_first, samples_first


class QkvAttention(nn.Module):
    """BEiT's attention in small: owns query and value biases, joined to zeros for the key by
    ``torch.cat`` (copies only in the shadowed layout), and a relative bias table it indexes and
    adds to scores with the heads folded into the batch dimension heads first (no copies: a
    sample's rows are not together), and calls ``F.linear`` with its ``qkv`` child's
    weight itself (a use outside ``qkv``'s call)."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_bias = nn.Parameter(torch.randn(dim) * 0.3)
        self.v_bias = nn.Parameter(torch.randn(dim) * 0.3)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1) * 0.3)
        self.proj = nn.Linear(dim, dim)
        index = torch.arange(tokens)
        self.register_buffer("index", index[:, None] - index[None, :] + tokens - 1)

    def forward(self, x: Tensor) -> Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.qkv.weight, bias).chunk(3, dim=-1)
        b, t, d = q.shape  # (two heads, folded into the batch dimension heads first)
        q, k, v = (h.reshape(b, t, 2, d // 2).permute(2, 0, 1, 3).flatten(0, 1) for h in (q, k, v))
        scores = q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5 + self.table[self.index]
        heads = (scores.softmax(-1) @ v).reshape(2, b, t, d // 2)
        return self.proj(heads.permute(1, 2, 0, 3).reshape(b, t, d))


class Block(nn.Module):
    """A pre-norm block with layer scales ``gamma`` (per-sample copies of layout 1)."""

    def __init__(self, dim: int, tokens: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = QkvAttention(dim, tokens)
        self.mlp = nn.Linear(dim, dim)
        self.gamma_1 = nn.Parameter(torch.rand(dim) + 0.5)
        self.gamma_2 = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.gamma_1 * self.attn(self.norm(x))
        return x + self.gamma_2 * torch.tanh(self.mlp(x))


class SmallBeit(nn.Module):
    """A class token on the root (copies of layout -1), two blocks, a head on the token."""

    def __init__(self, dim: int = 6, patches: int = 3) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
        self.blocks = nn.Sequential(Block(dim, patches + 1), Block(dim, patches + 1))
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = torch.cat([self.cls_token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.blocks(h)[:, 0])


def _engine_log(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]


def _fallback_modules(caplog) -> list[str]:
    return [
        r.getMessage().split("'")[1] for r in caplog.records if r.name == "ewc_reg.fallback"
    ]


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_beit_takes_copies_where_it_can_and_makes_only_its_attention_whole(
    method, caplog
) -> None:
    """The class token, layer scales and biases take per-sample copies, the attention modules
    are whole units (the per-module fallback: they use their ``qkv`` child's weight), and every
    other layer keeps its rule. Before session 17, the first failed copy (the biases) made
    every loose parameter's module a unit, the root among them, and the model went to the
    functorch engine."""
    torch.manual_seed(0)
    model = SmallBeit().double().eval()
    x, y = torch.randn(5, 3, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)
    messages = _engine_log(caplog)
    assert len(messages) == 2, messages
    assert "per-sample copies of parameters ['cls_token'," in messages[0]  # (all together)
    assert messages[0].split("; ")[-1] == (
        "the modules of ['blocks.0.attn.table', 'blocks.1.attn.table'] become units of their own "
        "parameters"
    )
    assert "'weight' of module 'blocks.0.attn.qkv' is used outside" in messages[1]
    assert "['blocks.0.attn', 'blocks.1.attn'] become units of all the parameters" in messages[1]
    assert _fallback_modules(caplog) == ["blocks.0.attn", "blocks.1.attn"]


def test_the_arrangement_is_kept_for_later_batches_and_calls(caplog) -> None:
    """The second batch, and a later call with the same parameters selected, try nothing
    again; a call with other parameters selected finds its own arrangement."""
    torch.manual_seed(0)
    model = SmallBeit().double().eval()
    x, y = torch.randn(7, 3, 5, dtype=torch.float64), torch.randint(0, 3, (7,))
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, data, "exact", backend="hooks")
        assert len(_engine_log(caplog)) == 2
        again = fisher_diagonal(model, data, "empirical", backend="hooks")
        assert len(_engine_log(caplog)) == 2
        assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
        assert_close_dicts(again, brute_force_fisher(model, x, y, "empirical"), 1e-10)
        model.cls_token.requires_grad_(False)
        fisher_diagonal(model, data, "exact", backend="hooks")
        assert len(_engine_log(caplog)) == 4


def test_copies_are_tried_by_kind_when_the_model_raises() -> None:
    """The layer scales and the biases have the same shape: tried together, the biases make
    the model raise; tried by kind (shape, owner's class, name), the scales take layout 1, the
    biases only the shadowed layout, and the tables none."""
    torch.manual_seed(0)
    model = SmallBeit().double().eval()
    params = dict(model.named_parameters())
    loose = loose_parameters(model, params)
    batch = Batch((torch.randn(3, 3, 5, dtype=torch.float64),), {}, None, 3)
    layouts, problem = copies_layout(model, loose, batch, lambda out: out)
    assert layouts == {
        "cls_token": -1,
        **{f"blocks.{i}.gamma_{j}": 1 for i in range(2) for j in (1, 2)},
        **{f"blocks.{i}.attn.{b}_bias": SHADOWED for i in range(2) for b in "qv"},
    }
    assert "failed in the model" in problem


class Outer(nn.Module):
    """Uses its grandchild's weight itself, on rows folded positions first (no shadowed
    copies): the engine climbs two levels."""

    def __init__(self) -> None:
        super().__init__()
        self.mid = nn.Sequential(nn.Linear(4, 4), nn.Tanh())
        self.scale = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mid(x)
        rows = F.linear(positions_first(h), self.mid[0].weight[:2, :2])
        return samples_first(rows, len(x)) * self.scale


def test_whole_units_climb_to_the_module_that_uses_the_parameter(caplog) -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Outer(), nn.Linear(4, 3)).double()
    x, y = torch.randn(6, 3, dtype=torch.float64), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    messages = _engine_log(caplog)
    assert ["['1.mid'] become units" in m for m in messages] == [True, False]
    assert "['1'] become units" in messages[1]
    assert _fallback_modules(caplog) == ["1"]


class RootUsesChildWeight(nn.Module):
    """Uses its child's weight on rows folded positions first (no shadowed copies)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)

    def forward(self, x: Tensor) -> Tensor:
        rows = F.linear(positions_first(torch.tanh(self.lin(x))), self.lin.weight[:3, :2])
        return samples_first(rows, len(x))


def test_the_climb_stops_below_the_root() -> None:
    """The root cannot be a unit: ``backend="hooks"`` says why; ``auto`` takes functorch."""
    model = RootUsesChildWeight().double()
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match="'weight' of module 'lin' is used outside"):
        fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    got = fisher_diagonal(model, [(x, y)], "exact")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


def test_plan_with_whole_modules() -> None:
    """A module in ``whole`` is one unit without a rule of every selected parameter inside
    it, whether it owns any itself or not; its siblings and parent keep theirs."""
    model = SmallBeit()
    params = dict(model.named_parameters())
    selected = {n: p for n, p in params.items() if "gamma" not in n and n != "cls_token"}
    units = {u.path: u for u in plan(model, selected, False, {"blocks.0.attn", "blocks.1.mlp"})}
    assert units["blocks.0.attn"].rule is None
    assert set(units["blocks.0.attn"].names) == {
        "q_bias", "v_bias", "table", "qkv.weight", "proj.weight", "proj.bias"
    }
    assert "blocks.0.attn.qkv" not in units and "blocks.1.attn.qkv" in units
    assert units["blocks.1.attn"].names == {
        "q_bias": "blocks.1.attn.q_bias", "v_bias": "blocks.1.attn.v_bias",
        "table": "blocks.1.attn.table",
    }
    assert units["blocks.1.mlp"].rule is None  # (a leaf made whole: no rule either)
    assert units["blocks.0.mlp"].rule is not None
    owns_nothing = nn.Sequential(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)))
    units = plan(owns_nothing, dict(owns_nothing.named_parameters()), False, {"0"})
    assert [(u.path, sorted(u.names), u.rule) for u in units] == [
        ("0", ["0.bias", "0.weight", "1.bias", "1.weight"], None)
    ]
    with pytest.raises(Unsupported, match="root"):
        plan(model, params, False)  # (the class token on the root, without copies)


def test_arrangement_parents() -> None:
    assert hooks.Arrangement.parents_of(frozenset({"a.b.c", "a.d"})) == {"a.b", "a"}
    assert hooks.Arrangement.parents_of(frozenset({"a.b", "c"})) is None
    arrangement = hooks.Arrangement({"x": 1}).with_whole(frozenset({"a"}))
    assert arrangement == hooks.Arrangement({"x": 1}, False, frozenset({"a"}))


def test_a_failure_is_kept_for_batches_of_the_same_shapes(caplog) -> None:
    """A later call on batches of the shapes the engine failed on goes to the fallback at once
    (logged as such); a batch of other shapes is tried again."""
    torch.manual_seed(0)
    model = RootUsesChildWeight().double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    want = brute_force_fisher(model, x[:4], y[:4], "exact")
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        for _ in range(2):
            assert_close_dicts(fisher_diagonal(model, [(x[:4], y[:4])], "exact"), want, 1e-10)
        fisher_diagonal(model, [(x, y)], "exact")
    messages = _engine_log(caplog)
    assert len(messages) == 3 and all("using the functorch engine" in m for m in messages)
    assert ["found on an earlier batch" in m for m in messages] == [False, True, False]
    with pytest.raises(ValueError, match="found on an earlier batch of these shapes"):
        fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
