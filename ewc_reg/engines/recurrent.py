r"""The hook engine's rules for ``nn.LSTM`` (with ``proj_size`` or not), ``nn.GRU`` and
``nn.RNN``, batch first or not: a whole-call rule with a recorded forward
(:func:`recurrence_in_pieces`) that runs the recurrence step by step, so that the pull-back
reaches the input projections of the gates, and an accumulator that makes each layer's (and
direction's) weights two ``Linear`` sums (three with an LSTM's projection); and for one step
of them, ``nn.LSTMCell``, ``nn.GRUCell`` and ``nn.RNNCell``, the same with one layer and one
step (:func:`cell_in_pieces`). The ``Linear`` sums treat steps alike
(:data:`.rules.POSITIONWISE`; not an LSTM's projection, whose sums pair each step with the
next), so the engine joins the calls of a module called more than once per forward pass into
one call on all their steps: a cell stepped through a sequence by hand, :math:`T` calls, is
one call on :math:`T` steps, the per-sample gradients :math:`\sum_t G_{a,t} x_t^\top` of
backpropagation through time; so is a layer run on two sequences, or on the pieces of one,
each from the last one's final states; and a call on ``k`` sequences per sample folded into the
batch dimension, ``(B k, T, in)`` (Sequencer's LSTMs along the rows of each image): its pieces
unfolded, ``(B, k, T, ...)``, are one sequence of ``k T`` steps per sample.

Registered in :data:`.rules.RULES` when this module is imported, which :mod:`ewc_reg.engines`
does. (``torch.func.vmap`` cannot run these modules: without this rule such models go to the
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
from .rules import CallRule, LinearSums, feed_all, register

_NAME = re.compile(r"((weight|bias)_(ih|hh)|weight_hr)_l\d+(_reverse)?")

#: Gates per layer: the rows of ``weight_ih`` are ``gates * hidden_size``.
_GATES = {nn.LSTM: 4, nn.GRU: 3, nn.RNN: 1, nn.LSTMCell: 4, nn.GRUCell: 3, nn.RNNCell: 1}

#: The layer each cell is one step of (the cells' own kinds too).
_KIND = {nn.LSTMCell: nn.LSTM, nn.GRUCell: nn.GRU, nn.RNNCell: nn.RNN}

_CELLS = tuple(_KIND)


def _batch_dims(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Input ``x`` and any initial states ``(layers, B, H)``, then the output and the final
    states."""
    first = 0 if module.batch_first else 1
    return (first, 1, 1), (first, 1, 1)


def _recurrent_parameters(module: nn.Module) -> set[str]:
    return {name for name, _ in module.named_parameters() if _NAME.fullmatch(name)}


def _suffixes(module: nn.Module) -> list[str]:
    """``"_l0"``, ``"_l0_reverse"``, ... in the order of the layers and directions (a cell's
    parameters, ``weight_ih`` and such, have none: ``""``)."""
    if isinstance(module, _CELLS):
        return [""]
    directions = ("", "_reverse") if module.bidirectional else ("",)
    return [f"_l{layer}{d}" for layer in range(module.num_layers) for d in directions]


def _step(
    module: nn.Module,
    a: Tensor,
    h: Tensor,
    c: Tensor | None,
    w_hh: Tensor,
    b_hh: Tensor | None,
    w_hr: Tensor | None,
) -> tuple[Tensor, Tensor | None, Tensor | None]:
    r"""One step from ``a`` (the input part of the gates at this step; for an LSTM or an RNN
    given no ``b_hh``, with the recurrent bias in it already) and the state: the new ``h``, the
    LSTM's new ``c``, and the GRU's reset gate ``r`` or, for an LSTM with a projection
    ``w_hr``, the projected :math:`m = \sigma(o) \odot \tanh c` (``h = m W_{hr}^\top``);
    PyTorch's gate orders ``i, f, g, o`` and ``r, z, n``."""
    kind = _KIND.get(type(module), type(module))
    if kind is nn.GRU:
        a_r, a_z, a_n = a.chunk(3, dim=1)
        h_r, h_z, h_n = F.linear(h, w_hh, b_hh).chunk(3, dim=1)
        r, z = torch.sigmoid(a_r + h_r), torch.sigmoid(a_z + h_z)
        return (1 - z) * torch.tanh(a_n + r * h_n) + z * h, None, r
    gates = torch.addmm(a, h, w_hh.t()) if b_hh is None else a + F.linear(h, w_hh, b_hh)
    if kind is nn.LSTM:
        i, f, g, o = gates.chunk(4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        m = torch.sigmoid(o) * torch.tanh(c)
        return (m, c, None) if w_hr is None else (F.linear(m, w_hr), c, m)
    act = torch.tanh if module.nonlinearity == "tanh" else torch.relu
    return act(gates), None, None


def recurrence_in_pieces(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    r"""``module(x)`` or ``module(x, hx)`` for an ``nn.LSTM``, ``nn.GRU`` or ``nn.RNN`` on
    ``x: (B, T, in)`` (or ``(T, B, in)`` without ``batch_first``), step by step;
    ``NotImplemented`` otherwise (packed or unbatched input, dropout in training mode). For each
    layer and direction, from the initial states given (zeros by default; the reverse direction
    runs from ``t = T-1`` down):

    .. math::

        a = x W_{ih}^\top + b_{ih}\ (B, T, G H),\qquad
        \text{gates}_t = a_t + (h_{t-1} W_{hh}^\top + b_{hh})
        \ \ (\text{GRU: its } n \text{ part } a_{n,t} + r_t \odot (\dots)),

    then the module's own cell (LSTM, GRU, tanh or ReLU RNN). ``keep`` records ``a``
    (``"a_l0"``, ...; the pull-back's gradient there is that of the gates at every step), the
    layer input ``x`` (``"x_l0"``), the states :math:`h_{t-1}` each step saw (``"h_l0"``),
    for a GRU the reset gates (``"r_l0"``), and for an LSTM with ``proj_size`` the projected
    :math:`m_t` (``"m_l0"``) and the states :math:`h_t` it gave, stacked as the layer's output
    (``"o_l0"``, pulled back to: its gradient is what the layers above and the loss send each
    :math:`h_t`)."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(x, Tensor) or x.dim() != 3 or (module.training and module.dropout > 0):
        return NotImplemented
    if not module.batch_first:
        x = x.transpose(0, 1)  # (B, T, in): the pieces are kept batch-first
    batch, steps, _ = x.shape
    lstm, projected = isinstance(module, nn.LSTM), bool(getattr(module, "proj_size", 0))
    sizes = (module.proj_size if projected else module.hidden_size, module.hidden_size)
    zeros = x.new_zeros(batch, sizes[0])
    layers = len(_suffixes(module))
    if hx is None:
        hx = tuple(x.new_zeros(layers, batch, size) for size in sizes[: 2 if lstm else 1])
    elif isinstance(hx, Tensor):
        hx = (hx,)
    if any(t.shape != (layers, batch, size) for t, size in zip(hx, sizes)):
        return NotImplemented  # (unbatched states)
    finals_h, finals_c = [], []
    layer_input = x
    suffixes = iter(_suffixes(module))
    for _ in range(module.num_layers):
        outputs = []
        for reverse in (False, True) if module.bidirectional else (False,):
            index = len(finals_h)
            suffix = next(suffixes)
            w_hh = getattr(module, f"weight_hh{suffix}")
            b_ih = getattr(module, f"bias_ih{suffix}") if module.bias else None
            b_hh = getattr(module, f"bias_hh{suffix}") if module.bias else None
            w_hr = getattr(module, f"weight_hr{suffix}") if projected else None
            keep(f"x{suffix}", layer_input, False)
            a = keep(
                f"a{suffix}",
                F.linear(layer_input, getattr(module, f"weight_ih{suffix}"), b_ih),
                True,
            )
            h, c = hx[0][index], hx[-1][index]
            seen, states, extras = [zeros] * steps, [zeros] * steps, [zeros] * steps
            step_bias = b_hh
            if b_hh is not None and not isinstance(module, nn.GRU):  # (GRU: inside r * (...))
                a, step_bias = a + b_hh, None  # (once for all steps: each step's gates, one addmm)
            inputs = a.unbind(1)  # (one backward node: slicing a[:, t] zero-fills a per step)
            for t in reversed(range(steps)) if reverse else range(steps):
                seen[t] = h
                h, c, extra = _step(module, inputs[t], h, c, w_hh, step_bias, w_hr)
                states[t] = h
                if extra is not None:
                    extras[t] = extra
            keep(f"h{suffix}", torch.stack(seen, 1), False)
            if isinstance(module, nn.GRU):
                keep(f"r{suffix}", torch.stack(extras, 1), False)
            stacked = torch.stack(states, 1)
            if projected:
                keep(f"m{suffix}", torch.stack(extras, 1), False)
                stacked = keep(f"o{suffix}", stacked, True)
            outputs.append(stacked)
            finals_h.append(h)
            finals_c.append(c)
        layer_input = torch.cat(outputs, dim=2) if len(outputs) > 1 else outputs[0]
    output = layer_input if module.batch_first else layer_input.transpose(0, 1)
    if lstm:
        return output, (torch.stack(finals_h), torch.stack(finals_c))
    return output, torch.stack(finals_h)


class _RecurrentSums:
    """The accumulator of :func:`recurrent_layer`: per layer and direction, the input weights'
    sums from ``(G_a, x)`` and the recurrent weights' from ``(G_h, h_{t-1})``, with ``G H``
    outputs, where ``G_h = G_a`` but for a GRU's ``n`` part, ``G_{a,n} ⊙ r``; bias sums are
    :math:`\\sum_{n,k} (\\sum_t G_{nkt})^{\\odot 2}` of the same.

    An LSTM's projection :math:`h_t = m_t W_{hr}^\\top` gets the sums from ``(G_{h_t}, m_t)``,
    where the gradient reaching :math:`h_t` is what the layer's output sends it (``"o"``), plus
    what the next step's gates send it, :math:`G_{a,t \\pm 1} W_{hh}`, plus, at the last
    step, what the final state ``h_n`` sends (output leaf 1). These arrive as separate
    gradients, one vector (or all, batched) at a time: they are kept until the last one (``h_n``
    gets none when nothing uses it: then until the next vector's first, or the end)."""

    def __init__(
        self, module: nn.Module, kept: dict[str, Tensor], names: Collection[str], budget: int
    ) -> None:
        acc = accumulation_dtype(getattr(module, f"weight_ih{_suffixes(module)[0]}").dtype)
        rows = _GATES[type(module)] * module.hidden_size
        self.names, self.kept, self.acc = names, kept, acc
        self.parts: dict[str, tuple[LinearSums, LinearSums]] = {}
        # per projected layer and direction: its index among the final states, whether it runs
        # in reverse, W_hh, and the sums of W_hr
        self.projections: dict[str, tuple[int, bool, Tensor, LinearSums]] = {}
        self.pending: dict[str, Tensor] = {}  # this vector's "a" and "o" gradients
        for index, suffix in enumerate(_suffixes(module)):
            wanted = {kind: [] for kind in ("ih", "hh")}
            for kind in wanted:
                for what in ("weight", "bias"):
                    if f"{what}_{kind}{suffix}" in names:
                        wanted[kind].append(what)
            self.parts[suffix] = (
                LinearSums(kept[f"x{suffix}"], rows, wanted["ih"], acc, budget),
                LinearSums(kept[f"h{suffix}"], rows, wanted["hh"], acc, budget),
            )
            if f"weight_hr{suffix}" in names:
                w_hh = getattr(module, f"weight_hh{suffix}").detach().to(acc)
                sums = LinearSums(kept[f"m{suffix}"], module.proj_size, ["weight"], acc, budget)
                self.projections[suffix] = (index, suffix.endswith("reverse"), w_hh, sums)

    def add(self, key: int | str, grads: Tensor) -> None:
        if self.projections:
            if key == 1:  # (h_n: the last of a vector's gradients)
                self._project(grads)
                return
            if isinstance(key, str) and key[0] in "ao":
                if key in self.pending:  # (the next vector's: h_n got none)
                    self._project(None)
                if key[1:] in self.projections:
                    self.pending[key] = grads.to(self.acc)
        # (the other outputs feed nothing here: their gradients reach a through the pieces)
        if not (isinstance(key, str) and key.startswith("a")):
            return
        suffix = key[1:]
        inputs, recurrent = self.parts[suffix]
        inputs.add(key, grads)
        reset = self.kept.get(f"r{suffix}")
        if reset is not None:  # (GRU: the reset gate scales the recurrent part of n)
            g_r, g_z, g_n = grads.chunk(3, dim=-1)
            grads = torch.cat([g_r, g_z, g_n * reset.to(grads.dtype)], dim=-1)
        recurrent.add(key, grads)

    def _project(self, final: Tensor | None) -> None:
        """Feed the projections' sums the gradients reaching each :math:`h_t` (see the class
        docstring), from the pending ones and ``final``, ``h_n``'s (``(..., L, B, P)``)."""
        for suffix, (index, reverse, w_hh, sums) in self.projections.items():
            g_a, g_o = self.pending.get(f"a{suffix}"), self.pending.get(f"o{suffix}")
            given = [t for t in (g_a, g_o, final) if t is not None]
            if not given:  # (nothing reached this layer and direction)
                continue
            batch, steps = self.kept[f"m{suffix}"].shape[:2]
            lead = given[0].shape[:-3]  # (the vectors' dimension, batched)
            g = given[0].new_zeros(*lead, batch, steps, w_hh.shape[1])  # (..., B, T, P)
            if g_o is not None:
                g += g_o
            if g_a is not None:  # (the next step's gates read the state: t + 1, or t - 1)
                recurrent = g_a @ w_hh
                if reverse:
                    g[..., 1:, :] += recurrent[..., :-1, :]
                else:
                    g[..., :-1, :] += recurrent[..., 1:, :]
            if final is not None:
                g[..., 0 if reverse else -1, :] += final.to(self.acc).select(-3, index)
            sums.add(None, g)
        self.pending.clear()

    def sums(self) -> dict[str, Tensor]:
        if self.pending:
            self._project(None)
        found = {}
        for suffix, (ih, hh) in self.parts.items():
            found.update({f"{what}_ih{suffix}": t for what, t in ih.sums().items()})
            found.update({f"{what}_hh{suffix}": t for what, t in hh.sums().items()})
        for suffix, (*_, hr) in self.projections.items():
            found[f"weight_hr{suffix}"] = hr.sums()["weight"]
        return {name: found[name] for name in self.names}


def _recurrent_sums(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> _RecurrentSums | None:
    ran = f"x{_suffixes(module)[0]}" in kept
    return _RecurrentSums(module, kept, names, budget) if ran else None


def _recurrent_rule(forward: str) -> CallRule:
    """A rule: the sums of a call recorded by ``forward`` (``None``, declining, for a call it
    did not redo), or of several calls joined (each kept piece and gradient with the calls'
    steps side by side, ``(B, T_1 + T_2 + ..., ...)``): the :class:`_RecurrentSums` of all
    the vectors at once."""

    def rule(
        module: nn.Module,
        args: tuple[Any, ...],
        kwargs: dict[str, Any],
        grads: dict[int | str, Tensor],
        kept: dict[str, Tensor],
        names: Collection[str],
        budget: int,
    ) -> dict[str, Tensor] | None:
        return feed_all(_recurrent_sums(module, args, kwargs, kept, names, budget), grads)

    rule.__doc__ = _recurrent_rule.__doc__.replace("``forward``", f":func:`{forward}`")
    return rule


def _steps_alike(module: nn.Module) -> tuple[int, int] | None:
    """Every step's pieces are used alike (:data:`.rules.POSITIONWISE`), except an LSTM's
    with a projection: its sums pair each step with the next."""
    return None if getattr(module, "proj_size", 0) else (1, 1)


recurrent_layer = register(
    nn.LSTM,
    nn.GRU,
    nn.RNN,
    params=_recurrent_parameters,
    whole_call=True,
    forward=recurrence_in_pieces,
    accumulate=_recurrent_sums,
    batch_dims=_batch_dims,
    positionwise=_steps_alike,
)(_recurrent_rule("recurrence_in_pieces"))


def cell_in_pieces(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    r"""``module(x)`` or ``module(x, hx)`` for an ``nn.LSTMCell``, ``nn.GRUCell`` or
    ``nn.RNNCell`` on ``x: (B, in)``, as one step of :func:`recurrence_in_pieces`
    (``NotImplemented`` for an unbatched input): :math:`a = x W_{ih}^\top + b_{ih}`, then the
    cell from :math:`a` and the state (zeros by default). ``keep`` records ``a`` (pulled back
    to), ``x``, the state ``h`` and a GRU's reset gate ``r``."""
    x = args[0] if args else kwargs.get("input")
    hx = args[1] if len(args) > 1 else kwargs.get("hx")
    if not isinstance(x, Tensor) or x.dim() != 2:
        return NotImplemented
    lstm = isinstance(module, nn.LSTMCell)
    if hx is None:
        zeros = x.new_zeros(x.shape[0], module.hidden_size)
        hx = (zeros, zeros) if lstm else zeros
    h, c = hx if lstm else (hx, None)
    keep("x", x, False)
    keep("h", h, False)
    a = keep("a", F.linear(x, module.weight_ih, module.bias_ih), True)
    h, c, reset = _step(module, a, h, c, module.weight_hh, module.bias_hh, None)
    if reset is not None:
        keep("r", reset, False)
    return (h, c) if lstm else h


recurrent_cell = register(
    *_CELLS,
    params=("weight_ih", "weight_hh", "bias_ih", "bias_hh"),
    whole_call=True,
    forward=cell_in_pieces,
    accumulate=_recurrent_sums,
    positionwise=_steps_alike,
)(_recurrent_rule("cell_in_pieces"))
