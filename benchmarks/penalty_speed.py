"""Cost of ``EWCRegularizer.penalty()`` and its backward inside an Adam training step.

Target (issue #3): the penalty adds at most 10% to an Adam step of the Split MNIST MLP at batch
128. Three contenders are timed round-robin in one process (so machine noise hits all alike),
and medians are reported:

* ``step``: forward, mean cross-entropy on the task's 2 units, backward, Adam step;
* ``step + penalty``: the same with ``reg.penalty()`` added to the loss;
* ``penalty``: ``reg.penalty().backward()`` alone, after ``zero_grad()`` as in a training step
  (so the gradient lands in ``.grad`` as it does there, not added to an old one).

Run: ``python -m benchmarks.penalty_speed [--repeats 300] [--threads 1 2] [--device cpu]``;
writes ``benchmarks/results/penalty_speed.md``.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import ewc_reg
from ewc_reg import EWCRegularizer

from .models import split_mnist_mlp

RESULTS = Path(__file__).parent / "results" / "penalty_speed.md"


def _timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    def time_once(fn: Callable[[], object]) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return time.perf_counter() - start

    return time_once


def measure(repeats: int, batch_size: int, device: torch.device) -> dict[str, float]:
    """Median seconds of each contender (see the module docstring)."""
    torch.manual_seed(0)
    model = split_mnist_mlp().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    reg = EWCRegularizer(model, strength=1e5, method="exact")
    reg.consolidate([(x, y)], output_fn=lambda out: out[:, :2])

    def step(with_penalty: bool) -> None:
        loss = F.cross_entropy(model(x)[:, :2], y)
        if with_penalty:
            loss = loss + reg.penalty()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()

    def penalty_only() -> None:
        optimizer.zero_grad()
        reg.penalty().backward()

    contenders = {
        "step": lambda: step(False),
        "step + penalty": lambda: step(True),
        "penalty": penalty_only,
    }
    time_once = _timer(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    warmup = max(repeats // 10, 3)
    for i in range(repeats + warmup):
        for name, fn in contenders.items():
            t = time_once(fn)
            if i >= warmup:
                times[name].append(t)
    return {name: statistics.median(ts) for name, ts in times.items()}


def report(results: dict[int, dict[str, float]], args: argparse.Namespace) -> str:
    """Markdown: one table per thread count, with the overhead and the verdict."""
    lines = [
        "# Penalty cost in an Adam step (Split MNIST MLP)",
        "",
        f"`python -m benchmarks.penalty_speed --repeats {args.repeats} --threads "
        f"{' '.join(map(str, args.threads))} --batch-size {args.batch_size} --device "
        f"{args.device}` · ewc_reg {ewc_reg.__version__} · torch {torch.__version__} · "
        f"{platform.machine()} · {date.today()} · medians of {args.repeats} interleaved repeats",
    ]
    for threads, medians in results.items():
        step = medians["step"]
        overhead = medians["step + penalty"] / step - 1
        alone = medians["penalty"] / step
        verdict = "pass" if max(overhead, alone) <= 0.10 else "FAIL"
        lines += [
            "",
            f"## {threads} thread{'s' if threads > 1 else ''}",
            "",
            "| contender | median ms | ratio to step |",
            "|---|---:|---:|",
        ]
        for name, seconds in medians.items():
            lines.append(f"| {name} | {seconds * 1e3:.3f} | {seconds / step:.3f} |")
        lines += [
            "",
            f"Added by the penalty: {overhead:.1%} of a step (step + penalty vs step); penalty "
            f"and its backward alone: {alone:.1%}. Target ≤ 10%: {verdict}.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=300)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    previous = torch.get_num_threads()
    results = {}
    try:
        for threads in args.threads:
            torch.set_num_threads(threads)
            results[threads] = measure(args.repeats, args.batch_size, torch.device(args.device))
    finally:
        torch.set_num_threads(previous)
    table = report(results, args)
    print(table)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(table)
    return table


if __name__ == "__main__":
    main()
