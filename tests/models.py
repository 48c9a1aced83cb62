"""Small random models for the tests (float64)."""

from __future__ import annotations

import torch
from torch import nn


def mlp(d_in: int = 6, hidden: int = 8, classes: int = 5) -> nn.Module:
    model = nn.Sequential(
        nn.Linear(d_in, hidden),
        nn.BatchNorm1d(hidden),
        nn.Tanh(),
        nn.Dropout(0.5),
        nn.Linear(hidden, classes),
    ).double()
    randomize_bn(model)
    return model


def cnn(classes: int = 4) -> nn.Module:
    model = nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1),
        nn.BatchNorm2d(3),
        nn.ReLU(),
        nn.Dropout(0.3),
        nn.Conv2d(3, 4, 3, stride=2),
        nn.Flatten(),
        nn.Linear(4 * 2 * 2, classes),
    ).double()
    randomize_bn(model)
    return model


def randomize_bn(model: nn.Module) -> None:
    """Non-trivial running statistics and affine parameters, so eval mode matters."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.normal_()
                m.running_var.uniform_(0.5, 2.0)
                m.weight.uniform_(0.5, 1.5)
                m.bias.normal_()


class Doubled(torch.autograd.Function):
    """``2 X`` whose backward reads a number out of its gradient: ``vmap`` cannot run it."""

    @staticmethod
    def forward(x: torch.Tensor) -> torch.Tensor:
        return 2 * x

    @staticmethod
    def setup_context(ctx: object, inputs: tuple[torch.Tensor], output: torch.Tensor) -> None:
        pass

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad * (2.0 + 0.0 * grad.sum().item())


class Twice(nn.Module):
    """A layer applied to its own output (a square linear layer) or to each half of the
    channels (a convolution, siamese), then a head of 3 classes."""

    def __init__(self, layer: nn.Module, features: int) -> None:
        super().__init__()
        self.layer, self.head = layer, nn.Linear(features, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if isinstance(self.layer, nn.Linear):
            h = self.layer(torch.tanh(self.layer(x)))
        else:
            left, right = x.chunk(2, dim=1)
            h = torch.cat([self.layer(left), torch.tanh(self.layer(right))], 1)
        return self.head(torch.tanh(h).flatten(1))
