r"""Rules of the convolutions: ``nn.Conv1d``/``2d``/``3d`` (the per-sample weight gradient
is a product of the output gradient with the input's patches) and ``nn.ConvTranspose1d``/``2d``
/``3d`` (the same product, taken phase by phase of the stride; see :func:`conv_transpose`), and
timm's: weight-standardised (:func:`standardized_conv`) and with TensorFlow's ``"SAME"`` padding
(:func:`tensorflow_same_pads`).
Registered in :data:`.rules.RULES` on import, with their rules for several calls of a layer
(:data:`.rules.SEVERAL_CALLS`)."""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Collection

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from . import base
from .rules import (
    acc_dtype,
    chunk_budget,
    per_sample_products,
    register,
    sample_chunks,
    square_sum,
    squared_products,
    sum_or_squeeze,
)


def _conv_padding(module: nn.Module) -> list[int]:
    """Explicit ``F.pad`` amounts (last dimension first) reproducing the module's padding,
    including ``padding="same"`` (the odd extra on the right, as PyTorch does)."""
    pads: list[int] = []
    for dim in reversed(range(len(module.kernel_size))):
        if module.padding == "same":
            total = module.dilation[dim] * (module.kernel_size[dim] - 1)
            pads += [total // 2, total - total // 2]
        elif module.padding == "valid":
            pads += [0, 0]
        else:
            pads += [module.padding[dim]] * 2
    return pads


def _patches(
    x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    r"""``(b, C, *S) -> (b, C * prod(kernel), L)``: the patches a convolution with these
    settings multiplies its weight with, on an input already padded, ``C`` before the kernel
    positions and the ``L`` output positions in row-major order (as ``F.unfold`` lays them
    out), for any number of spatial dimensions: for 1x1 kernels the strided input itself; for
    others the strided windows of the input (``Tensor.unfold`` views), copied once. On CPU that
    copy took 0.2-0.5 times as long as ``F.unfold`` for the reduced ResNet-18's layers (2
    threads, 32-128 samples)."""
    batch, channels = x.shape[:2]
    if all(k == 1 for k in kernel):
        return x[(..., *(slice(None, None, s) for s in stride))].reshape(batch, channels, -1)
    spatial = x.dim() - 2
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # (b, C, *L, *window)
    if any(d > 1 for d in dilation):
        x = x[(..., *(slice(None, None, d) for d in dilation))]
    order = (0, 1, *range(2 + spatial, 2 + 2 * spatial), *range(2, 2 + spatial))
    return x.permute(order).reshape(batch, channels * math.prod(kernel), -1)


def _patches_channels_last(
    x: Tensor, kernel: tuple[int, ...], dilation: tuple[int, ...], stride: tuple[int, ...]
) -> Tensor:
    r"""``(b, C, *S) -> (b, prod(kernel) * C, L)``: :func:`_patches` of a channels-last input
    (:func:`.base.channels_last`), the kernel positions before ``C`` (so the weight's sums
    come ``(C_out, *kernel, C_in)``), cut in the input's order: the result is the transpose of
    standard ``(b, L, prod(kernel) * C)`` storage, each position's patch one contiguous row
    made of runs of ``C`` numbers, which the products read as they lie. Cutting
    ``(b, C * prod(kernel), L)`` patches from such an input gathers single numbers: the
    reduced ResNet-18 in ``channels_last`` (exact, C=10, N=128, 2 threads) took 0.095 s
    cutting its patches so against 0.044 s in the standard order."""
    batch, spatial = x.shape[0], x.dim() - 2
    rows = x.movedim(1, -1)  # (b, *S, C), standard strides
    if all(k == 1 for k in kernel):
        rows = rows[(slice(None), *(slice(None, None, s) for s in stride))]
        return rows.reshape(batch, -1, x.shape[1]).mT
    for dim, (k, d, s) in enumerate(zip(kernel, dilation, stride)):
        rows = rows.unfold(1 + dim, d * (k - 1) + 1, s)  # (b, *L, C, *window)
    if any(d > 1 for d in dilation):
        rows = rows[(..., *(slice(None, None, d) for d in dilation))]
    order = (0, *range(1, 1 + spatial), *range(2 + spatial, 2 + 2 * spatial), 1 + spatial)
    return rows.permute(order).reshape(batch, math.prod(rows.shape[1 : 1 + spatial]), -1).mT


def conv_calls(
    module: nn.Module, xs: list[Tensor], grads: list[Tensor], names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r""":func:`conv` for several calls of the layer at once (inputs ``xs``, output gradients
    ``grads``): the per-sample gradient is a sum over the output positions of all the calls,
    so their patches and gradients are joined along the positions ``L`` (see
    :data:`SEVERAL_CALLS`); for a 3-d convolution and one vector, :func:`_grouped_products`
    instead."""
    acc = acc_dtype(module)
    pads = _conv_padding(module)
    xs = [x.to(acc) for x in xs]
    grouped = xs[0].dim() == 5 and grads[0].shape[0] == 1
    padding = [0] * len(module.kernel_size)  # (what is left to the convolution backward)
    if grouped and module.padding_mode == "zeros" and pads[::2] == pads[1::2]:
        padding = pads[::2][::-1]  # (no padded copy of x)
    elif any(pads):
        xs = _padded(module, xs, pads)
    # (the patches in the inputs' order: kernel positions before channels)
    channels_last = module.groups == 1 and all(base.channels_last(x) for x in xs)
    joined, patches_of = _factors(module, xs, grads, acc, channels_last)
    sums = {}
    if "weight" in names and grouped:
        sums["weight"] = _grouped_products(module, xs, grads, padding, acc, budget)
    elif "weight" in names:
        weight = squared_products(joined, patches_of, _patch_size(module), budget)
        if channels_last:  # (C_out, *kernel, C_in) -> (C_out, C_in, *kernel)
            weight = weight.reshape(module.out_channels, *module.kernel_size, -1)
            weight = weight.movedim(-1, 1).contiguous()
        sums["weight"] = weight.reshape(module.weight.shape)
    if "bias" in names:
        sums["bias"] = square_sum(sum_or_squeeze(joined, -1)).reshape(-1)
    return sums


def conv_factors(
    module: nn.Module, xs: list[Tensor], grads: list[Tensor], acc: torch.dtype
) -> tuple[Tensor, Callable[[slice], Tensor]]:
    r"""The factors of the per-sample weight gradients of a convolution over its calls (inputs
    ``xs``, output gradients ``grads``), in dtype ``acc``, for
    :func:`.rules.per_sample_products`: ``G`` as ``(K, B, g, C_out/g, L)``, the calls'
    positions side by side, and ``patches_of(chunk)``, the chunk's padded patches
    ``(b, g, P, L)``."""
    xs = [x.to(acc) for x in xs]
    pads = _conv_padding(module)
    return _factors(module, _padded(module, xs, pads) if any(pads) else xs, grads, acc)


def _padded(module: nn.Module, xs: list[Tensor], pads: list[int]) -> list[Tensor]:
    """``xs`` padded by ``pads`` (:func:`_conv_padding`) in the module's padding mode."""
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return [F.pad(x, pads, mode=mode) for x in xs]


def _patch_size(module: nn.Module) -> int:
    """``P = C_in/g * prod(kernel)``: the numbers in a patch of one group (read from the
    settings: a parametrized weight is made anew each time it is read)."""
    return module.in_channels // module.groups * math.prod(module.kernel_size)


def _factors(
    module: nn.Module,
    xs: list[Tensor],
    grads: list[Tensor],
    acc: torch.dtype,
    channels_last: bool = False,
) -> tuple[Tensor, Callable[[slice], Tensor]]:
    """:func:`conv_factors` of the calls' inputs ``xs``, padded already (or with the padding
    left to a grouped convolution backward: :func:`_grouped_products`); with
    ``channels_last``, the patches of :func:`_patches_channels_last`."""
    groups = module.groups
    num_vectors, batch = grads[0].shape[:2]
    joined = _joined(grads, num_vectors, batch, groups, module.out_channels // groups, acc)
    patch = _patch_size(module)
    settings = (module.kernel_size, module.dilation, module.stride)
    cut = _patches_channels_last if channels_last else _patches

    def patches_of(chunk: slice) -> Tensor:
        pieces = [cut(x[chunk], *settings) for x in xs]
        patches = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
        return patches.view(patches.shape[0], groups, patch, -1)  # (b, g, P, L)

    return joined, patches_of


def _grouped_products(
    module: nn.Module,
    xs: list[Tensor],
    grads: list[Tensor],
    padding: list[int],
    acc: torch.dtype,
    budget: int,
) -> Tensor:
    r"""The weight sums of a convolution from per-sample weight gradients that one grouped
    convolution backward forms (with zero ``padding`` per spatial dimension, the inputs padded
    otherwise), a chunk of samples at a time: with the ``b`` samples' inputs as ``b * C_in``
    channels and their ``K`` output gradients as ``b * K * C_out`` channels in ``b * g``
    groups, the weight gradient is :math:`D_{nk}`, ``(b * K * C_out, C_in/g, *kernel)``;
    several calls' gradients add up before the square.

    Used for 3-d convolutions with one vector (``empirical``, ``sample`` with one draw), where
    cutting 3-d patches is a slow copy: the layers of ``benchmarks.models.volume_cnn`` (N=64,
    2 CPU threads) took 35-37, 10-11 and 4.2-4.6 ms this way against 37-61, 34-37 and 8.6 ms
    by patches, and its `empirical` Fisher 121-123 against 194-206 ms. With K=9 they took
    71-74, 62-77 and 55-59 against 67-71, 54-55 and 20-21 ms, and for the reduced ResNet-18's
    2-d layers (K=9) patches were faster on all but the first stage."""
    num_vectors, batch = grads[0].shape[:2]
    per_sample = num_vectors * module.weight.numel() * acc.itemsize
    result = xs[0].new_zeros(module.weight.shape, dtype=acc)
    for chunk in sample_chunks(batch, per_sample, chunk_budget(budget, xs[0].device)):
        per_sample_grads = [
            _weight_grads(module, x[chunk], g[:, chunk], padding, acc) for x, g in zip(xs, grads)
        ]
        total = per_sample_grads[0] if len(per_sample_grads) == 1 else sum(per_sample_grads)
        squares = total.square_()  # (b, g, K, C_out/g, C_in/g * prod(kernel))
        result += squares.sum((0, 2)).reshape(module.weight.shape)
    return result


def _weight_grads(
    module: nn.Module, x: Tensor, grads: Tensor, padding: list[int], acc: torch.dtype
) -> Tensor:
    """One call's per-sample, per-vector weight gradients ``(b, g, K, C_out/g, C_in/g *
    prod(kernel))`` from its input ``(b, C_in, *S)`` (padded, or with zero ``padding`` left)
    and output gradients ``(K, b, C_out, *S')``, by one grouped convolution backward (see
    :func:`_grouped_products`)."""
    groups, out = module.groups, module.out_channels // module.groups
    num_vectors, batch = grads.shape[:2]
    grads = grads.transpose(0, 1).to(acc)  # (b, K, C_out, *S')
    grads = grads.reshape(batch, num_vectors, groups, out, *grads.shape[3:]).transpose(1, 2)
    spatial = len(module.kernel_size)
    weight = x.new_empty(1).expand(batch * groups * num_vectors * out, *module.weight.shape[1:])
    per_sample = torch.ops.aten.convolution_backward(
        grads.reshape(1, -1, *grads.shape[-spatial:]),
        x.reshape(1, -1, *x.shape[-spatial:]),
        weight,
        None,
        module.stride,
        padding,
        module.dilation,
        False,
        [0] * spatial,
        batch * groups,
        [False, True, False],
    )[1]
    # (a copy where the backward gives it channels-last: an input of one position whose strides
    # are channels-last's, as a channels-last pooling makes)
    return per_sample.reshape(batch, groups, num_vectors, out, -1)


def _joined(
    grads: list[Tensor], num_vectors: int, batch: int, groups: int, out: int, acc: torch.dtype
) -> Tensor:
    """The calls' output gradients ``(K, B, C_out, *S_t)`` as ``(K, B, g, C_out/g, L)``, their
    positions side by side (in ``(B, K, ...)`` storage, as the looped pull-back lays them out,
    when there are several)."""
    parts = [g.to(acc).reshape(num_vectors, batch, groups, out, -1) for g in grads]
    if len(parts) == 1:
        return parts[0]
    return torch.cat([part.transpose(0, 1) for part in parts], -1).transpose(0, 1)


@register(nn.Conv1d, nn.Conv2d, nn.Conv3d, several_calls=conv_calls)
def conv(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Convolutions ``(B, C_in, *spatial) -> (B, C_out, *spatial')`` (1 to 3 spatial
    dimensions) with any stride, padding (and padding mode), dilation and groups.

    With the padded input unfolded into patches :math:`U_n` of shape ``(g, P, L)``
    (``g`` groups, ``P = C_in/g * prod(kernel)``, ``L`` output positions, unfolded a chunk of
    samples at a time: :func:`_patches`) and ``G`` reshaped to ``(K, B, g, C_out/g, L)``, the
    per-sample weight gradient of group ``j`` is :math:`G_{nkj} U_{nj}^\top`
    (``(C_out/g, P)``; summed squares by :func:`squared_products`); the bias gradient is
    :math:`\sum_l G_{nkl}`.
    """
    return conv_calls(module, [x], [grads], names, budget)


def conv_transpose_calls(
    module: nn.Module, xs: list[Tensor], grads: list[Tensor], names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r""":func:`conv_transpose` for several calls of the layer at once: the calls' phase
    positions (and the input windows there) side by side."""
    acc = acc_dtype(module)
    groups = module.groups
    num_vectors, batch = grads[0].shape[:2]
    out = module.out_channels // groups
    sums = {}
    if "weight" in names:
        inputs = module.in_channels // groups
        weight = grads[0].new_zeros(groups, inputs, out, math.prod(module.kernel_size), dtype=acc)
        phases = _phases(module)
        offsets = [m for taps in phases.values() for _, m in taps]
        # (G as (B, K, ...): the looped pull-back's storage, the order the products read)
        calls = [
            _PhaseGrids(x.to(acc), g.transpose(0, 1).to(acc), module.stride, offsets)
            for x, g in zip(xs, grads)
        ]
        if base.launch_bound(xs[0].device) and _alike(phases, module.stride):
            _all_phases(calls, phases, weight, budget)
        else:
            _phase_by_phase(calls, phases, weight, budget)
        sums["weight"] = weight.reshape(module.weight.shape)
    if "bias" in names:
        joined = _joined(grads, num_vectors, batch, groups, out, acc)
        sums["bias"] = square_sum(sum_or_squeeze(joined, -1)).reshape(-1)
    return sums


def _phase_by_phase(
    calls: list[_PhaseGrids],
    phases: dict[tuple[int, ...], list[_Tap]],
    weight: Tensor,
    budget: int,
) -> None:
    """The weight sums of :func:`conv_transpose_calls` into ``weight`` ``(g, C_in/g, C_out/g,
    prod(kernel))``, one :func:`squared_products` call per phase."""
    groups, inputs, out = weight.shape[:3]
    batch, num_vectors = calls[0].split.shape[:2]
    for phase, taps in phases.items():
        parts = [c.grads(phase).reshape(batch, num_vectors, groups, out, -1) for c in calls]
        windows = [[c.window(m) for _, m in taps] for c in calls]
        joined = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
        patch = inputs * len(taps)
        sums_of_phase = squared_products(
            joined.transpose(0, 1), _stacked_windows(windows, groups, patch), patch, budget
        )  # (g, C_out/g, C_in/g * taps)
        sums_of_phase = sums_of_phase.view(groups, out, inputs, len(taps))
        weight[..., [tap for tap, _ in taps]] = sums_of_phase.transpose(1, 2)


def _alike(phases: dict[tuple[int, ...], list[_Tap]], stride: tuple[int, ...]) -> bool:
    """Whether every phase of the stride has taps, as many as each other (the kernel a
    multiple of the stride in each dimension, as a DCGAN's 4 with stride 2)."""
    return len(phases) == math.prod(stride) and len({len(t) for t in phases.values()}) == 1


def _all_phases(
    calls: list[_PhaseGrids],
    phases: dict[tuple[int, ...], list[_Tap]],
    weight: Tensor,
    budget: int,
) -> None:
    r"""The weight sums of :func:`conv_transpose_calls` for phases that are :func:`_alike`, on
    a launch-bound device: each phase's product taken as a group of its own (``g * s^dims``
    groups, the phases in the order of the output grid's split), so that one
    :func:`squared_products` call and one copy of the output gradients do what one per phase
    did. ``benchmarks.models.upsampling_cnn`` (N=128, C=10, counted on the CPU with a GPU's
    ways): 214 -> 116 computing operators for ``exact``, 168 -> 99 for ``empirical``; its
    time on a GPU is unmeasured. On the CPU the phases one at a time are faster (side by side,
    2 threads, medians of 11: ``exact`` 11.3-12.0x a forward+backward against 13.6-13.8x,
    ``empirical`` 2.5x against 3.4-3.5x). Into ``weight`` ``(g, C_in/g, C_out/g,
    prod(kernel))``."""
    groups, inputs, out = weight.shape[:3]
    order = sorted(phases)  # (the split's order: itertools.product of the strides)
    taps = len(phases[order[0]])
    parts = [c.all_grads(groups) for c in calls]  # (B, K, g * Φ, C_out/g, L)
    joined = parts[0] if len(parts) == 1 else torch.cat(parts, -1)
    windows = [[c.window(m) for phase in order for _, m in phases[phase]] for c in calls]

    def patches_of(chunk: slice) -> Tensor:  # (b, g * Φ, C_in/g * T, L)
        pieces = []
        for of_call in windows:
            stacked = torch.stack([w(chunk) for w in of_call], 2)  # (b, C_in, Φ T, *J)
            stacked = stacked.reshape(stacked.shape[0], groups, inputs, len(order), taps, -1)
            pieces.append(stacked.transpose(2, 3))
        patches = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
        return patches.reshape(patches.shape[0], groups * len(order), inputs * taps, -1)

    sums = squared_products(joined.transpose(0, 1), patches_of, inputs * taps, budget)
    sums = sums.view(groups, len(order), out, inputs, taps).permute(0, 3, 2, 1, 4)
    flat = [tap for phase in order for tap, _ in phases[phase]]
    weight[..., flat] = sums.reshape(groups, inputs, out, len(order) * taps)


def _stacked_windows(
    windows: list[list[Callable[[slice], Tensor]]], groups: int, patch: int
) -> Callable[[slice], Tensor]:
    """``patches_of`` for :func:`squared_products`: the taps' input windows ``(b, C_in, *J)``
    of each call (``windows``) stacked after the channels, the calls' positions side by side,
    as ``(b, g, patch, L)``."""

    def patches_of(chunk: slice) -> Tensor:
        pieces = [torch.stack([w(chunk) for w in calls], 2).flatten(3) for calls in windows]
        patches = pieces[0] if len(pieces) == 1 else torch.cat(pieces, -1)
        return patches.reshape(patches.shape[0], groups, patch, -1)

    return patches_of


#: A kernel tap of a transposed convolution: its flat index in the kernel and, per spatial
#: dimension, the offset ``m`` on the phase's grid (see :func:`conv_transpose`).
_Tap = tuple[int, tuple[int, ...]]


def _phases(module: nn.Module) -> dict[tuple[int, ...], list[_Tap]]:
    r"""The kernel taps of a transposed convolution by output phase: tap :math:`\kappa` (per
    dimension) writes output position :math:`t = s l + c` with :math:`c = \kappa d - p`, that
    is phase :math:`\phi = c \bmod s` at :math:`t = s(l + m) + \phi`, :math:`m = \lfloor c/s
    \rfloor`."""
    kernel, stride = module.kernel_size, module.stride
    phases: dict[tuple[int, ...], list[_Tap]] = {}
    for flat, tap in enumerate(itertools.product(*(range(k) for k in kernel))):
        offsets = [t * d - p for t, d, p in zip(tap, module.dilation, module.padding)]
        phase = tuple(c % s for c, s in zip(offsets, stride))
        phases.setdefault(phase, []).append((flat, tuple(c // s for c, s in zip(offsets, stride))))
    return phases


class _PhaseGrids:
    r"""One call of a transposed convolution (stride ``s``) on the grids of its output phases:
    the output gradients ``(B, K, C_out, *S')`` split as ``(B, K, C_out, J_1, s_1, ...)``
    (:math:`J = \lceil S'/s \rceil` positions, zero past ``S'``), so that :meth:`grads` of
    phase :math:`\phi` is :math:`G^\phi[j] = G[s j + \phi]`, a view; and the input zero-padded
    so that the :meth:`window` of every tap offset ``m`` in ``offsets`` is a slice of it."""

    def __init__(
        self, x: Tensor, grads: Tensor, stride: tuple[int, ...], offsets: list[tuple[int, ...]]
    ) -> None:
        spatial = len(stride)
        sizes = grads.shape[-spatial:]
        self.grid = [-(-n // s) for n, s in zip(sizes, stride)]
        extra = [j * s - n for j, s, n in zip(self.grid, stride, sizes)]
        if any(extra):
            grads = F.pad(grads, [n for e in reversed(extra) for n in (0, e)])
        split = tuple(n for j, s in zip(self.grid, stride) for n in (j, s))
        self.split = grads.reshape(grads.shape[:-spatial] + split)
        self.before = [max(0, *(m[a] for m in offsets)) for a in range(spatial)]
        after = [
            max(0, j - n - min(m[a] for m in offsets))
            for a, (j, n) in enumerate(zip(self.grid, x.shape[-spatial:]))
        ]
        pads = [n for a in reversed(range(spatial)) for n in (self.before[a], after[a])]
        self.padded = F.pad(x, pads)

    def grads(self, phase: tuple[int, ...]) -> Tensor:
        r""":math:`G^\phi` ``(B, K, C_out, *J)``."""
        return self.split[(..., *(i for p in phase for i in (slice(None), p)))]

    def all_grads(self, groups: int) -> Tensor:
        r"""Every phase's :math:`G^\phi` as a group of its own, ``(B, K, g * Φ, C_out/g,
        prod(J))`` (``Φ = prod(s)`` phases, in the order of ``itertools.product``; one copy)."""
        spatial = len(self.grid)
        batch, num_vectors, channels = self.split.shape[:3]
        split = self.split.reshape(
            batch, num_vectors, groups, channels // groups, *self.split.shape[3:]
        )
        grid_dims = [4 + 2 * a for a in range(spatial)]
        phase_dims = [5 + 2 * a for a in range(spatial)]
        joined = split.permute(0, 1, 2, *phase_dims, 3, *grid_dims)
        phases = math.prod(self.split.shape[4 + 2 * a] for a in range(spatial))
        return joined.reshape(batch, num_vectors, groups * phases, channels // groups, -1)

    def window(self, m: tuple[int, ...]) -> Callable[[slice], Tensor]:
        """A function of a chunk of samples giving :math:`x[j - m]` for :math:`j < J` (zero
        outside ``x``), ``(b, C_in, *J)``."""
        where = tuple(slice(b - o, b - o + j) for b, o, j in zip(self.before, m, self.grid))
        return lambda chunk: self.padded[(chunk, slice(None), *where)]


@register(
    nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d, several_calls=conv_transpose_calls
)
def conv_transpose(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""Transposed convolutions ``(B, C_in, *spatial) -> (B, C_out, *spatial')`` (1 to 3
    spatial dimensions) with any stride, padding, output padding, dilation and groups; the
    weight is ``(C_in, C_out/g, *kernel)``.

    Per spatial dimension (stride ``s``, dilation ``d``, padding ``p``), tap :math:`\kappa` of
    the kernel carries input position ``l`` to output position :math:`t = s l + \kappa d - p
    = s (l + m_\kappa) + \phi_\kappa` (:func:`_phases`), so the per-sample weight gradient is

    .. math::

        \frac{\partial \langle G_{nk}, y_n\rangle}{\partial W[i, o, \kappa]}
        = \sum_l x_n[i, l]\, G_{nk}[o, s (l + m_\kappa) + \phi_\kappa]
        = \sum_j G^{\phi_\kappa}_{nk}[o, j]\, x_n[i, j - m_\kappa],

    with :math:`G^\phi[o, j] = G[o, s j + \phi]` the output gradient on the grid of phase
    :math:`\phi` (``J = ceil(S'/s)`` positions, zero past the output) and ``x`` zero outside
    its positions. For the taps of one phase (``T`` of them), that is a convolution's
    per-sample product: :math:`G^\phi_{nkj}` ``(C_out/g, J)`` times the input windows
    :math:`x_n[\cdot, j - m_\kappa]` of its taps ``(C_in/g * T, J)``, which do not depend on
    the vector (:func:`squared_products`, one call per phase; ``s^dims`` phases at most; on a
    launch-bound device one call for all of them where they have as many taps each,
    :func:`_all_phases`). So
    only the input is cut into patches, as many numbers per sample as a convolution's patches
    with this kernel, while cutting each vector's output gradient into the patches of the
    adjoint convolution would take ``prod(kernel) / prod(s)`` times ``G`` per vector (1.8
    times the time, on ``benchmarks.models.upsampling_cnn``). The bias gradient is
    :math:`\sum_t G_{nkt}`.
    """
    return conv_transpose_calls(module, [x], [grads], names, budget)


def _standardized(module: nn.Module) -> tuple[Tensor, Tensor, Tensor]:
    r"""``(u, s, a)``: each output channel's weight row ``w_o`` (``(C_out, P)``) standardised,
    :math:`u_o = (w_o - \bar w_o) / s_o` with :math:`s_o = \sqrt{\operatorname{var}(w_o) +
    \varepsilon}` (biased variance, as ``F.batch_norm`` takes it), and the scale :math:`a_o`
    the layer multiplies :math:`u_o` by (``gain * scale`` for ``ScaledStdConv2d``, 1 for
    ``StdConv2d``), in the accumulation dtype."""
    acc = acc_dtype(module)
    w = module.weight.detach().to(acc).reshape(module.out_channels, -1)
    s = (w.var(-1, unbiased=False, keepdim=True) + module.eps).sqrt()
    u = (w - w.mean(-1, keepdim=True)) / s
    gain = getattr(module, "gain", None)
    a = torch.ones_like(s) if gain is None else gain.detach().to(acc).reshape(-1, 1) * module.scale
    return u, s, a


def _is_standardized_conv(module: nn.Module) -> bool:
    """Whether timm's ``StdConv2d``/``ScaledStdConv2d`` computes what :func:`standardized_conv`
    assumes: zero padding (its ``forward`` passes ``padding`` to ``F.conv2d`` itself, so another
    ``padding_mode`` would be ignored, not applied as ``nn.Conv2d`` does) and a float ``eps``
    (and ``scale``)."""
    numbers = [getattr(module, "eps", None)]
    if hasattr(module, "gain"):
        numbers.append(getattr(module, "scale", None))
    return module.padding_mode == "zeros" and all(isinstance(n, float) for n in numbers)


@register(
    "timm.layers.std_conv.StdConv2d",
    "timm.layers.std_conv.ScaledStdConv2d",
    accepts=_is_standardized_conv,
    params=("weight", "bias", "gain"),
)
def standardized_conv(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    r"""timm's convolutions with weight standardisation (BiT's ``StdConv2d``, the NF-Nets'
    ``ScaledStdConv2d``): the convolution of :func:`conv` with the weight
    :math:`\hat w_o = a_o u_o` (:func:`_standardized`; :math:`a_o = \text{gain}_o \cdot
    \text{scale}` or 1) in place of :math:`w_o`.

    With :math:`D_{nko}` the per-sample gradient of output channel ``o``'s row of
    :math:`\hat w` (``(P,)``, :math:`G_{nk} U_n^\top` as in :func:`conv`, formed a chunk of
    samples at a time: the standardisation's Jacobian needs it, not only its square), the
    chain rule through the standardisation (the batch-norm backward over the row's ``P``
    entries) gives

    .. math::

        \frac{\partial}{\partial w_o} = \frac{a_o}{s_o}\Big(D - \overline{D}
        - u_o\, \overline{D \odot u_o}\Big), \qquad
        \frac{\partial}{\partial \text{gain}_o} = \text{scale} \sum_p D_p\, u_{op},

    (bars: means over the ``P`` entries) and the bias gradient is :math:`\sum_l G_{nkl}`.
    """
    acc = acc_dtype(module)
    pads = _conv_padding(module)
    x = F.pad(x.to(acc), pads) if any(pads) else x.to(acc)
    groups, out = module.groups, module.out_channels // module.groups
    num_vectors, batch = grads.shape[:2]
    joined = _joined([grads], num_vectors, batch, groups, out, acc)  # (K, B, g, O/g, L)
    patch = module.weight[0].numel()
    u, s, a = _standardized(module)
    sums = {name: torch.zeros_like(p, dtype=acc) for name, p in module.named_parameters()}
    per_sample = num_vectors * module.out_channels * patch * 4 * acc.itemsize
    for chunk in sample_chunks(batch, per_sample, chunk_budget(budget, x.device)):
        patches = _patches(x[chunk], module.kernel_size, module.dilation, module.stride)
        d = per_sample_products(joined, patches, chunk)  # (b, g, K, O/g, P)
        d = d.transpose(1, 2).reshape(d.shape[0], num_vectors, module.out_channels, patch)
        projected = (d * u).mean(-1, keepdim=True)  # (b, K, C_out, 1)
        if "gain" in names:
            gain = projected.squeeze(-1) * (patch * module.scale)  # (b, K, C_out)
            sums["gain"] += gain.square_().sum((0, 1)).view(sums["gain"].shape)
        if "weight" in names:
            dw = (d - d.mean(-1, keepdim=True) - u * projected).mul_(a / s)
            sums["weight"] += dw.square_().sum((0, 1)).view(sums["weight"].shape)
    if "bias" in names:
        sums["bias"] = square_sum(sum_or_squeeze(joined, -1)).reshape(-1)
    return {name: sums[name] for name in names}


def tensorflow_same_pads(x: Tensor, module: nn.Module) -> list[int]:
    r"""``F.pad`` amounts (last dimension first) of TensorFlow's ``"SAME"`` padding of ``x``
    ``(B, C, *spatial)`` for the module's kernel, stride and dilation, which timm's ``*Same``
    convolutions apply in their ``forward``: per spatial dimension of size ``i`` (kernel ``k``,
    stride ``s``, dilation ``d``), :math:`\max((\lceil i/s \rceil - 1) s + (k - 1) d + 1 - i,
    0)` zeros in all, the smaller half before. (``padding="same"`` of PyTorch pads
    :math:`(k - 1) d` whatever ``i`` and ``s``, and takes stride 1 only.)"""
    pads: list[int] = []
    sizes = x.shape[2:]
    for dim in reversed(range(len(module.kernel_size))):
        size, stride = sizes[dim], module.stride[dim]
        reach = (module.kernel_size[dim] - 1) * module.dilation[dim] + 1
        total = max((-(-size // stride) - 1) * stride + reach - size, 0)
        pads += [total // 2, total - total // 2]
    return pads


def _pads_with_zeros(module: nn.Module) -> bool:
    """Whether a timm ``*Same`` convolution pads as its rule takes it: only zeros, by its
    ``forward`` (it passes ``padding`` to ``F.conv2d`` itself, so another ``padding_mode``
    would be ignored, not applied as ``nn.Conv2d`` does) and by its ``padding`` (0 where it
    pads dynamically)."""
    return module.padding_mode == "zeros" and not isinstance(module.padding, str)


@register("timm.layers.conv2d_same.Conv2dSame", accepts=_pads_with_zeros)
def conv_tensorflow_same(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    """timm's ``Conv2dSame`` (the TensorFlow ports of EfficientNet and MobileNet): :func:`conv`
    on ``x`` padded as :func:`tensorflow_same_pads` says (its ``padding`` is 0)."""
    return conv(module, F.pad(x, tensorflow_same_pads(x, module)), grads, names, budget)


@register(
    "timm.layers.std_conv.StdConv2dSame",
    "timm.layers.std_conv.ScaledStdConv2dSame",
    accepts=lambda module: (
        _pads_with_zeros(module)
        and _is_standardized_conv(module)
        and isinstance(getattr(module, "same_pad", None), bool)
    ),
    params=("weight", "bias", "gain"),
)
def standardized_conv_tensorflow_same(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    """timm's ``StdConv2dSame`` and ``ScaledStdConv2dSame`` (the hybrid ViTs' stems):
    :func:`standardized_conv` on ``x`` padded as :func:`tensorflow_same_pads` says where the
    layer pads dynamically (its ``same_pad``; else its ``padding`` is the static one)."""
    if module.same_pad:
        x = F.pad(x, tensorflow_same_pads(x, module))
    return standardized_conv(module, x, grads, names, budget)


def _pads_as_tensorflow(module: nn.Module) -> bool:
    """Whether Hugging Face BiT's ``WeightStandardizedConv2d`` computes what
    :func:`bit_standardized_conv` assumes: :func:`_is_standardized_conv`, and no ``pad`` or a
    ``DynamicPad2d`` of zeros for the layer's own kernel, stride and dilation."""
    pad = getattr(module, "pad", False)
    return _is_standardized_conv(module) and (
        pad is None
        or (
            type(pad).__name__ == "DynamicPad2d"
            and pad.value == 0
            and (tuple(pad.kernel_size), tuple(pad.stride), tuple(pad.dilation))
            == (module.kernel_size, module.stride, module.dilation)
        )
    )


@register(
    "transformers.models.bit.modeling_bit.WeightStandardizedConv2d",
    accepts=_pads_as_tensorflow,
    params=("weight", "bias"),
)
def bit_standardized_conv(
    module: nn.Module, x: Tensor, grads: Tensor, names: Collection[str], budget: int
) -> dict[str, Tensor]:
    """Hugging Face BiT's ``WeightStandardizedConv2d`` (BiT, the DPT and ViT hybrids' stems):
    :func:`standardized_conv` on ``x`` padded by its ``DynamicPad2d``, TensorFlow's ``"SAME"``
    (:func:`tensorflow_same_pads`), where it has one."""
    if module.pad is not None:
        x = F.pad(x, tensorflow_same_pads(x, module))
    return standardized_conv(module, x, grads, names, budget)
