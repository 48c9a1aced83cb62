r"""Rules for a normalisation followed by an activation in one module: timm's
``BatchNormAct2d``, ``GroupNormAct``, ``GroupNorm1Act``, ``LayerNormAct`` and
``LayerNormAct2d`` (timm's EfficientNets, MobileNetV3, RegNets, ResNetV2 and hybrids), and
Hugging Face BiT's ``BitGroupNormActivation``, matched by qualified name (neither library is
imported).

Such a module computes :math:`y = \mathrm{act}(\mathrm{drop}(\hat x \odot w + b))` with its own
``act`` and ``drop`` modules (BiT's: ``activation`` alone; without parameters: a module with a
parametrised activation, ``PReLU``, has no rule). The gradient at :math:`y` is not the one the
normalisation's rule needs; so while the engine records, the module runs in pieces
(:func:`norm_then_act`): the normalisation, kept as the piece ``"normalized"`` to which the
vectors are pulled back, then ``drop`` and ``act`` on it (the output itself is not pulled back
to: :data:`.rules.PIECES_ONLY`).
The rule is then the plain normalisation's on ``G`` at that piece:
:math:`\partial_w = \sum G \odot \hat x`, :math:`\partial_b = \sum G` over the dimensions the
affine parameters are broadcast over (:func:`.rules.affine_sums`)."""

from __future__ import annotations

from collections.abc import Callable, Collection
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from .rules import (
    Reduction,
    affine_sums,
    batch_norm_parts,
    group_norm_parts,
    layer_norm_parts,
    normalized_dims,
    qualified_name,
    register,
)


def _batch_norm(module: nn.Module, x: Tensor) -> Tensor:
    # (eval mode with running statistics: the engine rejects batch statistics in a batch norm)
    return F.batch_norm(
        x, module.running_mean, module.running_var, module.weight, module.bias, eps=module.eps
    )


def _group_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.group_norm(x, module.num_groups, module.weight, module.bias, module.eps)


def _layer_norm(module: nn.Module, x: Tensor) -> Tensor:
    return F.layer_norm(x, module.normalized_shape, module.weight, module.bias, module.eps)


def _timm_act(module: nn.Module, normalized: Tensor) -> Tensor:
    return module.act(module.drop(normalized))


def _bit_act(module: nn.Module, normalized: Tensor) -> Tensor:
    return module.activation(normalized)


_Piece = Callable[[nn.Module, Tensor], Tensor]
_Norm = tuple[_Piece, Reduction, bool, bool, _Piece]

#: By qualified name: the normalisation, the reduction of its rule, whether the affine
#: parameters span its trailing normalised dimensions (else one per channel, dimension 1),
#: whether it normalises the channels of ``(B, C, *spatial)`` moved last (``LayerNormAct2d``:
#: the normalisation and its rule see ``x`` channels last, and the kept piece is that, not a
#: view, which the activation may modify in place), and what follows the normalisation.
_NORMS: dict[str, _Norm] = {
    "timm.layers.norm_act.BatchNormAct2d": (_batch_norm, batch_norm_parts, False, False, _timm_act),
    "timm.layers.norm_act.GroupNormAct": (_group_norm, group_norm_parts, False, False, _timm_act),
    "timm.layers.norm_act.GroupNorm1Act": (_group_norm, group_norm_parts, False, False, _timm_act),
    "timm.layers.norm_act.LayerNormAct": (_layer_norm, layer_norm_parts, True, False, _timm_act),
    "timm.layers.norm_act.LayerNormAct2d": (_layer_norm, layer_norm_parts, True, True, _timm_act),
    "transformers.models.bit.modeling_bit.BitGroupNormActivation": (
        _group_norm, group_norm_parts, False, False, _bit_act
    ),
}  # fmt: skip


def _norm_of(module: nn.Module) -> _Norm:
    return _NORMS[qualified_name(module)]


def norm_then_act(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    keep: Callable[[str, Tensor, bool], Tensor],
) -> Any:
    """``module(x)`` in pieces: the normalisation, kept as ``"normalized"`` (pulled back to),
    then what follows it (the module's ``drop`` and ``act``; BiT's ``activation``);
    ``NotImplemented`` for any other call."""
    if kwargs or len(args) != 1 or not isinstance(args[0], Tensor):
        return NotImplemented
    norm, _, _, channels_last, after = _norm_of(module)
    x = args[0].movedim(1, -1) if channels_last else args[0]
    normalized = keep("normalized", norm(module, x), True)
    return after(module, normalized.movedim(-1, 1) if channels_last else normalized)


@register(*_NORMS, whole_call=True, forward=norm_then_act, pieces_only=True)
def norm_act(
    module: nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    grads: dict[int | str, Tensor],
    kept: dict[str, Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    """The normalisation's sums from ``G`` at the kept ``"normalized"`` piece (see the module
    docstring); a call the recorded forward did not take is declined (the per-module
    fallback)."""
    if "normalized" not in grads:
        return None
    _, parts, trailing, channels_last, _ = _norm_of(module)
    x = args[0].movedim(1, -1) if channels_last else args[0]
    reduced = parts(module, x, names)(grads["normalized"])  # (K, B, n, *D)
    return affine_sums(reduced, x, names, normalized_dims(module) if trailing else 1)
