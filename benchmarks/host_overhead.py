"""Host work of one Fisher call: the operators it dispatches, against a plain forward+backward.

On a GPU, models of the size of the paper's are launch-bound: every operator costs the host a
few microseconds, whatever its size, and the device waits (issue #3 measured ``empirical`` at
3.5-7x a forward+backward on an H100 where the CPU gives 1.3-1.9x). The operator count is
what decides that cost, and it can be measured without a GPU: this benchmark counts the ATen
operators one ``fisher_diagonal`` call dispatches (a ``TorchDispatchMode``) on each model and
estimator, with the default engine, as does a plain forward+backward of the same batch
(gradient of the mean cross-entropy). It reports all operators and those that compute (not
views, which launch nothing), and the median CPU time of both at a small batch, where the CPU
time is mostly host work too. With ``--device cuda`` the times are those of the GPU (synchronised
after each call), where the ratios show the launch-bound cost itself.

``--ways launch-bound`` makes the engines take the ways they take on a GPU (one pull-back
batched over the vectors, gathers: :func:`ewc_reg.engines.base.launch_bound`) on any device, so
that the CPU counts the operators a GPU would launch (the times stay the CPU's); ``--ways cpu``
makes them take the CPU's, so that a GPU times both.

Run: ``python -m benchmarks.host_overhead [--models mlp,resnet,transformer,lstm,upsampling]
[--samples 8] [--device cpu] [--ways device]``; writes ``benchmarks/results/host_overhead.md``.
"""

from __future__ import annotations

import argparse
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils._python_dispatch import TorchDispatchMode

import ewc_reg
from ewc_reg import fisher_diagonal

from ._paths import WAYS, engine_ways
from ._reports import at_least, command_line, device_name, keeping_threads, machine, write_report
from ._timing import side_by_side
from .models import (
    LSTMClassifier,
    ReducedResNet18,
    TextTransformer,
    evaluated,
    split_mnist_mlp,
    upsampling_cnn,
)

RESULTS = Path(__file__).parent / "results" / "host_overhead.md"
METHODS = ("exact", "empirical")


def _mlp(samples: int) -> tuple[nn.Module, Tensor]:
    return split_mnist_mlp(), torch.rand(samples, 1, 28, 28)


def _resnet(samples: int) -> tuple[nn.Module, Tensor]:
    return ReducedResNet18(), torch.randn(samples, 3, 32, 32)


def _transformer(samples: int) -> tuple[nn.Module, Tensor]:
    return TextTransformer(), torch.randint(0, 1000, (samples, 32))


def _lstm(samples: int) -> tuple[nn.Module, Tensor]:
    return LSTMClassifier(), torch.randint(0, 1000, (samples, 32))


def _upsampling(samples: int) -> tuple[nn.Module, Tensor]:
    return upsampling_cnn(), torch.randn(samples, 16, 4, 4)


MODELS: dict[str, tuple[str, Callable[[int], tuple[nn.Module, Tensor]]]] = {
    "mlp": ("Split MNIST MLP", _mlp),
    "resnet": ("reduced ResNet-18", _resnet),
    "transformer": ("Transformer text classifier", _transformer),
    "lstm": ("LSTM classifier", _lstm),
    "upsampling": ("transposed convolutions (4x4 to 32x32)", _upsampling),
}


class OperatorCount(TorchDispatchMode):
    """Counts the ATen operators dispatched inside the block, views (which compute nothing)
    apart."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: Counter[str] = Counter()
        self.views = 0

    def __torch_dispatch__(
        self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None
    ) -> Any:
        self.calls[str(func.overloadpacket.__name__)] += 1
        self.views += bool(getattr(func, "is_view", False))
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.calls.values())


@dataclass
class Row:
    model: str
    contender: str
    operators: int
    computing: int
    seconds: float
    top: str


def _count(fn: Callable[[], object]) -> OperatorCount:
    with OperatorCount() as counter:
        fn()
    return counter


def measure(key: str, samples: int, repeats: int, device: torch.device) -> list[Row]:
    """The plain forward+backward and each estimator's Fisher of model ``key``: operators of
    one call (after a warm-up call) and the median seconds of ``repeats``, interleaved."""
    label, make = MODELS[key]
    torch.manual_seed(0)
    model, x = make(samples)
    model, x = evaluated(model.to(device)), x.to(device)
    y = torch.randint(0, 10, (samples,), device=device)
    params = [p for p in model.parameters() if p.requires_grad]

    def plain() -> None:
        torch.autograd.grad(F.cross_entropy(model(x), y), params)

    contenders: dict[str, Callable[[], object]] = {"plain fwd+bwd": plain}
    for method in METHODS:
        contenders[f"Fisher, {method}"] = lambda m=method: fisher_diagonal(model, [(x, y)], m)
    timed = side_by_side(contenders, repeats, device)  # (its untimed first calls warm up)
    counts = {name: _count(fn) for name, fn in contenders.items()}  # (after the warm-up)
    rows = []
    for name, counter in counts.items():
        top = ", ".join(f"{op} {n}" for op, n in counter.calls.most_common(4))
        rows.append(
            Row(label, name, counter.total, counter.total - counter.views, timed[name][0], top)
        )
    return rows


def report(rows: list[Row], args: argparse.Namespace) -> str:
    """Markdown: one row per model and contender, ratios to the model's plain pass."""
    lines = [
        "# Host work of a Fisher call (operators dispatched)",
        "",
        f"`python -m benchmarks.host_overhead --models {','.join(args.models)} --samples "
        f"{args.samples} --repeats {args.repeats} --threads {args.threads} --device "
        f"{args.device} --ways {args.ways}` · ewc_reg {ewc_reg.__version__} · torch "
        f"{torch.__version__} · {machine(torch.device(args.device))} · {date.today()}",
        "",
        "Operators: ATen operators one call dispatches (computing: all but views). Time: median "
        f"seconds over {args.repeats} interleaved calls at N={args.samples}. Ratios are to "
        "the model's plain forward+backward.",
        "",
        "| model | contender | operators | × plain | computing | × plain | median ms | × plain "
        "| most frequent |",
        "|---|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    plain: dict[str, Row] = {}
    for row in rows:
        base = plain.setdefault(row.model, row)
        lines.append(
            f"| {row.model} | {row.contender} | {row.operators} | "
            f"{row.operators / base.operators:.1f}× | {row.computing} | "
            f"{row.computing / base.computing:.1f}× | {row.seconds * 1e3:.2f} | "
            f"{row.seconds / base.seconds:.1f}× | {row.top} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument(
        "--models", type=lambda s: s.split(","), default=list(MODELS),
        help=f"comma-separated, from {','.join(MODELS)}",
    )
    parser.add_argument("--samples", type=at_least(1), default=8)
    parser.add_argument("--repeats", type=at_least(1), default=20)
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--ways", choices=WAYS, default="device",
        help="the engines' ways for the device, a GPU's or the CPU's on any device",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        parser.error(f"unknown models {unknown}; choose from {list(MODELS)}")
    with keeping_threads(), engine_ways(args.ways):
        torch.set_num_threads(args.threads)
        rows = [
            row
            for key in args.models
            for row in measure(key, args.samples, args.repeats, torch.device(args.device))
        ]
    return write_report(report(rows, args), args.out)


if __name__ == "__main__":
    main()
