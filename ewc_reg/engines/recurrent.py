r"""The hook engine's rule for ``nn.LSTM`` (``batch_first=True``, without ``proj_size``): a
whole-call rule with a recorded forward (:func:`lstm_in_pieces`) that runs the recurrence step
by step, so that the pull-back reaches the input projections of the gates, and an accumulator
that makes each layer's (and direction's) weights two ``Linear`` sums.

Registered in :data:`.rules.RULES` when this module is imported, which :mod:`ewc_reg.engines`
does. (``torch.func.vmap`` cannot run ``nn.LSTM``: without this rule such models go to the
loop engine, one sample and one vector at a time.)
"""

from __future__ import annotations

import re
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import accumulation_dtype
from .rules import LinearSums, register

_NAME = re.compile(r"(weight|bias)_(ih|hh)_l\d+(_reverse)?")


def _plain_lstm(module: nn.Module) -> bool:
    return module.batch_first and not module.proj_size


def _lstm_parameters(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters() if _NAME.fullmatch(name)}


def _suffixes(module: nn.Module) -> list[str]:
    """``"_l0"``, ``"_l0_reverse"``, ... in the order of the layers and directions."""
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"_l{layer}{d}" for layer in range(module.num_layers) for d in directions]


def lstm_in_pieces(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    r"""``module(x)`` for an ``nn.LSTM`` with ``batch_first=True`` on ``x: (B, T, in)`` (no
    initial state given), step by step; ``NotImplemented`` otherwise (an initial state, packed
    or unbatched input, dropout in training mode). For each layer and direction, with the
    gates in PyTorch's order ``i, f, g, o``:

    .. math::

        a = x W_{ih}^\top + b_{ih}\ (B, T, 4H),\qquad
        z_t = a_t + h_{t-1} W_{hh}^\top + b_{hh},

        c_t = \sigma(z_f) \odot c_{t-1} + \sigma(z_i) \odot \tanh(z_g),\qquad
        h_t = \sigma(z_o) \odot \tanh(c_t),

    from zero states (the reverse direction runs from ``t = T-1`` down). ``keep`` records ``a``
    (``"a_l0"``, ...; the pull-back's gradient there is :math:`\partial z_t` at every step), the
    layer input ``x`` (``"x_l0"``) and the states :math:`h_{t-1}` each step saw (``"h_l0"``)."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if (
        not isinstance(x, Tensor)
        or x.dim() != 3
        or hx is not None
        or (module.training and module.dropout > 0)
    ):
        return NotImplemented
    batch, steps, _ = x.shape
    hidden = module.hidden_size
    finals_h, finals_c = [], []
    layer_input = x
    suffixes = iter(_suffixes(module))
    for _ in range(module.num_layers):
        outputs = []
        for reverse in (False, True) if module.bidirectional else (False,):
            suffix = next(suffixes)
            w_hh = getattr(module, f"weight_hh{suffix}")
            b_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
            b_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
            keep(f"x{suffix}", layer_input, False)
            a = keep(
                f"a{suffix}",
                F.linear(layer_input, getattr(module, f"weight_ih{suffix}"), b_ih),
                True,
            )
            h = c = layer_input.new_zeros(batch, hidden)
            seen: list[Tensor] = [h] * steps
            states: list[Tensor] = [h] * steps
            for t in reversed(range(steps)) if reverse else range(steps):
                seen[t] = h
                i, f, g, o = (a[:, t] + F.linear(h, w_hh, b_hh)).chunk(4, dim=1)
                c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
                h = torch.sigmoid(o) * torch.tanh(c)
                states[t] = h
            keep(f"h{suffix}", torch.stack(seen, 1), False)
            outputs.append(torch.stack(states, 1))
            finals_h.append(h)
            finals_c.append(c)
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    return layer_input, (torch.stack(finals_h), torch.stack(finals_c))


class _LSTMSums:
    """The accumulator of :func:`lstm`: per layer and direction, the input weights' sums from
    ``(G_a, x)`` and the recurrent weights' from ``(G_a, h_{t-1})``, both with ``4H``
    outputs; both biases get :math:`\\sum_{n,k} (\\sum_t G_{a,nkt})^{\\odot 2}`."""

    def __init__(
        self, module: nn.Module, kept: dict[str, Tensor], names: Collection[str], budget: int
    ) -> None:
        acc = accumulation_dtype(module.weight_ih_l0.dtype)
        gates = 4 * module.hidden_size
        self.names = names
        self.parts: dict[str, tuple[LinearSums, LinearSums]] = {}
        for suffix in _suffixes(module):
            wanted = {kind: [] for kind in ("ih", "hh")}
            for kind in wanted:
                for what in ("weight", "bias"):
                    if f"{what}_{kind}{suffix}" in names:
                        wanted[kind].append(what)
            self.parts[suffix] = (
                LinearSums(kept[f"x{suffix}"], gates, wanted["ih"], acc, budget),
                LinearSums(kept[f"h{suffix}"], gates, wanted["hh"], acc, budget),
            )

    def add(self, key: int | str, grads: Tensor) -> None:
        # (the outputs feed nothing here: their gradients reach a through the pieces)
        if isinstance(key, str) and key.startswith("a"):
            for sums in self.parts[key[1:]]:
                sums.add(key, grads)

    def sums(self) -> dict[str, Tensor]:
        found = {}
        for suffix, (ih, hh) in self.parts.items():
            found.update({f"{what}_ih{suffix}": t for what, t in ih.sums().items()})
            found.update({f"{what}_hh{suffix}": t for what, t in hh.sums().items()})
        return {name: found[name] for name in self.names}


def _lstm_sums(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> _LSTMSums | None:
    return _LSTMSums(module, kept, names, budget) if "x_l0" in kept else None


@register(
    nn.LSTM,
    accepts=_plain_lstm,
    params=_lstm_parameters,
    whole_call=True,
    forward=lstm_in_pieces,
    accumulate=_lstm_sums,
    batch_dims=(0, 1, 1),
)
def lstm(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    """The sums of an ``nn.LSTM`` call recorded by :func:`lstm_in_pieces` (``None``, declining,
    for a call it did not redo): the :class:`_LSTMSums` of all the vectors at once."""
    sums = _lstm_sums(module, args, kwargs, kept, names, budget)
    if sums is None:
        return None
    for key, g in grads.items():
        sums.add(key, g)
    return sums.sums()
