r"""Layers whose weight or bias is made from other parameters: by ``torch.nn.utils.parametrize``
(``parametrizations.weight_norm``, ``spectral_norm``, ``orthogonal``, or a parametrization of
one's own) or by the older ``torch.nn.utils.weight_norm`` (a forward pre-hook), or pruned by
``torch.nn.utils.prune`` and called more than once (called once, its class's rule takes it:
:func:`.rules.pruned_rule`), on a layer whose class computes the per-sample gradients of its
tensors as a product
(:data:`PER_SAMPLE`: ``nn.Linear``, ``nn.Conv1d``/``2d``/``3d``).

Such a layer computes what its class computes, with a tensor :math:`t = P(o_1, \dots, o_m)`
made from the parameters :math:`o_j` (``parametrizations.weight.original0``, ...,
``weight_g`` and ``weight_v``). Each sample's gradient of :math:`o_j` is the pull-back through
:math:`P` of that sample's gradient of :math:`t`,

.. math::

    \partial_{o_j} = \big(\partial t / \partial o_j\big)^\top D_{nk}, \qquad
    D_{nk} = \big(\partial y_n / \partial t\big)^\top G_{nk},

and the sums are :math:`\sum_{n,k} \partial_{o_j}^{\odot 2}`. Unlike a pruning mask, whose
Jacobian is diagonal so that the squares of :math:`D` suffice
(:func:`.rules.pruned_rule`), :math:`P` mixes the entries of :math:`t` (``weight_norm``
divides each row by its norm), so :math:`D` is formed: a chunk of samples at a time, by the
class's product of output gradients and inputs (:func:`.rules.per_sample_products`), then
pulled back through :math:`P` by ``torch.func.vjp``, vmapped over the chunk's samples and
vectors. The hooks engine takes this way where the layer's calls ended in no recorded product
(a convolution with ``padding_mode="reflect"`` pads its input first; rows folded into the
batch dimension); where they did, it pulls each call's product back through the graph that
made its weight (:mod:`.functional`), which sees the parametrization as it was in that call.
A parametrization ``vmap`` cannot run goes, with its layer, to the per-module fallback
(remembered: :data:`unvmappable`).

With every convolution and linear layer of the reduced ResNet-18 under ``weight_norm`` (C=10,
N=32, one thread), ``exact`` takes 8.1 times a forward+backward, against 11.7 on the functorch
engine; before, on per-sample copies of the layers' parameters and a looped pull-back, it
took 33.1 (``benchmarks/results/hooked_speed.md``).
"""

from __future__ import annotations

import logging
import weakref
from collections.abc import Callable, Collection
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.nn.utils import parametrize, prune
from torch.nn.utils.weight_norm import WeightNorm

from .base import accumulation_dtype
from .convolution import conv, conv_factors
from .rules import (
    CONSTRUCTION_ONLY,
    Rule,
    added,
    chunk_budget,
    class_entry,
    global_forward_hooks,
    linear,
    per_sample_products,
    sample_chunks,
)

logger = logging.getLogger("ewc_reg.fallback")

#: ``factors(module, xs, grads, acc) -> (G, patches_of)``: a layer's per-sample gradients of
#: its weight over its calls (inputs ``xs``, output gradients ``grads``) as factors for
#: :func:`.rules.per_sample_products`, in the accumulation dtype ``acc``: ``G`` of shape
#: ``(K, B, g, O, L)`` and ``patches_of(chunk)`` of shape ``(b, g, P, L)``, for a weight of
#: ``g O P`` numbers; the bias gradient is ``G`` summed over its ``L`` positions.
Factors = Callable[
    [nn.Module, list[Tensor], list[Tensor], torch.dtype],
    tuple[Tensor, Callable[[slice], Tensor]],
]


def linear_factors(
    module: nn.Module, xs: list[Tensor], grads: list[Tensor], acc: torch.dtype
) -> tuple[Tensor, Callable[[slice], Tensor]]:
    r""":data:`Factors` of :math:`y = x W^\top + b` on inputs ``(B, *S, in)``: its positions
    ``S`` (of all its calls, side by side) are ``L``, ``g = 1``, ``P = in``."""
    rows = [x.to(acc).reshape(x.shape[0], -1, x.shape[-1]) for x in xs]  # (B, S, in)
    patches = torch.cat(rows, 1).transpose(1, 2).unsqueeze(1)  # (B, 1, in, L)
    columns = [g.to(acc).reshape(*g.shape[:2], -1, g.shape[-1]) for g in grads]  # (K, B, S, out)
    joined = torch.cat(columns, 2).transpose(2, 3).unsqueeze(2)  # (K, B, 1, out, L)
    return joined, lambda chunk: patches[chunk]


#: The layers' :data:`Factors`, by their class's rule (so a class matched to that rule by name,
#: timm's ``Linear``, or a subclass that only changes how it is made, has them too).
PER_SAMPLE: dict[Rule, Factors] = {linear: linear_factors, conv: conv_factors}

#: Layers on which ``vmap`` failed to pull a parametrization back: they go to the per-module
#: fallback from then on.
unvmappable: weakref.WeakSet[nn.Module] = weakref.WeakSet()


@dataclass(frozen=True)
class Made:
    """A tensor of a layer, ``name`` (``"weight"``), that ``make(*params.values())`` makes from
    the parameters ``params`` (named relative to the layer)."""

    name: str
    params: dict[str, Tensor]
    make: Callable[..., Tensor]


def made_tensors(module: nn.Module) -> tuple[Rule, list[Made]] | None:
    """The rule of the class of a layer whose weight or bias is made from other parameters
    (see the module docstring), a rule with :data:`Factors`, and how the tensors are made.
    ``None`` for any other module, and for one with other hooks, a ``forward`` of its own, a
    class whose rule has no factors or declines its settings, or parameters its class does
    not know that make none of its tensors."""
    cls = type(module)
    made: list[Made] = []
    if parametrize.is_parametrized(module):
        own = set(vars(cls)) - CONSTRUCTION_ONLY - {"__getstate__", "__deepcopy__"}
        if len(cls.__bases__) != 1 or own != set(module.parametrizations):
            return None  # (not the class parametrize made, or a subclass of it)
        cls = cls.__bases__[0]
        for name, chain in module.parametrizations.items():
            inner = dict(chain.named_parameters())
            params = {f"parametrizations.{name}.{n}": p for n, p in inner.items()}
            made.append(Made(name, params, _parametrization(chain, list(inner))))
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, WeightNorm):
            params = {f"{hook.name}_g": getattr(module, f"{hook.name}_g")}
            params[f"{hook.name}_v"] = getattr(module, f"{hook.name}_v")
            made.append(Made(hook.name, params, _old_weight_norm(hook.dim)))
        elif isinstance(hook, prune.BasePruningMethod):  # (rules.pruned_rule takes one call)
            name = hook._tensor_name
            params = {f"{name}_orig": getattr(module, f"{name}_orig")}
            made.append(Made(name, params, _masked(getattr(module, f"{name}_mask"))))
        else:
            return None
    if not made or module._forward_hooks or global_forward_hooks() or "forward" in vars(module):
        return None
    entry = class_entry(cls)
    if entry is None or entry[0] not in PER_SAMPLE or not entry[1](module):
        return None
    making = {name for m in made for name in m.params}
    plain = {name for name, _ in module.named_parameters()} - making
    if {m.name for m in made} - {"weight", "bias"} or plain - {"weight", "bias"}:
        return None
    return entry[0], made


def _parametrization(chain: nn.Module, names: list[str]) -> Callable[..., Tensor]:
    """The tensor a ``torch.nn.utils.parametrize`` chain makes, as a function of its
    parameters ``names`` (its buffers as they are: a ``spectral_norm``'s vectors)."""
    return lambda *values: functional_call(chain, dict(zip(names, values)), ())


def _masked(mask: Tensor) -> Callable[[Tensor], Tensor]:
    r"""``torch.nn.utils.prune``'s :math:`t = t_{orig} \odot m`."""
    return lambda original: original * mask


def _old_weight_norm(dim: int) -> Callable[[Tensor, Tensor], Tensor]:
    r"""``torch.nn.utils.weight_norm``'s :math:`w = g\, v / \lVert v \rVert`, norms over all
    dimensions but ``dim`` (``-1``: over all of them), as its hook computes it."""
    return lambda g, v: torch._weight_norm(v, g, dim)


def made_sums(
    module: nn.Module,
    rule: Rule,
    made: list[Made],
    xs: list[Tensor],
    grads: list[Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor] | None:
    r"""The sums of the layer's parameters ``names`` from its calls' inputs ``xs`` and output
    gradients ``grads`` (see the module docstring), or ``None`` where ``vmap`` failed on a
    parametrization (:func:`unless_vmap_fails`)."""
    factors = PER_SAMPLE[rule]
    return unless_vmap_fails(
        module, lambda: _made_sums(module, factors, made, xs, grads, names, budget)
    )


def unless_vmap_fails(
    module: nn.Module, sums: Callable[[], dict[str, Tensor] | None]
) -> dict[str, Tensor] | None:
    """``sums()``, or ``None`` where ``vmap`` failed on pulling back through what made the
    layer's tensors, now (logged at info level) or before (the layer is remembered in
    :data:`unvmappable`)."""
    if module in unvmappable:
        return None
    try:
        return sums()
    except (RuntimeError, NotImplementedError) as error:
        if isinstance(error, torch.OutOfMemoryError):
            raise
        logger.info(
            "hooks engine: vmap failed on what makes the tensors of %s (%s: %s); it goes to "
            "the per-module fallback",
            type(module).__name__,
            type(error).__name__,
            error,
        )
        unvmappable.add(module)
        return None


def _made_sums(
    module: nn.Module,
    factors: Factors,
    made: list[Made],
    xs: list[Tensor],
    grads: list[Tensor],
    names: Collection[str],
    budget: int,
) -> dict[str, Tensor]:
    acc = accumulation_dtype(next(iter(made[0].params.values())).dtype)
    needed = [m for m in made if any(name in names for name in m.params)]
    pulls, shapes = {}, {}
    for m in needed:
        values = [p.detach().to(acc) for p in m.params.values()]
        tensor, pulls[m.name] = vjp(m.make, *values)
        shapes[m.name] = tensor.shape
    plain = {"weight", "bias"} & set(names)  # (a plain one beside a made one)
    for name in plain:
        shapes[name] = getattr(module, name).shape

    def pull(products: list[dict[str, Tensor]]) -> dict[str, Tensor]:
        (found,) = products  # (the calls' products joined: one group)
        grads = {name: found[name] for name in plain}
        for m in needed:
            grads.update(zip(m.params, vmap(pulls[m.name])(found[m.name])))
        return {name: g for name, g in grads.items() if name in names}

    return product_sums([factors(module, xs, grads, acc)], shapes, pull, budget)


#: ``pull(D) -> {name: gradients}``: each sample's gradients of a layer's parameters from each
#: sample's gradients of the tensors of its products, ``D``, one dict per group of factors
#: (:func:`product_sums`), ``{"weight": (n, *W.shape), "bias": (n, out)}`` (those asked for)
#: for ``n`` pairs of a sample and a vector; by parameter name, ``(n, *p.shape)`` each.
Pull = Callable[[list[dict[str, Tensor]]], dict[str, Tensor]]


def product_sums(
    factors: list[tuple[Tensor, Callable[[slice], Tensor]]],
    shapes: dict[str, torch.Size],
    pull: Pull,
    budget: int,
) -> dict[str, Tensor]:
    r""":math:`\sum_{n,k}` of the squares of what ``pull`` makes of the per-sample gradients
    :math:`D_{nk}` of the products' tensors ``shapes`` (``"weight"``, ``"bias"``), one product
    per group of :data:`Factors` ``(joined, patches_of)`` (``joined`` of shape
    ``(K, B, g, O, L)``; one group for calls whose products are summed before the pull-back,
    one per call where each call's tensors are pulled back on their own), a chunk of samples
    at a time within ``budget`` bytes (on CPU at most :data:`.rules.CHUNK_BYTES`)."""
    num_vectors, batch, groups, out, _ = factors[0][0].shape
    numbers = len(factors) * num_vectors * sum(shape.numel() for shape in shapes.values())
    size, device = factors[0][0].element_size(), factors[0][0].device
    per_sample = 4 * numbers * size  # (D, its pull-backs and their squares)
    sums: dict[str, Tensor] = {}
    for chunk in sample_chunks(batch, per_sample, chunk_budget(budget, device)):
        products = []
        for joined, patches_of in factors:
            found = {}
            for name, shape in shapes.items():
                if name == "weight":  # (b, g, K, O, P) -> (b K, *shape)
                    d = per_sample_products(joined, patches_of(chunk), chunk)
                    found[name] = d.transpose(1, 2).reshape(-1, *shape)
                else:  # (K, b, g, O, L) -> (b K, g O)
                    d = joined[:, chunk].sum(-1).transpose(0, 1)
                    found[name] = d.reshape(-1, groups * out)
            products.append(found)
        for name, grads in pull(products).items():
            sums[name] = added(sums.get(name), grads.square().sum(0))
    return sums
