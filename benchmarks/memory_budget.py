"""Time and peak memory of the exact Fisher of the reduced ResNet-18 against ``memory_budget``.

For each budget, ``fisher_diagonal(model, [(x, y)], "exact", backend="hooks",
memory_budget=...)`` runs on one batch of N random 3x32x32 images with C=10 classes, timed
round-robin with a plain forward+backward of the same batch (order reversed every other round,
medians; the first call of each budget is an untimed warm-up, so the timed calls start from the
chunk sizes the engine keeps). A first row calls it without ``memory_budget``: the device's
default (:func:`ewc_reg.engines.base.default_memory_budget`, in MiB). All are reported as
multiples of the plain forward+backward; the peak is the growth of the process's peak memory
(see :mod:`benchmarks._timing`). These figures chose the defaults.

``--pull-back looped`` or ``batched`` forces the hooks engine's pull-back (one backward pass per
vector, or one batched over the vectors) where by default it takes its own choice: looped for
this model on CPU, batched on a GPU (:func:`ewc_reg.engines.hooks.loops_pull_back`).

Run: ``python -m benchmarks.memory_budget [--budgets-mib 128 256 512 1024] [--repeats 3]
[--device cpu] [--pull-back auto]``; writes ``benchmarks/results/memory_budget.md``.
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import ewc_reg
from ewc_reg import fisher_diagonal
from ewc_reg.engines.base import default_memory_budget

from ._paths import PULL_BACKS, pull_back
from ._reports import at_least, command_line, device_name, keeping_threads, machine, write_report
from ._timing import Measurement, measure, memory_method
from .models import ReducedResNet18

RESULTS = Path(__file__).parent / "results" / "memory_budget.md"


def run(
    budgets_mib: list[float],
    samples: int,
    repeats: int,
    threads: int,
    device: torch.device,
) -> dict[str, list[Measurement]]:
    """The timed measurements of the plain forward+backward and of each budget."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = ReducedResNet18(10).to(device).eval()
    x = torch.randn(samples, 3, 32, 32, device=device)
    y = torch.randint(0, 10, (samples,), device=device)
    params = list(model.parameters())

    def plain() -> object:
        return torch.autograd.grad(F.cross_entropy(model(x), y), params)

    default = default_memory_budget(device) / 2**20
    contenders: dict[str, Callable[[], object]] = {
        "plain": plain,
        f"default ({default:.0f})": lambda: fisher_diagonal(
            model, [(x, y)], "exact", backend="hooks"
        ),
    }
    for mib in budgets_mib:
        budget = int(mib * 2**20)
        contenders[f"{mib:g}"] = lambda budget=budget: fisher_diagonal(
            model, [(x, y)], "exact", backend="hooks", memory_budget=budget
        )
    for fn in contenders.values():  # (warm-up)
        measure(fn, device)
    names = list(contenders)
    timed: dict[str, list[Measurement]] = {name: [] for name in names}
    for round_ in range(repeats):
        for name in names if round_ % 2 == 0 else names[::-1]:
            timed[name].append(measure(contenders[name], device))
    return timed


def report(timed: dict[str, list[Measurement]], args: argparse.Namespace) -> str:
    """Markdown: one row per budget, as multiples of the plain forward+backward."""

    def median(name: str, field: str) -> float:
        values = [v for m in timed[name] if (v := getattr(m, field)) is not None]
        return statistics.median(values) if values else float("nan")  # (no peak off Linux)

    plain_time, plain_peak = median("plain", "seconds"), median("plain", "peak_bytes")
    device = torch.device(args.device)
    lines = [
        "# Exact Fisher of the reduced ResNet-18 (C=10) against the memory budget",
        "",
        f"`python -m benchmarks.memory_budget --budgets-mib "
        f"{' '.join(f'{b:g}' for b in args.budgets_mib)} --samples {args.samples} --repeats "
        f"{args.repeats} --threads {args.threads} --device {args.device} --pull-back "
        f"{args.pull_back}` · ewc_reg "
        f"{ewc_reg.__version__} · torch {torch.__version__} · {machine(device)} · "
        f"{date.today()} · medians of {args.repeats} rounds, order reversed every other round",
        "",
        f"{memory_method(device)}.",
        "",
        f"Plain forward+backward: {plain_time:.3f} s, peak {plain_peak / 2**20:.0f} MiB.",
        "",
        "| budget (MiB) | time × fwd+bwd | peak × fwd+bwd |",
        "|---:|---:|---:|",
    ]
    for name in timed:
        if name != "plain":
            lines.append(
                f"| {name} | {median(name, 'seconds') / plain_time:.2f} | "
                f"{median(name, 'peak_bytes') / plain_peak:.2f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument("--budgets-mib", type=float, nargs="+", default=[128, 256, 512, 1024])
    parser.add_argument("--samples", type=at_least(1), default=128)
    parser.add_argument("--repeats", type=at_least(1), default=3)
    parser.add_argument("--threads", type=at_least(1), default=2)
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    parser.add_argument("--pull-back", choices=PULL_BACKS, default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    if not all(b > 0 for b in args.budgets_mib):
        parser.error(f"--budgets-mib: every budget must be positive, got {args.budgets_mib}")
    with keeping_threads(), pull_back(args.pull_back):
        timed = run(
            args.budgets_mib, args.samples, args.repeats, args.threads, torch.device(args.device)
        )
        table = report(timed, args)
    return write_report(table, args.out)


if __name__ == "__main__":
    main()
