r"""The hook engine's rule for ``nn.MultiheadAttention``: a whole-call rule of
:data:`.rules.CALL_RULES` with a recorded forward (:func:`attention_in_pieces`) that redoes the
call in pieces, so that the pull-back reaches the in-projection's outputs and the rule
(:func:`multihead_attention`) is three ``Linear`` rules.

Registered in :data:`.rules.RULES` when this module is imported, which
:mod:`ewc_reg.engines` does.
"""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import accumulation_dtype
from .rules import LinearSums, call_arguments, feed_all, register

#: The parameters the attention rule knows (``bias_k``/``bias_v`` are left to the fallback).
_ATTENTION_PARAMS = (
    "in_proj_weight", "q_proj_weight", "k_proj_weight", "v_proj_weight", "in_proj_bias",
    "out_proj.weight", "out_proj.bias",
)


def _additive(mask: Tensor, dtype: torch.dtype) -> Tensor:
    """A mask as added to the attention scores: boolean ``True`` is :math:`-\\infty`."""
    if mask.dtype == torch.bool:
        return torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
            mask, float("-inf")
        )
    return mask.to(dtype)


def _attention_mask(
    call: dict[str, Any], batch: int, heads: int, queries: int, keys: int, dtype: torch.dtype
) -> Tensor | None:
    """The additive mask of ``F.multi_head_attention_forward``, ``(B or 1, H or 1, L, S)``:
    ``attn_mask`` (``(L, S)`` or ``(B H, L, S)``; a causal one for ``is_causal`` where PyTorch
    ignores the mask given) plus ``key_padding_mask`` (``(B, S)``), or ``None``."""
    attn_mask, padding = call["attn_mask"], call["key_padding_mask"]
    device = call["query"].device
    if call["is_causal"] and padding is None and not call["need_weights"]:  # (SDPA's is_causal)
        attn_mask = torch.ones(queries, keys, dtype=torch.bool, device=device).triu(1)
    mask = None
    if attn_mask is not None:
        mask = _additive(attn_mask, dtype)
        mask = mask.view(1, 1, queries, keys) if mask.dim() == 2 else mask.view(
            batch, heads, queries, keys
        )
    if padding is not None:
        padding = _additive(padding, dtype).view(batch, 1, 1, keys)
        mask = padding if mask is None else mask + padding
    return mask


def _plain_attention(module: nn.Module) -> bool:
    return not module.add_zero_attn and module.bias_k is None


def _batch_dims(module: nn.Module) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """``query``, ``key`` and ``value`` (the masks lead with the batch, or are shared), then
    the output and the weights (``(B, L, S)`` either way)."""
    first = 0 if module.batch_first else 1
    return (first, first, first), (first, 0)


def attention_in_pieces(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    r"""``module(*args, **kwargs)`` for an ``nn.MultiheadAttention`` called on batched
    ``query`` ``(B, L, E)``, ``key`` ``(B, S, E_k)`` and ``value`` ``(B, S, E_v)`` (with
    ``batch_first=False``: ``(L, B, E)`` and so on, taken batch first here and the output
    transposed back; any masks, with or without weights), redone in pieces with ``H`` heads of
    ``d = E/H`` dimensions; ``NotImplemented`` for unbatched inputs and dropout in training mode:

    .. math::

        q = x_q W_q^\top + b_q,\quad k = x_k W_k^\top + b_k,\quad v = x_v W_v^\top + b_v
        \quad (\text{split into heads: } (B, H, L \text{ or } S, d)),

        o = \mathrm{softmax}\big(q k^\top/\sqrt d + M\big)\, v \ (\text{heads merged: }
        (B, L, E)),\qquad y = o W_o^\top + b_o,

    with ``M`` the additive mask (:func:`_attention_mask`); the attention core is
    ``F.scaled_dot_product_attention``, or, when the weights are asked for, done by hand (as
    PyTorch does). ``keep(name, tensor, pull_back)`` records the in-projection's outputs (one
    ``(B, L, 3E)`` tensor ``"qkv"`` for self-attention, else ``"q"``, ``"k"``, ``"v"``) and
    the output ``y`` (``"y"``), to which the engine pulls the vectors back, and the values the
    rule needs: the in-projection's inputs (``"x"``, else ``"xq"``, ``"xk"``, ``"xv"``) and
    ``o`` (``"o"``). Each piece has the batch first and the positions (``L`` or ``S``) as its
    second dimension, so the engine can join the pieces of several calls
    (:data:`.rules.POSITIONWISE`).
    Numerically this is PyTorch's attention up to rounding."""
    a = call_arguments(module, args, kwargs)
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3 or (module.training and module.dropout > 0):
        return NotImplemented
    self_attention = module._qkv_same_embed_dim and query is key and key is value
    if not module.batch_first:
        query, key, value = (t.transpose(0, 1) for t in (query, key, value))
    batch, queries, _ = query.shape
    keys, heads, head_dim = key.shape[1], module.num_heads, module.head_dim
    bias = module.in_proj_bias
    if self_attention:
        keep("x", query, False)
        q, k, v = keep("qkv", F.linear(query, module.in_proj_weight, bias), True).chunk(3, -1)
    else:
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        q, k, v = (
            keep(n, F.linear(keep(f"x{n}", x, False), w, b), True)
            for n, x, w, b in zip("qkv", (query, key, value), weights, biases)
        )
    q, k, v = (t.unflatten(-1, (heads, head_dim)).transpose(1, 2) for t in (q, k, v))
    mask = _attention_mask(a, batch, heads, queries, keys, q.dtype)
    weights = None
    if a["need_weights"]:
        scores = q @ k.mT * head_dim**-0.5
        p = (scores if mask is None else scores + mask).softmax(-1)  # (B, H, L, S)
        o = p @ v
        weights = p.mean(1) if a["average_attn_weights"] else p
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    o = keep("o", o.transpose(1, 2).flatten(2), False)  # (B, L, E)
    y = keep("y", F.linear(o, module.out_proj.weight, module.out_proj.bias), True)
    return (y if module.batch_first else y.transpose(0, 1)), weights


class _AttentionSums:
    """The :class:`~.rules.Accumulator` of :func:`multihead_attention`: one
    :class:`~.rules.LinearSums` per projection, fed by kept piece."""

    def __init__(
        self, module: nn.Module, kept: dict[str, Tensor], names: Collection[str], budget: int
    ) -> None:
        acc = accumulation_dtype(module.out_proj.weight.dtype)
        embed = module.embed_dim
        self.module, self.names = module, names
        out_names = [n.removeprefix("out_proj.") for n in names if n.startswith("out_proj.")]
        in_names = ["bias"] if "in_proj_bias" in names else []
        if any(n.endswith("_weight") for n in names):
            in_names.append("weight")
        self.parts: dict[int | str, LinearSums] = {
            "y": LinearSums(kept["o"], embed, out_names, acc, budget)
        }
        if "qkv" in kept:
            self.parts["qkv"] = LinearSums(kept["x"], 3 * embed, in_names, acc, budget)
        else:
            for n in "qkv":
                self.parts[n] = LinearSums(kept[f"x{n}"], embed, in_names, acc, budget)

    def add(self, key: int | str, grads: Tensor) -> None:
        # (the weights output, leaf 1, feeds nothing here: its gradients reach the
        # in-projection's outputs through the recorded pieces)
        if key in self.parts:
            self.parts[key].add(key, grads)

    def sums(self) -> dict[str, Tensor]:
        found = {f"out_proj.{n}": t for n, t in self.parts["y"].sums().items()}
        if "qkv" in self.parts:
            found.update({f"in_proj_{n}": t for n, t in self.parts["qkv"].sums().items()})
        else:
            parts = [self.parts[n].sums() for n in "qkv"]
            if "weight" in parts[0] and self.module._qkv_same_embed_dim:
                found["in_proj_weight"] = torch.cat([part["weight"] for part in parts])
            elif "weight" in parts[0]:
                found.update({f"{n}_proj_weight": p["weight"] for n, p in zip("qkv", parts)})
            if "bias" in parts[0]:
                found["in_proj_bias"] = torch.cat([part["bias"] for part in parts])
        return {name: found[name] for name in self.names}


def _attention_sums(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> _AttentionSums | None:
    if "o" not in kept:  # (the call was not redone in pieces)
        return None
    return _AttentionSums(module, kept, names, budget)


@register(
    nn.MultiheadAttention,
    accepts=_plain_attention,
    params=_ATTENTION_PARAMS,
    whole_call=True,
    forward=attention_in_pieces,
    accumulate=_attention_sums,
    batch_dims=_batch_dims,
    positionwise=lambda module: (1, 1),
)
def multihead_attention(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r"""The sums of an ``nn.MultiheadAttention`` call recorded by :func:`attention_in_pieces`
    (``None``, declining, for a call it did not redo), or of several calls joined (each piece
    with the calls' positions side by side). With the gradients ``G`` of the output
    ``y`` ``(K, B, L, E)`` and ``G_q``, ``G_k``, ``G_v`` of the in-projection's outputs (or
    ``G_{qkv}`` for self-attention: ``(K, B, L, 3E)``), each projection is a ``Linear`` on a
    sequence (:class:`~.rules.LinearSums`): ``out_proj`` from ``(G, o)``, the in-projection
    from ``(G_q, x_q)``, ``(G_k, x_k)``, ``(G_v, x_v)`` (one product with ``(G_{qkv}, x)`` for
    self-attention); bias sums are :math:`\sum_{n,k} (\sum_l G_{nkl})^{\odot 2}`. The engine
    feeds the same sums a vector at a time (:data:`~.rules.ACCUMULATIONS`). (Before, the rule
    redid the attention and pulled ``G`` back through it by hand, batched over ``K``, while the
    engine's pull-back went through PyTorch's attention as well: the exact Fisher of
    ``benchmarks.models.TextTransformer`` (N=128, 2 CPU threads) took 10.5x a forward and
    backward pass that way and 8.3x this way; the empirical one 1.83x and 1.29x.)"""
    return feed_all(_attention_sums(module, args, kwargs, kept, names, budget), grads)
