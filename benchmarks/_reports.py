"""What the benchmarks share around their measurements: their common options, the processor's
(and GPU's) name for the reports' headers, torch's thread count kept for the caller, and writing a
report."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch

_CPUINFO = Path("/proc/cpuinfo")


def cpu_name() -> str:
    """The processor's model name (Linux), else what ``platform`` knows."""
    try:
        for line in _CPUINFO.read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def machine(device: torch.device) -> str:
    """The processor, and the GPU where ``device`` is one."""
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (host: {cpu_name()})"
    return cpu_name()


@contextmanager
def keeping_threads() -> Iterator[None]:
    """Inside the block a benchmark may set torch's thread count; the caller's count is back
    after it, also on an error."""
    previous = torch.get_num_threads()
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def write_report(table: str, out: Path) -> str:
    """Print the markdown ``table`` and write it to ``out`` (its folder made if missing)."""
    print(table)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(table)
    return table


def timing_options(
    argv: list[str] | None, description: str, repeats: int, quick: str, out: Path
) -> argparse.Namespace:
    """The options of a timing benchmark, parsed from ``argv``: ``--repeats`` (default
    ``repeats``), ``--threads`` (2), ``--device`` (cpu), ``--quick`` (``quick`` says what it
    runs) and ``--out`` (default ``out``); repeats and threads must be at least 1."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--repeats", type=int, default=repeats)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--quick", action="store_true", help=quick)
    parser.add_argument("--out", type=Path, default=out, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.repeats < 1 or args.threads < 1:
        parser.error("--repeats and --threads must be at least 1")
    return args
