r"""Rules for a :class:`~.unit_sums.Tied` unit: modules of different kinds sharing a parameter.

A sample's gradient of a shared parameter is the sum of the members' per-sample gradients,
:math:`J_n^\top v_k = \sum_m a^{(m)}_{nk}`, so its sum is not the sum of the members' sums:

.. math::

    \sum_{n,k} \Big(\sum_m a^{(m)}_{nk}\Big)^{\odot 2}
    = \sum_m \sum_{n,k} a^{(m)\,\odot 2}_{nk}
    + 2 \sum_{m < m'} \sum_{n,k} a^{(m)}_{nk} \odot a^{(m')}_{nk} .

The members' own rules give the first terms; a rule here adds the cross terms. Without one (or
when its rule declines the calls) a tied unit goes to the per-module fallback.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn

from .rules import (
    acc_dtype,
    add_rows,
    chunk_budget,
    embedding,
    embedding_scale,
    linear,
    rule_for,
    sample_chunks,
    scaled_embedding,
)

if TYPE_CHECKING:
    from .recording import Record


def tied_sums(
    members: Sequence[nn.Module],
    calls: list[Record],
    grads: list[Tensor | None],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    """The sums of a tied unit with modules ``members`` (its parameters' local names ``names``:
    ``"{member}.{name}"``) from its recorded ``calls`` (each with ``member``, the index of the
    module called) and the gradients of their output edges, in order, or ``None`` where no rule
    here takes them. Every call was ``module(x)`` (:func:`.unit_sums._plain_calls`). The only
    rule: :func:`embedding_and_output_layer`, for at most one output layer and one or more
    embeddings (plain or scaled, :func:`.rules.scaled_embedding`: BART's encoder and decoder
    share their table, with the head of a language model, or without, in a classifier) with
    one ``padding_idx``: a scaled embedding's lookups are those of the table with ``G`` times
    its scale."""
    kinds = [rule_for(module) for module in members]
    heads = [m for m, kind in enumerate(kinds) if kind is linear]
    tables = [m for m, kind in enumerate(kinds) if kind in (embedding, scaled_embedding)]
    if len(heads) > 1 or not tables or len(heads) + len(tables) != len(members):
        return None
    head, table = heads[0] if heads else None, tables[0]
    if any(members[m].weight is not members[table].weight for m in [*heads, *tables]):
        return None  # (tied by a bias?)
    if len({members[m].padding_idx for m in tables}) != 1:
        return None
    live = [call for call in calls if call.edges]  # (one edge each: one output tensor)
    given = [(call.member, call.args[0], g) for call, g in zip(live, grads) if g is not None]
    lookups = [
        (x, g * embedding_scale(members[m], g) if kinds[m] is scaled_embedding else g)
        for m, x, g in given
        if m != head
    ]
    products = [(x, g) for m, x, g in given if m == head]
    bias = head is not None and f"{head}.bias" in names
    output_layer = None if head is None else members[head]
    sums = embedding_and_output_layer(members[table], output_layer, lookups, products, bias, budget)
    weight = next(name for name in names if name.endswith(".weight"))
    return {weight if name == "weight" else f"{head}.bias": s for name, s in sums.items()}


def embedding_and_output_layer(
    table: nn.Embedding,
    head: nn.Linear | None,
    lookups: list[tuple[Tensor, Tensor]],
    products: list[tuple[Tensor, Tensor]],
    bias: bool,
    budget: int,
) -> dict[str, Tensor]:
    r"""An embedding ``table`` whose weight :math:`W` ``(V, D)`` is also the weight of an output
    layer ``head`` (``tie_word_embeddings``; ``None``: of other embeddings alone, whose lookups
    are then the table's), from the calls of each: ``lookups``, indices ``(B, *S)`` and
    ``G^e: (K, B, *S, D)``; ``products``, inputs ``(B, *S', D)`` and ``G^h: (K, B, *S', V)``.
    Calls of a member are joined, positions side by side. The sums of ``"weight"``, and of the
    output layer's ``"bias"`` if ``bias``.

    Sample ``n``'s gradient of row ``r`` is :math:`E_{nkr} + A_{nkr}` with
    :math:`E_{nkr} = \sum_{s: i_{ns} = r} G^e_{nks}` (the embedding's) and
    :math:`A_{nkr} = \sum_{s'} G^h_{nks'r} x_{ns'}` (the output layer's), so the sum is the
    embedding's (:func:`.rules.embedding`) plus the output layer's (:class:`.rules.LinearSums`)
    plus the cross term

    .. math::

        2 \sum_{n,k} E_{nkr} \odot A_{nkr}
        = 2 \sum_{n,k} \sum_{s: i_{ns} = r} G^e_{nks} \odot a_{nks}, \qquad
        a_{nks} = \sum_{s'} G^h_{nks' i_{ns}} x_{ns'} ,

    the output layer's gradient at the rows the sample looks up only: ``G^h`` gathered at the
    sample's indices ``(K, B, S', S)`` times its inputs, a chunk of samples at a time (the
    ``padding_idx`` lookups add nothing). It costs :math:`K B S S' D` multiply-adds, against
    the output layer's :math:`K B V S' D`."""
    acc = acc_dtype(table)
    rows, dim = table.weight.shape
    x = _joined([x.reshape(x.shape[0], -1, dim) for x, _ in products], 1)  # (B, S', D)
    g_head = _joined([g.reshape(*g.shape[:2], -1, rows) for _, g in products], 2)
    indices = _joined([i.reshape(i.shape[0], -1) for i, _ in lookups], 1)  # (B, S)
    g_table = _joined([g.reshape(*g.shape[:2], -1, dim) for _, g in lookups], 2)
    names = ["weight", "bias"] if bias else ["weight"]
    owner = table if head is None else head  # (of the bias, if any)
    sums = {name: torch.zeros_like(getattr(owner, name), dtype=acc) for name in names}
    if head is not None and g_head is not None:
        sums = linear(head, x, g_head, names, budget)
    if g_table is None:
        return sums
    g_table = g_table.to(acc)
    if table.padding_idx is not None:
        g_table = g_table * (indices != table.padding_idx).unsqueeze(-1)
    sums["weight"] += embedding(table, indices, g_table, ["weight"], budget)["weight"]
    if g_head is None:
        return sums
    vectors, batch, after, before = *g_head.shape[:2], g_head.shape[2], indices.shape[1]
    per_sample = vectors * (after * before + before * dim) * torch.finfo(acc).bits // 8
    cross = torch.zeros_like(sums["weight"])
    x = x.to(acc)
    for chunk in sample_chunks(batch, per_sample, chunk_budget(budget, x.device)):
        index = indices[chunk]  # (b, S)
        shape = (vectors, index.shape[0], after, before)
        picked = g_head[:, chunk].gather(3, index[None, :, None, :].expand(shape)).to(acc)
        at_rows = picked.mT @ x[chunk]  # (K, b, S, D)
        terms = (g_table[:, chunk] * at_rows).sum(0)
        add_rows(cross, index.reshape(-1), terms.reshape(-1, dim))
    sums["weight"] += 2 * cross
    return sums


def _joined(parts: list[Tensor], dim: int) -> Tensor | None:
    """``parts`` side by side along ``dim`` (``None`` for none)."""
    if not parts:
        return None
    return parts[0] if len(parts) == 1 else torch.cat(parts, dim)
