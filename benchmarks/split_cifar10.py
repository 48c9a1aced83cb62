"""Split CIFAR-10 (van de Ven, 2025): reduced ResNet-18, normalised inputs, batch 256.

The full protocol needs a GPU (about 1.1M parameters, 2000 iterations per task)::

    python -m benchmarks.split_cifar10 --device cuda
    python -m benchmarks.report benchmarks/results/split_cifar10

``--synthetic`` runs a smoke configuration on random CIFAR-shaped data instead.
"""

from __future__ import annotations

from functools import partial

from .data import CIFAR10_SHAPE, load_cifar10, synthetic
from .models import ReducedResNet18
from .protocol import Benchmark, main

BENCHMARK = Benchmark(
    name="split_cifar10",
    make_model=ReducedResNet18,
    load_data=load_cifar10,
    synthetic_data=partial(synthetic, CIFAR10_SHAPE, train_per_class=10, test_per_class=10),
    batch_size=256,
)

if __name__ == "__main__":
    main(BENCHMARK)
