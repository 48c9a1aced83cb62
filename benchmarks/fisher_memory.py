"""Peak memory of the exact Fisher of a full ResNet-18 (11M parameters, 10 classes) as N grows.

For each engine and each N, ``fisher_diagonal(model, batches, "exact", backend=...)`` runs on N
random 3x32x32 images in batches of 32, and the growth of the process's peak resident memory
over the memory live before the call is reported (see :mod:`benchmarks._timing`). With the
default memory budget the peak should not grow with N.

Run: ``python -m benchmarks.fisher_memory [--sizes 32 128] [--backends auto functorch]``;
writes ``benchmarks/results/fisher_memory.md``. Needs torchvision (the ``bench`` extra).
"""

from __future__ import annotations

import functools
from datetime import date
from pathlib import Path

import torch

import ewc_reg
from ewc_reg import fisher_diagonal
from ewc_reg.engines import BACKENDS
from ewc_reg.engines.base import DEFAULT_MEMORY_BUDGET

from ._reports import at_least, command_line, cpu_name, keeping_threads, write_report
from ._timing import measure, memory_method

RESULTS = Path(__file__).parent / "results" / "fisher_memory.md"


def run(sizes: list[int], backends: list[str], threads: int) -> list[tuple[str, int, float, int]]:
    """(backend, N, seconds, peak bytes) for every backend and N."""
    import torchvision

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    rows = []
    for backend in backends:
        for n in sizes:
            x, y = torch.randn(n, 3, 32, 32), torch.randint(0, 10, (n,))
            batches = [(x[i : i + 32], y[i : i + 32]) for i in range(0, n, 32)]
            call = functools.partial(fisher_diagonal, model, batches, "exact", backend=backend)
            m = measure(call, torch.device("cpu"))
            rows.append((backend, n, m.seconds, m.peak_bytes))
            print(f"{backend} N={n}: {m.seconds:.1f} s, +{(m.peak_bytes or 0) / 2**20:.0f} MiB")
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument("--sizes", type=at_least(1), nargs="+", default=[32, 128], help="N")
    parser.add_argument("--backends", choices=BACKENDS, nargs="+", default=["auto", "functorch"])
    parser.add_argument("--threads", type=at_least(1), default=1)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    with keeping_threads():
        rows = run(args.sizes, args.backends, args.threads)
    lines = [
        "# Exact Fisher of ResNet-18 (11.2M parameters, C=10): peak memory as N grows",
        "",
        f"`python -m benchmarks.fisher_memory --sizes {' '.join(map(str, args.sizes))} "
        f"--backends {' '.join(args.backends)} --threads {args.threads}` · ewc_reg "
        f"{ewc_reg.__version__} · torch {torch.__version__} · {cpu_name()} · "
        f"{date.today()} · default memory budget {DEFAULT_MEMORY_BUDGET // 2**20} MiB · "
        "batches of 32 images 3x32x32",
        "",
        f"{memory_method(torch.device('cpu'))}.",
        "",
        "| backend | N | seconds | peak memory growth (MiB) |",
        "|---|---:|---:|---:|",
    ]
    for backend, n, seconds, peak in rows:
        shown = "–" if peak is None else f"{peak / 2**20:.0f}"
        lines.append(f"| {backend} | {n} | {seconds:.1f} | {shown} |")
    return write_report("\n".join(lines) + "\n", args.out)


if __name__ == "__main__":
    main()
