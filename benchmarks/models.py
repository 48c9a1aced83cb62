"""The networks of the paper's benchmarks (van de Ven, 2025, and its reference code).

* Split MNIST: an MLP 784-400-400-10 with ReLU.
* Split CIFAR-10: a reduced ResNet-18 without pre-training: a 3x3 conv (3->20) + BN + ReLU, four
  stages of two BasicBlocks (widths 20, 40, 80, 160; strides 1, 2, 2, 2), global average pooling
  and one linear layer 160->10 (about 1.09M parameters).
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


def evaluated(model: nn.Module) -> nn.Module:
    """``model`` in eval mode but for its recurrent layers, in training mode: with no dropout
    (the benchmarks' have none; checked) that is the same function, and cuDNN's backward of a
    recurrent layer needs it ("cudnn RNN backward can only be called in training mode"), so
    the plain forward+backward and the naive loop run on a GPU too. (``fisher_diagonal``
    itself does the same for such layers.)"""
    model.eval()
    for module in model.modules():
        if isinstance(module, nn.RNNBase):
            if module.dropout and module.num_layers > 1:
                raise ValueError(f"{type(module).__name__} with dropout: not its eval function")
            module.train()
    return model


def split_mnist_mlp(num_classes: int = 10) -> nn.Sequential:
    """MLP 784-400-400-``num_classes``; accepts ``(B, 1, 28, 28)`` or ``(B, 784)`` inputs."""
    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(784, 400),
        nn.ReLU(),
        nn.Linear(400, 400),
        nn.ReLU(),
        nn.Linear(400, num_classes),
    )


class BasicBlock(nn.Module):
    """Two 3x3 conv+BN layers with an identity (or 1x1 conv+BN) shortcut."""

    def __init__(self, in_planes: int, planes: int, stride: int = 1) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ReducedResNet18(nn.Module):
    """Reduced ResNet-18 for 32x32 RGB inputs (see the module docstring)."""

    def __init__(self, num_classes: int = 10, widths: tuple[int, ...] = (20, 40, 80, 160)) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        blocks: list[nn.Module] = []
        in_planes = widths[0]
        for width, stride in zip(widths, (1, 2, 2, 2)):
            blocks += [BasicBlock(in_planes, width, stride), BasicBlock(width, width, 1)]
            in_planes = width
        self.layers = nn.Sequential(*blocks)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.pool(self.layers(out)).flatten(1)
        return self.linear(out)


class TextTransformer(nn.Module):
    """Small Transformer-encoder text classifier: token + learned position embeddings, a stack
    of ``nn.TransformerEncoderLayer`` (post-norm, ReLU, no dropout; with ``shared``, one layer
    applied ``num_layers`` times), mean pooling over the sequence and one linear layer. Inputs
    are ``(B, seq_len)`` token ids; without ``batch_first``, the layers run sequence-first on
    ``(seq_len, B, ...)`` (PyTorch's default layout)."""

    def __init__(
        self,
        num_classes: int = 10,
        vocab_size: int = 1000,
        seq_len: int = 32,
        d_model: int = 64,
        num_heads: int = 4,
        num_layers: int = 2,
        d_feedforward: int = 128,
        shared: bool = False,
        batch_first: bool = True,
    ) -> None:
        super().__init__()
        self.batch_first = batch_first
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(seq_len, d_model)
        self.encoder = nn.Sequential(
            *[
                nn.TransformerEncoderLayer(
                    d_model, num_heads, d_feedforward, dropout=0.0, batch_first=batch_first
                )
                for _ in range(1 if shared else num_layers)
            ]
        )
        self.repeats = num_layers if shared else 1
        self.linear = nn.Linear(d_model, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        positions = torch.arange(tokens.shape[1], device=tokens.device).expand_as(tokens)
        if not self.batch_first:
            tokens, positions = tokens.t(), positions.t()
        hidden = self.embedding(tokens) + self.position(positions)
        for _ in range(self.repeats):
            hidden = self.encoder(hidden)
        return self.linear(hidden.mean(dim=1 if self.batch_first else 0))


class LSTMClassifier(nn.Module):
    """Token embedding, a batch-first ``nn.LSTM`` (projected to ``proj_size`` if given) and one
    linear layer on the last state. Inputs are ``(B, seq_len)`` token ids."""

    def __init__(
        self,
        num_classes: int = 10,
        vocab_size: int = 1000,
        dim: int = 64,
        num_layers: int = 1,
        proj_size: int = 0,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.lstm = nn.LSTM(dim, dim, num_layers=num_layers, batch_first=True, proj_size=proj_size)
        self.linear = nn.Linear(proj_size or dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.linear(self.lstm(self.embedding(tokens))[0][:, -1])


class LSTMCellClassifier(nn.Module):
    """:class:`LSTMClassifier` with one ``nn.LSTMCell`` stepped through the sequence by hand
    (one module called ``seq_len`` times per forward pass) from no state."""

    def __init__(self, num_classes: int = 10, vocab_size: int = 1000, dim: int = 64) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, dim)
        self.cell = nn.LSTMCell(dim, dim)
        self.linear = nn.Linear(dim, num_classes)

    def forward(self, tokens: Tensor) -> Tensor:
        state = None
        for x in self.embedding(tokens).unbind(1):
            state = self.cell(x, state)
        return self.linear(state[0])


class SharedBlockMLP(nn.Module):
    """An MLP on flattened ``(B, 1, 28, 28)`` images whose hidden block, ``Linear`` + ReLU +
    ``LayerNorm`` with a residual connection, is applied ``depth`` times with the same weights
    (ALBERT-style sharing)."""

    def __init__(self, num_classes: int = 10, width: int = 400, depth: int = 3) -> None:
        super().__init__()
        self.input = nn.Linear(784, width)
        self.hidden = nn.Linear(width, width)
        self.norm = nn.LayerNorm(width)
        self.linear = nn.Linear(width, num_classes)
        self.depth = depth

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu(self.input(x.flatten(1)))
        for _ in range(self.depth):
            h = self.norm(h + torch.relu(self.hidden(h)))
        return self.linear(h)


def upsampling_cnn(num_classes: int = 10, width: int = 32) -> nn.Sequential:
    """A DCGAN-style generator's upsampling stack as a classifier of ``(B, 16, 4, 4)`` inputs:
    three ``ConvTranspose2d`` (kernel 4, stride 2, padding 1: 4x4 to 32x32; 16, ``width``,
    ``width``, 16 channels) with ReLU, and a linear head."""
    return nn.Sequential(
        nn.ConvTranspose2d(16, width, 4, 2, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, width, 4, 2, 1),
        nn.ReLU(),
        nn.ConvTranspose2d(width, 16, 4, 2, 1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(16 * 32 * 32, num_classes),
    )


def volume_cnn(num_classes: int = 10, width: int = 16) -> nn.Sequential:
    """A 3-d CNN on ``(B, 3, 16, 16, 16)`` volumes: three 3x3x3 ``Conv3d`` (padding 1; strides
    1, 2, 2; 3, ``width``, ``width``, ``2 width`` channels) with ReLU, and a linear head."""
    return nn.Sequential(
        nn.Conv3d(3, width, 3, padding=1),
        nn.ReLU(),
        nn.Conv3d(width, width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv3d(width, 2 * width, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(2 * width * 4**3, num_classes),
    )


def small_vit(num_classes: int = 10, quick: bool = False) -> nn.Module:
    """torchvision's ``VisionTransformer`` for 32x32 images: 4x4 patches, 4 layers of 4 heads,
    width 64 (16 for ``quick``), with a class token and a position embedding on the model; the
    head, zero at initialisation there, is drawn at random (else the rest of its Fisher is 0).
    Needs torchvision (the ``bench`` extra)."""
    from torchvision.models import VisionTransformer

    width = 16 if quick else 64
    model = VisionTransformer(
        image_size=32, patch_size=4, num_layers=2 if quick else 4, num_heads=4,
        hidden_dim=width, mlp_dim=2 * width, num_classes=num_classes,
    )
    nn.init.normal_(model.heads.head.weight, std=width**-0.5)
    return model


class TiedLanguageModel(nn.Module):
    """A causal Transformer language model whose output layer shares its weight with the token
    embedding (``tie_word_embeddings``, GPT-2's default): token and learned position
    embeddings, ``num_layers`` pre-norm ``nn.TransformerEncoderLayer`` (GELU, no dropout) with a
    causal mask, a final ``LayerNorm`` and a bias-free head whose ``(V, D)`` weight is the
    embedding's table (both tables drawn from N(0, 0.02²), as GPT-2's). Positions are looked up
    as nanoGPT does, ``arange(T)`` of shape ``(T,)``. Inputs are ``(B, T)`` token ids,
    ``T <= max_len``; the output is ``(B, T, V)`` next-token logits."""

    def __init__(
        self,
        vocab_size: int = 5000,
        max_len: int = 32,
        d_model: int = 128,
        num_heads: int = 4,
        num_layers: int = 2,
    ) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, d_model)
        self.position = nn.Embedding(max_len, d_model)
        self.layers = nn.ModuleList(
            nn.TransformerEncoderLayer(
                d_model, num_heads, 4 * d_model, dropout=0.0, activation="gelu",
                batch_first=True, norm_first=True,
            )
            for _ in range(num_layers)
        )
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab_size, bias=False)
        self.head.weight = self.embedding.weight
        for table in (self.embedding.weight, self.position.weight):  # (as GPT-2's: with
            nn.init.normal_(table, std=0.02)  # N(0, 1), the logits' softmax underflows)

    def forward(self, tokens: Tensor) -> Tensor:
        length = tokens.shape[1]
        positions = torch.arange(length, device=tokens.device)
        hidden = self.embedding(tokens) + self.position(positions)
        causal = nn.Transformer.generate_square_subsequent_mask(length, device=tokens.device)
        for layer in self.layers:
            hidden = layer(hidden, src_mask=causal, is_causal=True)
        return self.head(self.norm(hidden))
