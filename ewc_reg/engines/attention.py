r"""The hook engine's rule for ``nn.MultiheadAttention`` (a whole-call rule of
:data:`.rules.CALL_RULES`; see :func:`multihead_attention` for the math).

Registered in :data:`.rules.RULES` when this module is imported, which
:mod:`ewc_reg.engines` does.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Collection
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .base import accumulation_dtype
from .rules import _linear_weight, _sample_chunks, _square_sum, chunk_budget, register

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


@register(
    nn.MultiheadAttention, accepts=_plain_attention, params=_ATTENTION_PARAMS, whole_call=True
)
def multihead_attention(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r"""``nn.MultiheadAttention`` with ``batch_first=True``, called on batched ``query``
    ``(B, L, E)``, ``key`` ``(B, S, E_k)`` and ``value`` ``(B, S, E_v)`` (any masks, with or
    without weights; declined: ``add_bias_kv``, ``add_zero_attn`` (by :func:`rule_for`),
    unbatched inputs and dropout in training mode). Its forward pass is redone in pieces, a chunk
    of samples at a time, with ``H`` heads of ``d = E/H`` dimensions:

    .. math::

        q = x_q W_q^\top + b_q,\quad k = x_k W_k^\top + b_k,\quad v = x_v W_v^\top + b_v
        \quad (\text{split into heads: } (B, H, L \text{ or } S, d)),

        P = \mathrm{softmax}\big(q k^\top/\sqrt d + M\big)\ (B, H, L, S),\qquad
        o = P v \ (\text{heads merged: } (B, L, E)),\qquad y = o W_o^\top + b_o,

    with ``M`` the additive mask (:func:`_attention_mask`); the weights output is ``P`` (or its
    mean over heads). The ``K`` vectors' gradients ``G`` of ``y`` ``(K, B, L, E)`` and ``G_P``
    of the weights (if they got any) are pulled back by hand, batched over ``K``:

    .. math::

        \partial o = G W_o,\quad \partial v = P^\top \partial o,\quad
        \partial P = \partial o\, v^\top + G_P\ (\text{or } G_P/H \text{ per head}),

        \partial A = P \odot \big(\partial P - \textstyle\sum_s (\partial P \odot P)_{\cdot s}\big)
        /\sqrt d,\quad \partial q = \partial A\, k,\quad \partial k = \partial A^\top q,

    and each projection's sums are the ``Linear`` rule's for sequence inputs
    (:func:`_linear_weight`): ``out_proj`` from ``(G, o)``, the in-projection from ``(∂q, x_q)``,
    ``(∂k, x_k)`` and ``(∂v, x_v)``, one product with ``(∂q | ∂k | ∂v, x)`` (``3E`` outputs) for
    self-attention (``query is key is value``); bias sums are
    :math:`\sum_{n,k} (\sum_l \partial_{nkl})^{\odot 2}`. (By hand, with ``P`` broadcast over
    ``K``: on CPU the attention core of one layer of ``benchmarks.models.TextTransformer``,
    N=128, K=9, took 17.6 ms, against 23.1 ms with ``autograd.grad(..., is_grads_batched=True)``
    through the decomposed attention, 34.0 ms through the fused ``scaled_dot_product_attention``
    and 39.1 ms folding ``K`` into the batch.)
    """
    call = _ATTENTION_SIGNATURE.bind(module, *args, **kwargs)
    call.apply_defaults()
    a = call.arguments
    query, key, value = a["query"], a["key"], a["value"]
    if query.dim() != 3 or (module.training and module.dropout > 0):
        return None
    acc = accumulation_dtype(module.out_proj.weight.dtype)
    batch, queries, embed = query.shape
    keys, heads, head_dim = key.shape[1], module.num_heads, module.head_dim
    if module._qkv_same_embed_dim:
        w_q, w_k, w_v = module.in_proj_weight.to(acc).chunk(3)
    else:
        w_q, w_k, w_v = (
            getattr(module, f"{n}_proj_weight").to(acc) for n in ("q", "k", "v")
        )
    b_q, b_k, b_v = (None,) * 3 if module.in_proj_bias is None else (
        module.in_proj_bias.to(acc).chunk(3)
    )
    w_o = module.out_proj.weight.to(acc)
    mask = _attention_mask(a, batch, heads, queries, keys, acc)
    g_out = grads.get(0)
    g_weights = grads.get(1) if a["need_weights"] else None
    average = a["average_attn_weights"]
    num_vectors = next(iter(grads.values())).shape[0]
    shared = query is key and key is value
    in_names = [n for n in _ATTENTION_PARAMS[:5] if n in names]
    sums = {name: w_o.new_zeros(module.get_parameter(name).shape) for name in names}

    def split(t: Tensor) -> Tensor:  # (..., n, E) -> (..., H, n, d)
        return t.unflatten(-1, (heads, head_dim)).transpose(-3, -2)

    def merge(t: Tensor) -> Tensor:  # (..., H, n, d) -> (..., n, E)
        return t.transpose(-3, -2).flatten(-2)

    size = torch.finfo(acc).bits // 8
    scores = heads * queries * keys
    per_sample = (num_vectors * (3 * scores + 8 * (queries + keys) * embed) + 2 * scores) * size
    budget = chunk_budget(budget, query.device)
    for chunk in _sample_chunks(batch, per_sample, budget):
        x_q = query[chunk].to(acc)
        x_k = x_q if shared else key[chunk].to(acc)
        x_v = x_q if shared else value[chunk].to(acc)
        q, k, v = split(F.linear(x_q, w_q, b_q)), split(F.linear(x_k, w_k, b_k)), split(
            F.linear(x_v, w_v, b_v)
        )
        logits = q @ k.mT / math.sqrt(head_dim)
        if mask is not None:
            logits = logits + (mask[chunk] if mask.shape[0] > 1 else mask)
        p = logits.softmax(-1)  # (b, H, L, S)
        o = merge(p @ v)  # (b, L, E)
        g = None if g_out is None else g_out[:, chunk].to(acc)  # (K, b, L, E)
        if g is not None:
            if "out_proj.weight" in names:
                sums["out_proj.weight"] += _linear_weight(g, o, budget)
            if "out_proj.bias" in names:
                sums["out_proj.bias"] += _square_sum(g.sum(2))
        if not in_names:
            continue
        d_p = d_v = None
        if g is not None:
            d_o = split(g @ w_o)  # (K, b, H, L, d)
            d_v = p.mT @ d_o  # (K, b, H, S, d)
            d_p = d_o @ v.mT  # (K, b, H, L, S)
        if g_weights is not None:
            g_p = g_weights[:, chunk].to(acc)
            g_p = g_p.unsqueeze(2) / heads if average else g_p
            d_p = g_p.expand(*g_p.shape[:2], heads, queries, keys) if d_p is None else d_p + g_p
        # ∂A √d = P ⊙ ∂P - P (Σ_s P ⊙ ∂P), in place (∂P is fresh unless only G_P came)
        d_a = d_p.mul_(p) if g is not None else d_p * p
        d_a.addcmul_(p, d_a.sum(-1, keepdim=True), value=-1.0)
        scale = 1 / math.sqrt(head_dim)
        d_q, d_k = merge(d_a @ (k * scale)), merge(d_a.mT @ (q * scale))  # (K, b, L or S, E)
        d_v = torch.zeros_like(d_k) if d_v is None else merge(d_v)
        parts = (d_q, d_k, d_v)
        if "in_proj_weight" in names and shared:
            sums["in_proj_weight"] += _linear_weight(torch.cat(parts, -1), x_q, budget)
        elif "in_proj_weight" in names:
            sums["in_proj_weight"] += torch.cat(
                [_linear_weight(d, x, budget) for d, x in zip(parts, (x_q, x_k, x_v))]
            )
        for d, x, n in zip(parts, (x_q, x_k, x_v), "qkv"):
            if f"{n}_proj_weight" in names:
                sums[f"{n}_proj_weight"] += _linear_weight(d, x, budget)
        if "in_proj_bias" in names:
            sums["in_proj_bias"] += torch.cat([_square_sum(d.sum(2)) for d in parts])
    return sums
