"""What the hooks engine's one-off checks cost a model's first Fisher call.

The hooks engine checks, on a model's first call (and again for new shapes or a new structure
of the forward pass), that the batch is where it takes it to be (a pass on 2 samples) and that
its sums on 2 samples are plain autograd's (:meth:`ewc_reg.engines.hooks.HookEngine._check_sums`:
2 forward and 2 backward passes on single samples and one hooks pass on 2). This benchmark
times, side by side in one process, three calls of ``fisher_diagonal(model, [(x, y)], method,
backend="hooks")`` on a model fresh for each repeat (a copy of one model, so that no check is
remembered):

* ``first``: the first call, with every check;
* ``first, no sums check``: the first call with the sums check left out (the other checks run);
* ``later``: a second call on the same batch, when no check runs.

Rounds go round-robin, order reversed every other round; medians. ``first − later`` is what the
checks cost; ``first − first, no sums check`` what the sums check costs alone.

Run: ``python -m benchmarks.check_cost [--repeats 5] [--threads 2] [--device cpu] [--quick]
[--out FILE]``; writes ``benchmarks/results/check_cost.md``, or ``--out``; a ``--quick`` smoke
test writes only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path
from unittest import mock

import torch
from torch import nn

import ewc_reg
from ewc_reg import fisher_diagonal
from ewc_reg.engines.hooks import HookEngine

from ._reports import machine, timing_main
from ._timing import measure
from .models import ReducedResNet18, TextTransformer, split_mnist_mlp

RESULTS = Path(__file__).parent / "results" / "check_cost.md"
METHODS = ("exact", "empirical")


def _workloads(quick: bool) -> dict[str, tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """Each model (float32, eval mode) with one batch: the Split MNIST MLP at N=256, the
    Transformer text classifier at N=128 and the reduced ResNet-18 at N=128 (C=10)."""
    torch.manual_seed(0)
    n = 4 if quick else None
    sizes = dict(vocab_size=50, seq_len=8, d_model=16, d_feedforward=32) if quick else {}
    return {
        "Split MNIST MLP": (
            split_mnist_mlp(10),
            torch.randn(n or 256, 1, 28, 28),
            torch.randint(0, 10, (n or 256,)),
        ),
        "Transformer text classifier": (
            TextTransformer(10, **sizes),
            torch.randint(0, 50 if quick else 1000, (n or 128, 8 if quick else 32)),
            torch.randint(0, 10, (n or 128,)),
        ),
        "reduced ResNet-18": (
            ReducedResNet18(10),
            torch.randn(n or 128, 3, 32, 32),
            torch.randint(0, 10, (n or 128,)),
        ),
    }


def _calls(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str
) -> dict[str, Callable[[], float]]:
    """Each way of calling, as a function giving the seconds of the call it stands for on a
    fresh copy of ``model`` (the copying not timed)."""

    def fisher(fresh: nn.Module) -> object:
        return fisher_diagonal(fresh, [(x, y)], method, backend="hooks")

    def first(skip_sums: bool) -> float:
        fresh = copy.deepcopy(model)
        unchecked = mock.patch.object(HookEngine, "_check_sums", lambda *args: None)
        with unchecked if skip_sums else contextlib.nullcontext():
            return measure(lambda: fisher(fresh), x.device).seconds

    def later() -> float:
        fresh = copy.deepcopy(model)
        fisher(fresh)
        return measure(lambda: fisher(fresh), x.device).seconds

    return {
        "first": lambda: first(False),
        "first, no sums check": lambda: first(True),
        "later": later,
    }


def run(
    repeats: int, threads: int, device: torch.device, quick: bool
) -> dict[tuple[str, str], dict[str, list[float]]]:
    """The timed seconds of each way of calling, by model and method."""
    torch.set_num_threads(threads)
    timed: dict[tuple[str, str], dict[str, list[float]]] = {}
    for title, (model, x, y) in _workloads(quick).items():
        model, x, y = model.to(device).eval(), x.to(device), y.to(device)
        for method in METHODS:
            calls = _calls(model, x, y, method)
            for call in calls.values():  # (warm-up)
                call()
            names = list(calls)
            times: dict[str, list[float]] = {name: [] for name in names}
            for round_ in range(repeats):
                for name in names if round_ % 2 == 0 else names[::-1]:
                    times[name].append(calls[name]())
            timed[(title, method)] = times
    return timed


def report(timed: dict[tuple[str, str], dict[str, list[float]]], args: argparse.Namespace) -> str:
    """Markdown: one row per model and method, the medians in milliseconds."""
    device = torch.device(args.device)
    lines = [
        "# The hooks engine's one-off checks on a model's first call",
        "",
        f"`python -m benchmarks.check_cost --repeats {args.repeats} --threads {args.threads} "
        f"--device {args.device}{' --quick' * args.quick}` · ewc_reg {ewc_reg.__version__} · "
        f"torch {torch.__version__} · {machine(device)} · {date.today()} · float32, C=10 · "
        f"medians of {args.repeats} rounds, order reversed every other round, in ms",
        "",
        "| model | method | first | first, no sums check | later | checks | sums check |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for (title, method), times in timed.items():
        first, unchecked, later = (
            1e3 * statistics.median(times[name])
            for name in ("first", "first, no sums check", "later")
        )
        lines.append(
            f"| {title} | {method} | {first:.1f} | {unchecked:.1f} | {later:.1f} | "
            f"{first - later:+.1f} | {first - unchecked:+.1f} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark ``argv`` asks for (:func:`._reports.timing_main`)."""
    quick = "tiny models: a smoke test, written only where --out says"
    return timing_main(argv, __spec__.name, __doc__, 5, quick, RESULTS, run, report)


if __name__ == "__main__":
    main()
