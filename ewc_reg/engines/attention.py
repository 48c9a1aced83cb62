r"""The hook engine's rule for ``nn.MultiheadAttention``: a whole-call rule of
:data:`.rules.CALL_RULES` with a recorded forward (:func:`attention_in_pieces`) that redoes the
call in pieces, so that the pull-back reaches the in-projection's outputs and the rule
(:func:`multihead_attention`) is three ``Linear`` rules.

Registered in :data:`.rules.RULES` when this module is imported, which
:mod:`ewc_reg.engines` does.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import accumulation_dtype
from .rules import _linear_weight, _square_sum, register

_ATTENTION_SIGNATURE = inspect.signature(nn.MultiheadAttention.forward)

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
    return module.batch_first and not module.add_zero_attn and module.bias_k is None


def attention_in_pieces(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    r"""``module(*args, **kwargs)`` for an ``nn.MultiheadAttention`` with ``batch_first=True``
    called on batched ``query`` ``(B, L, E)``, ``key`` ``(B, S, E_k)`` and ``value``
    ``(B, S, E_v)`` (any masks, with or without weights), redone in pieces with ``H`` heads of
    ``d = E/H`` dimensions; ``NotImplemented`` for unbatched inputs and dropout in training mode:

    .. math::

        q = x_q W_q^\top + b_q,\quad k = x_k W_k^\top + b_k,\quad v = x_v W_v^\top + b_v
        \quad (\text{split into heads: } (B, H, L \text{ or } S, d)),

        o = \mathrm{softmax}\big(q k^\top/\sqrt d + M\big)\, v \ (\text{heads merged: }
        (B, L, E)),\qquad y = o W_o^\top + b_o,

    with ``M`` the additive mask (:func:`_attention_mask`); the attention core is
    ``F.scaled_dot_product_attention``, or, when the weights are asked for, done by hand (as
    PyTorch does). ``keep(name, tensor, pull_back)`` records the in-projection's outputs (one
    ``(B, L, 3E)`` tensor ``"qkv"`` for self-attention, else ``"q"``, ``"k"``, ``"v"``), to
    which the engine pulls the vectors back, and ``o`` (``"o"``), whose value the rule needs.
    Numerically this is PyTorch's attention up to rounding."""
    call = _ATTENTION_SIGNATURE.bind(module, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3 or (module.training and module.dropout > 0):
        return NotImplemented
    batch, queries, _ = query.shape
    keys, heads, head_dim = key.shape[1], module.num_heads, module.head_dim
    bias = module.in_proj_bias
    if module._qkv_same_embed_dim and query is key and key is value:
        q, k, v = keep("qkv", F.linear(query, module.in_proj_weight, bias), True).chunk(3, -1)
    else:
        if module._qkv_same_embed_dim:
            weights = module.in_proj_weight.chunk(3)
        else:
            weights = (module.q_proj_weight, module.k_proj_weight, module.v_proj_weight)
        biases = (None,) * 3 if bias is None else bias.chunk(3)
        q, k, v = (
            keep(n, F.linear(x, w, b), True)
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
    return F.linear(o, module.out_proj.weight, module.out_proj.bias), weights


@register(
    nn.MultiheadAttention,
    accepts=_plain_attention,
    params=_ATTENTION_PARAMS,
    whole_call=True,
    forward=attention_in_pieces,
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
    (``None``, declining, for a call it did not redo). With the gradients ``G`` of the output
    ``y`` ``(K, B, L, E)`` and ``G_q``, ``G_k``, ``G_v`` of the in-projection's outputs (or
    ``G_{qkv}`` for self-attention: ``(K, B, L, 3E)``), each projection is a ``Linear`` on a
    sequence (:func:`~.rules._linear_weight`): ``out_proj`` from ``(G, o)``, the in-projection
    from ``(G_q, x_q)``, ``(G_k, x_k)``, ``(G_v, x_v)`` (one product with ``(G_{qkv}, x)`` for
    self-attention); bias sums are :math:`\sum_{n,k} (\sum_l G_{nkl})^{\odot 2}`. (Before, the
    rule redid the attention and pulled ``G`` back through it by hand, batched over ``K``, while
    the engine's pull-back went through PyTorch's attention as well: the exact Fisher of
    ``benchmarks.models.TextTransformer`` (N=128, 2 CPU threads) took 10.5x a forward and
    backward pass that way and takes 8.3x this way; the empirical one 1.83x and 1.29x.)"""
    if "o" not in kept:
        return None
    call = _ATTENTION_SIGNATURE.bind(module, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    acc = accumulation_dtype(module.out_proj.weight.dtype)
    sums: dict[str, Tensor] = {}

    def linear_sums(g: Tensor | None, x: Tensor, out: int) -> tuple[Tensor, Tensor]:
        """Weight and bias sums of one projection to ``out`` features from input ``x``."""
        if g is None:  # (no gradient reached it)
            return x.new_zeros(out, x.shape[-1], dtype=acc), x.new_zeros(out, dtype=acc)
        g = g.to(acc)
        return _linear_weight(g, x.to(acc), budget), _square_sum(g.sum(2))

    embed = module.embed_dim
    if "out_proj.weight" in names or "out_proj.bias" in names:
        sums["out_proj.weight"], sums["out_proj.bias"] = linear_sums(
            grads.get(0), kept["o"], embed
        )
    if "qkv" in kept:
        weight, bias = linear_sums(grads.get("qkv"), a["query"], 3 * embed)
        sums["in_proj_weight"], sums["in_proj_bias"] = weight, bias
    else:
        inputs = (a["query"], a["key"], a["value"])
        parts = [linear_sums(grads.get(n), x, embed) for n, x in zip("qkv", inputs)]
        if module._qkv_same_embed_dim:
            sums["in_proj_weight"] = torch.cat([w for w, _ in parts])
        else:
            for n, (w, _) in zip("qkv", parts):
                sums[f"{n}_proj_weight"] = w
        sums["in_proj_bias"] = torch.cat([b for _, b in parts])
    return {name: sums[name] for name in names}
