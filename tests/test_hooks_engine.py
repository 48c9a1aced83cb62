"""The hook engine: every rule, the per-module fallback and the validity checks, against the
functorch engine and a brute-force autograd loop (one sample and one vector at a time)."""

from __future__ import annotations

import contextlib
import copy
import gc
import logging
import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any
from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

from benchmarks._paths import engine_ways, pull_back
from benchmarks.models import LSTMClassifier
from ewc_reg import fisher_diagonal
from ewc_reg._batches import Batch
from ewc_reg.engines import (
    attention,
    base,
    convolution,
    get_engine,
    hooks,
    norm_act,
    recording,
    rules,
    unit_sums,
)
from ewc_reg.engines.base import (
    DEFAULT_MEMORY_BUDGET,
    MAX_VECTORS_TO_REDUCE,
    fewer_vectors,
    inside,
)
from ewc_reg.engines.functorch import FunctorchEngine
from ewc_reg.engines.hooks import HookEngine
from ewc_reg.engines.loose import loose_parameters
from ewc_reg.engines.recording import Planner, Unsupported, plan
from ewc_reg.likelihoods import Categorical

from .models import cnn, mlp, randomize_bn
from .reference import (
    assert_close_dicts,
    brute_force_fisher,
    positions_first,
    rel_err,
    samples_first,
)

K = 3  # vectors per sample in the direct engine tests


def trainable(model: nn.Module) -> dict[str, Tensor]:
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def random_vectors(model: nn.Module, x: Tensor, output_fn=lambda out: out) -> Tensor:
    with torch.no_grad():
        out = output_fn(model(x))
    return torch.randn(K, *out.shape, dtype=out.dtype, device=out.device)


def engine_sums(
    engine, model, x, vectors, output_fn=lambda out: out, chunk_size=None,
    memory_budget=DEFAULT_MEMORY_BUDGET,
) -> dict[str, Tensor]:
    batch = Batch((x,), {}, torch.zeros(x.shape[0]), x.shape[0])
    return engine(
        model, trainable(model), batch, output_fn, lambda out: vectors, chunk_size, memory_budget
    )


def brute_force(model, x, vectors, output_fn=lambda out: out) -> dict[str, Tensor]:
    """Σ_n Σ_k (J_nᵀ v_nk)², one sample and one vector at a time."""
    params = trainable(model)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    for i in range(x.shape[0]):
        out = output_fn(model(x[i : i + 1]))[0]
        for k in range(vectors.shape[0]):
            grads = torch.autograd.grad(
                out, list(params.values()), vectors[k, i], retain_graph=True, allow_unused=True
            )
            for n, g in zip(params, grads):
                if g is not None:
                    sums[n] += g.square()
    return sums


def check_against_references(model, x, output_fn=lambda out: out, *, via_rules=True, **kwargs):
    """The hook engine equals the functorch engine and the brute-force loop (float64)."""
    model.eval()
    if via_rules:  # every parametrised module is computed by a rule, not the fallback
        assert all(unit.rule is not None for unit in plan(model, trainable(model)))
    vectors = random_vectors(model, x, output_fn)
    got = engine_sums(HookEngine(), model, x, vectors, output_fn, **kwargs)
    assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors, output_fn), 1e-10)
    assert_close_dicts(got, brute_force(model, x, vectors, output_fn), 1e-10)


class Head(nn.Module):
    """Flattens whatever comes and maps it to 3 outputs (gives every layer a (B, C) output)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.linear = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(torch.tanh(x).flatten(1))


def with_head(layer: nn.Module, x: Tensor) -> nn.Module:
    with torch.no_grad():
        features = layer.eval()(x)[0].numel()
    model = nn.Sequential(layer, Head(features)).double()
    randomize_bn(model)
    return model


class Conv1D(nn.Module):
    """A stand-in for Hugging Face's ``transformers.pytorch_utils.Conv1D`` (GPT-2's linear
    layer, weight ``(in, out)``), under that qualified name: its rule is found by the name."""

    def __init__(self, nf: int, nx: int) -> None:
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.5)
        self.bias = nn.Parameter(torch.randn(nf))

    def forward(self, x: Tensor) -> Tensor:
        size_out = (*x.size()[:-1], self.nf)
        return torch.addmm(self.bias, x.view(-1, x.size(-1)), self.weight).view(size_out)


Conv1D.__module__ = "transformers.pytorch_utils"


class FalconLinear(nn.Linear):
    """A stand-in for Hugging Face's ``FalconLinear`` (an ``nn.Linear`` with a ``forward`` of
    its own computing the same), under its qualified name."""

    def forward(self, input: Tensor) -> Tensor:
        hidden = input @ self.weight.T
        return hidden if self.bias is None else hidden + self.bias


FalconLinear.__module__ = "transformers.models.falcon.modeling_falcon"


def timm_stand_in(cls: type[nn.Module], module: str, name: str) -> type[nn.Module]:
    """``cls`` under the qualified name ``module.name`` of a timm layer it stands in for."""
    cls.__module__, cls.__qualname__, cls.__name__ = module, name, name
    return cls


class _TimmStdConv2d(nn.Conv2d):  # (BiT's weight-standardised convolution, as timm 1.0.31's)
    def __init__(self, *args: Any, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.eps = eps

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
            momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class _TimmScaledStdConv2d(nn.Conv2d):  # (the NF-Nets', with a gain per output channel)
    def __init__(self, *args: Any, gamma: float = 1.0, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.scale = gamma * self.weight[0].numel() ** -0.5
        self.eps = eps
        self.gain = nn.Parameter(torch.rand(self.out_channels, 1, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None,
            weight=(self.gain * self.scale).view(-1), training=True, momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def _padded_as_tensorflow(x: Tensor, kernel, stride, dilation) -> Tensor:
    """``x`` with TensorFlow's "SAME" padding: as many outputs as ``ceil(size / stride)``."""
    pads = []
    for size, k, s, d in zip(x.shape[2:], kernel, stride, dilation):
        outputs = math.ceil(size / s)
        total = max(0, (outputs - 1) * s + d * (k - 1) + 1 - size)
        pads = [total // 2, total - total // 2, *pads]
    return F.pad(x, pads)


class _TimmConv2dSame(nn.Conv2d):  # (TensorFlow's "SAME" padding, as timm 1.0.31's)
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, padding=0, **kwargs)

    def forward(self, x: Tensor) -> Tensor:
        x = _padded_as_tensorflow(x, self.weight.shape[2:], self.stride, self.dilation)
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class _TimmStdConv2dSame(_TimmStdConv2d):  # (padding "SAME": dynamic unless it can be static)
    def __init__(self, *args: Any, dynamic: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.same_pad = dynamic

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = _padded_as_tensorflow(x, self.kernel_size, self.stride, self.dilation)
        return super().forward(x)


class _TimmScaledStdConv2dSame(_TimmScaledStdConv2d):
    def __init__(self, *args: Any, dynamic: bool = True, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.same_pad = dynamic

    def forward(self, x: Tensor) -> Tensor:
        if self.same_pad:
            x = _padded_as_tensorflow(x, self.kernel_size, self.stride, self.dilation)
        return super().forward(x)


class _TimmLinear(nn.Linear):  # (its forward outside TorchScript)
    def forward(self, input: Tensor) -> Tensor:
        return F.linear(input, self.weight, self.bias)


class _TimmLayerNorm(nn.LayerNorm):
    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class _TimmRmsNorm(nn.RMSNorm):  # (timm 1.0.31's, without apex: its own rms_norm)
    def forward(self, x: Tensor) -> Tensor:
        dims = tuple(range(-1, -len(self.normalized_shape) - 1, -1))
        x = x * torch.rsqrt(x.pow(2).mean(dim=dims, keepdim=True) + self.eps)
        return x * self.weight


class _TimmLayerNorm2d(nn.LayerNorm):  # (the channels of (B, C, H, W))
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


class _TimmGroupNorm(nn.GroupNorm):  # (channels first, as timm's)
    def __init__(self, num_channels: int, num_groups: int = 32) -> None:
        super().__init__(num_groups, num_channels)

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


class _TimmGroupNorm1(_TimmGroupNorm):
    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels, 1)


class _NormAct:  # (the activation and dropout modules timm's norm-act layers have)
    def add_act(self, act: nn.Module) -> None:
        self.drop, self.act = nn.Identity(), act


class _TimmBatchNormAct2d(nn.BatchNorm2d, _NormAct):
    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels)
        self.add_act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = F.batch_norm(
            x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.1, self.eps
        )
        return self.act(self.drop(x))


class _TimmGroupNormAct(nn.GroupNorm, _NormAct):
    def __init__(self, channels: int, act: nn.Module, groups: int = 2) -> None:
        super().__init__(groups, channels)
        self.add_act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class _BitGroupNormActivation(nn.GroupNorm):  # (Hugging Face BiT's, as transformers 5.25's)
    def __init__(self, channels: int, activation: nn.Module, groups: int = 2) -> None:
        super().__init__(groups, channels)
        self.activation = activation

    def forward(self, hidden_state: Tensor) -> Tensor:
        hidden_state = F.group_norm(
            hidden_state, self.num_groups, self.weight, self.bias, self.eps
        )
        return self.activation(hidden_state)


class DynamicPad2d(nn.Module):  # (Hugging Face BiT's: TensorFlow's "SAME" padding, by name)
    def __init__(self, kernel_size: int, stride: int, dilation: int, value: float = 0) -> None:
        super().__init__()
        self.kernel_size = (kernel_size, kernel_size)
        self.stride = (stride, stride)
        self.dilation = (dilation, dilation)
        self.value = value

    def forward(self, x: Tensor) -> Tensor:
        pads = []
        for dim in (1, 0):
            size, stride = x.shape[2 + dim], self.stride[dim]
            reach = (self.kernel_size[dim] - 1) * self.dilation[dim] + 1
            total = max((math.ceil(size / stride) - 1) * stride + reach - size, 0)
            pads += [total // 2, total - total // 2]
        return F.pad(x, pads, value=self.value)


class _WeightStandardizedConv2d(nn.Conv2d):  # (Hugging Face BiT's, as transformers 5.25's)
    def __init__(
        self, cin: int, cout: int, k: int, stride: int = 1, dynamic: bool = True, **kwargs: Any
    ) -> None:
        super().__init__(cin, cout, k, stride=stride, padding=0 if dynamic else k // 2, **kwargs)
        self.pad = DynamicPad2d(k, stride, self.dilation[0]) if dynamic else None
        self.eps = 1e-6

    def forward(self, hidden_state: Tensor) -> Tensor:
        if self.pad is not None:
            hidden_state = self.pad(hidden_state)
        weight = F.batch_norm(
            self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
            momentum=0.0, eps=self.eps,
        ).reshape_as(self.weight)
        return F.conv2d(
            hidden_state, weight, self.bias, self.stride, self.padding, self.dilation, self.groups
        )


class _TimmGroupNorm1Act(_TimmGroupNormAct):
    def __init__(self, channels: int, act: nn.Module) -> None:
        super().__init__(channels, act, 1)


class _TimmLayerNormAct(nn.LayerNorm, _NormAct):
    def __init__(self, features: int, act: nn.Module) -> None:
        super().__init__(features)
        self.add_act(act)

    def forward(self, x: Tensor) -> Tensor:
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(self.drop(x))


class _TimmLayerNormAct2d(_TimmLayerNormAct):
    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return self.act(self.drop(x.permute(0, 3, 1, 2)))


class _TimmLayerScale(nn.Module):  # (gamma scales the last dimension)
    def __init__(self, dim: int, inplace: bool = False, gamma_shape: tuple[int, ...] = ()) -> None:
        super().__init__()
        self.inplace = inplace
        self.gamma = nn.Parameter(torch.randn(dim, *gamma_shape))

    def scale(self) -> Tensor:
        return self.gamma

    def forward(self, x: Tensor) -> Tensor:
        return x.mul_(self.scale()) if self.inplace else x * self.scale()


class _TimmLayerScale2d(_TimmLayerScale):  # (timm.layers': (C,) viewed as (1, C, 1, 1))
    def scale(self) -> Tensor:
        return self.gamma.view(1, -1, 1, 1)


class _SwiftFormerLayerScale2d(_TimmLayerScale):  # (SwiftFormer's and FastViT's: (C, 1, 1))
    def __init__(self, dim: int, inplace: bool = False) -> None:
        super().__init__(dim, inplace, (1, 1))


class _MetaFormerScale(nn.Module):  # (its parameter is scale, viewed as shape)
    def __init__(self, dim: int, use_nchw: bool = True) -> None:
        super().__init__()
        self.shape = (dim, 1, 1) if use_nchw else (dim,)
        self.scale = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.scale.view(self.shape)


class _GlobalResponseNorm(nn.Module):  # (ConvNeXt-V2's; timm starts weight and bias at 0)
    def __init__(self, dim: int, channels_last: bool = True) -> None:
        super().__init__()
        self.eps = 1e-6
        self.spatial_dim, self.channel_dim = ((1, 2), -1) if channels_last else ((2, 3), 1)
        self.wb_shape = (1, 1, 1, -1) if channels_last else (1, -1, 1, 1)
        self.weight = nn.Parameter(torch.randn(dim))
        self.bias = nn.Parameter(torch.randn(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_g = x.norm(p=2, dim=self.spatial_dim, keepdim=True)
        x_n = x_g / (x_g.mean(dim=self.channel_dim, keepdim=True) + self.eps)
        w, b = self.weight.view(self.wb_shape), self.bias.view(self.wb_shape)
        return x + torch.addcmul(b, w, x * x_n)


class _StarReLU(nn.Module):  # (MetaFormer's: s * relu(x) ** 2 + b, scalars)
    def __init__(self, inplace: bool = False, scale_learnable: bool = True) -> None:
        super().__init__()
        self.inplace = inplace
        self.relu = nn.ReLU(inplace=inplace)
        self.scale = nn.Parameter(torch.randn(1), requires_grad=scale_learnable)
        self.bias = nn.Parameter(torch.randn(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * self.relu(x) ** 2 + self.bias


class _LearnableAffineBlock(nn.Module):  # (HGNet's: scale * x + bias, scalars)
    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.randn(1))
        self.bias = nn.Parameter(torch.randn(1))

    def forward(self, x: Tensor) -> Tensor:
        return self.scale * x + self.bias


class _GroupNorm1NoBias(_TimmGroupNorm1):  # (MetaFormer's norms without a bias)
    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels)
        self.bias = None


class _LayerNorm2dNoBias(_TimmLayerNorm2d):
    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels)
        self.bias = None


class _LayerNormNoBias(nn.LayerNorm):
    def __init__(self, num_channels: int) -> None:
        super().__init__(num_channels)
        self.bias = None


class _ConvNextLayerNorm(nn.LayerNorm):  # (Hugging Face's, as transformers 5.25 has it)
    def __init__(self, shape: int, *, eps: float = 1e-6, data_format: str = "channels_last"):
        super().__init__(shape, eps=eps)
        self.data_format = data_format

    def forward(self, features: Tensor) -> Tensor:
        if self.data_format == "channels_first":
            features = features.permute(0, 2, 3, 1)
            features = super().forward(features)
            return features.permute(0, 3, 1, 2)
        return super().forward(features)


class _EomtLayerNorm2d(nn.LayerNorm):  # (Hugging Face EoMT's, as transformers 5.25 has it)
    def forward(self, hidden_state: Tensor) -> Tensor:
        hidden_state = hidden_state.permute(0, 2, 3, 1)
        hidden_state = F.layer_norm(
            hidden_state, self.normalized_shape, self.weight, self.bias, self.eps
        )
        return hidden_state.permute(0, 3, 1, 2)


class _DebertaLayerNorm(nn.Module):  # (Hugging Face's, as transformers 5.25 has it)
    def __init__(self, size: int, eps: float = 1e-12) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(size))
        self.bias = nn.Parameter(torch.randn(size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_type = hidden_states.dtype
        hidden_states = hidden_states.float()
        mean = hidden_states.mean(-1, keepdim=True)
        variance = (hidden_states - mean).pow(2).mean(-1, keepdim=True)
        hidden_states = (hidden_states - mean) / torch.sqrt(variance + self.variance_epsilon)
        hidden_states = hidden_states.to(input_type)
        return self.weight * hidden_states + self.bias


class _Dinov2LayerScale(nn.Module):  # (Hugging Face's, as transformers 5.25 has it)
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.lambda1 = nn.Parameter(torch.randn(dim))

    def forward(self, hidden_state: Tensor) -> Tensor:
        return hidden_state * self.lambda1


class _NoNorm(nn.Module):  # (MobileBERT's, as transformers 5.25 has it)
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.bias = nn.Parameter(torch.randn(dim))
        self.weight = nn.Parameter(torch.randn(dim))

    def forward(self, input_tensor: Tensor) -> Tensor:
        return input_tensor * self.weight + self.bias


class _ConvNextV2GRN(nn.Module):  # (Hugging Face's, as transformers 5.25 has it)
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(1, 1, 1, dim))
        self.bias = nn.Parameter(torch.randn(1, 1, 1, dim))

    def forward(self, hidden_states: Tensor) -> Tensor:
        global_features = torch.linalg.vector_norm(hidden_states, ord=2, dim=(1, 2), keepdim=True)
        norm_features = global_features / (global_features.mean(dim=-1, keepdim=True) + 1e-6)
        return self.weight * (hidden_states * norm_features) + self.bias + hidden_states


class _LlamaRMSNorm(nn.Module):  # (Hugging Face's, as transformers 5.25 has it)
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.variance_epsilon = eps

    def forward(self, hidden_states: Tensor) -> Tensor:
        input_dtype = hidden_states.dtype
        hidden_states = hidden_states.to(torch.float32)
        variance = hidden_states.pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        return self.weight * hidden_states.to(input_dtype)


class _GemmaRMSNorm(nn.Module):  # (scales by 1 + weight; Gemma's multiplies in float32 too,
    # which in a float64 model rounds the weight's gradient to float32)
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.zeros(dim))

    def forward(self, x: Tensor) -> Tensor:
        output = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps))
        return output.type_as(x) * (1.0 + self.weight)


class _Gemma2RMSNorm(_GemmaRMSNorm):  # (as transformers 5.25 has it: (1 + w) x̂ in float32)
    def forward(self, x: Tensor) -> Tensor:
        output = x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)
        return (output * (1.0 + self.weight.float())).type_as(x)


class _T5LayerNorm(_LlamaRMSNorm):  # (T5's, as transformers 5.25 has it: the mean square in
    # float32, the input scaled in its own type; in float64, x̂ in float32 differs by 1e-8)
    def forward(self, hidden_states: Tensor) -> Tensor:
        variance = hidden_states.to(torch.float32).pow(2).mean(-1, keepdim=True)
        hidden_states = hidden_states * torch.rsqrt(variance + self.variance_epsilon)
        if self.weight.dtype in [torch.float16, torch.bfloat16]:
            hidden_states = hidden_states.to(self.weight.dtype)
        return self.weight * hidden_states


class _GatedRMSNorm(_LlamaRMSNorm):  # (a second input: no rule)
    def forward(self, hidden_states: Tensor, gate: Tensor | None = None) -> Tensor:
        return super().forward(hidden_states)


class _EpsOutsideRMSNorm(_LlamaRMSNorm):  # (x / (rms + eps): another computation, no rule)
    def forward(self, hidden_states: Tensor) -> Tensor:
        rms = hidden_states.pow(2).mean(-1, keepdim=True).sqrt()
        return self.weight * hidden_states / (rms + self.variance_epsilon)


TimmLinear = timm_stand_in(_TimmLinear, "timm.layers.linear", "Linear")
TimmStdConv2d = timm_stand_in(_TimmStdConv2d, "timm.layers.std_conv", "StdConv2d")
TimmScaledStdConv2d = timm_stand_in(
    _TimmScaledStdConv2d, "timm.layers.std_conv", "ScaledStdConv2d"
)
TimmConv2dSame = timm_stand_in(_TimmConv2dSame, "timm.layers.conv2d_same", "Conv2dSame")
TimmStdConv2dSame = timm_stand_in(_TimmStdConv2dSame, "timm.layers.std_conv", "StdConv2dSame")
TimmScaledStdConv2dSame = timm_stand_in(
    _TimmScaledStdConv2dSame, "timm.layers.std_conv", "ScaledStdConv2dSame"
)
TimmLayerNorm = timm_stand_in(_TimmLayerNorm, "timm.layers.norm", "LayerNorm")
TimmRmsNorm = timm_stand_in(_TimmRmsNorm, "timm.layers.norm", "RmsNorm")
TimmLayerNorm2d = timm_stand_in(_TimmLayerNorm2d, "timm.layers.norm", "LayerNorm2d")
TimmGroupNorm = timm_stand_in(_TimmGroupNorm, "timm.layers.norm", "GroupNorm")
TimmGroupNorm1 = timm_stand_in(_TimmGroupNorm1, "timm.layers.norm", "GroupNorm1")
TimmLayerScale = timm_stand_in(_TimmLayerScale, "timm.layers.layer_scale", "LayerScale")
TimmLayerScale2d = timm_stand_in(_TimmLayerScale2d, "timm.layers.layer_scale", "LayerScale2d")
SwiftFormerLayerScale2d = timm_stand_in(
    _SwiftFormerLayerScale2d, "timm.models.swiftformer", "LayerScale2d"
)
MetaFormerScale = timm_stand_in(_MetaFormerScale, "timm.models.metaformer", "Scale")
LlamaRMSNorm = timm_stand_in(
    _LlamaRMSNorm, "transformers.models.llama.modeling_llama", "LlamaRMSNorm"
)
GemmaRMSNorm = timm_stand_in(
    _GemmaRMSNorm, "transformers.models.gemma.modeling_gemma", "GemmaRMSNorm"
)
Gemma2RMSNorm = timm_stand_in(
    _Gemma2RMSNorm, "transformers.models.gemma2.modeling_gemma2", "Gemma2RMSNorm"
)
T5LayerNorm = timm_stand_in(_T5LayerNorm, "transformers.models.t5.modeling_t5", "T5LayerNorm")
GatedRMSNorm = timm_stand_in(_GatedRMSNorm, "transformers.models.x.modeling_x", "GatedRMSNorm")
EpsOutsideRMSNorm = timm_stand_in(
    _EpsOutsideRMSNorm, "transformers.models.x.modeling_x", "EpsOutsideRMSNorm"
)


class PlainRMSNorm(LlamaRMSNorm):  # (not Hugging Face's: its module is this one)
    pass


GroupNorm1NoBias = timm_stand_in(_GroupNorm1NoBias, "timm.models.metaformer", "GroupNorm1NoBias")
LayerNorm2dNoBias = timm_stand_in(
    _LayerNorm2dNoBias, "timm.models.metaformer", "LayerNorm2dNoBias"
)
LayerNormNoBias = timm_stand_in(_LayerNormNoBias, "timm.models.metaformer", "LayerNormNoBias")
GlobalResponseNorm = timm_stand_in(_GlobalResponseNorm, "timm.layers.grn", "GlobalResponseNorm")
ConvNextLayerNorm = timm_stand_in(
    _ConvNextLayerNorm, "transformers.models.convnext.modeling_convnext", "ConvNextLayerNorm"
)
EomtLayerNorm2d = timm_stand_in(
    _EomtLayerNorm2d, "transformers.models.eomt.modeling_eomt", "EomtLayerNorm2d"
)
Dinov2LayerScale = timm_stand_in(
    _Dinov2LayerScale, "transformers.models.dinov2.modeling_dinov2", "Dinov2LayerScale"
)
DebertaLayerNorm = timm_stand_in(
    _DebertaLayerNorm, "transformers.models.deberta.modeling_deberta", "DebertaLayerNorm"
)
NoNorm = timm_stand_in(_NoNorm, "transformers.models.mobilebert.modeling_mobilebert", "NoNorm")
ConvNextV2GRN = timm_stand_in(
    _ConvNextV2GRN, "transformers.models.convnextv2.modeling_convnextv2", "ConvNextV2GRN"
)
StarReLU = timm_stand_in(_StarReLU, "timm.models.metaformer", "StarReLU")
LearnableAffineBlock = timm_stand_in(
    _LearnableAffineBlock, "timm.models.hgnet", "LearnableAffineBlock"
)
TimmBatchNormAct2d = timm_stand_in(_TimmBatchNormAct2d, "timm.layers.norm_act", "BatchNormAct2d")
TimmGroupNormAct = timm_stand_in(_TimmGroupNormAct, "timm.layers.norm_act", "GroupNormAct")
TimmGroupNorm1Act = timm_stand_in(_TimmGroupNorm1Act, "timm.layers.norm_act", "GroupNorm1Act")
BitGroupNormActivation = timm_stand_in(
    _BitGroupNormActivation, "transformers.models.bit.modeling_bit", "BitGroupNormActivation"
)
WeightStandardizedConv2d = timm_stand_in(
    _WeightStandardizedConv2d, "transformers.models.bit.modeling_bit", "WeightStandardizedConv2d"
)
TimmLayerNormAct = timm_stand_in(_TimmLayerNormAct, "timm.layers.norm_act", "LayerNormAct")
TimmLayerNormAct2d = timm_stand_in(_TimmLayerNormAct2d, "timm.layers.norm_act", "LayerNormAct2d")


LAYERS = {
    "linear": (lambda: nn.Linear(5, 4), (6, 5)),
    "gpt_conv1d": (lambda: Conv1D(4, 5), (6, 5)),
    "gpt_conv1d_sequence": (lambda: Conv1D(4, 5), (6, 7, 5)),
    "falcon_linear_sequence": (lambda: FalconLinear(5, 4), (6, 7, 5)),
    "falcon_linear_no_bias": (lambda: FalconLinear(5, 4, bias=False), (6, 5)),
    "timm_linear": (lambda: TimmLinear(5, 4), (6, 7, 5)),
    "timm_layer_norm": (lambda: TimmLayerNorm(5), (6, 4, 5)),
    "timm_rms_norm": (lambda: TimmRmsNorm(5, eps=1e-6), (6, 4, 5)),
    "timm_layer_norm_2d": (lambda: TimmLayerNorm2d(3), (6, 3, 4, 5)),
    "timm_group_norm": (lambda: TimmGroupNorm(4, 2), (6, 4, 3, 3)),
    "timm_group_norm1": (lambda: TimmGroupNorm1(4), (6, 4, 5)),
    "timm_layer_scale": (lambda: TimmLayerScale(5), (6, 4, 5)),
    "timm_layer_scale_features": (lambda: TimmLayerScale(5), (6, 5)),
    "timm_layer_scale_2d": (lambda: TimmLayerScale2d(3), (6, 3, 4, 5)),
    "swiftformer_layer_scale_2d": (lambda: SwiftFormerLayerScale2d(3), (6, 3, 4, 5)),
    "metaformer_scale_nchw": (lambda: MetaFormerScale(3), (6, 3, 4, 5)),
    "metaformer_scale_channels_last": (lambda: MetaFormerScale(5, use_nchw=False), (6, 3, 4, 5)),
    "group_norm1_no_bias": (lambda: GroupNorm1NoBias(3), (6, 3, 4, 5)),
    "layer_norm2d_no_bias": (lambda: LayerNorm2dNoBias(3), (6, 3, 4, 5)),
    "layer_norm_no_bias": (lambda: LayerNormNoBias(5), (6, 4, 5)),
    "llama_rms_norm": (lambda: LlamaRMSNorm(5), (6, 4, 5)),
    "gemma_rms_norm": (lambda: GemmaRMSNorm(5), (6, 5)),
    "t5_layer_norm": (lambda: T5LayerNorm(5), (6, 4, 5)),
    "global_response_norm": (lambda: GlobalResponseNorm(5), (6, 3, 4, 5)),
    "global_response_norm_nchw": (
        lambda: GlobalResponseNorm(3, channels_last=False), (6, 3, 4, 5)
    ),
    "hf_convnext_layer_norm_channels_first": (
        lambda: ConvNextLayerNorm(3, data_format="channels_first"), (6, 3, 4, 5)
    ),
    "hf_convnext_layer_norm_channels_last": (lambda: ConvNextLayerNorm(5), (6, 3, 4, 5)),
    "hf_layer_norm_2d": (lambda: EomtLayerNorm2d(3), (6, 3, 4, 5)),
    "hf_layer_scale": (lambda: Dinov2LayerScale(5), (6, 4, 5)),
    "hf_no_norm": (lambda: NoNorm(5), (6, 4, 5)),
    # (x̂ in float32: the references' float64 autograd sees the same x̂, rounded alike)
    "hf_deberta_layer_norm": (lambda: DebertaLayerNorm(5, eps=1e-7), (6, 4, 5)),
    "hf_global_response_norm": (lambda: ConvNextV2GRN(5), (6, 3, 4, 5)),
    "star_relu": (lambda: StarReLU(), (6, 4, 5)),
    "star_relu_fixed_scale": (lambda: StarReLU(scale_learnable=False), (6, 3, 4, 5)),
    "learnable_affine_block": (lambda: LearnableAffineBlock(), (6, 3, 4, 5)),
    # (the activation in place, as timm's default: it modifies the piece pulled back to)
    "timm_batch_norm_act": (lambda: TimmBatchNormAct2d(3, nn.ReLU(inplace=True)), (6, 3, 4, 5)),
    "timm_group_norm_act": (lambda: TimmGroupNormAct(4, nn.SiLU(inplace=True)), (6, 4, 3, 3)),
    "hf_bit_group_norm_activation": (
        lambda: BitGroupNormActivation(4, nn.ReLU()), (6, 4, 3, 3)
    ),
    "hf_bit_group_norm_identity": (
        lambda: BitGroupNormActivation(4, nn.Identity()), (6, 4, 3, 3)
    ),
    "timm_group_norm1_act": (lambda: TimmGroupNorm1Act(4, nn.GELU()), (6, 4, 5)),
    "timm_layer_norm_act": (lambda: TimmLayerNormAct(5, nn.ReLU(inplace=True)), (6, 4, 5)),
    "timm_layer_norm_act_2d": (
        lambda: TimmLayerNormAct2d(3, nn.Hardswish(inplace=True)), (6, 3, 4, 5)
    ),
    "linear_no_bias": (lambda: nn.Linear(5, 4, bias=False), (6, 5)),
    "linear_sequence": (lambda: nn.Linear(5, 4), (6, 7, 5)),
    "linear_4d": (lambda: nn.Linear(5, 4), (6, 2, 3, 5)),
    "linear_short_sequence": (lambda: nn.Linear(16, 16), (6, 2, 16)),  # Gram with L = 2
    "conv1d": (lambda: nn.Conv1d(4, 6, 3, stride=2, padding=1, dilation=2, groups=2), (5, 4, 11)),
    "conv1d_same_circular": (
        lambda: nn.Conv1d(3, 2, 4, padding="same", padding_mode="circular"), (5, 3, 9)
    ),
    "conv2d": (lambda: nn.Conv2d(2, 4, 3, stride=(2, 1), padding=(1, 2)), (5, 2, 7, 6)),
    "conv2d_groups_dilation": (
        lambda: nn.Conv2d(6, 3, (2, 3), dilation=(2, 1), groups=3, bias=False), (5, 6, 7, 6)
    ),
    "conv2d_same_even_kernel": (
        lambda: nn.Conv2d(2, 3, (2, 4), padding="same", dilation=(1, 2)), (5, 2, 6, 7)
    ),
    "conv2d_same_reflect": (
        lambda: nn.Conv2d(2, 3, (2, 3), padding="same", padding_mode="reflect"), (5, 2, 6, 5)
    ),
    "conv2d_few_positions": (  # Gram with L = 4
        lambda: nn.Conv2d(8, 8, 3, groups=2), (5, 8, 4, 4)
    ),
    "conv2d_pointwise_strided": (  # 1x1 kernels: the patches are the strided input
        lambda: nn.Conv2d(4, 6, 1, stride=(2, 3)), (5, 4, 7, 6)
    ),
    "conv1d_pointwise_groups": (lambda: nn.Conv1d(4, 6, 1, stride=3, groups=2), (5, 4, 10)),
    "conv2d_pointwise_padded": (lambda: nn.Conv2d(2, 3, 1, padding=1), (5, 2, 4, 3)),
    "conv3d": (
        lambda: nn.Conv3d(2, 4, (2, 3, 2), (1, 2, 1), (1, 0, 1), (1, 1, 2)), (5, 2, 4, 6, 5)
    ),
    "conv2d_timm_std": (  # (weight standardisation: the batch-norm backward on each row)
        lambda: TimmStdConv2d(4, 6, 3, stride=2, padding=1, groups=2, bias=True), (5, 4, 7, 6)
    ),
    "conv2d_timm_scaled_std": (
        lambda: TimmScaledStdConv2d(3, 4, (3, 2), padding=(1, 0), dilation=(1, 2), eps=1e-2),
        (5, 3, 6, 7),
    ),
    "conv2d_timm_scaled_std_pointwise_groups": (
        lambda: TimmScaledStdConv2d(4, 6, 1, stride=2, groups=2, bias=False), (5, 4, 5, 4)
    ),
    "conv2d_timm_tensorflow_same": (  # (4 pads 1 + 2 with stride 2 and 5 taps; 7 pads 2 + 2)
        lambda: TimmConv2dSame(4, 6, (5, 3), stride=2, groups=2), (5, 4, 7, 4)
    ),
    "conv2d_timm_tensorflow_same_dilated": (
        lambda: TimmConv2dSame(3, 4, 3, stride=(1, 3), dilation=(2, 1), bias=False), (5, 3, 6, 7)
    ),
    "conv2d_timm_std_tensorflow_same": (
        lambda: TimmStdConv2dSame(4, 6, 4, stride=2, bias=True), (5, 4, 7, 6)
    ),
    "conv2d_timm_std_tensorflow_same_static": (  # (same_pad off: its static padding)
        lambda: TimmStdConv2dSame(3, 4, 3, padding=1, dynamic=False), (5, 3, 5, 4)
    ),
    "conv2d_timm_scaled_std_tensorflow_same": (
        lambda: TimmScaledStdConv2dSame(3, 4, (3, 2), stride=(2, 1), eps=1e-2), (5, 3, 6, 5)
    ),
    "conv2d_hf_bit_standardized_same": (  # (7 pads 1 + 2 with stride 2 and 4 taps)
        lambda: WeightStandardizedConv2d(4, 6, 4, stride=2, groups=2, bias=True), (5, 4, 7, 6)
    ),
    "conv2d_hf_bit_standardized_static": (
        lambda: WeightStandardizedConv2d(3, 4, 3, dynamic=False), (5, 3, 5, 4)
    ),
    "conv3d_same_replicate_groups": (
        lambda: nn.Conv3d(4, 2, 3, padding="same", groups=2, padding_mode="replicate"),
        (5, 4, 3, 4, 3),
    ),
    "conv3d_pointwise_strided": (lambda: nn.Conv3d(3, 2, 1, stride=2), (5, 3, 3, 4, 5)),
    "conv_transpose1d": (
        lambda: nn.ConvTranspose1d(4, 6, 3, 2, 1, output_padding=1, groups=2, dilation=2),
        (5, 4, 7),
    ),
    "conv_transpose2d": (
        lambda: nn.ConvTranspose2d(3, 4, (3, 2), stride=(2, 1), padding=(1, 0)), (5, 3, 4, 5)
    ),
    "conv_transpose2d_output_padding_past_stride": (  # positions past the input's: cut
        lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, output_padding=(2, 0), dilation=3),
        (5, 2, 3, 4),
    ),
    "conv_transpose2d_few_positions": (  # Gram with L = 4
        lambda: nn.ConvTranspose2d(8, 8, 3, groups=2), (5, 8, 2, 2)
    ),
    "conv_transpose2d_pointwise": (lambda: nn.ConvTranspose2d(3, 2, 1, stride=2), (5, 3, 3, 4)),
    "conv_transpose2d_dcgan": (  # every phase with 2 x 2 taps: alike, taken at once on GPUs
        lambda: nn.ConvTranspose2d(4, 6, 4, 2, 1, groups=2), (5, 4, 3, 2)
    ),
    "conv_transpose3d": (
        lambda: nn.ConvTranspose3d(2, 2, 2, stride=2, bias=False), (5, 2, 2, 3, 2)
    ),
    "conv_transpose3d_all_settings": (
        lambda: nn.ConvTranspose3d(
            2, 4, (2, 3, 2), (2, 1, 2), (0, 1, 1), (1, 0, 1), groups=2, dilation=(1, 2, 1)
        ),
        (5, 2, 2, 3, 3),
    ),
    "batchnorm1d": (lambda: nn.BatchNorm1d(4), (6, 4)),
    "batchnorm1d_sequence": (lambda: nn.BatchNorm1d(4), (6, 4, 5)),
    "batchnorm2d": (lambda: nn.BatchNorm2d(3), (6, 3, 4, 5)),
    "syncbatchnorm": (lambda: nn.SyncBatchNorm(3), (6, 3, 4, 5)),  # (as DDP models convert)
    "layernorm": (lambda: nn.LayerNorm(5), (6, 4, 5)),
    "layernorm_2d_no_bias": (lambda: nn.LayerNorm((4, 5), bias=False), (6, 3, 4, 5)),
    "groupnorm": (lambda: nn.GroupNorm(2, 4), (6, 4, 3, 3)),
    "instancenorm1d": (lambda: nn.InstanceNorm1d(3, affine=True), (6, 3, 5)),
    "instancenorm2d_tracked": (
        lambda: nn.InstanceNorm2d(3, affine=True, track_running_stats=True), (6, 3, 4, 5)
    ),
    "instancenorm3d": (lambda: nn.InstanceNorm3d(2, affine=True), (6, 2, 3, 2, 3)),
    "rmsnorm": (lambda: nn.RMSNorm(5), (6, 4, 5)),
    "prelu_per_channel": (lambda: nn.PReLU(3), (6, 3, 4, 5)),
    "prelu_per_feature": (lambda: nn.PReLU(4), (6, 4)),
    "prelu_shared": (lambda: nn.PReLU(), (6, 4, 5)),
    # (subclasses that define nothing but how they are made: their bases' rules)
    "conv2d_subclass": (lambda: DepthwiseConv2d(4, 3, stride=2), (5, 4, 5, 6)),
    "groupnorm_subclass": (lambda: SingleGroupNorm(4), (6, 4, 3, 3)),
    "groupnorm_subclass_of_a_subclass": (lambda: SingleGroupNormAgain(4), (6, 4, 3, 3)),
}


class DepthwiseConv2d(nn.Conv2d):
    """A subclass that only sets its base's arguments (Hugging Face EfficientNet's
    ``EfficientNetDepthwiseConv2d``): its base's rule."""

    def __init__(self, channels: int, kernel_size: int, stride: int = 1) -> None:
        super().__init__(channels, channels, kernel_size, stride, kernel_size // 2, groups=channels)


class SingleGroupNorm(nn.GroupNorm):
    """PoolFormer's ``GroupNorm`` (Hugging Face's and timm's): one group."""

    def __init__(self, channels: int) -> None:
        super().__init__(1, channels)

    def extra_repr(self) -> str:
        return f"channels={self.num_channels}"


class SingleGroupNormAgain(SingleGroupNorm):
    """A subclass of a subclass, adding nothing either."""


class ShiftedInputConv2d(nn.Conv2d):
    """A subclass overriding a helper its base's ``forward`` calls: no rule."""

    def _conv_forward(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return super()._conv_forward(x + 1, weight, bias)


class CountingLinear(nn.Linear):
    """A subclass with a method of its own (one its base never calls): no rule all the same."""

    def count(self) -> int:
        return self.weight.numel()


def randomize_affine(model: nn.Module) -> None:
    norms = (nn.LayerNorm, nn.GroupNorm, nn.RMSNorm, nn.modules.instancenorm._InstanceNorm)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, norms):
                m.weight.uniform_(0.5, 1.5)
                if getattr(m, "bias", None) is not None:
                    m.bias.normal_()
                if getattr(m, "running_mean", None) is not None:  # (tracked instance norm)
                    m.running_mean.normal_()
                    m.running_var.uniform_(0.5, 2.0)


@pytest.mark.parametrize("name", list(LAYERS))
def test_rule_matches_references(name: str, engine_ways: str) -> None:
    make, shape = LAYERS[name]
    x = torch.randn(*shape, dtype=torch.float64)
    model = with_head(make().double(), x)
    randomize_affine(model)
    check_against_references(model, x)


def test_layers_of_other_libraries_get_their_rules_by_qualified_name() -> None:
    """(The tests above would pass on the per-module fallback too.)"""
    assert rules.rule_for(Conv1D(4, 5)) is rules.gpt_conv1d
    assert rules.rule_for(FalconLinear(5, 4)) is rules.linear
    assert rules.rule_for(TimmLinear(5, 4)) is rules.linear
    assert rules.rule_for(TimmLayerNorm(5)) is rules.layer_norm
    assert rules.rule_for(TimmRmsNorm(5)) is rules.rms_norm
    assert rules.rule_for(TimmLayerNorm2d(3)) is rules.channel_layer_norm
    assert rules.rule_for(TimmGroupNorm(4, 2)) is rules.group_norm
    assert rules.rule_for(TimmGroupNorm1(4)) is rules.group_norm
    assert rules.rule_for(GroupNorm1NoBias(4)) is rules.group_norm
    assert rules.rule_for(LayerNorm2dNoBias(4)) is rules.channel_layer_norm
    assert rules.rule_for(LayerNormNoBias(4)) is rules.layer_norm
    for scale in (TimmLayerScale, TimmLayerScale2d, SwiftFormerLayerScale2d):
        assert rules.rule_for(scale(4)) is rules.layer_scale
        assert rules.rule_for(scale(4, inplace=True)) is None  # (it overwrites its input)
    assert rules.rule_for(MetaFormerScale(4)) is rules.layer_scale
    for layer in (GlobalResponseNorm(4), StarReLU(), LearnableAffineBlock()):
        assert rules.rule_for(layer) is rules.affine_of_input
    assert rules.rule_for(StarReLU(inplace=True)) is None  # (it overwrites its input)
    for layer in (NoNorm(4), ConvNextV2GRN(4)):
        assert rules.rule_for(layer) is rules.affine_of_input
    assert rules.rule_for(Dinov2LayerScale(4)) is rules.layer_scale
    assert rules.rule_for(DebertaLayerNorm(4)) is rules.deberta_layer_norm
    assert rules.rule_for(EomtLayerNorm2d(4)) is rules.channel_layer_norm
    for data_format in ("channels_first", "channels_last"):
        layer = ConvNextLayerNorm(4, data_format=data_format)
        assert rules.rule_for(layer) is rules.formatted_layer_norm
        layer.data_format = "channels_middle"
        assert rules.rule_for(layer) is None
    assert rules.rule_for(LlamaRMSNorm(4)) is rules.hugging_face_rms_norm
    assert rules.rule_for(GemmaRMSNorm(4)) is rules.hugging_face_rms_norm
    assert rules.rule_for(T5LayerNorm(4)) is rules.hugging_face_rms_norm
    assert rules.rule_for(GatedRMSNorm(4)) is None  # (a second input)
    assert rules.rule_for(EpsOutsideRMSNorm(4)) is None  # (it computes something else)
    assert rules.rule_for(PlainRMSNorm(4)) is None
    assert rules.rule_for(TimmStdConv2d(2, 3, 3)) is convolution.standardized_conv
    assert rules.rule_for(TimmScaledStdConv2d(2, 3, 3)) is convolution.standardized_conv
    # (its forward pads with zeros whatever the mode: not the convolution the rule takes)
    assert rules.rule_for(TimmScaledStdConv2d(2, 3, 3, padding_mode="reflect")) is None
    assert rules.rule_for(nn.Conv2d(2, 3, 3)) is convolution.conv
    assert rules.rule_for(TimmConv2dSame(2, 3, 3)) is convolution.conv_tensorflow_same
    for make in (TimmStdConv2dSame, TimmScaledStdConv2dSame):
        assert rules.rule_for(make(2, 3, 3)) is convolution.standardized_conv_tensorflow_same
        assert rules.rule_for(make(2, 3, 3, padding_mode="reflect")) is None
    assert rules.rule_for(WeightStandardizedConv2d(2, 3, 3)) is convolution.bit_standardized_conv
    assert rules.rule_for(WeightStandardizedConv2d(2, 3, 3, dynamic=False)) is not None
    padded_by_ones = WeightStandardizedConv2d(2, 3, 3)
    padded_by_ones.pad.value = 1.0
    assert rules.rule_for(padded_by_ones) is None
    assert rules.rule_for(BitGroupNormActivation(4, nn.GELU())) is norm_act.norm_act
    assert rules.rule_for(BitGroupNormActivation(4, nn.PReLU())) is None
    for make in (TimmBatchNormAct2d, TimmGroupNormAct, TimmLayerNormAct, TimmLayerNormAct2d):
        assert rules.rule_for(make(4, nn.ReLU())) is norm_act.norm_act
        assert rules.rule_for(make(4, nn.PReLU())) is None  # (a parametrised activation)


def test_subclasses_that_only_say_how_they_are_made_get_their_bases_rules() -> None:
    """A subclass defining ``__init__`` or ``extra_repr`` alone computes what its base does
    (before, its exact class had no rule: the per-module fallback); one defining anything else
    may not, even a method its base's ``forward`` never calls, and a parametrised module's
    class (``torch.nn.utils.parametrize``, a subclass with a property for the weight) has none.
    (The references above would pass on the per-module fallback too.)"""
    assert rules.rule_for(DepthwiseConv2d(4, 3)) is convolution.conv
    assert rules.rule_for(SingleGroupNorm(4)) is rules.group_norm
    assert rules.rule_for(SingleGroupNormAgain(4)) is rules.group_norm
    assert rules.rule_for(ShiftedInputConv2d(2, 3, 3)) is None
    assert rules.rule_for(CountingLinear(2, 3)) is None
    assert rules.rule_for(AlwaysBatchStatistics(3)) is None
    parametrized = nn.Linear(2, 3)
    torch.nn.utils.parametrize.register_parametrization(parametrized, "weight", nn.Tanh())
    assert rules.rule_for(parametrized) is None


CONVS = [name for name in LAYERS if name.startswith("conv")]


@pytest.mark.parametrize("name", CONVS)
@pytest.mark.parametrize("layout", ["vectors_first", "samples_first"])
@pytest.mark.parametrize("budget", [1, DEFAULT_MEMORY_BUDGET])
@pytest.mark.parametrize("num_vectors", [K, 1])
def test_conv_rule_any_layout_and_chunks(
    name: str, layout: str, budget: int, num_vectors: int, engine_ways: str
) -> None:
    """The (transposed) convolution rule on ``G`` stored ``(K, B, ...)`` (batched pull-back)
    or ``(B, K, ...)`` (looped pull-back), one sample per chunk or all, equals brute force;
    with one vector too (3-d convolutions: per-sample gradients by a grouped backward)."""
    make, shape = LAYERS[name]
    torch.manual_seed(0)
    layer = make().double()
    x = torch.randn(*shape, dtype=torch.float64)
    y = layer(x)
    grads = torch.randn(num_vectors, *y.shape, dtype=torch.float64)
    if layout == "samples_first":
        grads = grads.transpose(0, 1).contiguous().transpose(0, 1)
    names = [n for n, _ in layer.named_parameters()]
    with torch.no_grad():
        got = rules.rule_for(layer)(layer, x, grads, names, budget)
    expected = {n: torch.zeros_like(p) for n, p in layer.named_parameters()}
    for i in range(x.shape[0]):
        out = layer(x[i : i + 1])
        for k in range(num_vectors):
            pulled = torch.autograd.grad(
                out, list(layer.parameters()), grads[k, i : i + 1], retain_graph=True
            )
            for n, g in zip(names, pulled):
                expected[n] += g.square()
    assert_close_dicts(got, expected, 1e-10)


@pytest.mark.parametrize("padding_idx", [None, 2])
def test_embedding_with_repeated_indices(padding_idx: int | None) -> None:
    layer = nn.Embedding(7, 4, padding_idx=padding_idx).double()
    x = torch.tensor([[1, 2, 1, 1], [2, 3, 4, 2], [0, 0, 0, 6], [5, 6, 5, 2]])
    check_against_references(with_head(layer, x), x)


class TwoInputs(nn.Module):
    """An ``nn.Bilinear`` of the first 3 and the last 2 features of its input."""

    def __init__(self, bias: bool) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 2, 4, bias=bias)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, *S, 5)
        h = torch.tanh(self.bilinear(x[..., :3], x[..., 3:]))
        return self.head(h.reshape(h.shape[0], -1, 4).sum(1))


@pytest.mark.parametrize("shape", [(6, 5), (6, 4, 5), (6, 2, 3, 5)])
@pytest.mark.parametrize("bias", [True, False])
def test_bilinear(shape: tuple[int, ...], bias: bool, monkeypatch) -> None:
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)  # (by the rule: would fail if called)
    torch.manual_seed(0)
    check_against_references(TwoInputs(bias).double(), torch.randn(*shape, dtype=torch.float64))


class Bags(nn.Module):
    """An ``nn.EmbeddingBag`` on ``(B, L)`` indices, read from the first channel of ``(B, L,
    2)`` inputs (the second: per-sample weights, for ``mode="sum"``)."""

    def __init__(self, mode: str, padding_idx: int | None, weighted: bool) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(7, 4, mode=mode, padding_idx=padding_idx)
        self.weighted = weighted
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        weights = x[..., 1] if self.weighted else None
        return self.head(torch.tanh(self.bag(x[..., 0].long(), per_sample_weights=weights)))


@pytest.mark.parametrize(
    "mode, padding_idx, weighted",
    [("sum", None, False), ("sum", 2, True), ("mean", None, False), ("mean", 2, False)],
)
def test_embedding_bag(mode: str, padding_idx: int | None, weighted: bool, monkeypatch) -> None:
    """Repeated indices in a bag, a bag of padding only (its mean: zero), weights; by the rule
    (the call is not declined to the per-module fallback)."""
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)  # (would fail if called)
    indices = torch.tensor([[1, 2, 1, 1], [2, 3, 4, 2], [2, 2, 2, 2], [5, 6, 5, 0], [0, 1, 2, 3]])
    x = torch.stack([indices.double(), torch.rand(5, 4, dtype=torch.float64)], -1)
    torch.manual_seed(0)
    check_against_references(Bags(mode, padding_idx, weighted).double(), x)


class ByKeyword(nn.Module):
    """Rules that take the whole call, called with their inputs by keyword."""

    def __init__(self) -> None:
        super().__init__()
        self.bilinear = nn.Bilinear(3, 2, 4)
        self.bag = nn.EmbeddingBag(7, 4, mode="sum")
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 5)
        h = self.bilinear(input1=x[:, :3], input2=x[:, 3:])
        indices = (x[:, :4].abs() * 2).long().clamp(max=6)
        bags = self.bag(input=indices, per_sample_weights=x[:, 1:].abs())
        return self.head(torch.tanh(torch.cat([h, bags], 1)))


def test_whole_call_rules_take_inputs_passed_by_keyword(monkeypatch) -> None:
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)  # (by the rules: would fail if called)
    torch.manual_seed(0)
    check_against_references(ByKeyword().double(), torch.randn(6, 5, dtype=torch.float64))


def test_embedding_bag_with_offsets_goes_to_the_fallback() -> None:
    """A call with ``offsets`` (bags that are not the samples) is declined."""
    bag = nn.EmbeddingBag(7, 4).double()
    x = torch.tensor([[1, 2, 1], [3, 4, 5]])
    grads = {0: torch.randn(2, 2, 4, dtype=torch.float64)}
    offsets = torch.tensor([0])
    assert rules.embedding_bag(bag, (x.reshape(-1), offsets), {}, grads, {}, ["weight"], 1) is None
    assert rules.embedding_bag(bag, (x,), {}, grads, {}, ["weight"], 1) is not None


@pytest.mark.parametrize("batch", [0, 1, 1023, 1024, 1025, 3000])
def test_sample_products_are_the_contraction_over_the_samples(batch: int) -> None:
    torch.manual_seed(0)
    a, b = torch.randn(batch, 3), torch.randn(batch, 5)
    got = rules.sample_products(a, b)
    torch.testing.assert_close(got.double(), a.double().mT @ b.double(), rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("terms", [0, 5, 1024, 1025, 5000])
@pytest.mark.parametrize("shape", [(), (3,), (2, 3)])
def test_add_rows_is_index_add(terms: int, shape: tuple[int, ...]) -> None:
    """Into a table that already holds sums, with repeated rows, in blocks or not."""
    torch.manual_seed(0)
    table = torch.randn(9, *shape, dtype=torch.float64)
    index, values = torch.randint(0, 9, (terms,)), torch.randn(terms, *shape, dtype=torch.float64)
    expected = table.clone().index_add_(0, index, values)
    assert rules.add_rows(table, index, values) is table
    torch.testing.assert_close(table, expected, rtol=1e-12, atol=1e-12)


class TokensTable(nn.Module):
    """An embedding, a bag of embeddings and a small linear layer, on ``(B, 3)`` tokens."""

    def __init__(self) -> None:
        super().__init__()
        self.table, self.bag = nn.Embedding(5, 4), nn.EmbeddingBag(5, 4, mode="mean")
        self.head = nn.Linear(4, 3)

    def forward(self, ids: Tensor) -> Tensor:
        return self.head(torch.tanh(self.table(ids).mean(1) + self.bag(ids)))


@pytest.mark.parametrize(
    "model_of", [lambda: mlp(4, 6, 3).float(), TokensTable, lambda: TinyLanguageModel()]
)
def test_sums_over_one_large_batch_keep_float32_precision(model_of) -> None:
    """One batch of 1e5 samples: the weights of a layer with few features in and out, and
    embedding rows looked up in most samples (the table tied to the output layer too), each
    sum of 1e5 terms. Added in sequence in float32 they were 2.0e-5 (the linear layer's
    weight) and 1.3e-4 (embedding rows) off; the functorch engine's are ~1e-7."""
    torch.manual_seed(0)
    model = model_of()
    batch = 100_000
    if isinstance(model, nn.Sequential):
        x, y = torch.randn(batch, 4), torch.randint(0, 3, (batch,))
    else:
        per_position = isinstance(model, TinyLanguageModel)
        x = torch.randint(0, 5, (batch, 3))
        y = torch.randint(0, 7 if per_position else 3, (batch, 3) if per_position else (batch,))
    got = fisher_diagonal(model, [(x, y)], "empirical", backend="hooks")
    x = x.double() if x.is_floating_point() else x
    expected = fisher_diagonal(model.double(), [(x, y)], "empirical", backend="hooks")
    for name in expected:
        error = (got[name].double() - expected[name]).abs().max() / expected[name].abs().max()
        assert error < 1.5e-6, (name, error.item())


@settings(max_examples=30, deadline=None)
@given(
    kind=st.sampled_from(["1d", "1d-seq", "2d", "3d"]),
    batch=st.integers(1, 3),
    spatial=st.integers(1, 3),
    leading=st.sampled_from([(), (1,), (3,)]),
    names=st.sampled_from([("weight", "bias"), ("weight",), ("bias",)]),
    channels_last=st.booleans(),
    input_channels_last=st.booleans(),
    float32=st.booleans(),
)
def test_batch_norm_reducer_on_random_shapes(
    kind, batch, spatial, leading, names, channels_last, input_channels_last, float32
) -> None:
    """The eval-mode batch norm's reducer gives the per-sample, per-channel sums of ``G * x̂``
    and ``G`` over the spatial dimensions, for one vector (the kernel's backward with the
    samples as channels, leading dimensions of size 1 or none, as a looped pull-back gives
    them) and for several (``x̂`` broadcast), on inputs with dimensions of size 1 and
    channels-last gradients (the CPU kernel's backward is wrong for size-1 dimensions with
    unusual strides), and channels-last inputs (which take ``x̂`` for one vector too)."""
    dtype = torch.float32 if float32 else torch.float64
    shape = {
        "1d": (batch, 3), "1d-seq": (batch, 3, spatial), "2d": (batch, 3, spatial, 2),
        "3d": (batch, 3, 2, spatial, 1),
    }[kind]  # fmt: skip
    module = {"1d": nn.BatchNorm1d, "1d-seq": nn.BatchNorm1d, "2d": nn.BatchNorm2d}.get(
        kind, nn.BatchNorm3d
    )(3).to(dtype).eval()
    randomize_bn(module)
    x = torch.randn(shape, dtype=dtype)
    if input_channels_last and kind in ("2d", "3d"):
        layout = torch.channels_last if kind == "2d" else torch.channels_last_3d
        x = x.contiguous(memory_format=layout)
    grads = torch.randn(*leading, *shape, dtype=dtype)
    if channels_last and kind == "2d":
        grads = grads.reshape(-1, *shape[1:]).contiguous(memory_format=torch.channels_last)
        grads = grads.reshape(*leading, *shape)
    got = rules.batch_norm_parts(module, x, names)(grads)
    view = (1, 3) + (1,) * (len(shape) - 2)
    std = (module.running_var.view(view) + module.eps).sqrt()
    sums = {"weight": grads * (x - module.running_mean.view(view)) / std, "bias": grads}
    lead = len(leading) + 2  # (..., B, C)
    want = torch.stack(
        [sums[n].reshape(*grads.shape[:lead], -1).sum(-1) for n in names], dim=lead - 1
    )
    assert got.shape == want.shape
    tol = 1e-5 if float32 else 1e-12
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@settings(max_examples=12, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    channels=st.integers(1, 2),
    kernel=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 2), st.integers(1, 2)),
    padding=st.integers(0, 2),
    dilation=st.integers(1, 2),
    bias=st.booleans(),
    batch=st.integers(1, 4),
)
def test_conv2d_random_shapes(groups, channels, kernel, stride, padding, dilation, bias, batch):
    torch.manual_seed(0)
    layer = nn.Conv2d(
        2 * channels, 2 * groups, kernel, stride, padding, dilation, groups, bias
    ).double()
    x = torch.randn(batch, 2 * channels, 7, 6, dtype=torch.float64)
    check_against_references(with_head(layer, x), x)


@settings(max_examples=16, deadline=None)
@given(
    groups=st.sampled_from([1, 2]),
    kernel=st.tuples(st.integers(1, 4), st.integers(1, 3)),
    stride=st.tuples(st.integers(1, 3), st.integers(1, 2)),
    padding=st.tuples(st.integers(0, 2), st.integers(0, 1)),
    dilation=st.tuples(st.integers(1, 2), st.integers(1, 3)),
    extra=st.tuples(st.integers(0, 2), st.integers(0, 2)),
    bias=st.booleans(),
    batch=st.integers(1, 3),
)
def test_conv_transpose2d_random_shapes(
    groups, kernel, stride, padding, dilation, extra, bias, batch
):
    """Any stride, dilation, padding and output padding (below the stride or the dilation,
    as PyTorch requires): taps of every phase, some with windows past the input."""
    output_padding = tuple(e % max(s, d) for e, s, d in zip(extra, stride, dilation))
    x = torch.randn(batch, 2 * groups, 3, 4, dtype=torch.float64)
    sizes = [
        (n - 1) * s - 2 * p + d * (k - 1) + o + 1
        for n, s, p, d, k, o in zip((3, 4), stride, padding, dilation, kernel, output_padding)
    ]
    assume(min(sizes) > 0)
    torch.manual_seed(0)
    layer = nn.ConvTranspose2d(
        2 * groups, 2 * groups, kernel, stride, padding, output_padding, groups, bias, dilation
    ).double()
    for ways in ("cpu", "launch-bound"):  # (the phases one at a time, or alike ones at once)
        with engine_ways(ways):
            check_against_references(with_head(layer, x), x)


class SizedUpsampling(nn.Module):
    """A transposed convolution called with ``output_size``: output paddings of 1 and 2 (below
    its stride, 3) chosen at call time, not set on the module."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 3, stride=3, padding=1)
        self.head = nn.Linear(3 * 11 * 12, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, 4, 4)
        return self.head(torch.tanh(self.up(x, output_size=(11, 12))).flatten(1))


def test_transposed_convolution_with_an_output_size() -> None:
    check_against_references(SizedUpsampling().double(), torch.randn(5, 2, 4, 4).double())


@settings(max_examples=8, deadline=None)
@given(
    batch=st.integers(1, 5),
    extra=st.lists(st.integers(1, 3), max_size=2),
    features=st.tuples(st.integers(1, 4), st.integers(1, 4)),
    budget=st.sampled_from([1, DEFAULT_MEMORY_BUDGET]),
)
def test_linear_random_shapes(batch, extra, features, budget):
    torch.manual_seed(0)
    x = torch.randn(batch, *extra, features[0], dtype=torch.float64)
    model = with_head(nn.Linear(*features).double(), x)
    check_against_references(model, x, memory_budget=budget)


class Scale(nn.Module):
    """A parametrised module without a rule: y = x * s + t² (per-feature)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.s = nn.Parameter(torch.rand(features) + 0.5)
        self.t = nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return x * self.s + self.t.square()


class Pair(nn.Module):
    """A module without a rule returning a tuple, one part of it unused downstream."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor, *, shift: float) -> tuple[Tensor, Tensor]:
        return torch.tanh(x @ self.w) + shift, x @ self.w.T


class Mixed(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(5, 4)
        self.scale = Scale(4)
        self.pair = Pair()
        self.bilinear = nn.Bilinear(4, 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.scale(torch.relu(self.fc(x)))
        a, _ = self.pair(h, shift=0.5)
        return self.bilinear(a, h)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_modules_without_rules_use_the_per_module_fallback() -> None:
    model = Mixed().double()
    kinds = {unit.path: unit.rule is not None for unit in plan(model, trainable(model))}
    assert kinds == {"fc": True, "scale": False, "pair": False, "bilinear": True}
    check_against_references(model, torch.randn(6, 5, dtype=torch.float64), via_rules=False)


class HeldAdapter(nn.Module):
    """A frozen layer and an adapter held in a parameter container, used in the module's own
    forward (as PEFT's IA3 and embedding-LoRA layers hold theirs): a gain, and a low-rank
    update in a list."""

    def __init__(self, trainable_base: bool = False) -> None:
        super().__init__()
        self.base = nn.Linear(4, 3)
        self.base.requires_grad_(trainable_base)
        self.gain = nn.ParameterDict({"default": nn.Parameter(torch.randn(3))})
        self.update = nn.ParameterList([nn.Parameter(torch.randn(2, 4)), torch.randn(3, 2)])

    def forward(self, x: Tensor) -> Tensor:
        low_rank = x @ self.update[0].T @ self.update[1].T
        return (self.base(x) + low_rank) * self.gain["default"]


@pytest.mark.parametrize("trainable_base", [False, True])
def test_parameters_held_in_containers_belong_to_the_module_using_them(trainable_base, caplog):
    """The parameters of an ``nn.ParameterDict`` or ``nn.ParameterList`` are its holder's: with
    the base frozen, the holder is a unit (the per-module fallback), not a reason to leave the
    hooks engine; with the base trainable too, they are loose parameters of the holder (its
    Linear on its rule). They went to the functorch engine ("used outside that module's
    call"), as 9 of PEFT's adapter types did."""
    model = nn.Sequential(nn.Linear(5, 4), nn.Tanh(), HeldAdapter(trainable_base)).double()
    params = trainable(model)
    loose = loose_parameters(model, params)
    planned = plan(model, {name: p for name, p in params.items() if name not in loose})
    units = {unit.path: sorted(unit.names) for unit in planned}
    if trainable_base:
        assert loose.keys() == {"2.gain.default", "2.update.0", "2.update.1"}
        assert units == {"0": ["bias", "weight"], "2.base": ["bias", "weight"]}
    else:
        assert units == {
            "0": ["bias", "weight"], "2": ["gain.default", "update.0", "update.1"]
        }
    x = torch.randn(6, 5, dtype=torch.float64)
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        assert get_engine("auto", model, trainable(model)).name == "hooks"
        check_against_references(model, x, via_rules=False)
        data = [(x, torch.randint(0, 3, (6,)))]
        got = fisher_diagonal(model, data, "exact")
    assert not [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(got, fisher_diagonal(model, data, "exact", backend="loop"), 1e-10)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_the_per_module_fallback_is_logged_once_per_module(caplog) -> None:
    """Where a model is slower than its rules would make it is said, once per module: not
    again for the next chunk, batch or call, nor for the modules with rules."""
    model = Mixed().double()
    data = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,)))] * 2
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        for _ in range(2):
            fisher_diagonal(model, data, "exact", backend="hooks", chunk_size=2)
    said = [r.getMessage() for r in caplog.records if r.name == "ewc_reg.fallback"]
    assert sorted(said) == [
        f"hooks engine: no rule covers the calls of module {path!r} ({kind}): its per-sample "
        "gradients come from torch.func on the module alone (the per-module fallback)"
        for path, kind in [("pair", "Pair"), ("scale", "Scale")]
    ]
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        fisher_diagonal(Mixed().double(), data, "exact", backend="hooks")  # (a new model)
    assert sum(r.name == "ewc_reg.fallback" for r in caplog.records) == 2


def _hooked_mlp() -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    ).double()


def _hooked(hooks: Callable[[nn.Sequential], None]) -> Callable[[], nn.Module]:
    def make() -> nn.Module:
        model = _hooked_mlp()
        hooks(model)
        return model

    return make


class _KeywordCall(nn.Module):
    """Calls its layer with a keyword (no rule takes that call: the per-module fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.layer(input=x)))


def _keyword_pre_hook() -> nn.Module:
    model = _KeywordCall().double()
    model.layer.register_forward_pre_hook(
        lambda m, args, kwargs: (args, {"input": kwargs["input"] * 3}), with_kwargs=True
    )
    model.layer.register_forward_hook(lambda m, args, out: out.mul_(0.5))
    return model


class _CNN(nn.Sequential):
    def __init__(self) -> None:
        super().__init__(
            nn.Conv2d(2, 3, 3), nn.BatchNorm2d(3), nn.ReLU(), nn.Conv2d(3, 4, 3), nn.Flatten(),
            nn.Linear(16, 3),
        )


def _logged_cnn() -> nn.Module:
    model = _CNN().double()
    randomize_bn(model)
    store: dict[int, Tensor] = {}
    for layer in model:
        layer.register_forward_hook(lambda m, args, out: store.update({id(m): out.detach()}))
    model[3].register_forward_hook(lambda m, args, out: out * 1.5)
    model[0].register_forward_pre_hook(lambda m, args: (args[0] + 1,))
    return model


#: Models whose layers have forward hooks or pre-hooks, and whether every layer keeps its rule.
HOOKED = {
    "input_doubled_output_tripled": (
        _hooked(
            lambda m: (
                m[0].register_forward_pre_hook(lambda mod, args: (args[0] * 2,)),
                m[4].register_forward_hook(lambda mod, args, out: out * 3),
            )
        ),
        True,
    ),
    "output_changed_in_place": (
        _hooked(lambda m: m[2].register_forward_hook(lambda mod, args, out: out.mul_(2))), True
    ),
    "output_read_only": (
        _hooked(lambda m: m[2].register_forward_hook(lambda mod, args, out: None)), True
    ),
    "own_bias_used_in_the_hook": (
        _hooked(
            lambda m: m[2].register_forward_hook(lambda mod, args, out: out + mod.bias * out)
        ),
        True,
    ),
    "another_layers_weight_in_a_pre_hook": (
        _hooked(
            lambda m: m[2].register_forward_pre_hook(
                lambda mod, args: (args[0] * m[0].weight.sum(),)
            )
        ),
        True,
    ),
    "output_times_input": (
        _hooked(
            lambda m: m[2].register_forward_hook(
                lambda mod, args, out: out * args[0].sum(-1, keepdim=True)
            )
        ),
        True,
    ),
    "keyword_call_on_the_fallback": (_keyword_pre_hook, False),
    "logged_cnn": (_logged_cnn, True),
}


@pytest.mark.parametrize("name", list(HOOKED))
def test_hooked_layers_keep_their_rules(name) -> None:
    """A layer's forward hooks and pre-hooks lie outside what its rule computes: its call is
    recorded after the pre-hooks and its output before the hooks, so what they do is part of
    the network around the layer (the per-module fallback runs the layer's ``forward`` alone).
    Before, any hook, a read-only one too, sent the layer to the per-module fallback: a
    torchvision ResNet-18 with a logging hook on every layer took 121 times a plain
    forward+backward for ``exact`` instead of 4.9, twice the functorch engine's time."""
    make, via_rules = HOOKED[name]
    model = make()
    x = torch.randn(6, 2, 6, 6) if isinstance(model, _CNN) else torch.randn(6, 5)
    before = hook_state(model)
    check_against_references(model, x.double(), via_rules=via_rules)
    assert hook_state(model) == before


class _HookedAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.att, self.head = nn.MultiheadAttention(4, 2, batch_first=True), nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.att(x, x, x, need_weights=False)[0].mean(1))


def test_a_hooked_attention_layer_goes_to_the_fallback_with_its_hooks() -> None:
    """A rule of a whole call (attention: its forward redone in pieces) is not taken for a
    hooked module; the fallback runs the module with its hooks."""
    model = _HookedAttention().double()
    model.att.register_forward_pre_hook(lambda m, args: (args[0] * 2, *args[1:]))
    assert [unit.rule is None for unit in plan(model, trainable(model))] == [True, False]
    check_against_references(model, torch.randn(5, 3, 4, dtype=torch.float64), via_rules=False)


class _SineScale(nn.Module):
    """A module with a parameter and no rule (the per-module fallback)."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6))

    def forward(self, x: Tensor) -> Tensor:
        return torch.sin(x) * self.w


@pytest.mark.parametrize("where", ["own", "global", "attention"])
def test_backward_pre_hooks_of_fallback_modules_act_once(where) -> None:
    """A backward pre-hook that scales a module's output gradient, on a module the fallback
    runs with its hooks: the gradient recorded at its output has been through the hook, and
    the fallback ran the hook again (the hooks engine refused: '1.w' 4x where 2x was right;
    "auto" went to the loop engine)."""
    from torch.nn.modules import module as modules

    handles = []
    if where == "attention":
        model = _HookedAttention().double().eval()
        model.att.register_forward_hook(lambda m, args, out: None)  # (to the fallback)
        model.att.register_full_backward_pre_hook(lambda m, g: (3 * g[0], *g[1:]))
        x = torch.randn(5, 3, 4, dtype=torch.float64)
    else:
        model = nn.Sequential(nn.Linear(5, 6), _SineScale(), nn.Linear(6, 3)).double().eval()
        x = torch.randn(5, 5, dtype=torch.float64)
        if where == "own":
            model[1].register_full_backward_pre_hook(lambda m, g: (2 * g[0],))
        else:
            handles.append(modules.register_module_full_backward_pre_hook(
                lambda m, g: (2 * g[0],) if isinstance(m, (_SineScale, nn.Linear)) else None
            ))
    y = torch.randint(0, 3, (5,))
    try:
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
        assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    finally:
        for handle in handles:
            handle.remove()
    assert not any("_get_backward_pre_hooks" in vars(m) for m in model.modules())


def test_the_fallback_sets_nothing_on_a_module_without_backward_pre_hooks() -> None:
    """A module that forbids new attributes runs on the fallback (it failed once the fallback
    set its backward pre-hooks aside on every module it ran), and keeps none."""

    class Locked(_SineScale):
        def __setattr__(self, name: str, value: Any) -> None:
            if "w" in self._parameters and name not in vars(self):
                raise AttributeError(f"Locked: cannot set {name}")
            super().__setattr__(name, value)

    model = nn.Sequential(nn.Linear(5, 6), Locked(), nn.Linear(6, 3)).double().eval()
    x, y = torch.randn(5, 5, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    assert "_get_backward_pre_hooks" not in vars(model[1])


@pytest.mark.parametrize(
    "pruning", ["l1", "structured", "custom mask", "twice", "bias too", "transposed", "1d"]
)
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_pruned_layers_take_their_class_rule(pruning, method) -> None:
    """Layers pruned by ``torch.nn.utils.prune`` (their weight ``weight_orig * weight_mask``,
    made by a pre-hook) take their class's rule, the sums of ``weight_orig`` those of the
    weight times the mask squared (a mask of any values too): not the per-module fallback,
    which took 1.9x the functorch engine's time on a pruned ResNet-18."""
    from torch.nn.utils import prune

    if pruning == "transposed":
        layers = [nn.ConvTranspose2d(3, 4, 3, stride=2), nn.Tanh(), nn.Conv2d(4, 2, 3)]
        x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    elif pruning == "1d":
        layers = [nn.Conv1d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv1d(4, 2, 3)]
        x = torch.randn(5, 3, 7, dtype=torch.float64)
    else:
        layers = [nn.Conv2d(3, 4, 3, padding=1), nn.Tanh(), nn.Conv2d(4, 2, 3, stride=2)]
        x = torch.randn(5, 3, 6, 6, dtype=torch.float64)
    model = nn.Sequential(*layers, nn.Flatten(), nn.LazyLinear(3)).double()
    model(x)
    for layer in (model[0], model[2], model[4]):
        if pruning == "structured":
            prune.random_structured(layer, "weight", 0.5, dim=0)
        elif pruning == "custom mask":
            prune.custom_from_mask(layer, "weight", torch.rand_like(layer.weight))
        elif pruning == "twice":  # (a PruningContainer)
            prune.l1_unstructured(layer, "weight", 0.3)
            prune.l1_unstructured(layer, "weight", 0.3)
        else:
            prune.l1_unstructured(layer, "weight", 0.5)
        if pruning == "bias too":
            prune.l1_unstructured(layer, "bias", 0.5)
    model.eval()
    y = torch.randint(0, 3, (5,))
    with mock.patch.object(unit_sums, "_fallback_sums", side_effect=AssertionError("fallback")):
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


@pytest.mark.parametrize("norm", [nn.BatchNorm1d, nn.LayerNorm])
def test_pruned_norms_stay_on_the_fallback(norm) -> None:
    """A norm's rule takes the gradients its reduction gives, not the output's: a pruned norm
    goes to the per-module fallback (given the output's gradients, its sums were off by 1.2 of
    1.23 and the hooks engine refused the model)."""
    from torch.nn.utils import prune

    model = nn.Sequential(nn.Linear(5, 6), norm(6), nn.Tanh(), nn.Linear(6, 3)).double()
    randomize_bn(model)
    prune.l1_unstructured(model[1], "weight", 0.5)
    model.eval()
    x, y = torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class _Frames(nn.Module):
    """A layer on each sample's frames folded into the batch dimension: ``(B, T, ...)`` as
    ``(B T, ...)`` rows, then a classifier of each sample's ``T`` outputs."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        rows = torch.tanh(self.layer(x.flatten(0, 1)))
        return self.head(rows.reshape(x.shape[0], -1))


@pytest.mark.parametrize("layer", ["conv", "linear"])
def test_pruned_layers_on_folded_rows(layer) -> None:
    """A pruned layer called on samples' rows folded into the batch dimension: a convolution
    goes to the per-module fallback, which folds them again (its rule took the recorded
    ``(B, T, C, H, W)`` input for a 3-d convolution's, and the hooks engine refused the
    model); a linear layer's rule sums each sample's gradient over its rows, so it keeps it."""
    from torch.nn.utils import prune

    if layer == "conv":
        model = _Frames(nn.Conv2d(2, 3, 3, padding=1), 3 * 3 * 4 * 4)
        x = torch.randn(5, 3, 2, 4, 4, dtype=torch.float64)
    else:
        model = _Frames(nn.Linear(4, 3), 3 * 3)
        x = torch.randn(5, 3, 4, dtype=torch.float64)
    model.double().eval()
    prune.l1_unstructured(model.layer, "weight", 0.5)
    y = torch.randint(0, 3, (5,))
    refused = AssertionError("fallback")
    fallback = mock.patch.object(unit_sums, "_fallback_sums", side_effect=refused)
    with fallback if layer == "linear" else contextlib.nullcontext():
        got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("kind", ["forward", "pre"])
def test_hooks_registered_for_every_module_are_respected(kind) -> None:
    """A global hook changes every layer's output: no rule assumes the plain layer then; each
    module goes to the per-module fallback, which runs the hook. A global pre-hook runs
    before the recorder's (which would record its changed input): the functorch engine."""
    from torch.nn.modules import module as modules

    model = nn.Sequential(nn.Linear(5, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x = torch.randn(4, 5, dtype=torch.float64)
    if kind == "forward":
        handle = modules.register_module_forward_hook(
            lambda m, args, out: 2 * out if isinstance(m, nn.Linear) else None
        )
    else:
        handle = modules.register_module_forward_pre_hook(
            lambda m, args: (args[0] + 1,) if isinstance(m, nn.Linear) else None
        )
    try:
        if kind == "forward":
            assert all(unit.rule is None for unit in plan(model, trainable(model)))
            check_against_references(model, x, via_rules=False)
        else:
            with pytest.raises(ValueError, match="pre-hooks are registered for every module"):
                fisher_diagonal(model, [x], backend="hooks")
            assert get_engine("auto", model).name == "functorch"
            y = torch.randint(0, 3, (4,))
            want = brute_force_fisher(model, x, y, "exact")
            assert_close_dicts(fisher_diagonal(model, [(x, y)]), want, 1e-10)
    finally:
        handle.remove()
    assert all(unit.rule is not None for unit in plan(model, trainable(model)))


def test_sequence_outputs() -> None:
    """Vectors of any output shape (K, B, T, V), e.g. per-token logits."""
    model = nn.Sequential(nn.Embedding(9, 4), nn.LayerNorm(4), nn.Linear(4, 6)).double()
    randomize_affine(model)
    x = torch.randint(0, 9, (5, 7))
    check_against_references(model, x)


def test_inplace_changes_to_outputs_are_fine() -> None:
    class Block(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(2, 2, 3, padding=1)
            self.bn = nn.BatchNorm2d(2)
            self.relu = nn.ReLU(inplace=True)

        def forward(self, x: Tensor) -> Tensor:
            out = self.bn(self.conv(x))
            out += x  # in place on the recorded output of bn
            return self.relu(out).flatten(1)

    model = nn.Sequential(Block(), nn.Linear(2 * 4 * 4, 3)).double()
    randomize_bn(model)
    check_against_references(model, torch.randn(5, 2, 4, 4, dtype=torch.float64))


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_estimators_match_functorch(kind: str, method: str, engine_ways: str) -> None:
    model = mlp() if kind == "mlp" else cnn(classes=5)
    x = torch.randn(10, *((6,) if kind == "mlp" else (2, 6, 6)), dtype=torch.float64)
    data = [(x[:4], torch.randint(0, 5, (4,))), (x[4:], torch.randint(0, 5, (6,)))]
    model.train()
    results = {}
    for backend in ("hooks", "functorch"):
        generator = torch.Generator().manual_seed(7)
        results[backend] = fisher_diagonal(
            model, data, method, backend=backend, generator=generator, mc_samples=2
        )
        assert model.training and all(m.training for m in model.modules())
    assert_close_dicts(results["hooks"], results["functorch"], 1e-10)


def test_parameter_subset() -> None:
    model = cnn(classes=3)
    x = torch.randn(6, 2, 6, 6, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (6,)))]
    names = ["0.weight", "1.bias", "6.bias"]
    got = fisher_diagonal(model, data, params=names, backend="hooks")
    assert list(got) == names
    assert_close_dicts(got, fisher_diagonal(model, data, params=names, backend="functorch"), 1e-10)


def test_chunks_give_the_same_sums() -> None:
    model = cnn(classes=3)
    x = torch.randn(7, 2, 6, 6, dtype=torch.float64)
    vectors = random_vectors(model.eval(), x)
    whole = engine_sums(HookEngine(), model, x, vectors)
    for chunks in ({"chunk_size": 3}, {"memory_budget": 1}):
        engine = HookEngine()
        for _ in range(2):  # the second batch knows it will be split: no graph for the first pass
            assert_close_dicts(engine_sums(engine, model, x, vectors, **chunks), whole, 1e-12)


@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_chunks_make_their_own_vectors(method: str, unchecked_sums) -> None:
    """8 samples in chunks of 3: each chunk's vectors come from its own forward pass (no pass
    over the whole batch first), and sample's labels are those of the whole batch drawn at
    once (the functorch engine's)."""
    model = cnn(classes=3)
    x = torch.randn(8, 2, 6, 6, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (8,)))]
    expected = fisher_diagonal(
        model, data, method, backend="functorch", generator=torch.Generator().manual_seed(0)
    )
    calls = []
    model.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    got = fisher_diagonal(
        model, data, method, backend="hooks", chunk_size=3,
        generator=torch.Generator().manual_seed(0),
    )
    assert_close_dicts(got, expected, 1e-10)
    passes = [c for c in calls if c != (2, False)]  # (2, False): the layout check
    assert passes == [(3, True), (3, True), (2, True)]


def test_a_later_call_starts_with_the_chunks_of_the_last(unchecked_sums) -> None:
    """The first call on a model learns that 8 samples go in chunks (a first pass over all
    8, with gradients); the next call, at the same budget, starts with the first chunk."""
    model = cnn(classes=3)
    data = [(torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 3, (8,)))]
    expected = fisher_diagonal(model, data, "empirical", backend="functorch")
    budget = 20_000  # (chunks of 3 samples)
    calls = []
    model.register_forward_pre_hook(
        lambda module, args: calls.append((args[0].shape[0], torch.is_grad_enabled()))
    )
    passes = []
    for _ in range(2):
        calls.clear()
        got = fisher_diagonal(model, data, "empirical", backend="hooks", memory_budget=budget)
        assert_close_dicts(got, expected, 1e-10)
        passes.append([n for n, grad in calls if grad])  # (no gradients: the layout check)
    assert passes[0][0] == 8 and 1 < max(passes[0][1:]) < 8 and sum(passes[0][1:]) == 8
    assert passes[1] == passes[0][1:]


@pytest.mark.parametrize("budget", [12_000, 22_000, 30_000])
def test_chunk_sizes_of_another_estimator_do_not_change_the_fisher(budget: int) -> None:
    """The chunk sizes kept from the last call may be too small or too large for the next
    (exact pulls back 4 vectors here, empirical 1, sample 2): every call still gives the
    Fisher, and sample the labels the functorch engine draws with the same seed."""
    model = cnn(classes=5)
    data = [(torch.randn(8, 2, 6, 6, dtype=torch.float64), torch.randint(0, 5, (8,)))]
    methods = ("empirical", "exact", "sample")

    def fisher(method: str, **kwargs) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(0)
        return fisher_diagonal(model, data, method, generator=generator, mc_samples=2, **kwargs)

    expected = {m: fisher(m, backend="functorch") for m in methods}
    for method in (*methods, *methods[::-1]):
        got = fisher(method, backend="hooks", memory_budget=budget)
        assert_close_dicts(got, expected[method], 1e-10)


def hook_state(model: nn.Module) -> list:
    return [
        (dict(m._forward_hooks), dict(m._forward_pre_hooks), dict(m._backward_hooks))
        for m in model.modules()
    ]


def test_hooks_removed_after_success_and_error() -> None:
    model = cnn(classes=3).eval()
    model[0].register_forward_hook(lambda m, args, out: None)
    before = hook_state(model)
    x = torch.randn(4, 2, 6, 6, dtype=torch.float64)
    engine_sums(HookEngine(), model, x, random_vectors(model, x))
    assert hook_state(model) == before
    assert torch._C._len_torch_function_stack() == 0

    def broken(out: Tensor) -> Tensor:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        engine_sums(HookEngine(), model, x, None, output_fn=broken)
    assert hook_state(model) == before
    assert torch._C._len_torch_function_stack() == 0


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize("shape", [(3, 4, 1, 5, 6), (3, 4, 5, 6, 7), (40, 2, 3, 4, 50)])
def test_both_ways_of_the_linear_weight_sums(gram, shape, monkeypatch) -> None:
    """The Linear rule's weight sums over positions, Σ_{n,k} (G_nkᵀ x_n)², through
    squared_products (its Gram way or its direct one) and through the products over
    (k, n) pairs; which one runs is a matter of speed only."""
    num_vectors, batch, positions, out, features = shape
    grads = torch.randn(num_vectors, batch, positions, out, dtype=torch.float64)
    x = torch.randn(batch, positions, features, dtype=torch.float64)
    monkeypatch.setattr(rules, "LINEAR_GRAM_COST", 0 if gram else 10**12)
    monkeypatch.setattr(rules, "LINEAR_GRAM_READS", 0)
    want = torch.einsum("kbso,bsi->kboi", grads, x).square().sum((0, 1))
    torch.testing.assert_close(
        rules._linear_weight(grads, x, DEFAULT_MEMORY_BUDGET), want, rtol=1e-12, atol=0
    )


@pytest.mark.parametrize("gram", [True, False])
@pytest.mark.parametrize(
    "shape", [(3, 5, 1, 4, 1, 6), (9, 4, 1, 5, 16, 7), (2, 3, 2, 3, 5, 4), (1, 70, 3, 2, 3, 2)]
)
def test_both_ways_of_squared_products(gram, shape, monkeypatch, engine_ways) -> None:
    """The weight sums of a layer whose per-sample gradient is a product over positions,
    Σ_{n,k} (G_nkj U_njᵀ)² per group j, by squared_products' Gram way and by its direct one,
    against einsum (float64), with G in the looped pull-back's (B, K, ...) storage and the
    patches as convolutions cut them, (b, g, P, L) not contiguous; shape is (K, B, g, O, L, P),
    with L = 1 (the Gram way's own branch), groups, and chunks of a few samples (B = 70); with
    the CPU's ways (pair products by slices) and a GPU's (by gathers)."""
    num_vectors, batch, groups, out, positions, patch = shape
    grads = torch.randn(batch, num_vectors, groups, out, positions, dtype=torch.float64)
    grads = grads.transpose(0, 1)  # (K, B, g, O, L)
    patches = torch.randn(batch, groups, positions, patch, dtype=torch.float64).mT
    monkeypatch.setattr(rules, "_gram_is_faster", lambda *args: gram)
    want = torch.einsum("kbgol,bgpl->kbgop", grads, patches).square().sum((0, 1))
    got = rules.squared_products(grads, lambda chunk: patches[chunk], patch, 2**12)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)


def test_the_recorders_own_reads_stay_outside_its_mode(monkeypatch) -> None:
    """The recorder's hooks read sizes, versions and edges outside its torch-function mode
    (each read in it is a call of ``__torch_function__``): ``numel``, ``element_size`` and
    ``is_floating_point``, which only the hooks call here, never reach the mode, while the
    model's own operations do. (With the hooks inside the mode, 43 calls reached it in this
    model's pass, 9 without.)"""
    seen: list[str] = []
    watch = recording.Recorder.__torch_function__

    def counted(self, func, types, args=(), kwargs=None):
        seen.append(getattr(func, "__name__", str(func)))
        return watch(self, func, types, args, kwargs)

    monkeypatch.setattr(recording.Recorder, "__torch_function__", counted)
    model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 3)).double()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fisher_diagonal(model, [(x, y)], "empirical", backend="hooks")
    assert seen.count("linear") >= 2 and "relu" in seen
    assert not {"numel", "element_size", "is_floating_point"} & set(seen)
    assert_close_dicts(got, brute_force_fisher(model, x, y, "empirical"), 1e-10)


def test_the_recorder_finds_the_tensors_pytree_finds() -> None:
    """``base.tensors_in`` walks tuples, lists and dicts itself and asks ``pytree`` for
    anything else: the same tensors in the same order as ``pytree.tree_leaves``."""
    import collections
    from dataclasses import dataclass

    from torch.utils import _pytree as pytree

    if not hasattr(pytree, "register_dataclass"):
        pytest.skip("this torch's pytree has no register_dataclass")

    @dataclass
    class Pair:
        first: Tensor
        second: Tensor

    pytree.register_dataclass(Pair)
    Point = collections.namedtuple("Point", "x y")
    t = [torch.randn(2) for _ in range(7)]
    tree = (
        t[0],
        [1, None, torch.float32, (t[1], {"a": t[2], "b": [t[3]]})],
        collections.OrderedDict(c=Point(t[4], 2.0)),
        Pair(t[5], t[6]),
        "text",
    )
    want = [leaf for leaf in pytree.tree_leaves(tree) if isinstance(leaf, Tensor)]
    got = base.tensors_in(tree)
    assert len(got) == len(want) == 7 and all(a is b for a, b in zip(got, want))


# --- models the layer-wise decomposition does not cover ------------------------------------


class Tied(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(6, 4)
        self.out = nn.Linear(4, 6, bias=False)
        self.out.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        return self.out(torch.tanh(self.embed(x)).mean(1))


class RootParameter(nn.Module):
    """A root weight applied to rows folded into the batch dimension positions first, ``(B, 4)
    -> (2B, 2)``: no per-sample copies in any layout (where the weight meets the batch, a
    sample's rows are not together)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.w = nn.Parameter(torch.randn(3, 2))

    def forward(self, x: Tensor) -> Tensor:
        rows = torch.tanh(self.fc(x)).reshape(len(x), 2, 2).transpose(0, 1).flatten(0, 1)
        return F.linear(rows, self.w).unflatten(0, (2, len(x))).sum(0)


class UsedOutside(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(h) + F.linear(h, self.head.weight)


class UsedOutsideInAList(UsedOutside):
    """The parameter goes to a torch function inside a list (and a tuple in a list)."""

    def forward(self, x: Tensor) -> Tensor:
        out = self.head(torch.tanh(self.fc(x)))
        bias = self.head.bias
        return out + torch.stack([bias, bias]).sum(0) + torch.cat([(bias,)][0])


class UsedOutsideThroughAProperty(UsedOutside):
    """The weight read through a property giving a differentiable view (``.T``, ``.mT``) in
    the parent: an output layer as the embedding's transpose, a tied autoencoder."""

    def __init__(self, view: str) -> None:
        super().__init__()
        self.view = view

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.fc(x))
        return self.head(h) + h @ getattr(self.head.weight, self.view)


class AttentionCalledTwice(nn.Module):
    """Self-attention applied to its own output, its weights used too; with ``apart``, then
    once more with the key apart from the query and value (pieces of another kind)."""

    def __init__(self, apart: bool = False) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)
        self.apart = apart

    def forward(self, x: Tensor) -> Tensor:  # (B, 4) as (B, 2, 2) sequences of 2 features
        h = torch.cat([x.view(-1, 2, 2), x.view(-1, 2, 2).flip(1)], 2)  # (B, 2, 4)
        weights = h.new_zeros(())
        for _ in range(2):
            h, w = self.attention(h, h, h)
            weights = weights + w[:, 0, 1, None]
        if self.apart:
            h = self.attention(h, torch.tanh(h), h)[0]
        return self.head(h.mean(1)) * weights


class SharedEncoderLayer(nn.Module):
    """One ``nn.TransformerEncoderLayer`` applied three times (a universal transformer)."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = nn.TransformerEncoderLayer(4, 2, 6, dropout=0.0, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.cat([x.view(-1, 2, 2), x.view(-1, 2, 2).flip(1)], 2)  # (B, 2, 4)
        for _ in range(3):
            h = self.layer(h)
        return self.head(h.mean(1))


class Gate(nn.Module):
    """y = a where x > 0 else b: autograd saves the mask, not x."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.randn(4))
        self.b = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return torch.where(x > 0, self.a, self.b)


class InputChanged(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = Gate()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = x * 1.0
        out = self.gate(h)
        h.mul_(-1)  # the gate's recorded input changes
        return self.head(out + h)


class BatchMean(Scale):
    """:class:`Scale`, then the mean over the batch: the samples mixed."""

    def forward(self, x: Tensor) -> Tensor:
        return super().forward(x).mean(0)


class NoBatchDim(nn.Module):
    """A submodule whose output has no batch dimension, though its input has."""

    def __init__(self) -> None:
        super().__init__()
        self.bank = BatchMean(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(x - self.bank(x))


class FunctionalBatchNorm(nn.Module):
    """A batch norm of the user's own, MAML-style: ``F.batch_norm`` with batch statistics
    (``training=True``) whatever the mode, which no module check can see."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(features) + 0.5)
        self.bias = nn.Parameter(torch.randn(features))

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True)


class AlwaysBatchStatistics(nn.BatchNorm1d):
    """An ``nn.BatchNorm1d`` subclass that normalises with batch statistics in eval mode too
    (its running statistics kept, unused)."""

    def forward(self, x: Tensor) -> Tensor:
        return F.batch_norm(x, None, None, self.weight, self.bias, training=True, eps=self.eps)


def scripted(how: str) -> nn.Module:
    """A model with a TorchScript block (``torch.jit.script`` or ``torch.jit.trace``)."""
    block = nn.Sequential(nn.Linear(4, 5), nn.Tanh())
    block = torch.jit.trace(block, torch.randn(2, 4)) if how == "trace" else torch.jit.script(block)
    return nn.Sequential(block, nn.Linear(5, 3))


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (TorchScript is deprecated)
@pytest.mark.parametrize("how", ["script", "trace"])
def test_torchscript_blocks_match_brute_force(how) -> None:
    model = scripted(how).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    want = brute_force_fisher(model, x, y, "exact")
    assert_close_dicts(fisher_diagonal(model, [(x, y)]), want, 1e-10)


STATIC = {  # ruled out by the module tree: get_engine decides
    "batch_statistics": (
        lambda: nn.Sequential(
            nn.BatchNorm1d(4, track_running_stats=False), nn.Flatten(), nn.Linear(12, 3)
        ),
        lambda: torch.randn(5, 4, 3, dtype=torch.float64),
        "batch statistics",
    ),
    # (hooks on the modules inside do not run: before, a traced block's Fisher came out zero)
    "scripted": (lambda: scripted("script"), None, "TorchScript"),
    "traced": (lambda: scripted("trace"), None, "TorchScript"),
}
DYNAMIC = {  # found during the forward pass: the engine decides on the first batch
    "input_changed": (InputChanged, "modified in place"),
    "no_batch_dim": (NoBatchDim, "leading dimension"),
    # (its weight is no broadcast copy: per_sample_problem, then the root as one unit)
    "root_parameter": (RootParameter, "contains modules that own parameters"),
}


def data_for(make_x) -> list[tuple[Tensor, Tensor]]:
    x = make_x() if make_x else torch.randn(5, 4, dtype=torch.float64)
    return [(x, torch.randint(0, 3, (5,))), (x[:2], torch.randint(0, 3, (2,)))]


def log_and_compare(model, data, caplog, reason: str, mixed: bool = False) -> None:
    """``auto`` goes to the functorch engine and logs why once (a model whose samples are
    ``mixed`` is also warned of, once: samples alone are not the batch)."""
    with caplog.at_level(logging.INFO, logger="ewc_reg"), warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        got = fisher_diagonal(model, data)  # backend="auto"
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == 1 and reason in messages[0] and "functorch" in messages[0]
    alone = [str(x.message) for x in w if "as a batch of one" in str(x.message)]
    assert len(alone) == int(mixed)
    assert all(reason in message and "functorch engine" in message for message in alone)
    assert_close_dicts(got, fisher_diagonal(model, data, backend="functorch"), 1e-12)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (TorchScript is deprecated)
@pytest.mark.parametrize("name", list(STATIC))
def test_static_problems(name: str, caplog) -> None:
    """Batch statistics mix the samples: warned of too (before, only logged)."""
    make, make_x, reason = STATIC[name]
    model = make().double()
    mixed = name == "batch_statistics"
    with caplog.at_level(logging.INFO, logger="ewc_reg"), warnings.catch_warnings(record=True):
        warnings.simplefilter("always")
        assert get_engine("auto", model).name == "functorch"
    caplog.clear()
    with pytest.raises(ValueError, match=rf'{reason}.*backend="functorch"'):
        get_engine("hooks", model)
    with pytest.raises(ValueError, match=reason):
        fisher_diagonal(model, data_for(make_x), backend="hooks")
    log_and_compare(model, data_for(make_x), caplog, reason, mixed)


class HalfCentred(nn.Module):
    """Mixes the samples: half the batch's mean taken from the hidden features."""

    def __init__(self) -> None:
        super().__init__()
        self.body, self.head = nn.Linear(5, 6), nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.body(x))
        return self.head(h - 0.5 * h.mean(0))


MIXING = {
    "mean_over_the_batch": (HalfCentred, (5,)),
    "batch_norm_without_running_statistics": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 3, 3, bias=False), nn.BatchNorm2d(3, track_running_stats=False),
            nn.Flatten(),
            nn.Linear(12, 3),
        ),
        (2, 4, 4),
    ),
}


@pytest.mark.parametrize("name", list(MIXING))
@pytest.mark.parametrize("backend", ["auto", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_model_that_mixes_the_samples_gets_each_sample_run_alone(name, backend, method):
    """The Fisher of each sample run alone, as documented: its vectors from its own output
    too. Before, the functorch and loop engines made them from the batch's output (2.4e-2 to
    0.12 off: a hybrid of two functions, which changed with the batching)."""
    make, shape = MIXING[name]
    torch.manual_seed(0)
    model = make().double()
    x, y = torch.randn(4, *shape, dtype=torch.float64), torch.randint(0, 3, (4,))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # (auto's: tested above)
        got = fisher_diagonal(model, [(x, y)], method, backend=backend)
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


def test_a_model_that_needs_several_samples_per_batch_is_told_why_it_fails() -> None:
    """``nn.BatchNorm1d`` without running statistics on ``(B, C)``: PyTorch's error on a
    batch of one ("when training", for a model in eval mode) was all that was said."""
    model = nn.Sequential(
        nn.Linear(4, 5), nn.BatchNorm1d(5, track_running_stats=False), nn.Linear(5, 3)
    ).double()
    x = torch.randn(4, 4, dtype=torch.float64)
    with warnings.catch_warnings(), pytest.raises(ValueError) as caught:
        warnings.simplefilter("ignore")
        fisher_diagonal(model, [x])
    assert "batch of one" in "".join(caught.value.__notes__)


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (attention, vmapped)
@pytest.mark.parametrize("name", list(DYNAMIC))
def test_dynamic_problems(name: str, caplog) -> None:
    make, reason = DYNAMIC[name]
    model = make().double()
    assert get_engine("auto", model).name == "hooks"
    with pytest.raises(ValueError, match=rf'{reason}.*backend="functorch"'):
        fisher_diagonal(model, data_for(None), backend="hooks")
    log_and_compare(model, data_for(None), caplog, reason)


USED_OUTSIDE = {  # models whose root uses a parameter of a unit, and those parameters
    "used_outside": (UsedOutside, ["head.weight"]),
    "used_outside_in_a_list": (UsedOutsideInAList, ["head.bias"]),
    "used_outside_through_T": (lambda: UsedOutsideThroughAProperty("T"), ["head.weight"]),
    "used_outside_through_mT": (lambda: UsedOutsideThroughAProperty("mT"), ["head.weight"]),
}


@pytest.mark.parametrize("name", list(USED_OUTSIDE))
def test_parameters_used_outside_their_modules_take_shadowed_copies(name: str, caplog) -> None:
    """The recorder sees the use (through a list, a property's view), and the parameter takes
    shadowed per-sample copies, the root being no parent that can be made a whole unit;
    before, the model went to the functorch engine."""
    make, names = USED_OUTSIDE[name]
    model = make().double()
    data = data_for(None)
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, data, backend="hooks")
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == 1 and "used outside" in messages[0]
    assert messages[0].endswith(f"{names} take shadowed per-sample copies")
    x, y = (torch.cat(parts) for parts in zip(*data))
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


@pytest.mark.parametrize("norm", [FunctionalBatchNorm, AlwaysBatchStatistics])
def test_samples_mixed_outside_batch_norm_modules_go_to_functorch(norm, caplog) -> None:
    """Batch statistics that no batch-norm module in eval mode computes mix the samples; the
    model's output on two samples alone shows it (before, the hooks engine decomposed the
    mixed samples: 0.4 to 1.0 relative error). (No bias before the norm: it has no effect, and
    its Fisher is zero up to rounding.)"""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv1d(4, 4, 1, bias=False), norm(4), nn.Tanh(), nn.Flatten(), nn.Linear(12, 3)
    ).double()
    data = data_for(lambda: torch.randn(5, 4, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match=r'the samples are mixed.*backend="functorch"'):
        fisher_diagonal(model, data, backend="hooks")
    log_and_compare(model, data, caplog, "the samples are mixed", mixed=True)
    assert_close_dicts(
        fisher_diagonal(model, data), fisher_diagonal(model, data, backend="loop"), 1e-12
    )


class CachedView(nn.Module):
    """A view of a parameter made once in ``__init__`` and used in the parent's forward."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3, dtype=torch.float64)  # (.double() would leave the view)
        self.transposed = self.fc.weight.t()

    def forward(self, x: Tensor) -> Tensor:  # (B, 4) -> (B, 4)
        return F.linear(torch.tanh(self.fc(x)), self.transposed)


class CachedOwnView(nn.Module):
    """A module using a view of its own weight made in ``__init__`` (no rule: the per-module
    fallback would swap the weight, not the view)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, 4, dtype=torch.float64))
        self.transposed = self.weight.t()

    def forward(self, x: Tensor) -> Tensor:  # (B, 4) -> (B, 4)
        return torch.tanh(x @ self.transposed) @ self.weight


@pytest.mark.parametrize("make", [CachedView, CachedOwnView])
@pytest.mark.parametrize("backend", ["auto", "functorch"])
def test_a_view_of_a_parameter_made_beforehand_goes_to_the_loop_engine(
    make, backend, caplog
) -> None:
    """Before, the hooks engine and the functorch engine (which swaps the parameters, not the
    view) missed the view's part of the weight's gradient silently (0.9 relative)."""
    model, data = make(), data_for(None)
    with pytest.raises(ValueError, match=r'made before the forward pass.*backend="functorch"'):
        fisher_diagonal(model, data, backend="hooks")
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, backend=backend)
    assert any(
        "other than through their registered names" in r.getMessage()
        and "using the loop engine" in r.getMessage()
        for r in caplog.records
    )
    assert_close_dicts(got, fisher_diagonal(model, data, backend="loop"), 1e-12)


def test_reading_a_property_of_a_parameter_outside_its_module_is_no_use() -> None:
    """``weight.T.shape`` outside the module computes nothing with the weight: the model stays
    on the hooks engine (the view ``.T`` gives counts once a function takes it)."""

    class ShapeCheck(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc, self.head = nn.Linear(4, 5), nn.Linear(5, 3)

        def forward(self, x: Tensor) -> Tensor:
            assert self.fc.weight.T.shape[0] == x.shape[-1]
            return self.head(torch.tanh(self.fc(x)))

    model, data = ShapeCheck().double(), data_for(None)
    got = fisher_diagonal(model, data, backend="hooks")
    assert_close_dicts(got, fisher_diagonal(model, data, backend="loop"), 1e-12)


def test_sample_draws_are_not_consumed_by_a_failed_attempt() -> None:
    model = UsedOutside().double()
    data = data_for(None)
    got = fisher_diagonal(model, data, "sample", generator=torch.Generator().manual_seed(3))
    want = fisher_diagonal(
        model, data, "sample", generator=torch.Generator().manual_seed(3), backend="functorch"
    )
    assert_close_dicts(got, want, 1e-12)


# --- float32 and other dtypes, devices -----------------------------------------------------


def test_float32_benchmark_models_agree_with_functorch() -> None:
    from benchmarks.models import ReducedResNet18, split_mnist_mlp

    for model, x in [
        (split_mnist_mlp(), torch.randn(16, 784)),
        (ReducedResNet18(widths=(4, 8, 8, 8)), torch.randn(6, 3, 32, 32)),
    ]:
        randomize_bn(model)
        model.eval()
        assert get_engine("auto", model).name == "hooks"
        vectors = random_vectors(model, x)
        got = engine_sums(HookEngine(), model, x, vectors)
        assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors), 1e-5)


@pytest.mark.parametrize("kind", ["conv2d", "conv_transpose2d", "conv3d"])
def test_bfloat16_accumulates_in_float32(kind: str) -> None:
    layer, shape = {
        "conv2d": (nn.Conv2d(2, 3, 3), (2, 4, 4)),
        "conv_transpose2d": (nn.ConvTranspose2d(2, 3, 2, stride=2), (2, 1, 1)),
        "conv3d": (nn.Conv3d(2, 3, (1, 3, 3)), (2, 1, 4, 4)),
    }[kind]
    model = nn.Sequential(layer, nn.Flatten(), nn.Linear(12, 3)).bfloat16().eval()
    x = torch.randn(4, *shape, dtype=torch.bfloat16)
    vectors = random_vectors(model, x)
    got = engine_sums(HookEngine(), model, x, vectors)
    assert all(s.dtype == torch.float32 for s in got.values())
    assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors), 5e-2)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda() -> None:
    model = cnn(classes=3).cuda().eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64, device="cuda")
    vectors = random_vectors(model, x)
    got = engine_sums(HookEngine(), model, x, vectors)
    assert all(s.is_cuda for s in got.values())
    assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors), 1e-10)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # (TorchScript is deprecated)
def test_only_the_selected_parameters_are_checked(caplog) -> None:
    """A traced body below a head: the head alone is a layer-wise decomposable selection."""
    model = nn.Sequential(scripted("trace"), nn.Linear(3, 3)).double()
    names = ["1.weight", "1.bias"]
    head = {n: p for n, p in model.named_parameters() if n in names}
    assert get_engine("hooks", model, head).name == "hooks"
    with pytest.raises(ValueError, match="TorchScript"):
        get_engine("hooks", model)
    x = torch.randn(5, 4, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (5,))), (x[:2], torch.randint(0, 3, (2,)))]
    for method in ("exact", "empirical"):
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            got = fisher_diagonal(model, data, method, params=names)  # backend="auto"
        assert not [r for r in caplog.records if r.name == "ewc_reg"]
        assert list(got) == names
        want = fisher_diagonal(model, data, method, params=names, backend="functorch")
        assert_close_dicts(got, want, 1e-10)


# --- modules owning parameters next to parametrised submodules: one unit -------------------


class Attention(nn.Module):
    """Embedding, ``nn.MultiheadAttention`` (in_proj_weight next to out_proj, whose weight it
    uses without calling it; keyword arguments, a mask, both outputs), a small Transformer
    encoder (MHA called with ``need_weights=False``), mean pooling and a linear head."""

    def __init__(self, vocab: int = 11, dim: int = 8, classes: int = 3) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, 2, dropout=0.1, batch_first=True)
        layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        causal = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device).triu(1)
        a, weights = self.attn(h, h, value=h, need_weights=True, attn_mask=causal)
        return self.head(self.encoder(h + a + weights @ h).mean(1))


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_nested_modules_are_one_unit() -> None:
    torch.manual_seed(0)
    model = Attention().double()
    units = {unit.path: unit for unit in plan(model, trainable(model))}
    attn = units["attn"]
    assert attn.rule is attention.multihead_attention and "attn.out_proj" not in units
    assert attn.names == {
        "in_proj_weight": "attn.in_proj_weight",
        "in_proj_bias": "attn.in_proj_bias",
        "out_proj.weight": "attn.out_proj.weight",
        "out_proj.bias": "attn.out_proj.bias",
    }
    assert units["encoder.layers.1.self_attn"].rule is attention.multihead_attention
    x = torch.randint(0, 11, (5, 4))
    check_against_references(model, x)
    check_against_references(model, x, chunk_size=2)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_attention_estimators_match_references(method: str, caplog, engine_ways: str) -> None:
    torch.manual_seed(0)
    model = Attention().double().eval()
    x, y = torch.randint(0, 11, (5, 4)), torch.randint(0, 3, (5,))
    results = {}
    for backend in ("auto", "functorch"):
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            results[backend] = fisher_diagonal(
                model, [(x, y)], method, backend=backend, mc_samples=2,
                generator=torch.Generator().manual_seed(7),
            )
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback
    with torch.no_grad():
        draws = Categorical().sample(model(x), 2, torch.Generator().manual_seed(7))
    want = brute_force_fisher(model, x, y, method, sampled=draws)
    assert_close_dicts(results["auto"], results["functorch"], 1e-10)
    assert_close_dicts(results["auto"], want, 1e-10)


class AttentionWeightOutside(Attention):
    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        return self.head(F.linear(h + a, self.attn.out_proj.weight).mean(1))


class RootParameterWithAttention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.w = nn.Parameter(torch.randn(3, 4))

    def forward(self, x: Tensor) -> Tensor:  # (w on (T B, 4) rows: no per-sample copies)
        rows = self.attn(x, x, x)[0].transpose(0, 1).flatten(0, 1)
        return F.linear(rows, self.w).unflatten(0, (-1, len(x))).mean(0)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_nested_unit_problems(caplog) -> None:
    """A nested unit's inner parameter used outside its call and a root owning parameters next
    to parametrised children still go to the functorch engine."""
    model = AttentionWeightOutside().double()
    x = torch.randint(0, 11, (5, 4))
    data = [(x, torch.randint(0, 3, (5,))), (x[:2], torch.randint(0, 3, (2,)))]
    assert get_engine("auto", model).name == "hooks"
    log_and_compare(model, data, caplog, "parameter 'out_proj.weight' of module 'attn' is used")
    caplog.clear()
    model = RootParameterWithAttention().double()
    reason = "the root module owns parameters and contains modules that own parameters"
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match=reason):
        fisher_diagonal(model, data_for(lambda: x), backend="hooks")
    log_and_compare(model, data_for(lambda: x), caplog, reason)


class PerHeadMask(nn.Module):
    """A 3-d ``(B * heads, L, S)`` attention mask built per sample inside ``forward``."""

    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(4, 2, batch_first=True)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        keep = (x[..., 0] > -0.5).unsqueeze(1)  # (B, 1, S): per-sample key mask
        mask = ~keep.expand(-1, x.shape[1], -1).repeat_interleave(2, dim=0)  # (B*heads, L, S)
        mask = mask & ~torch.eye(x.shape[1], dtype=torch.bool)  # never mask everything
        return self.head(self.attn(x, x, x, attn_mask=mask, need_weights=False)[0].mean(1))


def test_input_folding_samples_into_the_batch_dimension_goes_to_functorch(caplog) -> None:
    model = PerHeadMask().double()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    log_and_compare(model, data_for(lambda: x), caplog, "a multiple of the batch")


# --- where the batch dimension is: sequence-first layouts as long as the batch --------------


class SequenceFirstLayers(nn.Module):
    """Per-position layers on a sequence-first ``(T, B, D)`` view of a batch-first input: with
    ``T == B`` every unit output has the batch size as leading dimension."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.tanh(self.proj(x.transpose(0, 1)))).mean(0))


class BatchFirstLayers(SequenceFirstLayers):
    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(torch.tanh(self.proj(x))).mean(1))


class TableScale(nn.Module):
    """No rule: ``h * w * table`` with a table shared by the samples."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, h: Tensor, table: Tensor) -> Tensor:
        return h * self.w * table


class SharedTable(nn.Module):
    """A ``(T, D)`` table shared by the samples, passed to a unit without a rule: with
    ``T == B`` it looks per-sample."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = TableScale()
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        table = torch.linspace(-1, 1, x.shape[1] * 4, dtype=x.dtype).view(x.shape[1], 4)
        return self.head(self.scale(x, table).mean(1))


class CountingCalls(nn.Module):
    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.sizes: list[int] = []

    def forward(self, x: Tensor) -> Tensor:
        self.sizes.append(x.shape[0])
        return self.inner(x)


def square_batch() -> list[tuple[Tensor, Tensor]]:
    """One batch of 5 sequences of 5 positions (the layout cannot be told by the shapes)."""
    return [(torch.randn(5, 5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))]


def test_a_shared_table_as_long_as_the_batch_is_passed_whole(caplog) -> None:
    """Without the layout check this Fisher diagonal was silently wrong (the per-module
    fallback cut the table per sample); then the model went to functorch; now the check's
    pass on fewer samples shows the table shared, and the fallback passes it whole."""
    model = SharedTable().double()
    data = square_batch()
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, data, backend="hooks")
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == 1 and "the per-module fallback passes it whole" in messages[0]
    x, y = data[0]
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


def test_batch_first_layers_with_as_many_positions_as_samples_stay_on_hooks(
    caplog, unchecked_sums
) -> None:
    """The extra check passes for a batch-first model, and runs once per shapes."""
    model = CountingCalls(BatchFirstLayers()).double()
    randomize_affine(model)
    data = square_batch() * 2
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, backend="auto")
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert model.sizes == [5, 2, 5]  # the batch, the check on 2 samples, the next batch
    assert_close_dicts(got, fisher_diagonal(model, data, backend="functorch"), 1e-12)
    model.sizes.clear()
    x = torch.randn(5, 3, 4, dtype=torch.float64)
    fisher_diagonal(model, [(x, torch.randint(0, 3, (5,)))], backend="hooks")
    assert model.sizes == [5, 2]  # (other shapes: checked too)
    model.sizes.clear()  # a later call on shapes already checked: no check
    fisher_diagonal(model, square_batch(), backend="hooks")
    assert model.sizes == [5]


# --- sequence-first position-wise layers -----------------------------------------------------


class SequenceFirstEncoder(nn.Module):
    """PyTorch's default layout: an embedding, encoder layers and a norm on ``(T, B, D)``,
    token ids given batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)  # batch_first=False
        self.encoder = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.norm(self.encoder(self.embed(x.transpose(0, 1)))).mean(0))


class BothLayouts(nn.Module):
    """One Linear called on a sequence-first view and on a batch-first one (joined calls)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.proj(x.transpose(0, 1))).transpose(0, 1)
        return self.head(torch.tanh(self.proj(h)).mean(1))


class SequenceFirstTiedLM(nn.Module):
    """PyTorch's word-language-model example: a causal encoder sequence-first between an
    embedding and an output layer tied to it, the logits given back batch first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        self.encoder = nn.TransformerEncoder(layer, 1, enable_nested_tensor=False)
        self.decoder = nn.Linear(4, 11)
        self.decoder.weight = self.embed.weight

    def forward(self, x: Tensor) -> Tensor:
        mask = nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=torch.float64)
        hidden = self.encoder(self.embed(x.t()), mask=mask, is_causal=True)
        return self.decoder(hidden).transpose(0, 1)


class SequenceFirstRecurrent(nn.Module):
    """An embedding, an LSTM and a Linear, all sequence-first."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.lstm = nn.LSTM(4, 5)  # batch_first=False
        self.proj = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.proj(self.lstm(self.embed(x.t()))[0])).mean(0))


class SequenceFirstPositions(nn.Module):
    """A learned ``(T_max, 1, D)`` position embedding of the root, added to sequence-first
    token embeddings: its per-sample copies put the batch second."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(11, 4)
        self.position = nn.Parameter(torch.randn(8, 1, 4))
        self.layer = nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        hidden = self.embed(x.t()) + self.position[: x.shape[1]]
        return self.head(self.layer(hidden).mean(0))


def _features(b: int, t: int) -> tuple[Tensor, Tensor]:
    return torch.randn(b, t, 4, dtype=torch.float64), torch.randint(0, 3, (b,))


def _tokens(b: int, t: int) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 11, (b, t)), torch.randint(0, 3, (b,))


def _next_tokens(b: int, t: int) -> tuple[Tensor, Tensor]:
    return torch.randint(0, 11, (b, t)), torch.randint(0, 11, (b, t))


SEQUENCE_FIRST = {
    "linear-norm": (SequenceFirstLayers, _features),
    "encoder": (SequenceFirstEncoder, _tokens),
    "both-layouts": (BothLayouts, _features),
    "tied-lm": (SequenceFirstTiedLM, _next_tokens),
    "recurrent": (SequenceFirstRecurrent, _tokens),
    "positions": (SequenceFirstPositions, _tokens),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", sorted(SEQUENCE_FIRST))
@pytest.mark.parametrize(
    "batch, positions",
    [(5, 3), (5, 5), (5, 2), (5, 1), (1, 3)],
    ids=["T!=B", "T==B", "T==fewer", "T=1", "B=1"],
)
def test_sequence_first_layers_stay_on_hooks(
    name: str, batch: int, positions: int, engine_ways: str, caplog
) -> None:
    """Linear, LayerNorm and Embedding on ``(T, B, ...)``: their rules get the input and the
    output gradients transposed (a tied embedding and output layer: their tied rule). With
    ``T == B`` the shapes cannot tell, and the check's pass on fewer samples does; with
    ``T == 1`` the inputs, ``(1, B, ...)``, are not taken for shared. (Before, such models
    went to the functorch engine; with ``T == B`` and no check, the Fisher was 43-88% off.)
    A layer called in both layouts is told call by call."""
    make, make_data = SEQUENCE_FIRST[name]
    model = make().double()
    randomize_affine(model)
    x, y = make_data(batch, positions)
    for method in ("exact", "empirical"):
        caplog.clear()
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            got = fisher_diagonal(model, [(x, y)], method=method, backend="auto")
        assert not [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
        want = fisher_diagonal(model, [(x, y)], method=method, backend="loop")
        assert_close_dicts(got, want, 1e-10)


def test_sequence_first_as_long_as_the_batch_is_told_in_every_call() -> None:
    """A later call (a new engine) on shapes already checked takes the layers as
    sequence-first too: the checked shapes are kept with the layout they were checked in
    (with ``T == B``, the shapes are the same either way)."""
    model = SequenceFirstLayers().double()
    randomize_affine(model)
    for _ in range(2):
        (x, y), = square_batch()
        got = fisher_diagonal(model, [(x, y)], backend="hooks")
        assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


def test_a_model_that_fails_on_fewer_samples_is_reported() -> None:
    class FixedBatch(BatchFirstLayers):
        def forward(self, x: Tensor) -> Tensor:
            return super().forward(x.view(5, 5, 4))

    with pytest.raises(ValueError, match="could not be checked: the model failed on 2 samples"):
        fisher_diagonal(FixedBatch().double(), square_batch(), backend="hooks")


def _gram(vectors: Tensor) -> Tensor:
    """``M_n = V_nᵀ V_n`` per sample, ``(B, D, D)``."""
    flat = vectors.reshape(*vectors.shape[:2], -1).double()
    return torch.einsum("kbd,kbe->bde", flat, flat)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_fewer_vectors_for_the_softmax_fisher(dtype: torch.dtype) -> None:
    """The exact Fisher's C softmax vectors have rank C - 1: one vector less, same Gram."""
    logits = torch.randn(6, 5, dtype=dtype) * 3
    vectors = Categorical().position_factor(logits)  # (C, B, C)
    fewer = fewer_vectors(vectors)
    assert fewer.shape == (4, 6, 5) and fewer.dtype == dtype
    tol = 1e-12 if dtype == torch.float64 else 1e-6
    assert torch.allclose(_gram(fewer), _gram(vectors), rtol=0, atol=tol)


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_parameters_cast_to_float32_are_checked_to_float32(method, caplog) -> None:
    """Gemma's RMS norm multiplies by ``1 + w.float()`` in a float64 model: plain autograd's
    gradient of ``w`` is a float32 product, 1.6e-7 from the rule's float64 one (relative, in
    Hugging Face's Gemma), which the sums check took for a broken decomposition (Gemma and
    Gemma 2 went to functorch, then the loop engine); it now checks such a parameter to
    float32's tolerance, the others to float64's. The rule's sums are no further from float64
    brute force than float32 rounding."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), Gemma2RMSNorm(8), nn.Tanh(), nn.Linear(8, 3)).double()
    with torch.no_grad():
        model[1].weight.normal_()
    assert rules.rule_for(model[1]) is rules.hugging_face_rms_norm
    x, y = torch.randn(5, 6, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method)
    assert not [r.getMessage() for r in caplog.records if r.name.startswith("ewc_reg")]
    want = brute_force_fisher(model, x, y, method)
    for name in got:
        scale = want[name].abs().max()
        assert (got[name] - want[name]).abs().max() <= 1e-5 * scale, name


def test_fewer_vectors_drops_only_what_certainly_adds_nothing() -> None:
    """Zero vectors go (each sample's others moved to the front), and directions beyond the
    vectors' dimension; with no more vectors than dimensions, a dependent set stays as it is
    (its small directions cannot be told from real ones)."""
    full = torch.randn(3, 4, 2, 5, dtype=torch.float64)  # (K, B, S, C), rank 3 per sample
    assert fewer_vectors(full) is full
    single = full[:1]
    assert fewer_vectors(single) is single
    dependent = torch.cat([full, full[:1] - 2 * full[1:2]])  # rank 3 of 4, D = 10
    assert fewer_vectors(dependent) is dependent
    zeros = torch.cat([full, torch.zeros_like(full[:2])])  # 2 zero vectors per sample
    zeros[0, 1], zeros[3, 1] = 0, full[0, 1]  # (sample 1's first vector moved to the fourth)
    fewer = fewer_vectors(zeros)
    assert fewer.shape == (3, 4, 2, 5) and torch.equal(_gram(fewer), _gram(zeros))
    assert fewer_vectors(torch.zeros(3, 4, 5)).shape == (1, 4, 5)  # (all zero: one is left)
    narrow = torch.randn(6, 4, 3, dtype=torch.float64)  # 6 vectors of dimension 3
    fewer = fewer_vectors(narrow)
    assert fewer.shape == (3, 4, 3)
    assert torch.allclose(_gram(fewer), _gram(narrow), rtol=0, atol=1e-12)
    half = narrow.bfloat16()  # (rounding to bfloat16 hides dependence)
    assert fewer_vectors(half) is half
    many = torch.randn(MAX_VECTORS_TO_REDUCE + 1, 2, 3).repeat(1, 1, 20)
    assert fewer_vectors(many) is many


@pytest.mark.parametrize("backend", ["auto", "functorch"])
def test_a_class_improbable_in_every_sample_keeps_its_share(backend) -> None:
    """A convolution (the looped pull-back, with fewer_vectors) and a class of probability
    ~2e-16 in every sample (float32): before, its direction was dropped as rounding and its head
    row's Fisher was 2e-23 for 2.3e-16 (relative error 1.0)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv1d(2, 3, 3), nn.Flatten(), nn.Linear(6, 10))
    with torch.no_grad():
        model[2].bias.copy_(torch.linspace(0, 8, 10))
        model[2].bias[3] = -28.0  # (against 8: p ~ 1e-16)
    x = torch.randn(5, 2, 4)
    want = fisher_diagonal(copy.deepcopy(model).double(), [x.double()], backend="loop")
    got = fisher_diagonal(model, [x], backend=backend)
    assert rel_err(got["2.bias"][3].double(), want["2.bias"][3]) < 1e-5


def test_fewer_vectors_in_the_engine_give_the_exact_fisher() -> None:
    """The hook engine reduces the exact Fisher's vectors; the sums stay those of all C."""
    model = cnn(classes=4).eval()
    x = torch.randn(5, 2, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        vectors = Categorical().position_factor(model(x))
    assert fewer_vectors(vectors).shape[0] == 3
    got = engine_sums(HookEngine(), model, x, vectors)
    assert_close_dicts(got, brute_force(model, x, vectors), 1e-10)


def test_normalisations_reduced_one_vector_at_a_time() -> None:
    """With a convolution the pull-back runs once per vector and the normalisation layers'
    gradients are reduced as they come (:data:`rules.REDUCTIONS`); a chunk boundary and a
    parameter subset (only some weights and biases) included."""
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1),
        nn.GroupNorm(2, 4),
        nn.Tanh(),  # (else the next normalisation would cancel the biases)
        nn.LayerNorm((5, 5)),
        nn.Tanh(),
        nn.BatchNorm2d(4),
        nn.Tanh(),
        nn.RMSNorm(5),
        nn.Flatten(),
        nn.Linear(100, 3),
    ).double()
    randomize_bn(model)
    randomize_affine(model)
    model.eval()
    units = plan(model, trainable(model))
    assert [rules.REDUCTIONS.get(u.rule) is not None for u in units] == [0, 1, 1, 1, 1, 0]
    x = torch.randn(5, 2, 5, 5, dtype=torch.float64)
    check_against_references(model, x)
    check_against_references(model, x, chunk_size=2)
    model[1].weight.requires_grad_(False)
    model[5].bias.requires_grad_(False)
    check_against_references(model, x)


@pytest.mark.parametrize("names", [("weight", "bias"), ("weight",), ("bias",)])
@pytest.mark.parametrize("shape", [(6, 5), (6, 3, 5), (6, 2, 3, 5)])
def test_linear_sums_add_up_over_vectors_in_any_grouping(shape, names) -> None:
    """The Linear accumulator fed all vectors at once (the rule) or one at a time (the looped
    pull-back) gives the per-sample squares summed, with extra dimensions summed first, for the
    parameters asked; fed nothing, zeros. Its sums do not change when read twice."""
    x = torch.randn(*shape, dtype=torch.float64)
    grads = torch.randn(5, *shape[:-1], 4, dtype=torch.float64)  # K = 5 vectors, 4 outputs

    def fed(groups) -> dict[str, Tensor]:
        sums = rules.LinearSums(x, 4, names, torch.float64, 2**20)
        for g in groups:
            sums.add(0, g)
        first = {name: t.clone() for name, t in sums.sums().items()}
        assert_close_dicts(sums.sums(), first, 0)
        return first

    xs, gs = x.reshape(6, -1, 5), grads.reshape(5, 6, -1, 4)
    want = {
        "weight": torch.einsum("kbso,bsi->kboi", gs, xs).square().sum((0, 1)),
        "bias": gs.sum(2).square().sum((0, 1)),
    }
    want = {name: want[name] for name in names}
    assert_close_dicts(fed([grads]), want, 1e-12)
    assert_close_dicts(fed(list(grads)), want, 1e-12)
    assert_close_dicts(fed([grads[:2], grads[2:]]), want, 1e-12)
    unfed = fed([])
    assert {n: t.shape for n, t in unfed.items()} == {n: t.shape for n, t in want.items()}
    assert_close_dicts(unfed, {name: torch.zeros_like(t) for name, t in want.items()}, 0)


# --- parameters of a module next to parametrised submodules: per-sample copies --------------


class ClassToken(nn.Module):
    """A ViT in small: patch embedding, a class token on the root (``expand`` + ``cat``), an
    encoder owning a position embedding (``+``) next to its layers, a head on the token."""

    def __init__(self, patches: int = 3, dim: int = 8) -> None:
        super().__init__()
        self.embed = nn.Linear(5, dim)
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        self.encoder = PositionEncoder(patches + 1, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1)
        return self.head(self.encoder(h)[:, 0])


class PositionEncoder(nn.Module):
    def __init__(self, length: int, dim: int) -> None:
        super().__init__()
        self.position = nn.Parameter(torch.randn(1, length, dim) * 0.5)
        self.layer = nn.TransformerEncoderLayer(dim, 2, 16, dropout=0.0, batch_first=True)
        self.norm = nn.LayerNorm(dim)

    def forward(self, h: Tensor) -> Tensor:
        return self.norm(self.layer(h + self.position))


class LayerScaleBlock(nn.Module):
    """A ConvNeXt block in small: ``x + γ * block(x)``, ``γ`` next to the block's layers."""

    def __init__(self, channels: int = 3) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.mix = nn.Linear(channels, channels)
        self.gamma = nn.Parameter(torch.rand(channels, 1, 1) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        y = self.mix(torch.tanh(self.norm(self.conv(x).permute(0, 2, 3, 1))))
        return x + self.gamma * y.permute(0, 3, 1, 2)


class RootOffset(nn.Module):
    """A root parameter added to the output (and squared: any broadcasting use will do)."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
        self.offset = nn.Parameter(torch.randn(3))

    def forward(self, x: Tensor) -> Tensor:
        return self.body(x) * self.offset.square() + self.offset


class TokenAndScale(nn.Module):
    """A BEiT-like block on the root: a class token ``(1, 1, D)`` (layout ``-1``) and a layer
    scale ``(D,)`` on ``(B, T, D)`` (layout ``1``), which no single layout fits."""

    def __init__(self, dim: int = 6) -> None:
        super().__init__()
        self.embed, self.mix, self.head = nn.Linear(5, dim), nn.Linear(dim, dim), nn.Linear(dim, 3)
        self.token = nn.Parameter(torch.randn(1, 1, dim))
        self.scale = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: Tensor) -> Tensor:  # (B, P, 5) -> (B, 3)
        h = self.embed(x)
        h = torch.cat([self.token.expand(h.shape[0], -1, -1), h], dim=1)
        h = h + self.scale * torch.tanh(self.mix(h))
        return self.head(h[:, 0])


def _tree(shape: list) -> nn.Module:
    """A module per node of ``shape`` (a list ``[owns a parameter, children...]``)."""
    module = nn.Module()
    if shape[0]:
        module.p = nn.Parameter(torch.zeros(1))
    for i, child in enumerate(shape[1:]):
        module.add_module(f"m{i}", _tree(child))
    return module


_TREES = st.recursive(
    st.lists(st.booleans(), min_size=1, max_size=1),
    lambda children: st.tuples(st.booleans(), st.lists(children, max_size=3)).map(
        lambda node: [node[0], *node[1]]
    ),
    max_leaves=12,
)


@settings(max_examples=150, deadline=None)
@given(shape=_TREES)
def test_loose_parameters_are_those_of_owners_with_owners_inside(shape) -> None:
    """Against the definition, pair by pair: a module's own parameters are loose where another
    module owning parameters lies inside it."""
    model = _tree(shape)
    params = trainable(model)
    owners = {name.rpartition(".")[0] for name in params}
    want = [n for n in params if any(inside(o, n.rpartition(".")[0]) for o in owners)]
    assert list(loose_parameters(model, params)) == want


@settings(max_examples=100, deadline=None)
@given(shape=_TREES, whole_parents=st.booleans())
def test_the_planner_plans_once_as_plan_does_and_hands_out_new_units(
    shape, whole_parents
) -> None:
    """For the selected parameters without the loose ones, with or without ``whole_parents``
    (no module is a parent then), the Planner's units are ``plan``'s, from one ``plan`` call
    shared with ``problem``, and each request gets new units (one set's changes
    do not reach the next)."""
    model = _tree(shape)
    params = trainable(model)
    loose = loose_parameters(model, params)
    selected = {n: p for n, p in params.items() if n not in loose}
    try:
        want = plan(model, selected, whole_parents)
    except Unsupported:
        assume(False)

    def fields(units: list) -> list:
        return [(u.module, u.path, u.names, u.rule, u.decided) for u in units]

    planner = Planner()
    with mock.patch.object(recording, "plan", wraps=recording.plan) as planned:
        assert planner.problem(model, params) is None
        first = planner.plan(model, selected, whole_parents)
        assert fields(first) == fields(want)
        for unit in first:
            unit.names.clear()
            unit.decided = True
        again = planner.plan(model, selected, not whole_parents)
    assert fields(again) == fields(want)
    assert planned.call_count == 1


COPIED = {  # model, input shape, the parameters taken through per-sample copies
    "root_offset": (RootOffset, (5, 4), ["offset"]),
    "class_token": (ClassToken, (5, 3, 5), ["token", "encoder.position"]),
    "layer_scale": (
        lambda: nn.Sequential(LayerScaleBlock(), LayerScaleBlock(), Head(3 * 4 * 4)),
        (5, 3, 4, 4),
        ["0.gamma", "1.gamma"],
    ),
    # (before, its root became one unit on the per-module fallback)
    "class_token_and_layer_scale": (TokenAndScale, (5, 3, 5), ["token", "scale"]),
}


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", list(COPIED))
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_parameters_next_to_submodules_get_per_sample_copies(name, method, caplog) -> None:
    """No fallback (every other parameter in a unit with a rule), the same labels drawn as the
    functorch engine for ``sample``, and the references' Fisher."""
    make, shape, loose = COPIED[name]
    torch.manual_seed(0)
    model = make().double().eval()
    assert list(loose_parameters(model, trainable(model))) == loose
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    results = {}
    for backend in ("auto", "functorch"):
        with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
            results[backend] = fisher_diagonal(
                model, [(x, y), (x[:2], y[:2])], method, backend=backend, mc_samples=2,
                generator=torch.Generator().manual_seed(7),
            )
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(results["auto"], results["functorch"], 1e-10)
    with torch.no_grad():
        draws = Categorical().sample(model(x), 2, torch.Generator().manual_seed(7))
    first = brute_force_fisher(model, x, y, method, sampled=draws)
    rest = {n: p for n, p in trainable(model).items() if n not in loose}
    assert all(unit.rule is not None for unit in plan(model, rest))
    if method != "sample":  # (the second batch's draws come after the first's)
        second = brute_force_fisher(model, x[:2], y[:2], method)
        want = {n: (5 * first[n] + 2 * second[n]) / 7 for n in first}
        assert_close_dicts(results["auto"], want, 1e-10)


class ChildWeightInParent(nn.Module):
    """Owns ``gamma`` (broadcast) and passes its submodule's weight to ``F.linear`` itself."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.gamma = nn.Parameter(torch.rand(4) + 0.5)

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.lin.weight, self.lin.bias) * self.gamma


class IndexedTable(nn.Module):
    """Owns a table it indexes and adds to rows folded into the batch dimension positions
    first: no per-sample copies in any layout (a sample's rows are not together)."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.table = nn.Parameter(torch.randn(7, 2))

    def forward(self, x: Tensor) -> Tensor:
        rows = self.lin(x).reshape(len(x), 2, 2).transpose(0, 1).flatten(0, 1)
        rows = rows + self.table[torch.tensor([1, 3, 5])].sum(0)
        return rows.unflatten(0, (2, len(x))).transpose(0, 1).flatten(1)


@pytest.mark.parametrize(
    "inner, messages_want",
    [
        (IndexedTable, [("per-sample copies", "become units of their own parameters")]),
        (
            ChildWeightInParent,  # (its gamma takes copies)
            [("'weight' of module '1.lin' is used outside", "['1'] become units of all the")],
        ),
    ],
)
def test_parents_whose_parameters_cannot_be_copied_become_units(
    inner, messages_want, caplog
) -> None:
    """The engine then takes the parent as a unit (the per-module fallback) of its own
    parameters, the modules inside it keeping their rules, or, where the parent uses their
    parameters itself, as one unit of all of them, still without leaving the hooks engine, and
    draws the labels once."""
    model = nn.Sequential(nn.Linear(4, 4), inner(), nn.Linear(4, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    results = {}
    for backend in ("auto", "functorch"):
        with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
            results[backend] = fisher_diagonal(
                model, [(x, y), (x[:2], y[:2])], "sample", backend=backend,
                generator=torch.Generator().manual_seed(3),
            )
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == len(messages_want)
    for message, parts in zip(messages, messages_want):
        assert all(part in message for part in parts), message
    assert_close_dicts(results["auto"], results["functorch"], 1e-10)


class TableAroundTable(nn.Module):
    """A parent of parents: owns a table it indexes next to an :class:`IndexedTable`, called
    twice."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = IndexedTable()
        self.table = nn.Parameter(torch.randn(5, 4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x) * self.table[torch.tensor([0, 2])].prod(0)
        return self.inner(torch.tanh(h)) + self.table[4]


def test_parents_of_parents_are_units_of_their_own_parameters(caplog) -> None:
    model = nn.Sequential(nn.Linear(4, 4), TableAroundTable(), nn.Linear(4, 3)).double()
    units = {unit.path: sorted(unit.names) for unit in plan(model, trainable(model), False)}
    assert units == {
        "0": ["bias", "weight"], "1": ["table"], "1.inner": ["table"],
        "1.inner.lin": ["bias", "weight"], "2": ["bias", "weight"],
    }
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    for method in ("exact", "empirical"):
        with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
            got = fisher_diagonal(model, [(x, y), (x[:2], y[:2])], method)
        assert_close_dicts(got, brute_force_fisher(model, torch.cat([x, x[:2]]),
                                                   torch.cat([y, y[:2]]), method), 1e-10)
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    # (once: the second call starts from the arrangement the first found)
    assert len(messages) == 1 and "of their own parameters" in messages[0]


def test_a_parent_unit_of_its_own_parameters() -> None:
    """With ``whole_parents=False``, the parent is a unit of its own parameters without a rule,
    and its child keeps its own unit and rule."""
    model = nn.Sequential(nn.Linear(4, 4), IndexedTable(), nn.Linear(4, 3)).double()
    whole = {unit.path: unit for unit in plan(model, trainable(model))}
    own = {unit.path: unit for unit in plan(model, trainable(model), whole_parents=False)}
    assert whole["1"].names == {"table": "1.table", "lin.weight": "1.lin.weight",
                                "lin.bias": "1.lin.bias"} and "1.lin" not in whole
    assert own["1"].names == {"table": "1.table"} and own["1"].rule is None
    assert own["1.lin"].names == {"weight": "1.lin.weight", "bias": "1.lin.bias"}
    assert own["1.lin"].rule is not None


@pytest.mark.filterwarnings("ignore:There is a performance drop")
def test_per_sample_copies_in_bfloat16(caplog) -> None:
    """The two-sample check allows for bfloat16 rounding (the copies are kept), and the sums
    accumulate in float32."""
    torch.manual_seed(0)
    model = ClassToken().eval()
    x, y = torch.randn(5, 3, 5), torch.randint(0, 3, (5,))
    want = fisher_diagonal(model, [(x, y)], backend="functorch")
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model.bfloat16(), [(x.bfloat16(), y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert got["token"].dtype == torch.float32
    assert_close_dicts(got, want, 1e-1)


def test_a_late_failure_does_not_draw_the_labels_again(monkeypatch) -> None:
    """An attempt that fails after making the vectors (here: made to) hands the retry and the
    fallback the same vectors, so ``sample`` equals the functorch engine's with the seed."""
    model = nn.Sequential(nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3)).double()
    data = data_for(None)
    real = HookEngine._sums

    def late_failure(self, *args):
        real(self, *args)  # (makes the vectors, then fails)
        raise recording.Unsupported("failed after the vectors")

    monkeypatch.setattr(HookEngine, "_sums", late_failure)
    got = fisher_diagonal(model, data, "sample", generator=torch.Generator().manual_seed(3))
    want = fisher_diagonal(
        model, data, "sample", generator=torch.Generator().manual_seed(3), backend="functorch"
    )
    assert_close_dicts(got, want, 1e-12)


def test_chunk_sizes_are_kept_per_sample_shape(unchecked_sums) -> None:
    """Longer sequences than the last batch's do not start from its chunks: their first pass
    goes over the whole batch, without gradients (the shorter ones went in chunks)."""
    model = nn.Sequential(nn.Embedding(20, 16), nn.Linear(16, 16), nn.Tanh(), nn.Linear(16, 5))
    model.double()

    def batch(length: int):
        return [(torch.randint(0, 20, (8, length)), torch.randint(0, 5, (8, length)))]

    budget = 4_000  # (chunks of 2 short sequences, of 1 long one)
    calls = []
    model.register_forward_pre_hook(
        lambda module, args: calls.append((tuple(args[0].shape), torch.is_grad_enabled()))
    )
    fisher_diagonal(model, batch(2), "empirical", backend="hooks", memory_budget=budget)
    assert calls[1:3] == [((2, 2), False), ((2, 2), True)]  # (the layout check, a chunk)
    long = batch(16)
    expected = fisher_diagonal(model, long, "empirical", backend="functorch")
    calls.clear()
    got = fisher_diagonal(model, long, "empirical", backend="hooks", memory_budget=budget)
    assert calls[0] == ((8, 16), False) and calls[2] == ((1, 16), True)  # (1: the check)
    assert_close_dicts(got, expected, 1e-10)


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("name", list(COPIED))
@pytest.mark.parametrize("chunks", [{"memory_budget": 1}, {"chunk_size": 2}])
def test_per_sample_copies_in_chunks_over_batches(name, chunks) -> None:
    """Later batches of a model known to go in chunks: a pass over the whole batch without
    gradients (chunks of one sample) or the first chunk's (chunks of two), copies included."""
    make, shape, _ = COPIED[name]
    torch.manual_seed(0)
    model = make().double().eval()
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    data = [(x, y), (x.flip(0), y.flip(0))]
    want = fisher_diagonal(model, data, "exact", backend="functorch")
    for _ in range(2):  # (the second call knows the chunks from its first batch on)
        got = fisher_diagonal(model, data, "exact", backend="hooks", **chunks)
        assert_close_dicts(got, want, 1e-10)


CHUNKINGS = [{}, {"memory_budget": 1}, {"chunk_size": 2}, {"memory_budget": 20_000}]


@pytest.mark.filterwarnings("ignore:There is a performance drop")
@pytest.mark.parametrize("kind", ["mlp", "cnn", "class_token"])
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_chunkings_and_repeated_calls_agree_with_functorch(
    kind: str, method: str, engine_ways: str
) -> None:
    """Two batches under every chunking (none, one sample, two, a few), each twice in a row
    (the second call starts from the chunk sizes the first left): the functorch engine's
    Fisher, and for sample its labels."""
    torch.manual_seed(0)
    if kind == "class_token":
        model, shape = ClassToken(), (3, 5)
    else:
        model, shape = (mlp(), (6,)) if kind == "mlp" else (cnn(classes=5), (2, 6, 6))
    model = model.double().eval()
    data = [
        (torch.randn(n, *shape, dtype=torch.float64), torch.randint(0, 3, (n,))) for n in (5, 3)
    ]

    def fisher(**kwargs) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(3)
        return fisher_diagonal(model, data, method, mc_samples=2, generator=generator, **kwargs)

    want = fisher(backend="functorch")
    for chunking in CHUNKINGS:
        for _ in range(2):
            assert_close_dicts(fisher(backend="hooks", **chunking), want, 1e-10)


def _pull_back_models() -> dict[str, tuple[nn.Module, Tensor, bool]]:
    """Models with the layers the pull-back treats apart, an input batch of 7, and whether the
    pull-back loops over the vectors on CPU."""
    return {
        "conv_bn": (cnn(), torch.randn(7, 2, 6, 6, dtype=torch.float64), True),
        "attention": (Attention().double(), torch.randint(0, 11, (7, 4)), True),
        "lstm": (
            LSTMClassifier(num_classes=4, vocab_size=11, dim=6).double(),
            torch.randint(0, 11, (7, 5)),
            False,
        ),
    }


@pytest.mark.parametrize("name", ["conv_bn", "attention", "lstm"])
@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_looped_and_batched_pull_backs_agree(name, method, pull_back_modes, engine_ways):
    """The pull-back loops over the vectors on CPU with convolutions, batch norms or attention,
    and is batched otherwise and on a launch-bound device (:func:`hooks.loops_pull_back`); the
    two ways give the same sums, in chunks too."""
    torch.manual_seed(0)
    model, x, looped_on_cpu = _pull_back_models()[name]
    model.eval()
    data = [(x[:4], torch.randint(0, 3, (4,))), (x[4:], torch.randint(0, 3, (3,)))]

    def fisher(**kwargs):
        return fisher_diagonal(
            model, data, method, backend="hooks", generator=torch.Generator().manual_seed(1),
            **kwargs,
        )

    by_default = fisher()
    assert set(pull_back_modes) == {looped_on_cpu and engine_ways == "cpu"}
    for kind in ("looped", "batched"):
        pull_back_modes.clear()
        with pull_back(kind):
            assert_close_dicts(fisher(), by_default, 1e-12)
            assert_close_dicts(fisher(chunk_size=2), by_default, 1e-12)
        assert set(pull_back_modes) == {kind == "looped"}


def test_the_pull_back_loops_only_in_large_passes(looped_min_bytes):
    """On the CPU a model with convolutions, batch norms or attention loops over the vectors
    only in passes whose recorded outputs take ``hooks.looped_min_bytes()`` or more on average;
    on a launch-bound device never; other models never."""
    cpu, conv = torch.device("cpu"), nn.Conv2d(1, 2, 3)
    assert looped_min_bytes == 512 * 2**10  # (the measured crossover at the suite's 2 threads)
    assert hooks.loops_pull_back(conv, cpu)  # (passes not known yet)
    assert hooks.loops_pull_back(conv, cpu, looped_min_bytes)
    assert not hooks.loops_pull_back(conv, cpu, looped_min_bytes - 1)
    assert not hooks.loops_pull_back(nn.Linear(2, 2), cpu, 10 * looped_min_bytes)
    with engine_ways("launch-bound"):
        assert not hooks.loops_pull_back(conv, cpu, 10 * looped_min_bytes)


def test_the_looped_pull_backs_threshold_grows_with_threads_measured(looped_min_bytes):
    """256 KiB a thread, up to the 2 threads measured (``LOOPED_MIN_BYTES_PER_THREAD``; the
    fixture puts torch's thread count back after the test)."""
    conv = nn.Conv2d(1, 2, 3)
    for count, expected in ((1, 256 * 2**10), (2, 512 * 2**10), (4, 512 * 2**10)):
        torch.set_num_threads(count)
        assert hooks.looped_min_bytes() == expected
        assert hooks.loops_pull_back(conv, torch.device("cpu"), 300 * 2**10) == (count == 1)


@pytest.mark.parametrize(
    ("samples", "budget", "looped"),
    [
        (2, None, False),  # the recorded outputs: 341 KiB on average
        (3, None, True),  # 512 KiB
        (6, 3 * 2**20, False),  # chunks of fewer samples within a small budget
    ],
)
def test_small_passes_take_the_batched_pull_back(
    looped_min_bytes, pull_back_modes, samples, budget, looped
):
    """The engine's choice by the mean size of the recorded outputs of a pass (its chunk, or
    the whole batch), with the same sums either way (float64, against the pull-back forced to
    loop). The model records three outputs per sample: 256, 256 KiB and 24 bytes."""
    model = nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.BatchNorm2d(32), nn.Flatten(), nn.Linear(32 * 32**2, 3)
    )
    model = model.double().eval()
    randomize_bn(model)
    x = torch.randn(samples, 1, 32, 32, dtype=torch.float64)
    data = [(x, torch.randint(0, 3, (samples,)))]
    kwargs = {} if budget is None else {"memory_budget": budget}
    got = fisher_diagonal(model, data, "exact", backend="hooks", **kwargs)
    assert pull_back_modes and set(pull_back_modes) == {looped}
    if budget is not None:
        assert len(pull_back_modes) > 1  # (chunks)
    with pull_back("looped"):
        want = fisher_diagonal(model, data, "exact", backend="hooks", **kwargs)
    assert_close_dicts(got, want, 1e-12)


def test_the_batched_pull_back_batches_convolutions_and_batch_norms(unchecked_sums):
    """One backward kernel per layer for all the vectors, not one per vector (as
    ``autograd.grad(..., is_grads_batched=True)`` runs them)."""
    calls = []

    class Calls(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            calls.append(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    model, x = cnn(), torch.randn(4, 2, 6, 6, dtype=torch.float64)
    layers = sum(isinstance(m, (nn.Conv2d, nn.BatchNorm2d)) for m in model.modules())
    with pull_back("batched"), Calls():
        fisher_diagonal(model, [(x, torch.randint(0, 4, (4,)))], "exact", backend="hooks")
    backward = [c for c in calls if c in ("convolution_backward", "native_batch_norm_backward")]
    assert 0 < len(backward) <= layers  # (looped over the K = 4 vectors: up to 4 times as many)


class _ClippedGradient(torch.autograd.Function):
    """Identity whose backward branches on the gradient's values (which ``vmap`` cannot)."""

    @staticmethod
    def forward(ctx, x: Tensor) -> Tensor:
        return x.clone()

    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        if g.abs().max() > 1e6:
            g = g.clamp(-1e6, 1e6)
        return g


class _BrokenGradient(_ClippedGradient):
    @staticmethod
    def backward(ctx, g: Tensor) -> Tensor:
        raise RuntimeError("a bug in the model's backward")


class _Through(nn.Module):
    def __init__(self, function: type[torch.autograd.Function]) -> None:
        super().__init__()
        self.function = function

    def forward(self, x: Tensor) -> Tensor:
        return torch.tanh(self.function.apply(x))


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_a_backward_vmap_cannot_batch_is_pulled_back_one_vector_at_a_time(method, caplog):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 7), _Through(_ClippedGradient), nn.Linear(7, 4)).double()
    data = [(torch.randn(6, 5, dtype=torch.float64), torch.randint(0, 4, (6,)))]

    def fisher(backend: str) -> dict[str, Tensor]:
        generator = torch.Generator().manual_seed(2)
        return fisher_diagonal(
            model, data, method, backend=backend, mc_samples=3, generator=generator
        )

    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher("hooks")
    assert "batched over the vectors failed" in caplog.text and "data-dependent" in caplog.text
    assert_close_dicts(got, fisher("loop"), 1e-12)


def test_an_error_in_the_models_backward_is_raised_not_hidden():
    model = nn.Sequential(nn.Linear(5, 7), _Through(_BrokenGradient), nn.Linear(7, 4))
    data = [(torch.randn(6, 5), torch.randint(0, 4, (6,)))]
    with pytest.raises(RuntimeError, match="a bug in the model's backward"):
        fisher_diagonal(model, data, "exact", backend="hooks")


@pytest.mark.parametrize("positions", [1, 2, 5, 16])
@pytest.mark.parametrize("weight", [1.0, 2.0])
def test_pairs_gathered_on_a_gpu_equal_the_slices(positions, weight):
    """The pairs ``l <= m`` of :func:`rules._pairs` and :func:`rules._outer_pairs`: one
    gather on a launch-bound device, a slice per row on CPU; both against a double loop."""
    t = torch.randn(3, 2, positions, positions, dtype=torch.float64)
    u = torch.randn(3, 4, positions, dtype=torch.float64).mT  # (3, L, 4), as patches come
    pairs = [(i, j) for i in range(positions) for j in range(i, positions)]
    want = torch.stack([t[..., i, j] * (1.0 if i == j else weight) for i, j in pairs], -1)
    want_outer = torch.stack([u[..., i, :] * u[..., j, :] for i, j in pairs], -2)
    sliced = rules._pairs(t, weight), rules._outer_pairs(u)
    with engine_ways("launch-bound"):
        gathered = rules._pairs(t, weight), rules._outer_pairs(u)
    for got in (sliced, gathered):
        torch.testing.assert_close(got[0], want, rtol=0, atol=0)
        torch.testing.assert_close(got[1], want_outer, rtol=0, atol=0)


def test_the_failed_batched_attempt_is_freed_before_the_retry(unchecked_sums):
    """Its graph and recorded activations (here: its model output) are gone while the looped
    retry runs, so a retry after running out of memory has the memory back."""
    outputs: list[weakref.ref] = []
    alive_in_retry: list[list[bool]] = []

    class Probed(_ClippedGradient):
        @staticmethod
        def backward(ctx, g: Tensor) -> Tensor:
            g = _ClippedGradient.backward(ctx, g)  # (fails under vmap: the first attempt)
            gc.collect()
            alive_in_retry.append([ref() is not None for ref in outputs])
            return g

    class Model(nn.Sequential):
        def forward(self, x: Tensor) -> Tensor:
            out = super().forward(x)
            outputs.append(weakref.ref(out))
            return out

    model = Model(nn.Linear(5, 7), _Through(Probed), nn.Linear(7, 4))
    data = [(torch.randn(6, 5), torch.randint(0, 4, (6,)))]
    fisher_diagonal(model, data, "exact", backend="hooks")
    assert alive_in_retry and alive_in_retry[0][0] is False  # (the first attempt's output)


def test_the_failed_attempt_is_freed_before_the_fallback_runs():
    """A problem the forward pass reveals (a parameter used outside its module's call, on
    rows folded positions first: no shadowed copies either) sends the model to the functorch
    engine; the hooks engine's forward pass, graph and output, is gone by the check of the
    shadowed copies, and by the functorch engine's first call."""
    outputs: list[weakref.ref] = []
    alive: list[list[bool]] = []

    class Model(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.first, self.head = nn.Linear(5, 8), nn.Linear(8, 4)

        def forward(self, x: Tensor) -> Tensor:
            gc.collect()
            alive.append([ref() is not None for ref in outputs])
            h = torch.tanh(self.first(x))
            rows = F.linear(positions_first(h), self.head.weight[:, :4])  # (outside head's call)
            out = self.head(h) + samples_first(rows, len(x))[:, :4]
            outputs.append(weakref.ref(out))
            return out

    data = [(torch.randn(6, 5), torch.randint(0, 4, (6,)))]
    fisher_diagonal(Model(), data, "exact", backend="auto")
    assert len(alive) >= 3 and not alive[1][0]  # (the check's first pass)


def test_running_out_of_memory_in_the_batched_pull_back_is_raised(monkeypatch):
    """Not retried one vector at a time: at the same budget that takes larger chunks."""

    def out_of_memory(*args):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    monkeypatch.setattr(torch.func, "vmap", lambda fn: out_of_memory)
    model = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 4))
    with pytest.raises(torch.OutOfMemoryError, match="simulated"):
        fisher_diagonal(model, [(torch.randn(6, 5), torch.randint(0, 4, (6,)))], "exact")


# --- idioms of real models: checkpointing, parametrizations, layers without rules ------------


class Checkpointed(nn.Module):
    """A block under activation checkpointing (``torch.utils.checkpoint``): its layers' forward
    hooks fire again when the backward recomputes the block."""

    def __init__(self, use_reentrant: bool) -> None:
        super().__init__()
        self.block = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 6), nn.LayerNorm(6))
        self.head = nn.Linear(6, 3)
        self.use_reentrant = use_reentrant

    def forward(self, x: Tensor) -> Tensor:
        from torch.utils.checkpoint import checkpoint

        h = checkpoint(self.block, x, use_reentrant=self.use_reentrant)
        return self.head(torch.tanh(h))


def weight_normed() -> nn.Module:
    """``weight_norm`` as a parametrization: ``weight`` is computed from two parameters."""
    from torch.nn.utils.parametrizations import weight_norm

    return nn.Sequential(weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))


class Gated(nn.Module):
    """A module of its own, with a parameter: no rule."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(features, features))

    def forward(self, a: Tensor, b: Tensor) -> Tensor:
        return (a @ self.w) * torch.sigmoid(b)


class WithoutRules(nn.Module):
    """Layers with parameters but no rule (the per-module fallback: ``EmbeddingBag`` taking
    maxima, a module of its own) between layers with one."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 3, 2, stride=2)
        self.conv = nn.Conv2d(3, 3, 3)
        self.prelu = nn.PReLU(3)
        self.conv3d = nn.Conv3d(1, 2, (2, 3, 3))
        self.bag = nn.EmbeddingBag(7, 8, mode="max")
        self.gate = Gated(8)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.prelu(self.conv(self.up(x)))  # (B, 3, 4, 4)
        h = self.conv3d(h.unsqueeze(1)).flatten(1)  # (B, 2 * 2 * 2 * 2)
        tokens = torch.arange(4).repeat(h.shape[0], 1)
        return self.head(torch.tanh(self.gate(h[:, ::2], self.bag(tokens))))


class TinyUNet(nn.Module):
    """A U-Net in small: convolutions with group norm, max pooling down, a transposed
    convolution up, and the skip connection concatenated."""

    def __init__(self) -> None:
        super().__init__()
        self.down = nn.Sequential(nn.Conv2d(2, 4, 3, padding=1), nn.GroupNorm(2, 4), nn.ReLU())
        self.bottom = nn.Sequential(nn.MaxPool2d(2), nn.Conv2d(4, 8, 3, padding=1), nn.Tanh())
        self.up = nn.ConvTranspose2d(8, 4, 2, stride=2)
        self.out = nn.Conv2d(8, 3, 1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, 4, 4)
        skip = self.down(x)
        h = torch.cat([skip, self.up(self.bottom(skip))], 1)
        return self.out(h).mean((2, 3))


IDIOMS = {
    "checkpoint": (lambda: Checkpointed(use_reentrant=False), (7, 4)),
    "checkpoint_reentrant": (lambda: Checkpointed(use_reentrant=True), (7, 4)),
    "weight_norm": (weight_normed, (7, 4)),
    "layers_without_rules": (WithoutRules, (7, 2, 3, 3)),
    "unet": (TinyUNet, (7, 2, 4, 4)),
}


@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("name", list(IDIOMS))
@pytest.mark.parametrize("method", ["exact", "empirical"])
@pytest.mark.parametrize("chunks", [{}, {"chunk_size": 3}])
def test_model_idioms_stay_on_hooks_and_match_brute_force(
    name, method, chunks, engine_ways, caplog
) -> None:
    make, shape = IDIOMS[name]
    torch.manual_seed(0)
    model = make().double()
    randomize_affine(model)
    x, y = torch.randn(*shape, dtype=torch.float64), torch.randint(0, 3, (shape[0],))
    assert get_engine("auto", model, trainable(model)).name == "hooks"
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method, **chunks)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # no fallback, no retry
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


class SquareToo(nn.Module):
    """Returns ``y`` and a tensor computed from it: ``y``'s gradient recorded at its autograd
    edge includes the part that flows back through the second output."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4, 4))

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        y = torch.tanh(x @ self.w)
        return y, y.square().sum(1, keepdim=True)


class Twice(SquareToo):
    """Returns the same tensor twice, and a view of it."""

    def forward(self, x: Tensor) -> tuple[Tensor, ...]:
        y = torch.tanh(x @ self.w)
        return y, y, y[:, :1]


class Feeding(nn.Module):
    def __init__(self, inner: nn.Module, uses: str) -> None:
        super().__init__()
        self.inner, self.uses = inner, uses
        self.head = nn.LazyLinear(3)

    def forward(self, x: Tensor) -> Tensor:
        outputs = self.inner(x)
        used = outputs if self.uses == "all" else outputs[:1]
        return self.head(torch.tanh(torch.cat(used, dim=1)))


class UnruledLSTMCell(nn.LSTMCell):
    """An LSTM cell without a rule: a ``forward`` of its own (computing the same) takes it off
    its base's."""

    def forward(self, x: Tensor, state: tuple[Tensor, Tensor] | None = None):
        return super().forward(x, state)


FEEDING = {
    "lstm_cell_h_and_c": lambda: Feeding(UnruledLSTMCell(4, 3), "all"),  # h = o * tanh(c)
    "lstm_cell_h_only": lambda: Feeding(UnruledLSTMCell(4, 3), "first"),
    "output_and_its_square": lambda: Feeding(SquareToo(), "all"),
    "same_tensor_twice_and_a_view": lambda: Feeding(Twice(), "all"),
}


@pytest.mark.parametrize("name", list(FEEDING))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_outputs_of_a_module_feeding_one_another(name, method, engine_ways) -> None:
    """The per-module fallback pulls back only the gradients that reach a module's outputs
    from outside it (before, the LSTM cell's Fisher of its input and output gates came out 4
    times too large, even with ``c`` unused)."""
    torch.manual_seed(0)
    model = FEEDING[name]()
    x, y = torch.randn(6, 4), torch.randint(0, 3, (6,))
    model(x)  # (sizes the lazy head)
    model.double()
    x = x.double()
    assert {unit.path: unit.rule for unit in plan(model, trainable(model))}["inner"] is None
    got = fisher_diagonal(model, [(x, y)], method, chunk_size=4)
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


# --- units called on inputs the samples share (position_ids of shape (1, T)) ---------------


class SharedPositions(nn.Module):
    """Token and position embeddings as Hugging Face's BERT and GPT-2 look them up: positions
    ``(1, T)``, broadcast over the batch; plus a Linear on a shared ``(1, 4)`` buffer."""

    def __init__(self, squeeze: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(9, 4), nn.Embedding(7, 4)
        self.bias = nn.Linear(4, 4)
        self.register_buffer("anchor", torch.randn(1, 4))
        self.norm, self.head = nn.LayerNorm(4), nn.Linear(4, 3)
        self.squeeze = squeeze

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        pos = self.pos(positions)  # (1, T, 4)
        if self.squeeze:  # (T, 4), and a mean over the positions: (4,)
            pos = pos.squeeze(0).mean(0)
        h = self.norm(self.tok(ids) + pos + self.bias(self.anchor)[:, None])
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("method", ["exact", "empirical"])
@pytest.mark.parametrize("chunks", [{}, {"chunk_size": 2}])
def test_units_on_inputs_the_samples_share_stay_on_hooks(method, chunks, engine_ways, caplog):
    """Their inputs are expanded over the batch, so their outputs' gradients are per sample."""
    torch.manual_seed(0)
    model = SharedPositions().double()
    randomize_affine(model)
    ids, y = torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(ids, y)], method, **chunks)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # (hooks, no fallback)
    assert_close_dicts(got, brute_force_fisher(model, ids, y, method), 1e-10)
    assert got["pos.weight"][:6].abs().min() > 0 and got["bias.weight"].abs().min() > 0


def test_shared_position_ids_as_long_as_the_batch_stay_on_hooks(caplog) -> None:
    """With ``T == B`` the ``(1, T)`` position ids look like a sequence-first input with one
    position, ``(1, B)``, until the layout check's pass on 2 samples shows them shared; the
    retry expands them."""
    model = SharedPositions().double()
    randomize_affine(model)
    ids, y = torch.randint(0, 9, (5, 5)), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(ids, y)], backend="auto")
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert not [m for m in messages if "using the functorch engine" in m]
    assert any("the inputs of module 'pos', sequence-first" in m for m in messages)  # (retry)
    assert_close_dicts(got, brute_force_fisher(model, ids, y, "exact"), 1e-10)


def test_a_layout_found_by_a_retry_is_kept_for_later_calls() -> None:
    """A later call takes the ``(1, T)`` position ids with ``T == B`` for shared at once: one
    forward pass (before, 3: the wrong layout, the layout check's pass and the right one)."""
    model = CountingCalls(SharedPositions()).double()
    ids, y = torch.randint(0, 9, (5, 5)), torch.randint(0, 3, (5,))
    fisher_diagonal(model, [(ids, y)], "empirical", backend="hooks")
    model.sizes.clear()
    got = fisher_diagonal(model, [(ids, y)], "empirical", backend="hooks")
    assert model.sizes == [5]
    assert_close_dicts(got, brute_force_fisher(model, ids, y, "empirical"), 1e-10)


class LearnedPositions(nn.Embedding):
    """Hugging Face BART's position embedding: an ``nn.Embedding`` subclass (no rule) looking
    up shared positions, ``(1, T, D)``, from per-sample ids it reads only the shape of."""

    def forward(self, ids: Tensor, positions: Tensor) -> Tensor:
        return super().forward(positions.unsqueeze(0))


class SharedOutput(nn.Module):
    """Token embeddings plus a shared ``(1, T, 4)`` output, broadcast; or summed over dimension
    0 (expanded, the model's output changes), viewed as ``(T, 4)`` (expanded, the model
    fails), or its row 0 taken (expanded, sample 0's copy: only the sums check sees it)."""

    def __init__(self, use: str = "broadcast") -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(9, 4), LearnedPositions(7, 4)
        self.head = nn.Linear(4, 3)
        self.use = use

    def forward(self, ids: Tensor) -> Tensor:
        pos = self.pos(ids, torch.arange(ids.shape[1]))
        if self.use == "summed":
            pos = pos.sum(0)
        elif self.use == "viewed":
            pos = pos.view(ids.shape[1], 4)
        elif self.use == "first":
            pos = pos[0]
        h = self.tok(ids) + pos
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_shared_output_is_expanded_over_the_batch(method, engine_ways, caplog) -> None:
    """A unit without a rule whose output the samples share, ``(1, ...)``, gets it expanded
    over the batch, so that the gradients at it are per sample (before, the model went to
    functorch). A model that sums the output over the batch dimension goes to functorch (the
    layout check: its output on 2 samples is not theirs alone), and so does one that takes
    sample 0's copy (the sums check). With as many positions as samples, the shared positions
    ``(T,)`` lead with the batch size: the per-module fallback passes them whole (before, it
    would have cut them per sample, and the model went to functorch; Hugging Face BART with
    ``T == B`` to the loop engine). (One that fails on the expansion: see ``test_shadows``.)"""
    for positions in (6, 5):
        model = SharedOutput().double()
        ids, y = torch.randint(0, 9, (5, positions)), torch.randint(0, 3, (5,))
        with caplog.at_level(logging.INFO, logger="ewc_reg"):
            got = fisher_diagonal(model, [(ids, y), (ids[:3], y[:3])], method)
        assert not [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
        want = brute_force_fisher(model, torch.cat([ids, ids[:3]]), torch.cat([y, y[:3]]), method)
        assert_close_dicts(got, want, 1e-10)
    cases = [
        ("summed", 6, "the model's output"),  # (a layout or expansion check finds it)
        ("first", 6, "the per-layer sums of parameter 'pos.weight' differ from plain"),
    ]
    for use, positions, reason in cases:
        caplog.clear()
        model = SharedOutput(use).double()
        ids = torch.randint(0, 9, (5, positions))
        log_and_compare(model, [(ids, y)], caplog, reason)


class PositionsWithoutBatch(nn.Module):
    """Positions looked up as nanoGPT does, ``arange(T)`` of shape ``(T,)`` beside ids
    ``(B, T)``, broadcast over the batch. With ``view``, the position embeddings are reshaped
    to ``(T, 4)``, which fails once they have a batch dimension; with ``folded``, a Linear
    runs on the hidden states folded to ``(B T, 4)`` (as OPT's last layers do), which are no
    shared input."""

    def __init__(self, view: bool = False, folded: bool = False) -> None:
        super().__init__()
        self.tok, self.pos = nn.Embedding(9, 4), nn.Embedding(7, 4)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.view, self.folded = view, folded

    def forward(self, ids: Tensor) -> Tensor:
        length = ids.shape[1]
        pos = self.pos(torch.arange(length, device=ids.device))  # (T, 4)
        if self.view:
            pos = pos.view(length, 4)
        h = torch.tanh(self.tok(ids) + pos)
        if self.folded:
            h = self.mix(h.reshape(-1, 4)).view_as(h)
        return self.head(h.mean(1))


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_units_on_inputs_without_a_batch_dimension_stay_on_hooks(method, caplog) -> None:
    """Inputs the samples share without a batch dimension get one in front (before, the
    units' outputs without the batch sent the model to functorch)."""
    torch.manual_seed(0)
    model = PositionsWithoutBatch().double()
    ids, y = torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,))
    data = [(ids, y), (ids[:1], y[:1])]  # (one sample: (T,) gets a batch dimension of 1)
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, method)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # (hooks, no fallback)
    first = brute_force_fisher(model, ids, y, method)
    last = brute_force_fisher(model, ids[:1], y[:1], method)
    want = {name: (5 * first[name] + last[name]) / 6 for name in first}
    assert_close_dicts(got, want, 1e-10)
    assert got["pos.weight"][:6].abs().min() > 0


class ClassEmbedding(nn.Module):
    """Per-sample class ids ``(B,)`` beside token ids ``(B, T)``: with ``T == B`` they have
    one sample's shape of the ids, and are no shared input all the same."""

    def __init__(self) -> None:
        super().__init__()
        self.tok, self.cls, self.head = nn.Embedding(9, 4), nn.Embedding(3, 4), nn.Linear(4, 3)

    def forward(self, ids: Tensor, classes: Tensor) -> Tensor:
        return self.head(torch.tanh(self.tok(ids) + self.cls(classes)[:, None]).mean(1))


def test_shared_inputs_with_the_batch_size_among_their_dimensions(caplog) -> None:
    """nanoGPT's ``arange(T)`` with as many samples as positions (``T == B == 6``) has the
    batch size as its dimension: not expanded at first, the layout check finds its unit's
    inputs and output unchanged on 2 samples, and the next attempt expands them (before, the
    model went to functorch). Per-sample class ids ``(B,)`` beside ``(B, T)`` ids with
    ``T == B`` are not taken for shared: both stay on hooks, with the right Fisher."""
    torch.manual_seed(0)
    model = PositionsWithoutBatch().double()
    ids, y = torch.randint(0, 9, (6, 6)), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(ids, y)], "exact", backend="hooks")
        assert_close_dicts(got, brute_force_fisher(model, ids, y, "exact"), 1e-10)
        model = ClassEmbedding().double()
        data = [{"ids": ids, "classes": torch.randint(0, 3, (6,)), "labels": y}]
        got = fisher_diagonal(model, data, "exact", backend="hooks")
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(got, fisher_diagonal(model, data, "exact", backend="loop"), 1e-10)


def test_expansions_that_cannot_be_checked_go_to_functorch(caplog) -> None:
    """Positions ``(2,)`` look per-sample on the 2 samples of the check. (Expansions the model
    fails on, or that change its output: see ``test_shadows``.)"""
    torch.manual_seed(0)
    model = PositionsWithoutBatch().double()
    ids, y = torch.randint(0, 9, (5, 2)), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(ids, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    reason = "could not be told from per-sample ones on 2 samples, to check"
    assert len(messages) == 1 and reason in messages[0] and "functorch" in messages[0]
    assert_close_dicts(got, brute_force_fisher(model, ids, y, "exact"), 1e-10)


# --- positions folded into the batch dimension ((B T, D), as OPT's layers) ------------------


class Folded(nn.Module):
    """Per-sample data folded into the batch dimension, rows ``nT`` to ``nT + T - 1`` for sample
    ``n``: token ids looked up flattened, ``(B T,)``, a layer norm and a feed-forward block on
    ``(B T, 4)`` (OPT's layers), the same block's first layer called on ``(B, 4)`` too, and a
    Linear on windows of two positions, ``(B T/2, 2, 4)`` (Swin's). ``order="positions"``
    flattens the positions first, ``(T B, 4)``; ``"ragged"`` keeps the rows of each sample's
    tokens alone (id 0 pads), one sample after another (unpadding)."""

    def __init__(self, order: str = "samples") -> None:
        super().__init__()
        self.tok, self.norm = nn.Embedding(9, 4), nn.LayerNorm(4)
        self.fc1, self.fc2, self.window = nn.Linear(4, 6), nn.Linear(6, 4), nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)
        self.order = order

    def forward(self, ids: Tensor) -> Tensor:
        batch, length = ids.shape
        if self.order == "ragged":
            kept = ids != 0
            h = torch.zeros(batch, length, 4, dtype=self.tok.weight.dtype)
            h[kept] = self.fc2(torch.tanh(self.fc1(self.norm(self.tok(ids[kept])))))
        elif self.order == "positions":
            h = self.tok(ids.t().reshape(-1))
            h = (h + self.fc2(torch.tanh(self.fc1(self.norm(h))))).view(length, batch, 4)
            h = h.transpose(0, 1)
        else:
            h = self.tok(ids.reshape(-1))
            h = (h + self.fc2(torch.tanh(self.fc1(self.norm(h))))).view(batch, length, 4)
            h = self.window(h.reshape(-1, 2, 4)).view(batch, length, 4)
        pooled = torch.tanh(h).mean(1)
        return self.head(pooled + self.fc2(torch.tanh(self.fc1(pooled))))


@pytest.mark.parametrize("method", ["exact", "empirical"])
@pytest.mark.parametrize("way", ["looped", "batched"])
@pytest.mark.parametrize("chunks", [{}, {"chunk_size": 2}])
def test_positions_folded_into_the_batch_dimension_stay_on_hooks(method, way, chunks, caplog):
    """Each folded call is taken as the call on its input unfolded, ``(B, T, ...)``, and the
    gradients at its output alike (before, the model went to functorch, and a Hugging Face
    OPT, whose masks vmap cannot take, to the loop engine). A batch of one sample folds too."""
    torch.manual_seed(0)
    model = Folded().double()
    randomize_affine(model)
    ids, y = torch.randint(0, 9, (5, 6)), torch.randint(0, 3, (5,))
    data = [(ids, y), (ids[:1], y[:1])]
    with pull_back(way), caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, method, **chunks)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # (hooks, no fallback)
    first = brute_force_fisher(model, ids, y, method)
    last = brute_force_fisher(model, ids[:1], y[:1], method)
    assert_close_dicts(got, {n: (5 * first[n] + last[n]) / 6 for n in first}, 1e-10)


@pytest.mark.parametrize(
    "order, reason",
    [
        ("positions", "rows for the first 2 samples alone differ"),
        ("ragged", "rows for the samples in reverse order differ"),
    ],
)
def test_rows_that_are_not_the_samples_positions_go_to_functorch(order, reason, caplog) -> None:
    """Rows of the positions first, and rows of unequal numbers per sample (3, 1, 2 and 2
    tokens: 8 rows, 2 per sample on average, and the first two samples' 4 rows come first, so
    only the batch in reverse order tells; taken as folded, ``fc1.weight``'s Fisher is 0.53
    off)."""
    torch.manual_seed(0)
    model = Folded(order).double()
    randomize_affine(model)
    ids, y = torch.randint(1, 9, (4, 3)), torch.randint(0, 3, (4,))
    ids[1, 1:], ids[2, 2:], ids[3, 2:] = 0, 0, 0
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(ids, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert reason in messages[0] and "functorch" in messages[0]  # (ragged: then loop)
    assert_close_dicts(got, brute_force_fisher(model, ids, y, "exact"), 1e-10)


def padded(lengths: list[int], length: int) -> Tensor:
    """Token ids ``(B, length)`` with ``lengths[n]`` tokens in row ``n`` and id 0 after them."""
    ids = torch.randint(1, 9, (len(lengths), length))
    for row, n in enumerate(lengths):
        ids[row, n:] = 0
    return ids


@pytest.mark.parametrize(
    "batches, chunks",
    [
        ([[3, 3, 3, 3], [6, 2, 2, 2]], {}),  # (12 rows each: the same shapes, checked before)
        ([[2, 2, 3, 1]], {"chunk_size": 2}),  # (the second chunk's rows alone are ragged)
        ([[2] * 6, [2, 2, 3, 1, 3, 1]], {"memory_budget": 3000}),  # (chunks by the budget)
    ],
)
def test_how_rows_fold_is_checked_on_every_pass(batches, chunks, caplog) -> None:
    """How rows fold depends on the data, not only on the shapes: rows of unequal numbers per
    sample in a batch whose shapes an earlier batch already passed with, or in a chunk after a
    first chunk that folds (before, the check ran once per shapes and on the first chunk
    alone: 0.19 to 0.41 off, found by a review)."""
    torch.manual_seed(1)
    model = Folded("ragged").double()
    randomize_affine(model)
    data = [(padded(n, max(n)), torch.randint(0, 3, (len(n),))) for n in batches]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, **chunks)
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert "rows for the samples in reverse order differ" in messages[0]
    total = sum(len(n) for n in batches)
    parts = [brute_force_fisher(model, ids, y, "exact") for ids, y in data]
    want = {n: sum(len(y) * part[n] for (_, y), part in zip(data, parts)) / total for n in got}
    assert_close_dicts(got, want, 1e-10)


class InPlace(nn.Module):
    """A Linear on ``(B, T, 4)``, whose output is a view of its ``(B T, 6)`` product, modified
    in place afterwards (``how``)."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.how = how

    def forward(self, x: Tensor) -> Tensor:
        h = self.fc(x)
        if self.how == "relu_":
            h = torch.relu_(h)
        elif self.how == "inplace module":
            h = nn.ReLU(inplace=True)(h)
        elif self.how == "used before":
            before = h * 2
            h = h.mul_(3) + before
        else:  # (through a transposed view of it)
            h = h.transpose(1, 2).relu_().transpose(1, 2)
        return self.head(torch.tanh(h).mean(1))


@pytest.mark.parametrize("how", ["relu_", "inplace module", "used before", "transposed"])
def test_an_output_view_modified_in_place_keeps_its_gradient(how, caplog) -> None:
    """A Linear's output on ``(B, T, in)`` is a view; an in-place operation on it sends its
    later uses past the view's edge to its base's, where the gradient is now taken (before,
    ``nn.ReLU(inplace=True)`` after such a Linear gave it a Fisher of 0, and 0.84 off where the
    output was also used before the operation; found by a review)."""
    torch.manual_seed(0)
    model = InPlace(how).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # (hooks, no fallback)
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
    assert got["fc.weight"].abs().min() > 0


class GradScale(torch.autograd.Function):
    """Gradient scaling (reversal, with a negative factor): the identity as a view of its
    input forward, the gradient times ``factor`` backward."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x: Tensor, factor: float) -> Tensor:
        return x.view_as(x)

    @staticmethod
    def setup_context(ctx: Any, inputs: tuple[Any, ...], output: Tensor) -> None:
        ctx.factor = inputs[1]

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        return grad * ctx.factor, None


class Scaled(nn.Module):
    """A module of the user's (no rule) ending in :class:`GradScale`."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(6, 5) * 0.3)

    def forward(self, x: Tensor) -> Tensor:
        return GradScale.apply(torch.tanh(x @ self.weight.T), 3.0)


class AttentionPlusInput(nn.Module):
    """``nn.MultiheadAttention`` whose output gets the residual added in place."""

    def __init__(self) -> None:
        super().__init__()
        self.attention = nn.MultiheadAttention(6, 2, batch_first=True)
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        out, _ = self.attention(x, x, x, need_weights=False)
        out += x
        return self.head(out.mean(1))


@pytest.mark.parametrize("name", ["custom view function", "attention output added to"])
def test_output_views_of_other_kinds(name, caplog) -> None:
    """A view a custom ``autograd.Function`` makes is no plain reshape: its base's gradient
    has the function's factor already (taken there, the unit's Fisher came out 9 times too
    large); the attention rule's kept output piece, a view of its out-projection's product,
    modified in place, is taken at its base's edge like any output (its Fisher was 0). Both
    found by a review."""
    torch.manual_seed(0)
    if name == "custom view function":
        model = nn.Sequential(Scaled(), nn.Linear(6, 3)).double()
        x = torch.randn(4, 5, dtype=torch.float64)
    else:
        model = AttentionPlusInput().double()
        x = torch.randn(4, 3, 6, dtype=torch.float64)
    y = torch.randint(0, 3, (4,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    assert not [r for r in caplog.records if r.name == "ewc_reg"]  # (hooks, no fallback)
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class TransposedProduct(nn.Module):
    """A module of the user's (no rule) whose output is a transposed view of ``x @ weight``."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(4, 6))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.weight).transpose(1, 2)


def test_an_output_view_other_than_a_reshape_modified_in_place_goes_to_functorch(caplog):
    """A unit's output that is a view but not a reshape of its base keeps its own edge, which
    an in-place operation bypasses: caught after the forward pass by its version."""
    torch.manual_seed(0)
    model = nn.Sequential(TransposedProduct(), nn.ReLU(inplace=True), nn.Tanh())
    model.append(nn.Flatten()).append(nn.Linear(18, 3)).double()
    x, y = torch.randn(5, 3, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert len(messages) == 1 and "module '0', a view, is modified in place" in messages[0]
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


# --- units called more than once per forward pass -------------------------------------------


class CalledTwice(nn.Module):
    """A Linear (with a rule) applied to its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.fc(torch.tanh(self.fc(x)))))


class Siamese(nn.Module):
    """One encoder (a conv with a rule, and a unit without one returning two tensors) applied
    to both halves of the input, and once more without gradients."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1)
        self.encoder = Pair()
        self.head = nn.Linear(16, 3)

    def encode(self, half: Tensor) -> Tensor:
        return torch.cat(self.encoder(torch.tanh(self.conv(half[:, None])[:, 0]), shift=0.5), 1)

    def forward(self, x: Tensor) -> Tensor:
        halves = x.chunk(2, 1)
        with torch.no_grad():
            self.encode(halves[0])
        return self.head(torch.cat([self.encode(h) for h in halves], 1))


class SiameseCNN(nn.Module):
    """A small CNN (reflect padding, stride, groups, batch norm in eval mode, group norm,
    instance norm, PReLU) applied to an image and to a smaller crop of it: each layer called
    twice, on inputs of two sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(  # (no bias right before an instance norm: it would
            nn.InstanceNorm2d(2, affine=True),  # have no effect, nor a Fisher)
            nn.Conv2d(2, 4, 3, padding=1, padding_mode="reflect"),
            nn.BatchNorm2d(4),
            nn.PReLU(4),
            nn.Conv2d(4, 4, 3, stride=2, groups=2),
            nn.GroupNorm(2, 4),
            nn.Tanh(),
        )
        randomize_bn(self)
        self.eval()
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, 6, 6)
        pooled = [self.features(image).mean((2, 3)) for image in (x, x[..., 1:, 1:])]
        return self.head(torch.cat(pooled, 1))


class SiameseUpsampling(nn.Module):
    """Transposed convolutions (stride, output padding, groups, dilation) and a 3-d convolution
    applied to an image and to a smaller crop of it: each layer called twice, on inputs of two
    sizes."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 3, stride=2, padding=1, output_padding=1, groups=2)
        self.widen = nn.ConvTranspose2d(4, 2, 2, dilation=2)
        self.conv3d = nn.Conv3d(1, 2, (2, 3, 3), padding=(0, 1, 1))
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, 4, 4)
        pooled = []
        for image in (x, x[..., 1:, 1:]):
            h = torch.tanh(self.widen(torch.tanh(self.up(image))))  # (B, 2, H, W)
            pooled.append(self.conv3d(h.unsqueeze(1)).mean((2, 3, 4)))  # (B, 2)
        return self.head(torch.cat(pooled, 1))


class SiameseDCGAN(nn.Module):
    """A DCGAN-style transposed convolution (kernel 4, stride 2: every phase with 2 x 2 taps)
    applied to an image and to a smaller crop of it."""

    def __init__(self) -> None:
        super().__init__()
        self.up = nn.ConvTranspose2d(2, 4, 4, stride=2, padding=1)
        self.head = nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, 2, 4, 4)
        pooled = [torch.tanh(self.up(image)).mean((2, 3)) for image in (x, x[..., 1:, :2])]
        return self.head(torch.cat(pooled, 1))


class Conv1DTwice(nn.Module):
    """GPT-2's linear layer (the stand-in :class:`Conv1D`) applied to its own output."""

    def __init__(self) -> None:
        super().__init__()
        self.layer = Conv1D(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 4)
        h = torch.tanh(self.layer(torch.tanh(self.layer(x))))
        return self.head(h.mean(1))


class CellLoop(nn.Module):
    """A recurrent cell stepped through the sequence by hand, from no state (``None``: the
    cell makes zeros, which ``vmap`` cannot batch) or from a given one."""

    def __init__(self, cell: type[nn.Module], given_state: bool) -> None:
        super().__init__()
        self.cell, self.given_state = cell(3, 4), given_state
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:  # (B, T, 3)
        state = None
        if self.given_state:
            h = torch.zeros(x.shape[0], 4, dtype=x.dtype)
            state = (h, h) if isinstance(self.cell, nn.LSTMCell) else h
        for t in range(x.shape[1]):
            state = self.cell(x[:, t], state)
        return self.head(state[0] if isinstance(state, tuple) else state)


class SharedBlock(nn.Module):
    """ALBERT-style weight sharing: one block of position-wise layers (with rules) applied
    three times, to ``(B, 4)`` and to ``(B, T, 4)``; an embedding looked up twice."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(7, 4, padding_idx=0)
        self.fc = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)
        self.rms = nn.RMSNorm(4)
        self.head = nn.Linear(4, 3)

    def block(self, h: Tensor) -> Tensor:
        return self.rms(self.norm(h + torch.tanh(self.fc(h))))

    def forward(self, x: Tensor) -> Tensor:  # (B, T) floats, cut into indices
        ids = (x.abs() * 3).long().clamp(max=6)
        h = self.embed(ids) + self.embed(ids.flip(1))  # (B, T, 4)
        pooled = h.mean(1)
        for _ in range(3):
            h, pooled = self.block(h), self.block(pooled)
        return self.head(pooled + h.mean(1))


CALLED_TWICE = {  # the model, a sample's shape, the units that go to the per-module fallback
    # (the others take their calls by their rules: see unit_sums.unit_sums)
    "linear_on_its_own_output": (CalledTwice, (4,), set()),
    "shared_block": (SharedBlock, (5,), set()),
    "siamese": (Siamese, (8,), {"encoder"}),
    "siamese_cnn": (SiameseCNN, (2, 6, 6), set()),
    "siamese_upsampling": (SiameseUpsampling, (2, 4, 4), set()),
    "siamese_dcgan": (SiameseDCGAN, (2, 4, 4), set()),
    "gpt_conv1d": (Conv1DTwice, (5, 4), set()),
    "attention": (AttentionCalledTwice, (4,), set()),
    "shared_encoder_layer": (SharedEncoderLayer, (4,), set()),
    "lstm_cell_loop": (lambda: CellLoop(nn.LSTMCell, False), (5, 3), set()),
    "lstm_cell_loop_from_a_state": (lambda: CellLoop(nn.LSTMCell, True), (5, 3), set()),
    "gru_cell_loop": (lambda: CellLoop(nn.GRUCell, True), (5, 3), set()),
    "rnn_cell_loop": (lambda: CellLoop(nn.RNNCell, False), (5, 3), set()),
    # (vmap cannot batch the zero state this cell makes: the loop engine, for the cell alone)
    "lstm_cell_loop_without_rule": (lambda: CellLoop(UnruledLSTMCell, False), (5, 3), {"cell"}),
}


@pytest.mark.parametrize("name", list(CALLED_TWICE))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_units_called_more_than_once(name, method, engine_ways, caplog, monkeypatch) -> None:
    """A unit called several times (weight sharing) gets per-sample gradients summed over its
    calls before squaring, on the hooks engine (before: the functorch engine, and for the
    cells, whose zero state vmap cannot batch, the loop engine one sample at a time); by its
    rule on the calls joined where the rule treats positions alike (Linear, the norms over
    trailing dimensions, Embedding, the recurrent cells), else by the per-module fallback."""
    fallbacks = set()
    original = unit_sums._fallback_sums

    def spy(unit, *args):
        fallbacks.add(unit.path)
        return original(unit, *args)

    monkeypatch.setattr(unit_sums, "_fallback_sums", spy)
    torch.manual_seed(0)
    make, shape, want_fallbacks = CALLED_TWICE[name]
    model = make().double()
    x, y = torch.randn(6, *shape, dtype=torch.float64), torch.randint(0, 3, (6,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method, chunk_size=4)
        again = fisher_diagonal(model, [(x, y)], method, chunk_size=4)
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)
    assert_close_dicts(again, got, 1e-14)
    assert fallbacks == want_fallbacks
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert not any(m.startswith("hooks engine") for m in messages)
    # (a module vmap fails on is remembered: the loop engine at once, from the second call)
    assert len(messages) == (name == "lstm_cell_loop_without_rule")


class CalledByBatchSize(nn.Module):
    """Calls its layer a number of times that changes with the batch size."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.LazyLinear(3)

    def forward(self, x: Tensor) -> Tensor:
        return sum(self.fc(x) for _ in range(min(len(x), 3)))


@pytest.mark.filterwarnings("ignore:There is a performance drop")  # (attention, vmapped)
def test_calls_recorded_in_pieces_of_other_kinds_go_to_functorch(caplog) -> None:
    """Self-attention, then cross-attention: the in-projection's pieces differ."""
    model = AttentionCalledTwice(apart=True).double()
    log_and_compare(model, data_for(None), caplog, "pieces it cannot join")


def test_calls_are_checked_on_fewer_samples(caplog) -> None:
    """With the batch size in a second dimension, the units are recorded again on fewer
    samples (:func:`.batch_checks.check_batch_layout`): call by call, and as often."""
    x, y = torch.randn(4, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    twice = CalledTwice().double()
    assert_close_dicts(
        fisher_diagonal(twice, [(x, y)], backend="hooks"),
        brute_force_fisher(twice, x, y, "exact"),
        1e-10,
    )
    model = CalledByBatchSize()
    model(x.float())
    model.double()
    with pytest.raises(ValueError, match="called differently on fewer samples"):
        fisher_diagonal(model, [(x, y)], backend="hooks")
    log_and_compare(model, [(x, y)], caplog, "called differently")


class SquareTooTwice(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = SquareToo()
        self.head = nn.Linear(5, 3)

    def forward(self, x: Tensor) -> Tensor:
        y, s = self.inner(x)
        return self.head(torch.cat(self.inner(torch.tanh(y + s)), 1))


def test_a_unit_with_a_rule_and_several_outputs_called_twice_goes_to_functorch(
    caplog, monkeypatch
) -> None:
    """A called-again unit goes to the per-module fallback, which cannot tell the gradient
    reaching one output from outside the unit from what reaches it through another output,
    unless the outputs were cloned apart (units without a rule only: the rules' outputs are
    kept as they are). No rule has several outputs and no recorded forward yet, so one is
    made up here."""
    def never(*args: object) -> None:
        raise AssertionError("the rule of a unit called twice is not used")

    monkeypatch.setitem(rules.RULES, SquareToo, (never, lambda m: True, frozenset({"w"})))
    model = SquareTooTwice().double()
    assert plan(model, trainable(model))[0].rule is never
    log_and_compare(model, data_for(None), caplog, "with several outputs")


# --- tied weights: one parameter registered on several modules -------------------------------


class TiedBelowHead(nn.Module):
    """Tied weights below a head."""

    def __init__(self) -> None:
        super().__init__()
        self.body = Tied()
        self.head = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.body(x)))


class RegisteredTwice(nn.Module):
    """One Linear under two names, called once through each."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(3, 3)
        self.second = self.first
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:  # (the indices of Tied's inputs, as floats)
        h = torch.tanh(self.first(x.double()))
        return self.head(torch.tanh(self.second(h)))


class TiedInside(nn.Module):
    """A module that registers its child's weight as its own parameter too."""

    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Linear(3, 3)
        self.gain = self.inner.weight
        self.head = nn.Linear(3, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.inner(x.double())))


TIED = {  # the model, the units it has (a tied one joins its modules' paths with "+")
    "embedding_and_output_layer": (Tied, ["embed+out"]),
    "tied_below_a_head": (TiedBelowHead, ["body.embed+body.out", "head"]),
    "module_registered_twice": (RegisteredTwice, ["first", "head"]),
    "parameter_of_a_module_and_its_child": (
        lambda: nn.Sequential(TiedInside(), nn.Tanh(), nn.Linear(3, 6)),
        ["0", "2"],
    ),
}


@pytest.mark.parametrize("name", list(TIED))
@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_tied_weights_match_brute_force(name, method, engine_ways, caplog) -> None:
    """A parameter registered on several modules (tied weights) stays on the hooks engine (before:
    the functorch engine, logged): the modules sharing it are one unit, whose per-sample
    gradients the fallback sums over all their calls before squaring."""
    torch.manual_seed(0)
    make, want_units = TIED[name]
    model = make().double()
    assert [unit.path for unit in plan(model, trainable(model))] == want_units
    x = torch.randint(0, 3, (6, 3))
    y = torch.randint(0, 3, (6,))
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)], method, chunk_size=4)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


class TinyLanguageModel(nn.Module):
    """Token and position embeddings, a LayerNorm and an output layer tied to the token
    embedding (``tie_word_embeddings``), on ``(B, T)`` tokens: logits ``(B, T, V)``."""

    def __init__(self, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(vocab, dim), nn.Embedding(5, dim)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.head.weight = self.tokens.weight

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1], device=ids.device)[None]
        return self.head(self.norm(torch.tanh(self.tokens(ids) + self.positions(positions))))


@pytest.mark.parametrize("method", ["exact", "empirical"])
def test_a_language_model_with_a_tied_output_layer(method, caplog) -> None:
    torch.manual_seed(0)
    model = TinyLanguageModel().double()
    ids = torch.randint(0, 7, (4, 5))
    data = [{"ids": ids, "labels": ids.roll(-1, 1)}]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, method)
    assert not [r for r in caplog.records if r.name == "ewc_reg"]
    assert_close_dicts(got, fisher_diagonal(model, data, method, backend="loop"), 1e-10)


class TiedEncoderDecoder(nn.Module):
    """A token table looked up twice (an encoder's and a decoder's tokens, as T5's ``shared``)
    and an output layer tied to it (with a bias, optionally), called on two sequences of
    different lengths; the table may have a ``padding_idx``."""

    def __init__(self, padding_idx: int | None, bias: bool, vocab: int = 7, dim: int = 4) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.mix = nn.Linear(dim, dim)
        self.head = nn.Linear(dim, vocab, bias=bias)
        self.head.weight = self.tokens.weight

    def forward(self, ids: Tensor) -> Tensor:  # (B, 5) -> (B, 5, V)
        encoded = torch.tanh(self.mix(self.tokens(ids))).mean(1, keepdim=True)
        decoded = torch.tanh(self.tokens(ids[:, :3].flip(1)) + encoded)
        return torch.cat([self.head(decoded), self.head(torch.tanh(self.mix(decoded)))[:, :2]], 1)


@pytest.mark.parametrize("padding_idx", [None, 0])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("budget", [DEFAULT_MEMORY_BUDGET, 1])
def test_embedding_tied_to_an_output_layer_by_the_rule(padding_idx, bias, budget, monkeypatch):
    """The tied unit's sums come from its rule (the fallback would fail if called): each
    member called once and twice, ``padding_idx``, a bias of the output layer, one sample at a
    time (``budget``) or all at once."""
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)
    torch.manual_seed(0)
    model = TiedEncoderDecoder(padding_idx, bias).double()
    x = torch.randint(0, 7, (6, 5))
    x[0, :2] = 0  # (a padding lookup, when padding_idx is 0; repeated indices)
    check_against_references(model, x, via_rules=False, memory_budget=budget)
    language_model = TinyLanguageModel().double()
    check_against_references(language_model, x, via_rules=False, memory_budget=budget)


@pytest.mark.parametrize("method", ["exact", "empirical", "sample"])
def test_tied_output_layer_estimators_and_a_parameter_subset(method, monkeypatch) -> None:
    """Every estimator through ``fisher_diagonal``, and with only the tied weight selected
    (the output layer's bias constant)."""
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)
    torch.manual_seed(0)
    model = TiedEncoderDecoder(padding_idx=1, bias=True).double()
    ids = torch.randint(0, 7, (5, 5))
    data = [{"ids": ids, "labels": torch.randint(0, 7, (5, 5))}]
    got = fisher_diagonal(model, data, method, generator=torch.Generator().manual_seed(1))
    want = fisher_diagonal(
        model, data, method, backend="functorch", generator=torch.Generator().manual_seed(1)
    )
    assert_close_dicts(got, want, 1e-10)
    params = {"tokens.weight": model.tokens.weight}
    seeded = torch.Generator().manual_seed(1)
    got = fisher_diagonal(model, data, method, params=params, generator=seeded)
    assert set(got) == {"tokens.weight"}
    assert_close_dicts(got, {"tokens.weight": want["tokens.weight"]}, 1e-10)


class MyScaledWordEmbedding(nn.Embedding):
    """Hugging Face's scaled word embedding (BART's, Gemma's): the lookup times a scale (the
    tests give it the rule of BART's: :func:`scaled_rule`)."""

    def __init__(self, vocab: int, dim: int, scale: float, padding_idx: int | None = None):
        super().__init__(vocab, dim, padding_idx=padding_idx)
        self.embed_scale = scale

    def forward(self, ids: Tensor) -> Tensor:
        return super().forward(ids) * self.embed_scale


class SpecialScaledWordEmbedding(MyScaledWordEmbedding):
    """Named as one, but another lookup for one token (as T5Gemma2's): no rule."""

    def forward(self, ids: Tensor) -> Tensor:
        looked_up = super().forward(ids)
        return torch.where((ids == 5)[..., None], looked_up.square(), looked_up)


@pytest.fixture
def scaled_rule(monkeypatch):
    """:class:`MyScaledWordEmbedding` with the rule of Hugging Face BART's scaled embedding."""
    bart = "transformers.models.bart.modeling_bart.BartScaledWordEmbedding"
    assert bart in rules.SCALED_EMBEDDINGS
    monkeypatch.setitem(rules.RULES, MyScaledWordEmbedding, rules.RULES[bart])


class ScaledEncoderDecoder(nn.Module):
    """BART's layout: an encoder's and a decoder's scaled embeddings (two modules, ``scale``
    as a float or a 0-d tensor) sharing their table with an output layer (``tied="head"``,
    a language model), or with each other alone (``"tables"``, BART's classifier); ``"none"``
    leaves the table to the encoder alone, a plain unit."""

    def __init__(
        self, scale: float | Tensor, tied: str = "head", kind: type = MyScaledWordEmbedding
    ) -> None:
        super().__init__()
        self.encode = kind(7, 4, scale, padding_idx=1)
        self.decode = MyScaledWordEmbedding(7, 4, scale, padding_idx=1)
        self.mix = nn.Linear(4, 4)
        self.head = nn.Linear(4, 7, bias=False)
        if tied == "head":
            self.decode.weight = self.head.weight = self.encode.weight
        elif tied == "tables":
            self.decode.weight = self.encode.weight

    def forward(self, ids: Tensor) -> Tensor:  # (B, 5) -> (B, 3, V)
        encoded = torch.tanh(self.mix(self.encode(ids))).mean(1, keepdim=True)
        return self.head(torch.tanh(self.decode(ids[:, :3].flip(1)) + encoded))


@pytest.mark.parametrize("scale", [2.5, torch.tensor(0.5, dtype=torch.float64)])
@pytest.mark.parametrize("tied", ["head", "tables", "none"])
def test_scaled_word_embeddings_have_rules(scale, tied, scaled_rule, monkeypatch) -> None:
    """A scaled word embedding gets the embedding rule with its scale, alone and as members of
    a tied unit (two of them, with the output layer or without: the tied rule; the fallback
    would fail if called). Before, BART's went to the per-module fallback, and with the head
    3.0x a forward+backward against 2.2x (``benchmarks/results/lm_speed_bart_xeon.md``); its
    classifier's two tables, without the head, went there until session 20."""
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)
    torch.manual_seed(0)
    model = ScaledEncoderDecoder(scale, tied).double()
    assert {u.rule for u in plan(model, trainable(model)) if u.path == "encode"} <= {
        rules.scaled_embedding
    }
    x = torch.randint(0, 7, (6, 5))
    x[0, :2] = 1  # (padding lookups)
    check_against_references(model, x, via_rules=False)


def test_scaled_embeddings_are_matched_by_name_not_by_pattern(scaled_rule) -> None:
    """A class named like one but looking one token up otherwise has no rule (matched by a
    name pattern, its Fisher was 27% off where the token is not in the first 2 samples, which
    the sums check sees)."""
    model = ScaledEncoderDecoder(2.0, kind=SpecialScaledWordEmbedding).double()
    assert rules.rule_for(model.encode) is None
    ids = torch.randint(0, 7, (5, 5))
    ids[3, 0] = 5
    data = [{"ids": ids, "labels": torch.randint(0, 7, (5, 3))}]
    got = fisher_diagonal(model, data, "empirical")
    assert_close_dicts(got, fisher_diagonal(model, data, "empirical", backend="loop"), 1e-10)


class TiedOutputByKeyword(TinyLanguageModel):
    """The tied output layer called with its input by keyword: the rule declines the call."""

    def forward(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1])[None]
        h = self.norm(torch.tanh(self.tokens(ids) + self.positions(positions)))
        return self.head(input=h)


def test_a_tied_unit_the_rule_declines_goes_to_the_fallback() -> None:
    torch.manual_seed(0)
    check_against_references(
        TiedOutputByKeyword().double(), torch.randint(0, 7, (4, 5)), via_rules=False
    )


def test_bfloat16_tied_output_layer_accumulates_in_float32(monkeypatch) -> None:
    monkeypatch.setattr(unit_sums, "_fallback_sums", None)
    torch.manual_seed(0)
    model = TinyLanguageModel().bfloat16().eval()
    x = torch.randint(0, 7, (4, 5))
    vectors = random_vectors(model, x)
    got = engine_sums(HookEngine(), model, x, vectors)
    assert all(s.dtype == torch.float32 for s in got.values())
    monkeypatch.undo()
    assert_close_dicts(got, engine_sums(FunctorchEngine(), model, x, vectors), 5e-2)


class _PositionsOfTheFirstSample(nn.Module):
    """A position embedding looked up with ``(1, T)`` ids (expanded over the batch by the
    engine), of which the model then takes row 0: after the expansion, sample 0's copy, which
    every sample's gradient reaches."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 6), nn.Embedding(5, 6)
        self.head = nn.Linear(6, 3)
        self.register_buffer("ids", torch.arange(5)[None])

    def forward(self, x: Tensor) -> Tensor:
        return self.head(torch.tanh(self.tokens(x) + self.positions(self.ids)[0]).mean(1))


class _Stashing(nn.Module):
    """No rule (the per-module fallback): keeps its pre-activation as an attribute."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 8) * 0.4)

    def forward(self, x: Tensor) -> Tensor:
        self.pre = x @ self.w
        return torch.tanh(self.pre)


class _ReadsTheStash(nn.Module):
    """Uses the pre-activation its block stashed: a path from ``block.w`` to the output that
    bypasses the block's output."""

    def __init__(self) -> None:
        super().__init__()
        self.block, self.head = _Stashing(), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(x) + 0.5 * self.block.pre)


class _LayerInsideVmap(nn.Module):
    """A Linear run inside ``torch.vmap`` over the tokens: its output's edge lies inside the
    transform, out of the pull-back's reach."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.head = nn.Linear(2, 8), nn.Linear(8, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.vmap(self.inner, in_dims=1, out_dims=1)(x.view(-1, 3, 2))
        return self.head(torch.tanh(h).sum(1))


class _Derivative(nn.Module):
    """Outputs the derivative of a scalar network with respect to the input (a Hamiltonian
    network's vector field): the parameters reach it through the layers' backward graph."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))

    def forward(self, x: Tensor) -> Tensor:
        with torch.enable_grad():
            x = x.detach().requires_grad_()
            return torch.autograd.grad(self.net(x).sum(), x, create_graph=True)[0]


UNSEEN_BREAKS = {  # model, inputs, likelihood
    "positions-of-the-first-sample": (_PositionsOfTheFirstSample, (4, 5), "categorical"),
    "stashed-pre-activation": (_ReadsTheStash, (4, 6), "categorical"),
    "layer-inside-vmap": (_LayerInsideVmap, (4, 6), "categorical"),
    "derivative-as-output": (_Derivative, (4, 6), "gaussian"),
}


@pytest.mark.parametrize("name", list(UNSEEN_BREAKS))
def test_models_breaking_the_decomposition_unseen_by_the_other_checks_go_to_functorch(
    name: str, caplog
) -> None:
    """Each breaks the layer-wise decomposition in a way none of the checks of its
    assumptions sees (the per-layer sums were 0.65-2.2 off, or 0); the check of the sums on two
    samples against the loop engine's does: ``auto`` goes to functorch with the right Fisher,
    ``hooks`` refuses."""
    make, shape, likelihood = UNSEEN_BREAKS[name]
    model = make().double()
    if name == "positions-of-the-first-sample":
        x, y = torch.randint(0, 7, shape), torch.randint(0, 3, (4,))
    else:
        x = torch.randn(*shape, dtype=torch.float64)
        y = torch.randn(4, 6, dtype=torch.float64) if likelihood == "gaussian" else (
            torch.randint(0, 3, (4,))
        )
    data = [(x, y)]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, likelihood=likelihood, backend="auto")
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert any("differ from plain autograd" in m for m in messages), messages
    assert_close_dicts(got, fisher_diagonal(model, data, likelihood=likelihood, backend="loop"),
                       1e-10)
    with pytest.raises(ValueError, match="differ from plain autograd"):
        fisher_diagonal(make().double(), data, likelihood=likelihood, backend="hooks")


class _FailsAlone(nn.Module):
    """``inner`` on two samples or more; on one sample alone it fails (as a model whose
    ``squeeze()`` takes a batch of one for no batch does), so the loop engine cannot be the
    reference of the check of the sums."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: Tensor) -> Tensor:
        if x.shape[0] < 2:
            raise RuntimeError("this model needs two samples or more")
        return self.inner(x)


@pytest.mark.parametrize("name", ["stashed-pre-activation", "derivative-as-output"])
def test_models_that_fail_on_one_sample_alone_have_their_sums_checked_too(name: str) -> None:
    """The check of the sums takes plain autograd on the two samples together as the
    reference where the loop engine fails: such a model breaking the decomposition is refused
    (its Fisher was wrong without an error, 0.3 to 1 off), and one that keeps it passes with
    the brute-force Fisher of the model inside."""
    make, shape, likelihood = UNSEEN_BREAKS[name]
    x = torch.randn(*shape, dtype=torch.float64)
    y = torch.randn(4, 6, dtype=torch.float64) if likelihood == "gaussian" else (
        torch.randint(0, 3, (4,))
    )
    model = _FailsAlone(make().double())
    with pytest.raises(ValueError, match="differ from plain autograd"):
        fisher_diagonal(model, [(x, y)], likelihood=likelihood, backend="hooks")
    inner = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 3)).double()
    x, y = torch.randn(4, 6, dtype=torch.float64), torch.randint(0, 3, (4,))
    got = fisher_diagonal(_FailsAlone(inner), [(x, y)], "exact", backend="hooks")
    want = brute_force_fisher(inner, x, y, "exact")
    assert_close_dicts(got, {f"inner.{n}": f for n, f in want.items()}, 1e-10)


def test_the_sums_are_checked_once_per_model_and_structure(monkeypatch) -> None:
    """The check of the sums runs on a model's first batch, again where the forward pass
    takes another way (here: a layer only sequences longer than 4 go through) or the batch
    has one sample (cross-sample breaks need two), but not for another batch size or
    sequence length alone."""
    checks = []
    check = HookEngine._check_sums

    def counted(self, model, *args):
        checks.append(model)
        return check(self, model, *args)

    class LongOnes(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.embed, self.extra, self.head = nn.Embedding(9, 6), nn.Linear(6, 6), nn.Linear(6, 3)

        def forward(self, x: Tensor) -> Tensor:
            h = self.embed(x)
            if x.shape[1] > 4:
                h = torch.tanh(self.extra(h))
            return self.head(h.mean(1))

    def batch(size: int, length: int):
        return [(torch.randint(0, 9, (size, length)), torch.randint(0, 3, (size,)))]

    monkeypatch.setattr(HookEngine, "_check_sums", counted)
    model = LongOnes().double()
    fisher_diagonal(model, batch(6, 3) * 2, backend="hooks")
    assert len(checks) == 1
    fisher_diagonal(model, batch(5, 4) + batch(3, 2), backend="hooks")
    assert len(checks) == 1
    fisher_diagonal(model, batch(6, 5), backend="hooks")
    assert len(checks) == 2  # (extra runs)
    fisher_diagonal(model, batch(6, 7), backend="hooks")
    assert len(checks) == 2
    fisher_diagonal(model, batch(1, 7), backend="hooks")
    assert len(checks) == 3


class _SelfAttention(nn.Module):
    """Self-attention of separate query, key and value layers (as BERT's), with biases: the
    softmax over the keys is blind to the key bias, whose sums are 0 but for rounding."""

    def __init__(self, dim: int = 8) -> None:
        super().__init__()
        self.query, self.key, self.value = (nn.Linear(dim, dim) for _ in range(3))
        self.embed, self.head = nn.Embedding(11, dim), nn.Linear(dim, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x)
        scores = self.query(h) @ self.key(h).mT / h.shape[-1] ** 0.5
        return self.head((scores.softmax(-1) @ self.value(h)).mean(1))


def test_sums_that_are_zero_but_for_rounding_pass_the_check(caplog) -> None:
    """In float32 the key bias's sums are rounding alone (about 1e-25 against 1e-2 for the
    other parameters), different in each engine: the check lets them differ by the rounding
    unit of the largest sums, and the model stays on the hooks engine."""
    model = _SelfAttention()
    data = [(torch.randint(0, 11, (4, 6)), torch.randint(0, 3, (4,)))]
    with caplog.at_level(logging.INFO, logger="ewc_reg"):
        got = fisher_diagonal(model, data, backend="auto")
    assert not [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert got["key.bias"].abs().max() < 1e-12 * got["key.weight"].abs().max()
    want = fisher_diagonal(model.double(), data, backend="loop")
    scale = max(w.abs().max() for w in want.values())
    for name, w in want.items():
        torch.testing.assert_close(got[name].double(), w, rtol=1e-3, atol=1e-6 * scale)


class DenseLayer(nn.Module):
    """A layer without a rule taking the list of the features so far (as timm's RDNet)."""

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(c_out, c_in) / c_in**0.5)

    def forward(self, features: list[Tensor]) -> Tensor:
        return torch.tanh(torch.cat(features, 1) @ self.w.T)


class DenseStage(nn.Module):
    """Appends each layer's output to the list the layer was given (after its call)."""

    def __init__(self) -> None:
        super().__init__()
        self.first = nn.Linear(4, 3)
        self.layers = nn.ModuleList([DenseLayer(3, 2), DenseLayer(5, 2)])
        self.head = nn.Linear(7, 3)

    def forward(self, x: Tensor) -> Tensor:
        features = [self.first(x)]
        for layer in self.layers:
            features.append(layer(features))
        return self.head(torch.cat(features, 1))


def test_a_list_argument_extended_after_the_call() -> None:
    """The recorded call keeps the list as it was when the layer ran: the per-module fallback
    ran the layers again on the list as the forward pass left it (RDNet's dense blocks
    failed, or would have had the wrong inputs)."""
    torch.manual_seed(0)
    model = DenseStage().double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class MaskedWindows(nn.Module):
    """timm's SwinV2 window attention in small, without a rule: ``windows`` windows of ``n``
    tokens per sample folded into the batch dimension, scores ``(B windows, heads, n, n)``
    plus a mask ``(windows, n, n)`` the samples share, broadcast as
    ``scores.view(-1, windows, heads, n, n) + mask.unsqueeze(1).unsqueeze(0)``."""

    def __init__(self, n: int = 2, windows: int = 4, heads: int = 2) -> None:
        super().__init__()
        self.n, self.windows, self.heads = n, windows, heads
        self.scale = nn.Parameter(torch.rand(heads) + 0.5)

    def forward(self, x: Tensor, mask: Tensor) -> Tensor:  # (B windows, n, 4), (windows, n, n)
        rows = x.unsqueeze(1) * self.scale.view(1, -1, 1, 1)  # (B windows, heads, n, 4)
        scores = rows @ x.unsqueeze(1).transpose(-1, -2)
        scores = scores.view(-1, self.windows, self.heads, self.n, self.n)
        attn = (scores + mask.unsqueeze(1).unsqueeze(0)).view(-1, self.heads, self.n, self.n)
        return (attn.softmax(-1) @ x.unsqueeze(1)).mean(1)


class MaskedWindowModel(nn.Module):
    def __init__(self, n: int = 2, windows: int = 4) -> None:
        super().__init__()
        self.attn = MaskedWindows(n, windows)
        self.head = nn.Linear(windows * n * 4, 3)
        self.register_buffer("mask", torch.linspace(-1, 1, windows * n * n).view(windows, n, n))

    def forward(self, x: Tensor) -> Tensor:  # (B, windows n, 4)
        windows = x.reshape(-1, self.attn.n, 4)
        return self.head(torch.tanh(self.attn(windows, self.mask)).reshape(len(x), -1))


@pytest.mark.parametrize("samples", [4, 3])
def test_a_shared_mask_as_long_as_the_batch_reaches_the_fallback_as_it_is(samples, caplog):
    """With as many windows as samples, the mask leads with the batch size and the fallback
    passes it whole; each sample's call gets it as the model made it, ``(windows, n, n)``, not
    with a leading dimension of one sample (timm's SwinV2 at B=4 failed so in the check of
    the sums and went to functorch)."""
    torch.manual_seed(0)
    model = MaskedWindowModel().double()
    x = torch.randn(samples, 8, 4, dtype=torch.float64)
    y = torch.randint(0, 3, (samples,))
    with caplog.at_level(logging.DEBUG, logger="ewc_reg"):
        got = fisher_diagonal(model, [(x, y)])
    messages = [r.getMessage() for r in caplog.records if r.name == "ewc_reg"]
    assert not any("using the" in message for message in messages), messages
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class CapturingNet(nn.Module):
    """A body and a head; features that a user's forward hook stores are added to the output."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh())
        self.head = nn.Linear(8, 3)
        self.feats: dict[str, Tensor] = {}

    def forward(self, x: Tensor) -> Tensor:
        self.feats = {}
        out = self.head(self.body(x))
        return out + self.feats["skip"][:, :3] if "skip" in self.feats else out


class Centred(nn.Module):
    """No parameters; mixes the samples."""

    def forward(self, x: Tensor) -> Tensor:
        return x - 0.5 * x.mean(0, keepdim=True)


def _capture_and_scale(model: CapturingNet) -> None:
    def hook(module: nn.Module, inputs: Any, out: Tensor) -> Tensor:
        model.feats["skip"] = out  # (the raw output, read in forward: not the layer's)
        return out * 2

    model.body[2].register_forward_hook(hook)


MUTATIONS = {  # (a change between two calls, and whether the samples are mixed after it)
    "module_inserted": (lambda m: m.body.insert(3, Centred()), True),
    "mixing_hook": (
        lambda m: m.body[2].register_forward_hook(lambda mod, i, o: o - 0.5 * o.mean(0)),
        True,
    ),
    "capturing_hook": (_capture_and_scale, False),
}


@pytest.mark.parametrize("name", list(MUTATIONS))
def test_a_model_changed_between_calls_is_checked_again(name) -> None:
    """A module inserted or a forward hook registered after a first call: the checks kept for the
    model were of another function (before, they were kept, and the same object's Fisher was
    71–83% off without a warning, at this batch size or another, where a fresh copy's checks
    sent it to the functorch engine)."""
    mutate, mixed = MUTATIONS[name]
    torch.manual_seed(0)
    model = CapturingNet().double()
    x = torch.randn(6, 5, dtype=torch.float64)
    fisher_diagonal(model, [x])  # (its checks pass and are kept)
    mutate(model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        got = fisher_diagonal(model, [x])
    assert any("as a batch of one" in str(w.message) for w in caught) == mixed
    assert_close_dicts(got, fisher_diagonal(model, [x], backend="loop"), 1e-10)
    if mixed:
        with pytest.raises(ValueError, match="hooks engine cannot compute"):
            fisher_diagonal(model, [x[:4]], backend="hooks")
    else:  # (the rule takes the layer's raw output, which the hook stores: both uses reach it)
        hooked = fisher_diagonal(model, [x[:4]], backend="hooks")
        assert_close_dicts(hooked, fisher_diagonal(model, [x[:4]], backend="loop"), 1e-10)


class SequenceFirstInside(nn.Module):
    """A linear layer run sequence-first, ``(T, B, D)``, then one run batch-first, on
    ``(B, T, D)``: with ``T == B`` their calls have the same shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.inner, self.other, self.head = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(12, 2)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inner(x.transpose(0, 1)).transpose(0, 1)
        return self.head(torch.tanh(self.other(h)).flatten(1))


@pytest.mark.parametrize("backend", ["hooks", "auto"])
def test_the_layout_checks_of_one_selection_do_not_serve_another(backend) -> None:
    """A first call selecting ``other`` passed the layout check of its calls; a second one
    selecting ``inner``, whose calls have the same shapes, was taken as checked, and ``inner``
    as batch-first: its Fisher 0.87 off without a word (the checks were kept by shapes)."""
    torch.manual_seed(0)
    model = SequenceFirstInside().double()
    data = [(torch.randn(3, 3, 4, dtype=torch.float64), torch.randint(0, 2, (3,)))]
    selected = ["inner.weight", "inner.bias"]
    fisher_diagonal(model, data, backend=backend, params=["other.bias"])
    got = fisher_diagonal(model, data, backend=backend, params=selected)
    assert_close_dicts(got, fisher_diagonal(model, data, backend="loop", params=selected), 1e-10)


class RootTemperature(nn.Module):
    """A layer, and a temperature of the root's own that only an ``output_fn`` reads."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(4, 3)
        self.temp = nn.Parameter(torch.tensor(0.7))

    def forward(self, x: Tensor) -> Tensor:
        return self.lin(x)


def test_an_output_fn_reading_a_parameter_after_one_that_did_not_is_checked_again() -> None:
    """Before, the checks and the arrangement of the first call (the temperature unused: its
    Fisher 0) served the second: the temperature's Fisher stayed 0 on ``auto`` (relative
    error 1.0); the refusal of the first call served the third."""
    torch.manual_seed(0)
    model = RootTemperature().double()
    data = [(torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,)))]
    scaled = lambda out: out * model.temp  # noqa: E731
    fisher_diagonal(model, data, "empirical", output_fn=lambda out: out)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = fisher_diagonal(model, data, "empirical", output_fn=scaled)
    want = fisher_diagonal(model, data, "empirical", output_fn=scaled, backend="loop")
    assert want["temp"] > 0
    assert_close_dicts(got, want, 1e-10)
    with pytest.raises(ValueError, match="hooks engine cannot compute"):
        fisher_diagonal(model, data, "empirical", output_fn=scaled, backend="hooks")
    fisher_diagonal(model, data, "empirical", output_fn=lambda out: out, backend="hooks")


def _rows_first(self: nn.Module, x: Tensor) -> Tensor:
    return self.head(torch.tanh(self.lin(x))).mean(1)


def _positions_first(self: nn.Module, x: Tensor) -> Tensor:
    return self.head(torch.tanh(self.lin(x.transpose(0, 1)).transpose(0, 1))).mean(1)


def test_a_forward_of_the_instance_replaced_by_another_is_checked_again() -> None:
    """``model.forward`` set to one function, then to another that runs the layer
    sequence-first (``T == B``): the caches were kept (the tree only told that the instance
    had a forward of its own), the layer taken as batch-first, its Fisher 0.73 off."""
    import types

    torch.manual_seed(0)
    model = nn.Module()
    model.lin, model.head = nn.Linear(4, 4), nn.Linear(4, 3)
    model.double()
    data = [(torch.randn(3, 3, 4, dtype=torch.float64), torch.tensor([0, 1, 2]))]
    for forward in (_rows_first, _positions_first):
        model.forward = types.MethodType(forward, model)
        got = fisher_diagonal(model, data, "empirical", backend="hooks")
        want = fisher_diagonal(copy.deepcopy(model), data, "empirical", backend="loop")
        assert_close_dicts(got, want, 1e-10)


def test_a_failure_is_forgotten_once_the_module_behind_it_is_replaced() -> None:
    """Before, the verdict was kept per model and batch shapes: with the mixing module replaced
    by ``nn.Identity``, ``backend="hooks"`` still refused the model ("found on an earlier
    batch"), and ``auto`` warned again and took the functorch engine."""
    torch.manual_seed(0)
    model = CapturingNet().double()
    model.body.insert(3, Centred())
    x = torch.randn(6, 5, dtype=torch.float64)
    with pytest.warns(UserWarning, match="as a batch of one"):
        fisher_diagonal(model, [x])
    model.body[3] = nn.Identity()
    got = fisher_diagonal(model, [x], backend="hooks")
    assert_close_dicts(got, fisher_diagonal(model, [x], backend="loop"), 1e-10)


class RootScale(nn.Module):
    """A ``(D,)`` scale on the root beside layers (a loose parameter: per-sample copies), on
    ``(B, D)`` or ``(B, T, D)`` features: copies of another layout for each."""

    def __init__(self) -> None:
        super().__init__()
        self.lin, self.head = nn.Linear(4, 6), nn.Linear(6, 3)
        self.scale = nn.Parameter(torch.randn(6))

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.lin(x) * self.scale)
        return self.head(h if h.dim() == 2 else h.mean(1))


@pytest.mark.parametrize("first_rank", [2, 3])
def test_copies_kept_from_an_earlier_call_are_found_again_for_inputs_of_another_rank(
    first_rank,
) -> None:
    """Before, the copies' layout kept from the first call's inputs failed on the second's, and
    the model was refused ("the root module owns parameters ..."; ``auto``: the functorch
    engine), where a fresh copy ran on the hooks engine."""
    torch.manual_seed(0)
    model = RootScale().double()
    flat = torch.randn(3, 4, dtype=torch.float64)
    sequences = torch.randn(3, 5, 4, dtype=torch.float64)
    first, second = (flat, sequences) if first_rank == 2 else (sequences, flat)
    fisher_diagonal(model, [first], backend="hooks")
    got = fisher_diagonal(model, [second], backend="hooks")
    assert_close_dicts(got, fisher_diagonal(model, [second], backend="loop"), 1e-10)


def test_a_3d_convolution_padded_same_with_an_even_kernel() -> None:
    """``padding="same"`` with an even kernel pads one side more: the grouped way of one
    vector (``empirical``) must not take it for symmetric padding."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(2, 3, kernel_size=2, padding="same"), nn.Tanh(), nn.Flatten(), nn.Linear(81, 4)
    ).double()
    x, y = torch.randn(5, 2, 3, 3, 3, dtype=torch.float64), torch.randint(0, 4, (5,))
    for method in ("empirical", "exact"):
        got = fisher_diagonal(model, [(x, y)], method, backend="hooks")
        assert_close_dicts(got, brute_force_fisher(model, x, y, method), 1e-10)


def test_the_sums_check_rejects_a_rule_off_by_a_thousandth(monkeypatch) -> None:
    """The check of a rule's sums on two samples against the loop engine's (float64: to
    1e-9) rejects a rule 0.1% off, which ``auto`` then leaves for the functorch engine."""
    from ewc_reg.engines import rules

    plain = rules.LinearSums.sums
    monkeypatch.setattr(
        rules.LinearSums, "sums", lambda self: {n: t * 1.001 for n, t in plain(self).items()}
    )
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    x, y = torch.randn(16, 4, dtype=torch.float64), torch.randint(0, 3, (16,))
    with pytest.raises(ValueError, match="hooks engine cannot compute"):
        fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    got = fisher_diagonal(model, [(x, y)], "exact")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)


class _WeightedTotal(nn.Module):
    """One number per sample: ``(B, 4) -> (B,)``, a module without a rule."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(4))

    def forward(self, x: Tensor) -> Tensor:
        return (x * self.w).sum(1)


class _Column(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        return x.unsqueeze(1)


def test_a_fallback_module_with_one_number_per_sample() -> None:
    """A module on the per-module fallback whose output is ``(B,)``: its gradients ``(K, B)``
    have no dimension to flatten (the hooks engine raised an IndexError in the check of the
    sums and refused the model)."""
    model = nn.Sequential(nn.Linear(4, 4), _WeightedTotal(), _Column(), nn.Linear(1, 3))
    model.double().eval()
    x, y = torch.randn(6, 4, dtype=torch.float64), torch.randint(0, 3, (6,))
    got = fisher_diagonal(model, [(x, y)], "exact", backend="hooks")
    assert_close_dicts(got, brute_force_fisher(model, x, y, "exact"), 1e-10)
