"""Per-sample copies in the shadowed layout (:mod:`ewc_reg.engines.shadows`): loose parameters
that reach the batch through operations on parameters alone. The mode is checked against
per-sample autograd, and models whose loose parameters only this layout takes against brute
force (float64, 1e-10), with no module on the per-module fallback."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from ewc_reg import fisher_diagonal
from ewc_reg._batches import Batch
from ewc_reg.engines.loose import (
    SHADOWED,
    copies_layout,
    loose_parameters,
    per_sample_problem,
)
from ewc_reg.engines.recording import plan
from ewc_reg.engines.shadows import ByIdentity, Shadows

from .reference import assert_close_dicts, brute_force_fisher
from .test_hooks_engine import PositionsWithoutBatch, SharedOutput, SharedPositions, trainable


class ReshapedScale(nn.Module):
    """A ConvNeXt block in small: ``x + conv(x) * gamma.reshape(1, C, 1, 1)``."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.gamma = nn.Parameter(torch.rand(channels) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return x + torch.tanh(self.conv(x)).mul(self.gamma.reshape(1, -1, 1, 1))


class JoinedBias(nn.Module):
    """BEiT's query and value biases joined to the key's zeros by ``torch.cat`` and passed to
    ``F.linear`` with a weight of its own, next to a child owning parameters."""

    def __init__(self, dim: int = 4) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3 * dim, dim) * 0.5)
        self.q_bias = nn.Parameter(torch.randn(dim))
        self.v_bias = nn.Parameter(torch.randn(dim))
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor) -> Tensor:
        bias = torch.cat([self.q_bias, torch.zeros_like(self.q_bias), self.v_bias])
        q, k, v = F.linear(x, self.weight, bias).chunk(3, dim=-1)
        return self.proj(torch.tanh(q * k) + v)


class IndexedBias(nn.Module):
    """A relative bias table, indexed and added to per-sample scores ``(B, T, T)``."""

    def __init__(self, tokens: int = 3) -> None:
        super().__init__()
        self.mix = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.randn(2 * tokens - 1))
        index = torch.arange(tokens)
        self.register_buffer("index", index[:, None] - index[None, :] + tokens - 1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.mix(x)
        scores = h @ h.transpose(1, 2) + self.table[self.index]
        return scores.softmax(-1) @ h


class Head(nn.Module):
    def __init__(self, features: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


SHADOWED_MODELS = {  # model, input shape, the parameters that take shadowed copies
    "reshaped_scale": (
        lambda: nn.Sequential(ReshapedScale(), ReshapedScale(), Head(3 * 4 * 4)),
        (5, 3, 4, 4),
        ["0.gamma", "1.gamma"],
    ),
    "joined_bias": (
        lambda: nn.Sequential(nn.Linear(4, 4), JoinedBias(), Head(4 * 2)),
        (5, 2, 4),
        ["1.weight", "1.q_bias", "1.v_bias"],
    ),
    "indexed_bias": (lambda: nn.Sequential(IndexedBias(), Head(3 * 4)), (5, 3, 4), ["0.table"]),
}


@pytest.mark.parametrize("name", list(SHADOWED_MODELS))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_loose_parameters_reaching_the_batch_through_operations_take_shadowed_copies(
    name, method, caplog
) -> None:
    """Before, each of these parents was a unit of its own parameters on the per-module
    fallback (which recomputes its forward for them)."""
    make, shape, loose = SHADOWED_MODELS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    params = trainable(model)
    assert list(loose_parameters(model, params)) == loose
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    batch = Batch((x,), {}, y, len(x))
    layouts, problem = copies_layout(model, loose_parameters(model, params), batch, lambda o: o)
    assert layouts == dict.fromkeys(loose, SHADOWED) and not problem
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y), (x[:2], y[:2])], method, backend="hooks")
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("ewc_reg")]
    rest = {n: p for n, p in params.items() if n not in loose}
    assert all(unit.rule is not None for unit in plan(model, rest))
    want = brute_force_fisher(model, torch.cat([x, x[:2]]), torch.cat([y, y[:2]]), method)
    assert_close_dicts(got, want, 1e-10)


def test_the_mode_gives_each_sample_its_gradient() -> None:
    """Against autograd sample by sample: a chain of operations on two parameters (reshape,
    cat, indexing, a product of both), meeting the batch twice, once through ``F.linear``."""
    torch.manual_seed(0)
    a = torch.randn(4, dtype=torch.float64, requires_grad=True)
    b = torch.randn(2, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(5, 6, dtype=torch.float64)

    def f(x: Tensor, a: Tensor, b: Tensor) -> Tensor:
        scale = torch.cat([a, b[0, :2]]).reshape(1, 6) * b.sum()
        h = torch.tanh(x * scale)
        return F.linear(h, b.repeat(1, 2), a[torch.tensor([0, 3])]).square().sum(1)

    copies = {a: a.expand(5, 4), b: b.expand(5, 2, 3)}
    with Shadows(copies, [x]):
        out = f(x, a, b)
    assert torch.allclose(out, f(x, a, b), rtol=1e-14, atol=0)
    weights = torch.randn(5, dtype=torch.float64)
    got = torch.autograd.grad((out * weights).sum(), list(copies.values()))
    for n in range(5):
        want = torch.autograd.grad(f(x[n : n + 1], a, b).sum() * weights[n], [a, b])
        for g, w in zip(got, want):
            assert torch.allclose(g[n], w, rtol=1e-12, atol=1e-14)


def test_a_meeting_that_does_not_keep_the_samples_apart_raises() -> None:
    """A ``cat`` over the batch dimension gives each sample more than its one row."""
    a = torch.randn(1, 3, requires_grad=True)
    x = torch.randn(4, 3)
    with pytest.raises(ValueError, match="does not treat the samples apart"), Shadows(
        {a: a.expand(4, 1, 3)}, [x]
    ):
        torch.cat([x, a.reshape(1, 3)])


def test_constants_and_other_parameters_are_not_batch_data() -> None:
    """Operations of the shadowed parameter with a buffer and with another parameter keep
    shadowing (only descendants of the inputs are batch data), and the tables are emptied of
    what the pass left behind."""
    a = torch.randn(3, requires_grad=True)
    w = torch.randn(3, 3, requires_grad=True)
    buffer = torch.arange(3.0)
    x = torch.randn(4, 3)
    mode = Shadows({a: a.expand(4, 3)}, [x])
    with mode:
        derived = (a + buffer) @ w
        assert derived in mode.shadow and mode.shadow[derived].shape == (4, 3)
        y = x * derived
        assert y in mode.batch and y not in mode.shadow
    assert torch.allclose(y, x * ((a + buffer) @ w))


class SharedTable(nn.Module):
    """Class embeddings all samples share, looked up with ``arange(5)``: an output without the
    batch (with 5 samples, one that leads with the batch size all the same)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)
        self.classes = nn.Embedding(5, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 5)
        return torch.tanh(self.fc(x)) @ self.classes(torch.arange(5)).T


class SharedBias(nn.Module):
    """A bias table ``(2n - 1, heads)`` looked up with relative positions, called without
    inputs: an output ``(1, heads, n, n)`` the samples share, as Hugging Face Swin's relative
    position bias, a module without a rule."""

    def __init__(self, n: int, heads: int) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(2 * n - 1, heads))
        index = torch.arange(n)
        self.register_buffer("buckets", index[:, None] - index[None, :] + n - 1)

    def forward(self) -> Tensor:
        return self.table[self.buckets].permute(2, 0, 1).unsqueeze(0)


class PositionMlpAttention(nn.Module):
    """Window attention (``windows`` windows of ``n`` tokens folded into the batch dimension,
    one sample's after another) whose bias is a small MLP of fixed relative coordinates, passed
    to ``scaled_dot_product_attention`` as its mask (timm's ``RelPosMlp`` in MaxViT and
    ViT-relpos); T5's bias table looked up with position buckets with ``table``; a
    :class:`SharedBias` with ``shared``."""

    def __init__(
        self,
        n: int = 3,
        windows: int = 2,
        heads: int = 2,
        table: bool = False,
        bias: bool = False,
        shared: bool = False,
    ) -> None:
        super().__init__()
        self.n, self.windows, self.heads = n, windows, heads
        self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)
        index = torch.arange(n)
        relative = (index[:, None] - index[None, :]).double()
        self.register_buffer("coords", torch.stack([relative, relative.abs().log1p()], -1))
        self.register_buffer("buckets", index[:, None] - index[None, :] + n - 1)
        if shared:
            self.bias = SharedBias(n, heads)
        elif table:
            self.bias = nn.Embedding(2 * n - 1, heads)
        else:
            # (a bias last would add a constant to every score: a Fisher of 0 but for rounding)
            self.bias = nn.Sequential(nn.Linear(2, 8), nn.ReLU(), nn.Linear(8, heads, bias=bias))

    def forward(self, x: Tensor) -> Tensor:  # (B, windows n, 4)
        b = x.shape[0]
        rows = x.reshape(b * self.windows, self.n, 4)
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2) for t in self.qkv(rows).chunk(3, -1)
        )
        if isinstance(self.bias, SharedBias):
            mask = self.bias()
        else:
            table = self.bias(self.buckets if isinstance(self.bias, nn.Embedding) else self.coords)
            mask = table.permute(2, 0, 1).unsqueeze(0)  # (1, heads, n, n)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).flatten(2)).reshape(b, -1, 4)


class NormOfTheUpdate(nn.Module):
    """PEFT's DoRA in small: a low-rank pair called on the batch and on an identity matrix
    ``(n, n)``, whose output gives the update's row norms (with ``n = 2B``, the identity looks
    like 2 rows per sample folded into the batch dimension, and with ``B - 1`` samples, like
    ``n / (B - 1)``)."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.base = nn.Linear(n, 3)
        self.a, self.b = nn.Linear(n, 2, bias=False), nn.Linear(2, 3, bias=False)

    def forward(self, x: Tensor) -> Tensor:  # (B, n) -> (B, 3)
        update = self.b(self.a(torch.eye(x.shape[1], dtype=x.dtype))).T  # (3, n)
        return (self.base(x) + self.b(self.a(x))) * update.norm(dim=1)


class ExpandedBias(nn.Module):
    """MPNet's relative attention in small: a bias table looked up with position buckets,
    ``(n, n, heads)``, ``expand``ed to the batch size (``(rows B, heads, n, n)``: ``rows``
    windows per sample folded into the batch dimension) and made ``contiguous`` before
    ``scores += bias``."""

    def __init__(self, n: int = 3, rows: int = 1, heads: int = 2) -> None:
        super().__init__()
        self.n, self.rows, self.heads = n, rows, heads
        self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)
        self.bias = nn.Embedding(2 * n - 1, heads)
        index = torch.arange(n)
        self.register_buffer("buckets", index[:, None] - index[None, :] + n - 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, rows n, 4)
        b = x.shape[0]
        windows = x.reshape(b * self.rows, self.n, 4)
        q, k, v = (
            t.unflatten(-1, (self.heads, -1)).transpose(1, 2)
            for t in self.qkv(windows).chunk(3, -1)
        )
        scores = q @ k.transpose(-1, -2)
        bias = self.bias(self.buckets).permute(2, 0, 1).unsqueeze(0)
        scores += bias.expand(b * self.rows, -1, -1, -1).contiguous()
        out = scores.softmax(-1) @ v
        return self.proj(out.transpose(1, 2).flatten(2)).reshape(b, -1, 4)


class RepeatedPositions(nn.Module):
    """XCiT's Fourier position encoding in small: a linear layer of fixed coordinates
    ``(n, 2)``, its output ``repeat``ed over the batch, added to the batch."""

    def __init__(self, n: int = 6) -> None:
        super().__init__()
        self.positions, self.mix = nn.Linear(2, 4), nn.Linear(4, 4)
        coords = torch.linspace(-1, 1, n, dtype=torch.float64)
        self.register_buffer("coords", torch.stack([coords, coords.square()], -1))

    def forward(self, x: Tensor) -> Tensor:  # (B, n, 4)
        positions = self.positions(self.coords).unsqueeze(0)
        return torch.tanh(self.mix(x + positions.repeat(x.shape[0], 1, 1)))


BATCHLESS = {  # model, input shape, the parameters that take shadowed copies
    "shared_table": (SharedTable, (4, 4), ["classes.weight"]),
    "shared_table_of_batch_size": (SharedTable, (5, 4), ["classes.weight"]),
    "position_mlp": (
        lambda: nn.Sequential(PositionMlpAttention(), Head(6 * 4)),
        (4, 6, 4),
        ["0.bias.0.weight", "0.bias.0.bias", "0.bias.2.weight"],
    ),
    "bucket_table": (
        lambda: nn.Sequential(PositionMlpAttention(table=True), Head(6 * 4)),
        (4, 6, 4),
        ["0.bias.weight"],
    ),
    # (buckets (4, 4) with 2 samples: taken for 2 positions per sample folded into the batch
    # dimension, which the shapes on 1 sample, the same (4, 4), show to be shared)
    # (before, to functorch: the identity's rows looked like 2 per sample, then 3 per sample)
    "identity_of_twice_the_batch": (NormOfTheUpdate, (3, 6), ["a.weight", "b.weight"]),
    "bucket_table_of_twice_the_batch": (
        lambda: nn.Sequential(PositionMlpAttention(n=4, table=True), Head(8 * 4)),
        (2, 8, 4),
        ["0.bias.weight"],
    ),
    # (before, to the loop engine through functorch: each sample's shadow of the expanded bias
    # had the whole batch's rows)
    "expanded_bias": (
        lambda: nn.Sequential(ExpandedBias(), Head(3 * 4)), (4, 3, 4), ["0.bias.weight"]
    ),
    "expanded_bias_on_windows": (
        lambda: nn.Sequential(ExpandedBias(rows=2), Head(6 * 4)), (4, 6, 4), ["0.bias.weight"]
    ),
    # (before, to functorch)
    "repeated_positions": (
        lambda: nn.Sequential(RepeatedPositions(), Head(6 * 4)),
        (4, 6, 4),
        ["0.positions.bias", "0.positions.weight"],
    ),
}


@pytest.mark.parametrize("name", list(BATCHLESS))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_units_without_the_batch_take_shadowed_copies(name, method, caplog) -> None:
    """Before, their outputs without the batch sent these models to the functorch engine (with
    5 samples, the shared table's output of 5 rows passed the recorder, and the layout check
    found it); their parameters now take shadowed copies, their modules no units, the others
    keeping their rules."""
    make, shape, shadowed = BATCHLESS[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y), (x[:2], y[:2])], method, backend="hooks")
    messages = [r.getMessage() for r in caplog.records if r.name.startswith("ewc_reg")]
    assert len(messages) == 1, messages
    assert messages[0].endswith(f"{sorted(shadowed)} take shadowed per-sample copies")
    want = brute_force_fisher(model, torch.cat([x, x[:2]]), torch.cat([y, y[:2]]), method)
    assert_close_dicts(got, want, 1e-10)


class GainedPositions(nn.Module):
    """:class:`PositionsWithoutBatch` with ``view``, its output scaled by a parameter of the
    root's own (per-sample copies, ``(B, 3)``, in the same pass as the expansion)."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = PositionsWithoutBatch(view=True)
        self.gain = nn.Parameter(torch.rand(3) + 0.5)

    def forward(self, ids: Tensor) -> Tensor:
        return self.inner(ids) * self.gain


FAILED_EXPANSIONS = {  # model, input, the start of the reason
    # (before, to functorch: "the model failed with the inputs (or output) the samples share")
    "shared_output_viewed": (
        lambda: SharedOutput("viewed"),
        lambda: torch.randint(0, 9, (5, 6)),
        "the model failed with the inputs (or output) the samples share of module 'pos'",
    ),
    "positions_viewed": (
        lambda: PositionsWithoutBatch(view=True),
        lambda: torch.randint(0, 9, (5, 6)),
        "the model failed with the inputs (or output) the samples share of module 'pos'",
    ),
    # (before, to functorch: the failure was taken for the copies')
    "positions_viewed_beside_copies": (
        GainedPositions,
        lambda: torch.randint(0, 9, (5, 6)),
        "the model failed with the inputs (or output) the samples share of module 'inner.pos'",
    ),
    # (before, to functorch: "changes the model's output")
    "positions_squeezed": (
        lambda: SharedPositions(squeeze=True),
        lambda: torch.randint(0, 9, (5, 6)),
        "expanding the inputs (or output) the samples share of module 'pos', module 'bias' "
        "over the batch (for per-sample gradients) changes the model's output",
    ),
    # Hugging Face Swin (before, to functorch: the bias expanded to (B, ...) meets B nW windows)
    "windows_bias": (
        lambda: nn.Sequential(PositionMlpAttention(shared=True), Head(6 * 4)),
        lambda: torch.randn(4, 6, 4, dtype=torch.float64),
        "the model failed with the inputs (or output) the samples share of module '0.bias'",
    ),
}


@pytest.mark.parametrize("name", list(FAILED_EXPANSIONS))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_expansions_the_model_fails_on_are_left_as_they_are(name, method, caplog) -> None:
    """Shared inputs or outputs expanded over the batch that the model fails on (a ``view`` to
    the shared shape; Swin's bias added to the scores of ``B nW`` windows) or whose expansion
    changes its output (a ``squeeze(0)``) are left as they are on the next attempt, and the
    units' parameters take shadowed copies: the model stays on hooks (before, functorch), and
    the next batch goes there at once."""
    make, make_x, reason = FAILED_EXPANSIONS[name]
    torch.manual_seed(0)
    model = make().double()
    x = make_x()
    y = torch.randint(0, 3, (x.shape[0],))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y), (x[:2], y[:2])], method)
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == 2, messages
    assert messages[0].startswith(f"hooks engine: {reason}")
    assert messages[0].endswith("; left as they are")
    assert messages[1].endswith("take shadowed per-sample copies")
    want = brute_force_fisher(model, torch.cat([x, x[:2]]), torch.cat([y, y[:2]]), method)
    assert_close_dicts(got, want, 1e-10)


def test_a_broadcasting_meeting_on_folded_rows_takes_the_shadows_aligned() -> None:
    """``scaled_dot_product_attention``'s mask (``vmap`` of it raises on CPU) meets queries of
    2 windows per sample: the shadows are aligned, each sample's repeated for its windows."""
    torch.manual_seed(0)
    a = torch.randn(2, 3, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 2, 3, 5, dtype=torch.float64)  # (2 samples x 2 windows, heads, n, d)

    def f(x: Tensor, a: Tensor) -> Tensor:
        out = F.scaled_dot_product_attention(x, x.tanh(), x, attn_mask=a.unsqueeze(0))
        return out.square().unflatten(0, (-1, 2)).sum((1, 2, 3, 4))

    copies = {a: a.expand(2, 2, 3, 3)}
    with Shadows(copies, [x]):
        out = f(x, a)
    got = torch.autograd.grad(out.sum(), copies[a])[0]
    for n in range(2):
        want = torch.autograd.grad(f(x[2 * n : 2 * n + 2], a).sum(), a)[0]
        assert torch.allclose(got[n], want, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("in_place", [False, True])
@pytest.mark.parametrize("long", ["expanded", "reshaped"])
def test_a_shared_row_repeated_as_long_as_the_batch_meets_each_sample_with_its_rows(
    long, in_place
) -> None:
    """A row of parameters repeated as long as the batch data (windows folded: 2 rows per
    sample), added to it, in place or not: each sample's rows take its shadow of the row.
    Expanded (MPNet's bias ``expand``ed to the batch size and made ``contiguous``), or then
    reshaped and transposed with the leading dimension kept (XCiT's position encoding). A
    ``repeat`` of size-1 dimensions and ``contiguous`` keep the shadows views (no copy of the
    whole batch's rows per sample)."""
    torch.manual_seed(0)
    a = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(6, 3, dtype=torch.float64)  # (3 samples x 2 rows, 3)

    def f(x: Tensor, a: Tensor) -> Tensor:
        rows = a.square().expand(len(x), 3).contiguous()
        if long == "reshaped":
            rows = rows.reshape(len(x), 1, 3).transpose(1, 2).permute(0, 2, 1).flatten(1)
        y = x.tanh()
        y = y.__iadd__(rows) if in_place else y + rows
        return (y * a.repeat(len(x), 1)).unflatten(0, (-1, 2)).square().sum((1, 2))

    mode = Shadows({a: a.expand(3, 1, 3)}, [x])
    with mode:
        out = f(x, a)
        repeated = a.repeat(6, 1)
        contiguous = a.expand(6, 3).contiguous()
    assert mode.shadow[repeated].stride()[1] == mode.shadow[contiguous].stride()[1] == 0
    assert torch.allclose(out, f(x, a), rtol=1e-14, atol=0)
    got = torch.autograd.grad(out.sum(), mode.shadow[a])[0]
    for n in range(3):
        want = torch.autograd.grad(f(x[2 * n : 2 * n + 2], a).sum(), a)[0]
        assert torch.allclose(got[n], want, rtol=1e-12, atol=1e-14)


def test_rows_that_differ_as_long_as_the_batch_are_not_taken() -> None:
    """Rows of parameters that differ (a ``cat``), or one row after an operation that mixes
    the rows, as long as the batch data: each sample's shadow would hold the whole batch's
    rows (``B`` times the memory, and its gradient too); the meeting fails, as before, and
    the parameter goes to the per-module fallback."""
    a = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    with pytest.raises(ValueError, match="does not treat the samples apart"):
        with Shadows({a: a.expand(4, 1, 3)}, [x]):
            _ = x + torch.cat([a * (k + 1) for k in range(4)])
    with pytest.raises(ValueError, match="does not treat the samples apart"):
        with Shadows({a: a.expand(4, 1, 3)}, [x]):
            _ = x + a.expand(4, 3).cumsum(0)


def test_a_constant_expanded_as_a_shadowed_tensor_keeps_its_values() -> None:
    """``expand_as`` takes its shape from a shadowed tensor, not its values: the result's shadow
    is not an expansion of that tensor's (which would add ``a`` to the batch, not 5)."""
    a = torch.randn(1, 3, dtype=torch.float64, requires_grad=True)
    x = torch.randn(4, 3, dtype=torch.float64)
    with Shadows({a: a.expand(4, 1, 3)}, [x]):
        out = x + torch.full((1, 3), 5.0, dtype=torch.float64).expand_as(a)
    assert torch.equal(out, x + 5)


def test_the_check_takes_a_gradient_zero_but_for_rounding_as_such() -> None:
    """The last bias of the position MLP adds one constant to every score of a softmax: its
    per-sample gradients are rounding (1e-17 against 1e-1 for the weights here) on both sides of
    the two-sample check, which compares them to the largest gradient of all (before, to their
    own, and the check failed: ViT-relpos and MaxViT went to the functorch engine)."""
    torch.manual_seed(0)
    model = nn.Sequential(PositionMlpAttention(bias=True), Head(6 * 4)).double()
    params = {n: p for n, p in model.named_parameters() if n.startswith("0.bias.")}
    batch = Batch((torch.randn(4, 6, 4, dtype=torch.float64),), {}, None, 4)
    failing, problem, raised = per_sample_problem(
        model, params, batch, lambda o: o, dict.fromkeys(params, SHADOWED)
    )
    assert not failing and not problem and not raised
    grad = torch.autograd.grad(model(batch.args[0][:1]).sum(), params["0.bias.2.bias"])[0]
    assert grad.abs().max() < 1e-14


def test_the_tables_hold_their_tensors_weakly() -> None:
    """An entry goes with its tensor (a shadow is not kept past what it shadows), and a later
    tensor is not taken for it."""
    table = ByIdentity({})
    a = torch.ones(3)
    table[a] = torch.zeros(4, 3)
    assert a in table and table[a].shape == (4, 3)
    del a
    assert not table._items
    b = torch.ones(3)
    assert b not in table
    with pytest.raises(KeyError):
        table[b]


ROW_KEEPING = ["contiguous", "reshape", "permute", "transpose"]


@settings(max_examples=30, deadline=None)
@given(
    rows=st.integers(1, 2),
    chain=st.lists(st.sampled_from([*ROW_KEEPING, "flip", "cumsum"]), max_size=4),
    seed=st.integers(0, 2**16),
)
def test_any_chain_on_a_repeated_row_is_right_or_refused(rows, chain, seed) -> None:
    """A row of parameters expanded as long as the batch data (``rows`` per sample for 3
    samples), then a chain of operations (reshapes keeping the leading size, permutations and
    transpositions keeping it first, ``contiguous``; or ``flip`` and ``cumsum`` over the rows),
    added to the batch data: the per-sample gradients are each sample's alone, or the mode
    refuses the meeting; it refuses only after an operation over the rows."""
    generator = torch.Generator().manual_seed(seed)
    a = torch.randn(1, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    m = 3 * rows

    def long(a: Tensor) -> Tensor:
        d = a.expand(m, 2, 3)
        for step in chain:
            rest = d.shape[1:]
            if step == "contiguous":
                d = d.contiguous()
            elif step == "reshape":
                d = d.reshape(m, *[(6,), (3, 2), (2, 3), (1, 6)][len(rest) % 4])
            elif step == "permute" and len(rest) > 1:
                d = d.permute(0, *reversed(range(1, d.dim())))
            elif step == "transpose" and len(rest) > 1:
                d = d.transpose(1, -1)
            elif step == "flip":
                d = d.flip(0)
            elif step == "cumsum":
                d = d.cumsum(0)
        return d

    x = torch.randn(m, *long(a).shape[1:], dtype=torch.float64, generator=generator)

    def per_sample(x: Tensor, d: Tensor) -> Tensor:
        return (x.tanh() + d).square().unflatten(0, (-1, rows)).flatten(1).sum(1)

    mode = Shadows({a: a.expand(3, 1, 2, 3)}, [x])
    try:
        with mode:
            out = per_sample(x, long(a))
    except (ValueError, RuntimeError):  # (the meeting's, or a shape the batch does not take)
        assert not set(chain) <= set(ROW_KEEPING)
        return
    got = torch.autograd.grad(out.sum(), mode.shadow[a])[0]
    for n in range(3):
        own = slice(n * rows, (n + 1) * rows)
        want = torch.autograd.grad(per_sample(x[own], long(a)[own]).sum(), a)[0]
        assert torch.allclose(got[n], want, rtol=1e-12, atol=1e-14)


class TiedLookups(nn.Module):
    """A table with a ``padding_idx``, read by the root too (an output layer tied to it,
    ``h @ weight.T``): its per-sample copies are looked up in, by ``nn.Embedding`` or by
    ``torch.embedding`` (where ``aten``, whose -1 is no padding, takes the index as it is)."""

    def __init__(self, padding_idx: int, aten: bool) -> None:
        super().__init__()
        self.table = nn.Embedding(6, 3, padding_idx=padding_idx)
        self.aten = aten

    def forward(self, ids: Tensor) -> Tensor:
        if self.aten:
            rows = torch.embedding(self.table.weight, ids, self.table.padding_idx)
        else:
            rows = self.table(ids)
        return torch.tanh(rows) @ self.table.weight.T  # (B, T, V)


@pytest.mark.parametrize("padding_idx, aten", [(0, False), (-1, False), (0, True)])
@pytest.mark.parametrize("method", ["exact", "empirical"])
@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_a_shadowed_table_keeps_its_padding_row_out_of_the_lookups(
    padding_idx, aten, method, backend
):
    """``vmap`` of ``F.embedding`` (and ``torch.embedding``) over a table's per-sample copies
    gave the padding row a gradient in every copy but the first: its Fisher up to 5.4 times
    too large, where the padding token was not in the first two samples (the check's)."""
    torch.manual_seed(0)
    model = TiedLookups(padding_idx, aten).double()
    pad = padding_idx % 6
    ids = torch.tensor([[1, 2, 3], [4, 5, 1], [2, 3, pad], [pad, 1, pad]]) % 6
    labels = torch.randint(0, 6, (4, 3))
    got = fisher_diagonal(model, [(ids, labels)], method, backend=backend)
    want = fisher_diagonal(model, [(ids, labels)], method, backend="loop")
    assert_close_dicts(got, want, 1e-10)
