"""Split MNIST (van de Ven, 2025): MLP 784-400-400-10, inputs in [0, 1], batch 128.

Usage::

    python -m benchmarks.split_mnist --quick          # a few minutes on a laptop CPU
    python -m benchmarks.split_mnist                  # the paper's sweep: 3 seeds x 14 λ x 6
    python -m benchmarks.report benchmarks/results/split_mnist
"""

from __future__ import annotations

from functools import partial

from .data import MNIST_SHAPE, load_mnist, synthetic
from .models import split_mnist_mlp
from .protocol import Benchmark, main

BENCHMARK = Benchmark(
    name="split_mnist",
    make_model=split_mnist_mlp,
    load_data=load_mnist,
    synthetic_data=partial(synthetic, MNIST_SHAPE, train_per_class=200, test_per_class=50),
    batch_size=128,
)

if __name__ == "__main__":
    main(BENCHMARK)
