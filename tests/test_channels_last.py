"""Convolutional models in ``torch.channels_last`` memory (their activations, and so the
gradients the engine pulls back, lie channels-last): the hooks engine keeps their looped
gradients in that order (``hooks._buffer``), cuts their patches in it
(``convolution._patches_channels_last``) and reduces their batch norms without copying them
into the standard order; each is checked against the functorch engine and brute force in
float64, and spied on, so that a test fails if its way is not taken."""

from __future__ import annotations

from unittest import mock

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from benchmarks._paths import engine_ways
from benchmarks.models import ReducedResNet18
from ewc_reg import fisher_diagonal
from ewc_reg.engines import convolution, hooks

from .models import randomize_bn
from .test_hooks_engine import check_against_references

LAYOUTS = {4: torch.channels_last, 5: torch.channels_last_3d}


def channels_last(model: nn.Module, x: Tensor) -> tuple[nn.Module, Tensor]:
    """``model`` and ``x`` in the channels-last memory format of ``x``'s dimensions."""
    layout = LAYOUTS[x.dim()]
    return model.to(memory_format=layout), x.contiguous(memory_format=layout)


class ConvNet(nn.Module):
    """A convolution, an eval-mode batch norm and a second convolution, then a linear head."""

    def __init__(self, conv: nn.Module, norm: nn.Module, second: nn.Module, features: int):
        super().__init__()
        self.conv, self.norm, self.second = conv, norm, second
        self.head = nn.Linear(features, 3)

    def forward(self, x: Tensor) -> Tensor:
        out = self.second(torch.relu(self.norm(self.conv(x))))
        return self.head(torch.tanh(out).flatten(1))


@pytest.fixture
def cut_channels_last():
    """Counts the patches cut in the channels-last order."""
    with mock.patch.object(
        convolution, "_patches_channels_last", wraps=convolution._patches_channels_last
    ) as spy:
        yield spy


@settings(max_examples=25, deadline=None)
@given(
    volume=st.booleans(),
    kernel=st.integers(1, 3),
    stride=st.integers(1, 2),
    padding=st.integers(0, 1),
    dilation=st.integers(1, 2),
    padding_mode=st.sampled_from(["zeros", "reflect", "circular"]),
    bias=st.booleans(),
    batch=st.integers(1, 3),
)
def test_channels_last_convolutions(
    volume, kernel, stride, padding, dilation, padding_mode, bias, batch
) -> None:
    """2-d and 3-d convolutions of any kernel, stride, padding (and mode) and dilation, in a
    channels-last model: the same sums as the references, with the patches cut channels-last
    for every channels-last input."""
    torch.manual_seed(0)
    conv_type, norm_type = (nn.Conv3d, nn.BatchNorm3d) if volume else (nn.Conv2d, nn.BatchNorm2d)
    size = (6, 5, 5) if volume else (7, 6)
    conv = conv_type(3, 4, kernel, stride, padding, dilation, bias=bias, padding_mode=padding_mode)
    second = conv_type(4, 2, 2, padding=1, bias=not bias)
    x = torch.randn(batch, 3, *size)
    with torch.no_grad():
        features = second(conv(x)).numel() // batch
    model = ConvNet(conv, norm_type(4), second, features).double()
    randomize_bn(model)
    model, x = channels_last(model, x.double())
    with mock.patch.object(
        convolution, "_patches_channels_last", wraps=convolution._patches_channels_last
    ) as spy:
        check_against_references(model, x)
    with engine_ways("launch-bound"):  # (the pull-back batched over the vectors, as on a GPU)
        check_against_references(model, x)
    # (float64 3-d convolutions on the CPU give their outputs in the standard order, and so
    # do some circular and reflecting pads: the second convolution's input, padded by zeros,
    # is channels-last for a 2-d model whatever the first's padding)
    plainly_padded = padding == 0 or padding_mode == "zeros"
    assert spy.call_count >= (2 if not volume else int(plainly_padded))


def test_grouped_channels_last_convolution_cuts_standard_patches(cut_channels_last) -> None:
    """A grouped convolution in a channels-last model keeps the standard patches (a group's
    channels are not contiguous in a channels-last patch row), and its sums are right."""
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2)
    model = ConvNet(conv, nn.BatchNorm2d(4), nn.Conv2d(4, 2, 1, groups=2), 2 * 5 * 6).double()
    randomize_bn(model)
    model, x = channels_last(model, torch.randn(3, 4, 5, 6).double())
    check_against_references(model, x)
    assert cut_channels_last.call_count == 0


def test_channels_last_convolution_called_twice(cut_channels_last) -> None:
    """A channels-last convolution applied to its own output: the calls' patches, each cut
    channels-last, are joined along the positions."""
    torch.manual_seed(0)
    model = ConvNet(nn.Conv2d(3, 3, 3, padding=1), nn.BatchNorm2d(3), nn.Identity(), 3 * 5 * 4)
    model.second = model.conv
    model = model.double()
    randomize_bn(model)
    model, x = channels_last(model, torch.randn(3, 3, 5, 4).double())
    check_against_references(model, x)
    assert cut_channels_last.call_count >= 2


def test_reduced_resnet_in_channels_last_memory(cut_channels_last) -> None:
    """The reduced ResNet-18 in channels_last memory: its exact Fisher equals that of the same
    model in the standard memory order (float64), with the looped pull-back's gradients kept
    channels-last."""
    torch.manual_seed(0)
    model = ReducedResNet18(4, widths=(3, 4, 5, 6)).double().eval()
    randomize_bn(model)
    x, y = torch.randn(6, 3, 16, 16).double(), torch.randint(0, 4, (6,))
    want = fisher_diagonal(model, [(x, y)], backend="hooks")
    kept = []

    def buffer(*args, **kwargs):
        held = real_buffer(*args, **kwargs)
        if held.dim() == 5:  # (B, K, C, H, W): the channels innermost
            kept.append(held.stride(2) == 1 and held.shape[2] > 1)
        return held

    real_buffer = hooks._buffer
    model, x = channels_last(model, x)
    with mock.patch.object(hooks, "_buffer", buffer):
        got = fisher_diagonal(model, [(x, y)], backend="hooks")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)
        assert got[name].is_contiguous()
    assert kept and all(kept)
    assert cut_channels_last.call_count > 0
    with engine_ways("launch-bound"):  # (the pull-back batched over the vectors, as on a GPU)
        got = fisher_diagonal(model, [(x, y)], backend="hooks")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-10, atol=0)


@pytest.mark.parametrize("dims", [4, 5])
def test_buffer_follows_the_gradients_layout(dims: int) -> None:
    """The looped pull-back's ``(B, K, C, *S)`` buffer lies ``(B, *S, K, C)`` for channels-last
    gradients and ``(B, K, C, *S)`` for standard ones, and is reused for a smaller chunk of
    the same layout, not for one of the other layout."""
    shape = (5, 3, 4, 6, 2)[:dims]
    standard = torch.randn(shape)
    last = standard.contiguous(memory_format=LAYOUTS[dims])
    storage: dict[int, Tensor] = {}
    held = hooks._buffer(storage, 0, last, 7)
    assert held.shape == (5, 7, *shape[1:])
    assert held.permute(0, *range(3, dims + 1), 1, 2).is_contiguous()
    assert hooks._buffer(storage, 0, last[:4], 7).data_ptr() == held.data_ptr()
    other = hooks._buffer(storage, 0, standard, 7)
    assert other.is_contiguous() and other.data_ptr() != held.data_ptr()
    assert hooks._buffer(storage, 0, standard[:2], 7).data_ptr() == other.data_ptr()


def test_grouped_products_of_a_channels_last_input_of_one_position() -> None:
    """A 3-d convolution with one vector takes its per-sample weight gradients from one grouped
    convolution backward (``convolution._weight_grads``), which gives them channels-last for an
    input of one position with channels-last strides (a channels-last pooling's output):
    float32, as a chunk of one sample after the check's two (a RuntimeError from ``view``
    before)."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.AdaptiveAvgPool3d(1),
        nn.Conv3d(4, 4, (3, 1, 3), padding="same", groups=2),
        nn.Flatten(),
        nn.Linear(4, 3),
    )
    model, x = channels_last(model, torch.randn(3, 4, 3, 3, 3))
    data = [(x, torch.zeros(3, dtype=torch.long))]
    got = fisher_diagonal(model, data, "empirical", backend="hooks", chunk_size=2)
    want = fisher_diagonal(model, data, "empirical", backend="functorch")
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
