"""Putting a model in the state the Fisher is computed in (evaluation mode, compiled code run
eagerly, attention on its differentiable path, in its own precision) and restoring it
exactly."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

import torch
from torch import nn

#: Attributes in which modules keep, in eval mode, a tensor computed from a parameter by their
#: first call and reused by the later ones: timm's attention-bias caches (LeViT,
#: EfficientFormer and EfficientFormerV2, EfficientViT (MSRA), TinyViT keep
#: ``attention_biases[:, idxs]`` by device). A cache filled before the Fisher is computed (by an
#: evaluation without gradients) gives the parameter no gradient, and one filled during it
#: serves the next pass a tensor of a graph already used, or of per-sample copies of the
#: parameter (:mod:`.engines.loose`; the model then failed, also after the call).
EVAL_CACHES = ("attention_bias_cache",)


class _Bypassed(dict):
    """A cache (a dict by key, as :data:`EVAL_CACHES`) that holds no key for the next call:
    each call computes the cached tensor anew from the parameter, and stores it only for its
    own reading."""

    def __contains__(self, key: object) -> bool:
        return False


@contextmanager
def evaluating(model: nn.Module) -> Iterator[None]:
    """Eval mode inside the block, with the caches of :data:`EVAL_CACHES` bypassed; afterwards
    every submodule's training flag and caches and every parameter's ``.grad`` and
    ``requires_grad`` are as before, on success and on error, and so are the tables of
    embeddings with ``max_norm`` (their forward renormalises the rows it looks up in place)."""
    training = [(m, m.training) for m in model.modules()]
    caches = [
        (m, name, getattr(m, name))
        for m in model.modules()
        for name in EVAL_CACHES
        if isinstance(getattr(m, name, None), dict)
    ]
    params = list(model.parameters())
    saved = [(p, p.grad, p.requires_grad) for p in params]
    tables = [
        (m.weight, m.weight.detach().clone())
        for m in model.modules()
        if isinstance(m, (nn.Embedding, nn.EmbeddingBag)) and m.max_norm is not None
    ]
    model.eval()
    for module, name, _ in caches:
        setattr(module, name, _Bypassed())
    try:
        yield
    finally:
        for module, flag in training:
            module.training = flag
        for module, name, cache in caches:
            setattr(module, name, cache)
        for p, grad, requires_grad in saved:
            p.grad = grad
            p.requires_grad_(requires_grad)
        with torch.no_grad():
            for weight, table in tables:
                weight.copy_(table)


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
