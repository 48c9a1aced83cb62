r"""Data-parallel Fisher: every rank holds a shard of the data, all ranks get the Fisher of the
union.

Every estimator is a ratio of sums over the data, so with shards :math:`D_1, \dots, D_R`

.. math::

    \hat F = \frac{\sum_r S_r}{\sum_r N_r}, \qquad
    S_r = \sum_{n \in D_r} \sum_k (J_n^\top v_{nk})^{\odot 2}

(for ``batched``, :math:`S_r` sums squared batch gradients and :math:`N_r` counts batches).
:func:`reduce_shards` all-reduces the :math:`S_r` and :math:`N_r`, so every rank returns what one
process would compute on the union of the shards (up to floating-point summation order).

Switch: ``process_group=None`` with ``distributed=True`` (the defaults) uses the default group
when ``torch.distributed`` is initialised and is a plain single-process computation otherwise; a
``ProcessGroup`` restricts the reduction to that group; ``distributed=False`` computes on this
rank's data alone even when a group is initialised.
"""

from __future__ import annotations

import hashlib
import sys

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["process_group_for", "reduce_shards", "shard_generator", "unwrap_model"]

_WRAPPERS: tuple[type[nn.Module], ...] = (nn.DataParallel, nn.parallel.DistributedDataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module inside ``DistributedDataParallel``/``DataParallel`` and ``torch.compile``
    wrappers, in any nesting (else ``model``), so that parameter names carry no ``module.`` or
    ``_orig_mod.`` prefix and match the unwrapped model."""
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
        elif isinstance(model, _compiled_module_type()):
            model = model._orig_mod
        else:
            return model


def _compiled_module_type() -> type | tuple[()]:
    """The class of ``torch.compile(module)``'s wrappers, or ``()`` when none can exist yet
    (``torch._dynamo`` not imported: importing it here would cost every user a second)."""
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return getattr(eval_frame, "OptimizedModule", ())


def process_group_for(
    process_group: dist.ProcessGroup | None, distributed: bool
) -> dist.ProcessGroup | None:
    """The group to reduce over, or ``None`` for a single-process computation (see the module
    docstring for the rules).

    Raises:
        ValueError: ``process_group`` given with ``distributed=False``, or given while
            ``torch.distributed`` is not initialised.
    """
    if not isinstance(distributed, bool):
        raise ValueError(f"distributed must be True or False, got {distributed!r}")
    initialised = dist.is_available() and dist.is_initialized()
    if process_group is not None:
        if not distributed:
            raise ValueError(
                "process_group was given with distributed=False; pass one or the other"
            )
        if not initialised:
            raise ValueError("process_group was given but torch.distributed is not initialised")
        return process_group
    return dist.group.WORLD if distributed and initialised else None


def shard_generator(generator: torch.Generator, rank: int) -> torch.Generator:
    """The label-sampling stream of the shard on ``rank`` for ``method="sample"``.

    Drawing from the same seeded ``generator`` on every rank would give every shard the same
    uniforms, so the shards' draws would be correlated. Instead one 63-bit seed is drawn from
    ``generator`` (advancing it alike on every rank) and hashed with the rank in the process
    group to seed a fresh generator on the same device: shards draw independent, reproducible
    labels. The union's estimate is the single-process one with each shard's labels drawn from
    its shard's stream; one process reproduces it by summing, over ranks ``r``, ``N_r`` times the
    Fisher of shard ``r`` computed with ``shard_generator(<same seed>, r)``.
    """
    seed = int(torch.randint(2**63 - 1, (), generator=generator, device=generator.device))
    digest = hashlib.blake2b(f"{seed}:{rank}".encode(), digest_size=8).digest()
    derived = torch.Generator(device=generator.device)
    derived.manual_seed(int.from_bytes(digest, "little") & (2**63 - 1))
    return derived


def reduce_shards(
    sums: dict[str, Tensor],
    count: int,
    group: dist.ProcessGroup,
    device: torch.device,
    error: Exception | None = None,
) -> int:
    """All-reduce (sum) ``sums`` in place across ``group`` and return the total ``count``.

    ``error`` is this rank's failure, if any. The first collective carries the counts together
    with a failure flag, so that when any rank failed, every rank raises instead of waiting
    forever in a collective the failed rank never joins: the failed rank re-raises its error,
    the others raise ``RuntimeError``.
    """
    header = torch.tensor([count, int(error is not None)], dtype=torch.int64, device=device)
    dist.all_reduce(header, group=group)
    total, failures = (int(v) for v in header.tolist())
    if error is not None:
        raise error
    if failures:
        raise RuntimeError(
            f"the Fisher computation failed on {failures} other rank(s) of the process group; "
            "see their errors"
        )
    groups: dict[tuple[torch.dtype, torch.device], list[Tensor]] = {}
    for s in sums.values():
        groups.setdefault((s.dtype, s.device), []).append(s)
    for tensors in groups.values():  # one collective per dtype and device, not per parameter
        flat = torch.cat([t.reshape(-1) for t in tensors])
        dist.all_reduce(flat, group=group)
        for t, reduced in zip(tensors, flat.split([t.numel() for t in tensors])):
            t.copy_(reduced.view_as(t))
    return total
