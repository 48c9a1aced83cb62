r"""The interface every Fisher engine implements.

An engine computes, for one batch of ``B`` samples,

.. math::

    \Sigma_\theta = \sum_{n=1}^{B} \sum_{k=1}^{K} \big(J_n^\top v_{nk}\big)^{\odot 2}
    \quad\text{for every parameter } \theta,

where :math:`J_n = \partial f(x_n)/\partial\theta` is the per-sample Jacobian of the
(``output_fn``-mapped) model output and ``V = make_vectors(f(X).detach())`` has shape
``(K, B, C)``, or ``(K, B, *S, C)`` for outputs with positions (sequences), i.e. ``(K, *f.shape)``.
The estimators (:mod:`ewc_reg.fisher`) choose the vectors; engines only pull them back, and only
into the parameters in ``params`` (the others are constants: no gradient is computed for them).
``make_vectors`` gives the same vectors for the same samples however often it is called (a
retry or a fallback engine after a failed attempt calls it again): ``sample``'s draws are kept
for the batch.
Sums are returned in the accumulation dtype (float32 or wider).

Memory: an engine processes the batch in chunks of samples. With ``chunk_size=None`` it must pick
the chunk with :func:`resolve_chunk_size` from ``memory_budget`` (bytes) and its own estimate of
the working memory one sample adds (for the functorch engine, the ``K`` per-sample pull-backs of
all parameters), so that the chunk's working set stays within the budget as the batch grows.
The budget covers the per-chunk work; the one forward pass of the whole batch that forms ``V``
(without gradients, or, in the functorch engine, on detached parameters, which records no graph)
is bounded by the batch the data yields. Where the vectors are
:class:`RowWiseVectors` (every estimator's: each sample's vectors need only its own output, and
its own draws for ``sample``), an engine may form them from each chunk's own forward pass
instead, and save that pass.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge
from torch.func import functional_call
from torch.nn.utils import parametrize
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from .._batches import Batch

OutputFn = Callable[[object], Tensor]
VectorFn = Callable[[Tensor], Tensor]


class RowWiseVectors:
    """A :data:`VectorFn` whose vectors of a run of samples need only those samples' outputs:
    ``vectors(output, start, stop)`` makes the vectors of samples ``start`` to ``stop - 1``
    of the batch from their output (``output`` of the whole batch and ``start=0, stop=None`` by
    default). Random vectors must be the same whatever the runs of samples asked for (as
    ``sample``'s are: its labels are drawn once per sample, in sample order)."""

    def __init__(self, make: Callable[[Tensor, int, int | None], Tensor]) -> None:
        self._make = make

    def __call__(self, output: Tensor, start: int = 0, stop: int | None = None) -> Tensor:
        return self._make(output, start, stop)


#: Memory per chunk when the caller sets no ``memory_budget``, on a CPU: 256 MiB. (Reduced
#: ResNet-18, exact Fisher, C=10, N=128, 2 CPU threads, three runs, the last ``python -m
#: benchmarks.memory_budget``:
#: budgets of 128, 256, 512 and 1024 MiB took 6.6-7.6, 6.3-7.0, 6.3-6.7 and 6.2-6.7 times a
#: plain forward+backward, with peaks of 0.8-0.9, 1.3, 2.0 and 3.5 times its peak. Larger
#: budgets buy nothing measurable here and 256 MiB keeps the peak well under 2x.)
DEFAULT_MEMORY_BUDGET = 256 * 2**20

#: Share of a CUDA device's available memory (free on the device, plus what PyTorch's caching
#: allocator holds unused) that :func:`default_memory_budget` gives the engines there. On a GPU
#: every chunk costs its own launches, so the chunks should be few: the exact Fisher of the
#: reduced ResNet-18 (C=10, N=128, NVIDIA H200, hooks engine, ``python -m
#: benchmarks.memory_budget --device cuda``) took 45.1, 15.8, 5.8 and 5.3 times a plain
#: forward+backward at budgets of 256 MiB, 1, 4 and 16 GiB, with peaks of 1.1, 4.4, 8.9 and
#: 8.9 times its peak (2.2 GB at most), and 5.6 times with this share (35 GB there). A quarter
#: leaves room for the estimate's error and for what the caller allocates next.
CUDA_MEMORY_SHARE = 0.25


def default_memory_budget(device: torch.device) -> int:
    """The memory budget of a call that sets none, for parameters on ``device``: on a CUDA
    device, :data:`CUDA_MEMORY_SHARE` of the memory available there (``free`` of
    ``torch.cuda.mem_get_info`` plus ``memory_reserved - memory_allocated``), and never less
    than :data:`DEFAULT_MEMORY_BUDGET`; elsewhere :data:`DEFAULT_MEMORY_BUDGET` (on a CPU more
    buys nothing measurable: see its comment)."""
    if device.type != "cuda":
        return DEFAULT_MEMORY_BUDGET
    free, _ = torch.cuda.mem_get_info(device)
    cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    return max(DEFAULT_MEMORY_BUDGET, int(CUDA_MEMORY_SHARE * (free + cached)))


#: Functions whose backward ``torch.func.vmap`` computes wrongly when only the cotangents are
#: batched, as in a pull-back vmapped over the vectors: ``torch.cdist`` (torch 2.14: the
#: gradient of ``x1`` off by about 2×; ``autograd.grad(is_grads_batched=True)`` and one vector
#: at a time are right). Where a model calls one, the engines pull back one vector at a time.
VMAP_WRONG = frozenset({torch.cdist})


#: Leaves that hold no tensor (skipped without asking ``pytree``).
_NOT_TENSORS = (int, float, bool, str, type(None), torch.dtype, torch.device, torch.Size)


def tensors_in(tree: Any) -> list[Tensor]:
    """The tensors in ``tree``, in ``pytree``'s order: tuples, lists and dicts are walked here
    (the recorder's mode calls this on every operation's arguments: ``pytree.tree_leaves``
    took 0.24 of 0.81 s of OPT's ``empirical`` Fisher in a profile), anything else that may
    hold tensors (a registered container) by ``pytree``."""
    found: list[Tensor] = []

    def walk(node: Any) -> None:
        if isinstance(node, Tensor):
            found.append(node)
        elif isinstance(node, (tuple, list)):
            for child in node:
                walk(child)
        elif isinstance(node, dict):
            for child in node.values():
                walk(child)
        elif not isinstance(node, _NOT_TENSORS):
            found.extend(leaf for leaf in pytree.tree_leaves(node) if isinstance(leaf, Tensor))

    walk(tree)
    return found


class CallsVmapWrong(TorchFunctionMode):
    """Inside the block, records whether a function of :data:`VMAP_WRONG` is called
    (:attr:`called`)."""

    def __init__(self) -> None:
        super().__init__()
        self.called = False

    def __torch_function__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.called = self.called or func in VMAP_WRONG
        return func(*args, **(kwargs or {}))


def channels_last(t: Tensor) -> bool:
    """Whether ``t``, ``(B, C, *S)`` with 2 or 3 spatial dimensions, lies channels-last
    (``torch.channels_last``/``channels_last_3d``: ``C`` innermost, as a convolutional model
    in that memory format makes its activations and their gradients) and not also in the
    standard order (as a tensor with ``C = 1`` or ``S`` of one position does)."""
    if t.dim() not in (4, 5) or t.is_contiguous():
        return False
    layout = torch.channels_last if t.dim() == 4 else torch.channels_last_3d
    return t.is_contiguous(memory_format=layout)


def transformed() -> bool:
    """Whether a ``torch.func`` transform (``grad``, ``vmap``, ``jacrev``, ``jvp``, ...) or
    forward-mode AD (a ``forward_ad.dual_level``) is active: a ``torch.autograd.Function``
    written for autograd alone has no rules for them (PyTorch raised that it "must override
    the setup_context staticmethod", or that "you must implement the jvp function"). Two reads
    of PyTorch's state, private but there since torch 2.0 (where missing: not active)."""
    functorch = getattr(torch._C, "_functorch", None)
    peek = getattr(functorch, "peek_interpreter_stack", lambda: None)
    forward_level = getattr(torch.autograd.forward_ad, "_current_level", -1)
    return peek() is not None or forward_level >= 0


def launch_bound(device: torch.device) -> bool:
    """Whether the engines treat ``device`` as launch-bound (any device but the CPU: a GPU).

    There the host launches each kernel for a few microseconds whatever its size, and the
    paper's models are small enough that the number of kernels, not their work, sets the time
    (an H100 ran a reduced ResNet-18's forward+backward at N=128 in 9 ms). The engines then
    take the way with fewer, larger kernels: one backward pass batched over the vectors, one
    gather instead of a loop of slices, chunks bounded by the memory budget alone. On the CPU,
    passes over memory cost most, and smaller, cache-sized pieces are faster; each place that
    asks says what it measured."""
    return device.type != "cpu"


class Engine(Protocol):
    """Computes per-batch sums of squared pull-backs (see the module docstring)."""

    name: str

    def __call__(
        self,
        model: nn.Module,
        params: dict[str, Tensor],
        batch: Batch,
        output_fn: OutputFn,
        make_vectors: VectorFn,
        chunk_size: int | None,
        memory_budget: int,
    ) -> dict[str, Tensor]: ...


def resolve_chunk_size(chunk_size: int | None, memory_budget: int, bytes_per_sample: int) -> int:
    """``chunk_size`` when given, else the most samples whose working memory
    (``bytes_per_sample`` each) fits in ``memory_budget`` bytes, and at least one."""
    if chunk_size is not None:
        return chunk_size
    return max(1, memory_budget // max(bytes_per_sample, 1))


def swapped_call(
    model: nn.Module, tensors: dict[str, Tensor], args: Any, kwargs: dict[str, Any]
) -> Any:
    """``torch.func.functional_call(model, tensors, args, kwargs, strict=False)``, with every
    module's registered parameters and buffers put back afterwards. Its ``tie_weights=True``
    (which swaps a parameter shared by two modules, a tied embedding and output layer, under
    both) leaves the swapped tensor in place of the parameter of a module registered under two
    names (``ModuleList([block, block])``, ``self.alias = self.layer``) in PyTorch 2.14
    (pytorch/pytorch#164759): training's gradients no longer reached the parameter after a
    Fisher, and a later ``get_parameter`` failed."""
    registered = [
        (kind, name, t)
        for module in model.modules()
        for kind in (module._parameters, module._buffers)
        for name, t in kind.items()
    ]
    try:
        return functional_call(model, tensors, args, kwargs, strict=False)
    finally:
        for kind, name, t in registered:  # (kind: a dict, or TorchScript's wrapper of one)
            if name not in kind or kind[name] is not t:
                kind[name] = t


@functools.cache  # (called per layer and vector: a lookup instead of a dispatched op)
def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sums are kept in at least float32 (bf16/fp16 models accumulate in float32)."""
    return torch.promote_types(dtype, torch.float32)


def inside(path: str, outer: str) -> bool:
    """Whether the module at ``path`` lies strictly inside the one at ``outer`` (paths as in
    ``named_modules()``; ``""`` is the root)."""
    return path != outer and (not outer or path.startswith(outer + "."))


#: Modules that only hold parameters for the module they belong to, which uses them in its own
#: ``forward`` (PEFT keeps its IA3, VeRA, AdaLoRA and embedding-LoRA adapters so): their
#: parameters are that module's own (:func:`own_parameters`).
PARAMETER_CONTAINERS = (nn.ParameterDict, nn.ParameterList)


def own_parameters(module: nn.Module) -> Iterator[tuple[str, nn.Parameter]]:
    """The parameters registered on ``module`` itself, on its children of
    :data:`PARAMETER_CONTAINERS` (``"adapter.default"``) and, for a module parametrized by
    ``torch.nn.utils.parametrize``, in its parametrizations' lists (the tensors its weight is
    made of, ``"parametrizations.weight.original0"``, and the parameters of the
    parametrizations, ``"parametrizations.weight.0.scale"``, used while it runs), by name
    relative to it (duplicates included); none for a container or such a list itself (nor for
    the modules inside such a list: :func:`modules_and_own_parameters`)."""
    if isinstance(module, (*PARAMETER_CONTAINERS, parametrize.ParametrizationList)):
        return
    yield from module.named_parameters(recurse=False, remove_duplicate=False)
    for name, child in module.named_children():
        if isinstance(child, PARAMETER_CONTAINERS):
            yield from child.named_parameters(prefix=name, remove_duplicate=False)
    if parametrize.is_parametrized(module):
        for tensor, chain in module.parametrizations.items():
            prefix = f"parametrizations.{tensor}"
            yield from chain.named_parameters(prefix, remove_duplicate=False)


def modules_and_own_parameters(
    model: nn.Module,
) -> Iterator[tuple[str, nn.Module, Iterator[tuple[str, nn.Parameter]]]]:
    """Every module of ``model`` by path (``named_modules(remove_duplicate=False)``), with its
    :func:`own_parameters`; none for the modules inside a parametrization list (a
    parametrization with parameters of its own, ``"parametrizations.weight.0"``), whose
    parameters are those of the module they make a tensor of."""
    chained = {
        id(inner)
        for chain in model.modules()
        if isinstance(chain, parametrize.ParametrizationList)
        for inner in chain.modules()
    }
    for path, module in model.named_modules(remove_duplicate=False):
        yield path, module, iter(()) if id(module) in chained else own_parameters(module)


def describe(path: str) -> str:
    """The module at ``path`` (or the unit of tied modules, their paths joined by ``+``), in
    words for a message."""
    if "+" in path:
        return "the tied modules " + " and ".join(map(repr, path.split("+")))
    return "the root module" if not path else f"module {path!r}"


def zero_sums(params: dict[str, Tensor]) -> dict[str, Tensor]:
    """Zeros shaped like each parameter, in its :func:`accumulation_dtype`, by name."""
    return {
        name: torch.zeros_like(p, dtype=accumulation_dtype(p.dtype)) for name, p in params.items()
    }


#: :func:`fewer_vectors` leaves more vectors than this as they are.
MAX_VECTORS_TO_REDUCE = 32


def fewer_vectors(vectors: Tensor) -> Tensor:
    r"""Vectors ``(K', B, ...)`` with ``K' <= K`` giving the same sums as ``vectors``.

    The sums depend on sample ``n``'s vectors only through :math:`M_n = \sum_k v_{nk}
    v_{nk}^\top = V_n^\top V_n` (:math:`\sum_k (J^\top v_k)^{\odot 2} = \mathrm{diag}(J^\top
    M_n J)`). Only what certainly adds nothing goes: each sample's zero vectors (positions left
    out), its others moved to the front (``K'`` the most any sample has); and, where more
    vectors than their dimension ``D`` remain (``sample``'s draws beyond the classes), all but
    the ``r`` largest directions: with the eigendecomposition :math:`V_n V_n^\top = Q_n
    \Lambda_n Q_n^\top` (``K x K``, in float64), the rows :math:`W_n = Q_{n,r}^\top V_n` have
    :math:`W_n^\top W_n = M_n` up to the dropped eigenvalues, ``r <= D`` the most eigenvalues
    above :math:`\max(10 K \epsilon_{64}, K^2 \epsilon^2)\, \lambda_{\max}` in any sample
    (:math:`\epsilon` that of ``vectors``: rounding ``V`` to it leaves an exactly dependent
    combination about :math:`K \epsilon |V|` away from zero). With no more vectors than
    dimensions, a small direction is kept: it cannot be told from a dependent one by its
    eigenvalue, and the exact factors of the likelihoods have none (before, a class of
    probability 2e-16 in every sample lost its share: its head row's Fisher 2e-23 for 2.3e-16).
    Vectors of lower precision than float32, a single vector or more than
    :data:`MAX_VECTORS_TO_REDUCE` (one vector less saves little) are returned as they are; so are
    vectors whose float64 eigendecomposition fails.
    """
    num_vectors, batch = vectors.shape[:2]
    eps = torch.finfo(vectors.dtype).eps
    if not 2 <= num_vectors <= MAX_VECTORS_TO_REDUCE or eps > torch.finfo(torch.float32).eps:
        return vectors
    flat = vectors.reshape(num_vectors, batch, -1)  # (K, B, D)
    nonzero = flat.ne(0).any(-1)  # (K, B)
    kept = max(int(nonzero.sum(0).max()), 1)  # (one zero vector where all are: a pass to run)
    if kept < num_vectors:  # (each sample's nonzero vectors first, in their order)
        order = torch.sort(nonzero.logical_not().to(torch.int8), dim=0, stable=True).indices
        flat = flat.gather(0, order[:kept].unsqueeze(-1).expand(kept, *flat.shape[1:]))
    if kept > flat.shape[-1]:
        flat = _leading_directions(flat, eps)
    if flat.shape[0] == num_vectors:
        return vectors
    return flat.reshape(flat.shape[0], *vectors.shape[1:])


def _leading_directions(flat: Tensor, eps: float) -> Tensor:
    """:func:`fewer_vectors`' ``r`` largest directions of ``flat`` ``(K, B, D)``, ``K > D``."""
    num_vectors = flat.shape[0]
    wide = flat.to(torch.float64)
    gram = torch.einsum("kbd,jbd->bkj", wide, wide)
    try:
        values, bases = torch.linalg.eigh(gram)  # ascending
    except RuntimeError:  # (did not converge)
        return flat
    tol = max(10 * num_vectors * torch.finfo(torch.float64).eps, (num_vectors * eps) ** 2)
    rank = int((values > tol * values[:, -1:]).sum(1).max().clamp(min=1))
    if rank == num_vectors:
        return flat
    return torch.einsum("bkr,kbd->rbd", bases[..., num_vectors - rank :], wide).to(flat.dtype)


def check_differentiable(output: Any) -> None:
    """``ValueError`` when ``output`` (a model's output after ``output_fn``, recorded with
    gradients) carries none: no vector can be pulled back from it."""
    if isinstance(output, Tensor) and not output.requires_grad:
        raise ValueError(
            "the output (after output_fn) does not depend on any parameter that requires grad: "
            "output_fn or the model detaches it or computes it under torch.no_grad(), or every "
            "parameter it depends on is frozen; the Fisher needs its gradient"
        )


class BatchingFailed(Exception):
    """The pull-back batched over the vectors failed (``vmap`` cannot run some backward: a
    custom ``autograd.Function`` whose backward branches on a tensor's value, say); the
    message is the original error's."""


def batched_grads(
    output: Tensor,
    inputs: Sequence[Tensor | GradientEdge],
    vectors: Tensor,
    retain_graph: bool = False,
) -> list[Tensor | None]:
    """``autograd.grad(output, inputs, v)`` for each of the ``K`` vectors, in one backward pass
    under ``torch.func.vmap``: each ``(K, *shape)``, ``None`` for the inputs the pass does not
    reach; :class:`BatchingFailed` where ``vmap`` fails. Not ``is_grads_batched=True``: its
    older vmap has no batching rule for the backward of convolutions, batch norms or the
    recurrent steps and runs them once per vector (the reduced ResNet-18's exact Fisher at
    N=8: 171 ``convolution_backward`` calls against 19 here)."""
    if len(vectors) == 1:  # (vmap would only add views)
        grads = torch.autograd.grad(
            output, inputs, vectors[0], retain_graph=retain_graph, allow_unused=True
        )
        return [None if g is None else g.unsqueeze(0) for g in grads]
    reached: list[int] = []

    def pull(v: Tensor) -> tuple[Tensor, ...]:
        grads = torch.autograd.grad(  # (called once)
            output, inputs, v, retain_graph=retain_graph, allow_unused=True
        )
        reached[:] = [i for i, g in enumerate(grads) if g is not None]
        return tuple(grads[i] for i in reached)  # (vmap returns tensors only)

    try:
        found = torch.func.vmap(pull)(vectors)
    except RuntimeError as error:  # (the caller retries with one backward per vector)
        if isinstance(error, torch.OutOfMemoryError):
            raise  # (one backward per vector takes as much memory per vector: no cure)
        raise BatchingFailed(f"{type(error).__name__}: {error}") from error
    grads: list[Tensor | None] = [None] * len(inputs)
    for i, g in zip(reached, found):
        grads[i] = g
    return grads
