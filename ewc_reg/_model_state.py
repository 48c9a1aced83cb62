"""Putting a model in the state the Fisher is computed in (evaluation mode, compiled code run
eagerly, attention on its differentiable path, in its own precision, batch norm on a correct
backward) and restoring it exactly."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parameter import is_lazy
from torch.nn.utils import parametrize
from torch.utils import _pytree as pytree

#: Attributes in which modules keep, in eval mode, a tensor computed from a parameter by their
#: first call and reused by the later ones: timm's attention-bias caches (LeViT,
#: EfficientFormer and EfficientFormerV2, EfficientViT (MSRA), TinyViT keep
#: ``attention_biases[:, idxs]`` by device). A cache filled before the Fisher is computed (by an
#: evaluation without gradients) gives the parameter no gradient, and one filled during it
#: serves the next pass a tensor of a graph already used, or of per-sample copies of the
#: parameter (:mod:`.engines.loose`; the model then failed, also after the call).
EVAL_CACHES = ("attention_bias_cache",)

#: The forwards of PyTorch's recurrent layers, whose ``training`` flag only switches dropout
#: between layers on (see :func:`evaluating`).
_RECURRENT_FORWARDS = (nn.RNN.forward, nn.LSTM.forward, nn.GRU.forward)


class _Bypassed(dict):
    """A cache (a dict by key, as :data:`EVAL_CACHES`) that holds no key for the next call:
    each call computes the cached tensor anew from the parameter, and stores it only for its
    own reading."""

    def __contains__(self, key: object) -> bool:
        return False


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, with the caches of :data:`EVAL_CACHES` bypassed and the
    parameters' gradient hooks (``p.register_hook``) not called; afterwards every submodule's
    training flag and caches and every parameter's ``.grad``, ``requires_grad`` and hooks are
    as before, on success and on error, and so are the tables of embeddings with ``max_norm``
    (their forward renormalises the rows it looks up in place) and the modules' attributes
    that the computation left holding a transform's tensor (:func:`_escaped`).

    A parameter's hook acts on its gradient (masking for pruning, clipping, scaling,
    logging), not on the model's function, whose Fisher is computed: the hooks and functorch
    engines never take a parameter's own gradient, while the loop engine and ``batched`` take
    it with ``torch.autograd.grad``, which would run the hooks (with per-sample gradients,
    and count a scaling hook's factor in the Fisher). So the hooks stay registered (also
    those PyTorch keeps outside Python) and only the Python dictionary that holds a
    parameter's hooks is emptied for the block. Modules' backward hooks
    (``register_full_backward_hook``) stay on: they change the gradient that flows through
    the model, and every engine applies them.

    Recurrent layers running PyTorch's own forward (``nn.RNN``, ``nn.LSTM``, ``nn.GRU``, and
    subclasses that keep it) compute their eval function in training mode: their ``dropout``
    is 0 inside the block. Eval mode changes nothing else that forward computes, and cuDNN's
    backward of a recurrent layer refuses it ("cudnn RNN backward can only be called in
    training mode", torch 2.11 on an NVIDIA H200): the ``batched`` method and the loop and
    functorch engines (LSTMs with ``proj_size``, packed sequences) failed on such models on a
    GPU. A forward of one's own, or a forward hook, may read ``training`` otherwise (the old
    ``spectral_norm``'s power iteration, a weight drop): such layers stay in eval, and where
    one is on a GPU, cuDNN is off inside the block (before, a weight drop made the Fisher
    random, and ``spectral_norm`` changed its buffers and the Fisher 50%)."""
    training = [(m, m.training) for m in model.modules()]
    recurrent = [
        (m, m.dropout)
        for m in model.modules()
        if isinstance(m, nn.RNNBase)
        and type(m).forward in _RECURRENT_FORWARDS
        and "forward" not in vars(m)
    ]
    hooked = [m for m, _ in recurrent if _hooked(m)]
    recurrent = [(m, dropout) for m, dropout in recurrent if m not in hooked]
    cudnn = torch.backends.cudnn.enabled
    caches = [
        (m, name, getattr(m, name))
        for m in model.modules()
        for name in EVAL_CACHES
        if isinstance(getattr(m, name, None), dict)
    ]
    params = [p for p in model.parameters() if not is_lazy(p)]  # (lazy: no state to keep)
    saved = [(p, p.grad, p.requires_grad) for p in params]
    hooks = [(p._backward_hooks, dict(p._backward_hooks)) for p in params if p._backward_hooks]
    tables = [
        (m.weight, m.weight.detach().clone())
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    attributes = {id(m): (m, dict(vars(m))) for m in model.modules()}  # (see _escaped)
    model.eval()
    for module, _ in recurrent:
        module.dropout, module.training = 0.0, True
    if any(p.is_cuda for module in hooked for p in module.parameters()):
        torch.backends.cudnn.enabled = False
    for module, name, _ in caches:
        setattr(module, name, _Bypassed())
    for held, _ in hooks:
        held.clear()
    try:
        yield
    finally:
        torch.backends.cudnn.enabled = cudnn
        for module, flag in training:
            module.training = flag
        for module, dropout in recurrent:
            module.dropout = dropout
        for module, name, cache in caches:
            setattr(module, name, cache)
        for p, grad, requires_grad in saved:
            p.grad = grad
            p.requires_grad_(requires_grad)
        for held, before in hooks:
            held.clear()
            held.update(before)
        with torch.no_grad():
            for weight, table in tables:
                weight.copy_(table)
        for module, before in attributes.values():
            for name, value in list(vars(module).items()):
                if (name not in before or value is not before[name]) and _escaped(value):
                    if name in before:
                        vars(module)[name] = before[name]
                    else:
                        del vars(module)[name]


def _hooked(module: nn.Module) -> bool:
    """Whether forward hooks (the module's own or global ones) run around ``module``."""
    modules = nn.modules.module
    return bool(
        module._forward_pre_hooks
        or module._forward_hooks
        or getattr(modules, "_global_forward_pre_hooks", None)
        or getattr(modules, "_global_forward_hooks", None)
    )


def _escaped(value: object) -> bool:
    """Whether ``value`` (a module's attribute) holds a tensor of a ``torch.func`` transform
    that has ended: a forward run under ``vmap`` that keeps an activation
    (``self.last = out.detach()``), or ``spectral_norm``'s pre-hook setting ``module.weight``,
    left one there, which no operation, ``pickle`` or ``torch.save(model)`` can use. Such an
    attribute gets its value from before the call back (or goes, if it is new)."""
    return any(
        isinstance(leaf, Tensor) and torch._C._functorch.is_functorch_wrapped_tensor(leaf)
        for leaf in pytree.tree_leaves(value)
    )


@contextmanager
def differentiable_kernels() -> Iterator[None]:
    """Inside the block, ``nn.MultiheadAttention`` and the ``nn.Transformer*`` layers take
    their ordinary path also where no gradient is taken (``torch.backends.mha``'s fast path
    off): in eval mode without gradients they would otherwise take a fused path, which for an
    ``nn.TransformerEncoder`` with a padding mask returns zeros at padded positions (nested
    tensors) where the path with gradients computes them. The engines make the vectors from
    passes without gradients and pull them back through passes with them, so both must be one
    function."""
    enabled = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        yield
    finally:
        torch.backends.mha.set_fastpath_enabled(enabled)


@contextmanager
def observers_frozen(model: nn.Module) -> Iterator[None]:
    """Inside the block ``torch.ao.quantization``'s observers of ``model`` do not change its
    function, and afterwards their buffers are as before, on success and on error: the
    fake-quantize modules of a quantization-aware model (``prepare_qat``) keep their scale and
    zero point (their observing is off: ``disable_observer``), and plain observers (a model
    prepared for calibration) have their statistics restored. Both observe in eval mode too,
    so every forward pass of the computation recalibrated a QAT model: a QAT ResNet-18's
    Fisher changed from call to call (1.2 apart, relative, between two identical calls of the
    loop engine), and one call changed 135 of its buffers. (Only where the model has such
    modules, and ``torch.ao.quantization`` is imported: else nothing to do.)"""
    quantization = sys.modules.get("torch.ao.quantization")
    kinds = () if quantization is None else (
        quantization.FakeQuantizeBase,
        quantization.ObserverBase,
    )
    modules = [m for m in model.modules() if kinds and isinstance(m, kinds)]
    saved = [
        (m, name, b, b.detach().clone())
        for m in modules
        for name, b in m._buffers.items()
        if b is not None
    ]
    for m in modules:
        if isinstance(m, quantization.FakeQuantizeBase):
            m.disable_observer()
    try:
        yield
    finally:
        with torch.no_grad():
            for module, name, buffer, value in saved:  # (an observer may resize its buffers)
                module._buffers[name] = buffer
                buffer.data = value


@contextmanager
def parametrizations_uncached() -> Iterator[None]:
    """Inside the block, ``torch.nn.utils.parametrize``'s cache is off: parametrized weights
    are computed from their parameters at every call, also within a user's
    ``with parametrize.cached():`` (its cache is kept for after the block). A cached weight
    computed without gradients (by an evaluation pass in that block, or by the engines' own
    passes that make the vectors or check the batch) has no graph to its parameter, whose
    Fisher came out zero. (Private to PyTorch: where it has no such cache, nothing to do.)"""
    enabled = getattr(parametrize, "_cache_enabled", 0)
    if not isinstance(enabled, int) or not enabled:
        yield
        return
    parametrize._cache_enabled = 0
    try:
        yield
    finally:
        parametrize._cache_enabled = enabled


def running_eagerly() -> AbstractContextManager[object]:
    """Inside the block, ``torch.compile``d modules and functions (a compiled model, one
    compiled with ``model.compile()``, compiled submodules) run their eager code: the engines
    hook modules, ``vmap`` them and pull back through them one layer at a time, which compiled
    graphs do not allow. Nothing is recompiled, and the compiled code is used again after the
    block. (``torch.compiler.set_stance``; torch < 2.6 lacks it, and compiled code then runs as
    it is. Where ``torch._dynamo`` was never imported, nothing was compiled, and the block
    spares the second it takes to import.)"""
    set_stance = getattr(torch.compiler, "set_stance", None)
    if set_stance is None or "torch._dynamo" not in sys.modules:
        return nullcontext()
    return set_stance("force_eager")


def in_own_precision(device: torch.device) -> AbstractContextManager[object]:
    """Inside the block, ``torch.autocast`` is off on ``device``'s type: a ``consolidate``
    called from a mixed-precision training loop computes in the model's own dtypes. (The
    Fisher runs once per task, so exactness is worth more than autocast's speed there; in
    float16 the squared per-sample gradients can underflow; in bfloat16 the Fisher of small
    test models on CPU came out 0.5% (an MLP) to 2-5% (a CNN) off.)"""
    available = getattr(torch.amp, "is_autocast_available", lambda device_type: True)
    if not available(device.type):
        return nullcontext()
    return torch.autocast(device_type=device.type, enabled=False)


def batch_norm_backward_fixed(model: nn.Module) -> AbstractContextManager[object]:
    r"""Inside the block, ``F.batch_norm`` with running statistics (eval mode), on an input with a
    dimension of size 1 and with a gradient to take, is computed as the affine map it is,

    .. math:: y = (x - \mu)\,\frac{\gamma}{\sqrt{\sigma^2 + \epsilon}} + \beta,

    by elementwise operations (in at least float32; a half-precision input's result is cast
    back) instead of by the batch-norm kernel. Every other call goes to the kernel.

    The CPU kernel's backward (torch 2.14.1, float32 and float64) is wrong when the input or
    the output's gradient has a dimension of size 1 whose stride is not the one a contiguous
    or channels-last tensor would have: the weight's, the bias's and the input's gradients
    were off by 4 to 26 (against values of order 1) in a check of every layout of
    ``(N, C, H, W)`` and ``(N, C, D, H, W)`` inputs and gradients with ``N = 1`` or ``H = 1``;
    no layout without a dimension of size 1 was wrong. Such gradients come from ordinary
    models: a batch norm whose output is used as tokens, ``y.flatten(2).transpose(1, 2)``, as
    in ViT hybrids, XCiT, LeViT and LambdaNets. The loop engine passes one sample at a time,
    and the hooks engine a batch or a chunk of one sample now and then: each computed a wrong
    Fisher for the batch norm's parameters and every parameter before it.

    ``torch.nn.functional.batch_norm`` is replaced for the block (and put back after it, on
    every path), which reaches every caller that looks it up there, as ``nn.BatchNorm*`` and
    timm's ``BatchNormAct2d`` do. (A torch-function mode would see the calls without replacing
    anything, but it costs every torch call of the engines: 19,000 calls and 17-25% of the
    time of a reduced ResNet-18's Fisher at N=128.) Only a model with a batch-norm module
    (``nn.BatchNorm*``, ``nn.SyncBatchNorm`` and their subclasses) has it replaced."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules()):
        return nullcontext()
    return _replaced(F, "batch_norm", _as_affine_in_eval(F.batch_norm))


@contextmanager
def _replaced(owner: object, name: str, value: object) -> Iterator[None]:
    """``owner.name`` is ``value`` inside the block, and what it was after it."""
    before = getattr(owner, name)
    setattr(owner, name, value)
    try:
        yield
    finally:
        setattr(owner, name, before)


def eval_batch_norm_scale(
    running_var: Tensor, weight: Tensor | None, eps: float, dtype: torch.dtype
) -> Tensor:
    r"""An eval-mode batch norm's per-channel scale :math:`w / \sqrt{\sigma^2 + \epsilon}`
    (:math:`1 / \sqrt{\sigma^2 + \epsilon}` without a weight), ``(C,)`` in ``dtype``."""
    scale = (running_var.to(dtype) + eps).rsqrt()
    return scale if weight is None else scale * weight.to(dtype)


def _as_affine_in_eval(kernel: Callable[..., Tensor]) -> Callable[..., Tensor]:
    """``F.batch_norm`` (``kernel``), computed as an affine map where
    :func:`batch_norm_backward_fixed` says."""

    @functools.wraps(kernel)
    def batch_norm(
        input: Tensor,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        weight: Tensor | None = None,
        bias: Tensor | None = None,
        training: bool = False,
        momentum: float = 0.1,
        eps: float = 1e-5,
    ) -> Tensor:
        takes_grad = torch.is_grad_enabled() and any(
            t is not None and t.requires_grad for t in (input, weight, bias)
        )
        if training or running_mean is None or running_var is None or not takes_grad or (
            1 not in input.shape
        ):
            return kernel(input, running_mean, running_var, weight, bias, training, momentum, eps)
        dtype = torch.promote_types(input.dtype, torch.float32)
        shape = (1, -1) + (1,) * (input.dim() - 2)
        scale = eval_batch_norm_scale(running_var, weight, eps, dtype)
        y = (input.to(dtype) - running_mean.to(dtype).view(shape)) * scale.view(shape)
        if bias is not None:
            y = y + bias.to(dtype).view(shape)
        return y.to(input.dtype)

    return batch_norm
