"""Units on the per-module fallback called on rows folded into the batch dimension: Swin's
window attention runs on ``(B nW, N, C)`` windows, with a ``(nW, N, N)`` mask the samples share.
The fallback runs each sample's ``nW`` windows as the module's batch; rows that are not each
sample's, one sample after another, and per-sample data folded into a second argument are
refused (the model goes to the functorch engine). Float64, against brute force."""

from __future__ import annotations

import logging

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc_reg import fisher_diagonal

from .reference import assert_close_dicts, brute_force_fisher


class WindowAttention(nn.Module):
    """Attention within windows of ``n`` tokens, its projections its own parameters (no rule:
    a unit on the per-module fallback), with a relative position bias table it indexes and an
    optional mask per window added as Swin adds it (``(B nW, h, N, N)`` viewed by window)."""

    def __init__(self, dim: int, n: int) -> None:
        super().__init__()
        self.qkv = nn.Parameter(torch.randn(3 * dim, dim) / dim**0.5)
        self.proj = nn.Parameter(torch.randn(dim, dim) / dim**0.5)
        self.table = nn.Parameter(torch.randn(2 * n - 1) * 0.3)
        index = torch.arange(n)
        self.register_buffer("index", index[:, None] - index[None, :] + n - 1)

    def forward(self, x: Tensor, mask: Tensor | None = None) -> Tensor:
        q, k, v = F.linear(x, self.qkv).chunk(3, -1)
        scores = q @ k.transpose(-1, -2) + self.table[self.index]
        if mask is not None:
            windows = mask.shape[0]
            scores = (scores.view(-1, windows, *scores.shape[1:]) + mask).flatten(0, 1)
        return F.linear(scores.softmax(-1) @ v, self.proj)


class Windowed(nn.Module):
    """Tokens ``(B, nW n, 3)`` embedded, cut into ``nW`` windows of ``n`` (sample-major, as
    Swin's window partition, or positions-first with ``positions_first``), attended, pooled."""

    def __init__(
        self, windows: int = 4, n: int = 2, masked: bool = True, positions_first: bool = False
    ) -> None:
        super().__init__()
        self.embed = nn.Linear(3, 4)
        self.attn = WindowAttention(4, n)
        self.head = nn.Linear(4, 5)
        self.windows, self.n, self.positions_first = windows, n, positions_first
        self.register_buffer("mask", torch.randn(windows, n, n) if masked else None)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b = h.shape[0]
        w = h.reshape(b, self.windows, self.n, -1)
        if self.positions_first:
            w = w.transpose(0, 1)
        w = self.attn(w.reshape(b * self.windows, self.n, -1), mask=self.mask)
        w = w.reshape(-1, b, self.n, w.shape[-1]).transpose(0, 1) if self.positions_first else w
        return self.head(w.reshape(b, self.windows * self.n, -1).mean(1))


def _messages(caplog, name: str = "ewc_reg") -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == name]


def _refused(model: nn.Module, reason: str) -> None:
    """``backend="hooks"`` raises, saying ``reason``; ``auto`` is right (the functorch engine)."""
    model = model.double()
    x, y = torch.randn(3, 8, 3, dtype=torch.float64), torch.randint(0, 5, (3,))
    with pytest.raises(ValueError, match=reason):
        fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    got = fisher_diagonal(model, [(x, y)], "exact")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("masked", [True, False])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_window_attention_on_the_fallback(masked: bool, method: str, caplog) -> None:
    """4 windows and batches of 3 and 2 samples: the shared mask has a multiple of 2 as
    leading dimension, which a unit with a rule would refuse (a per-sample ``(B * heads, L,
    S)`` mask); the layout check, on 2 samples and 1, tells it shared. (With as many windows
    as samples, ``nW == B``, the mask cannot be told from per-sample data: refused.)"""
    torch.manual_seed(0)
    model = Windowed(masked=masked).double()
    x, y = torch.randn(5, 8, 3, dtype=torch.float64), torch.randint(0, 5, (5,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x[:3], y[:3]), (x[3:], y[3:])], method, backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)
    assert [m.split("'")[1] for m in _messages(caplog, "ewc_reg.fallback")] == ["attn"]


def test_windows_positions_first_are_refused(caplog) -> None:
    """Each sample's windows are not together: the fallback would give a sample other
    samples' windows; the reverse-order pass shows it."""
    torch.manual_seed(0)
    model = Windowed(masked=False, positions_first=True)  # (a mask would go by row)
    _refused(model, "not each sample's 4 positions one sample after")


class PerSampleMask(Windowed):
    """Each window gets a mask of its own, computed from its sample's tokens: per-sample data,
    ``(B nW, n, n)``, in the mask argument (the fallback would get it whole, not split)."""

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        b = h.shape[0]
        windows = h.reshape(b * self.windows, self.n, -1)
        mask = (windows @ windows.transpose(-1, -2)).detach()
        return self.head(self.attn(windows, mask=mask).reshape(b, -1, 4).mean(1))


def test_per_sample_data_in_another_argument_is_refused() -> None:
    torch.manual_seed(0)
    _refused(PerSampleMask(), "the batch is not the leading dimension of an input")


class PositionedWindows(Windowed):
    """A position embedding on the root (per-sample copies) before the windows: the
    reverse-order pass of the folded call's check has no module call for the copies."""

    def __init__(self) -> None:
        super().__init__(masked=False)
        self.position = nn.Parameter(torch.randn(1, 8, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x) + self.position
        b = h.shape[0]
        w = self.attn(h.reshape(b * self.windows, self.n, -1))
        return self.head(w.reshape(b, self.windows * self.n, -1).mean(1))


def test_folded_fallback_calls_beside_per_sample_copies(caplog) -> None:
    torch.manual_seed(0)
    model = PositionedWindows().double()
    x, y = torch.randn(3, 8, 3, dtype=torch.float64), torch.randint(0, 5, (3,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    assert not _messages(caplog)  # (the position embedding takes copies)
    assert [m.split("'")[1] for m in _messages(caplog, "ewc_reg.fallback")] == ["attn"]
