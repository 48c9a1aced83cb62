"""EWC for a small causal Transformer language model on two synthetic text tasks.

Task A: sequences that count up by 1 (mod V), e.g. ``5 6 7 8 ...``; task B: sequences that count
up by 3. One model can do both (the step is visible after two tokens), but training on B alone
overwrites A. We train on A, consolidate with the exact Fisher of the per-token language-model
likelihood (sequence log-likelihood = sum over its tokens), then train on B with and without the
EWC penalty, and print next-token accuracy on both tasks. Runs in well under a minute on CPU::

    python examples/sequence_lm.py
"""

from __future__ import annotations

import copy
import math
import time

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ewc_reg import EWCRegularizer

VOCAB, LENGTH, DIM = 12, 8, 32


class Block(nn.Module):
    """Pre-norm causal self-attention and MLP."""

    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.mlp = nn.Sequential(nn.Linear(DIM, 2 * DIM), nn.GELU(), nn.Linear(2 * DIM, DIM))

    def forward(self, h: Tensor) -> Tensor:
        length = h.shape[-2]
        q, k, v = self.qkv(self.ln1(h)).chunk(3, dim=-1)
        scores = q @ k.transpose(-1, -2) / math.sqrt(DIM)
        causal = torch.ones(length, length, dtype=torch.bool, device=h.device).tril()
        h = h + self.proj(scores.masked_fill(~causal, float("-inf")).softmax(-1) @ v)
        return h + self.mlp(self.ln2(h))


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.tok = nn.Embedding(VOCAB, DIM)
        self.pos = nn.Embedding(LENGTH, DIM)
        self.blocks = nn.Sequential(Block())
        self.head = nn.Linear(DIM, VOCAB)

    def forward(self, input_ids: Tensor) -> Tensor:
        positions = torch.arange(input_ids.shape[-1], device=input_ids.device)
        return self.head(self.blocks(self.tok(input_ids) + self.pos(positions)))  # (B, T, V)


def task_batch(step: int, size: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    """Counting sequences ``x_t = x_0 + step * t (mod V)``: inputs and next-token labels. The
    first label is -100 (left out): the step cannot be known from one token."""
    start = torch.randint(0, VOCAB, (size, 1), generator=g)
    seq = (start + step * torch.arange(LENGTH + 1)) % VOCAB
    labels = seq[:, 1:].clone()
    labels[:, :1] = -100
    return seq[:, :-1], labels


def loss_fn(model: nn.Module, x: Tensor, y: Tensor) -> Tensor:
    return F.cross_entropy(model(x).flatten(0, 1), y.flatten(), ignore_index=-100)


@torch.no_grad()
def accuracy(model: nn.Module, step: int) -> float:
    x, y = task_batch(step, 512, torch.Generator().manual_seed(1000 + step))
    model.eval()
    predicted = model(x).argmax(-1)
    model.train()
    kept = y != -100
    return (predicted[kept] == y[kept]).float().mean().item()


def train(model: nn.Module, step: int, steps: int, reg: EWCRegularizer | None = None) -> None:
    g = torch.Generator().manual_seed(step)
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        loss = loss_fn(model, *task_batch(step, 64, g))
        if reg is not None:
            loss = loss + reg.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()


def main() -> None:
    torch.manual_seed(0)
    torch.set_num_threads(min(2, torch.get_num_threads()))
    start = time.perf_counter()
    model = TinyLM()
    train(model, step=1, steps=300)
    print(f"after task A:           A accuracy {accuracy(model, 1):.3f}")

    # Exact Fisher of the per-token likelihood: K = T*V = 96 pull-backs per sequence, within
    # the default max_exact_vectors (1024). Data: dict batches; -100 labels are left out.
    reg = EWCRegularizer(model, strength=2e3, method="exact")
    g = torch.Generator().manual_seed(7)
    fisher_data = [dict(zip(("input_ids", "labels"), task_batch(1, 32, g))) for _ in range(2)]
    t0 = time.perf_counter()
    reg.consolidate(fisher_data)
    print(f"exact Fisher on 64 sequences in {time.perf_counter() - t0:.1f}s")

    plain = copy.deepcopy(model)
    train(plain, step=3, steps=200)
    train(model, step=3, steps=200, reg=reg)
    for name, m in (("without EWC", plain), ("with EWC", model)):
        print(f"after task B, {name:11s}: A accuracy {accuracy(m, 1):.3f}, "
              f"B accuracy {accuracy(m, 3):.3f}")
    print(f"total {time.perf_counter() - start:.0f}s")


if __name__ == "__main__":
    main()
