"""What the benchmarks share around their measurements: their common options, the processor's
(and GPU's) name for the reports' headers, torch's thread count kept for the caller, and writing a
report."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

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


def write_report(table: str, out: Path | None) -> str:
    """Print the markdown ``table`` and write it to ``out`` (its folder made if missing; with
    ``None``, nowhere: a smoke test's or a partial run's table, which must not replace the
    committed one)."""
    print(table)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(table)
    return table


def report_file(
    parser: argparse.ArgumentParser,
    args: argparse.Namespace,
    out: Path | None,
    defaults: Iterable[str],
) -> Path | None:
    """Where a benchmark writes its table: ``--out`` (``args.out``) if given, else ``out``, the
    committed table, for a run with each option of ``defaults`` (by ``args``' names) at its
    default, else nowhere (``None``: a run of some models or at other sizes prints its table,
    which must not replace the committed one)."""
    if args.out is not None:
        return args.out
    at_defaults = all(getattr(args, name) == parser.get_default(name) for name in defaults)
    return out if at_defaults else None


def command_line(module: str, doc: str) -> argparse.ArgumentParser:
    """The command line of the benchmark ``module`` (``__spec__.name``, the same run with
    ``python -m`` as imported): named as it is run, ``python -m benchmarks.x`` (argparse would
    say ``x.py``), and described by the first line of its docstring ``doc``."""
    return argparse.ArgumentParser(prog=f"python -m {module}", description=doc.splitlines()[0])


def device_name(text: str) -> str:
    """``--device``'s type for ``argparse``: ``text`` where it names a CPU or a CUDA device
    this machine has (``cpu``, ``cuda``, ``cuda:1``), else an error of the command line."""
    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"{text!r} is no device; use cpu or cuda") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"{text!r}: the benchmarks run on cpu or cuda")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"{text!r}: no CUDA device here (torch.cuda.is_available() is False)"
        )
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise argparse.ArgumentTypeError(
            f"{text!r}: this machine has {torch.cuda.device_count()} CUDA device(s)"
        )
    return text


def at_least(low: int) -> Callable[[str], int]:
    """An ``argparse`` type: an integer ``>= low``, else an error of the command line."""

    def integer(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"{value} is less than {low}")
        return value

    integer.__name__ = f"integer >= {low}"  # (argparse names the type in its errors)
    return integer


def timing_options(
    argv: list[str] | None, module: str, doc: str, repeats: int, quick: str, out: Path
) -> argparse.Namespace:
    """The options of the timing benchmark ``module`` (see :func:`command_line`), parsed from
    ``argv``: ``--repeats`` (default ``repeats``), ``--threads`` (2), ``--device`` (cpu),
    ``--quick`` (``quick`` says what it runs) and ``--out`` (default ``out``, but ``None``
    with ``--quick``: a smoke test writes only where it is told); repeats and threads must be
    at least 1."""
    options = command_line(module, doc)
    options.add_argument("--repeats", type=at_least(1), default=repeats)
    options.add_argument("--threads", type=at_least(1), default=2)
    options.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    options.add_argument("--quick", action="store_true", help=quick)
    options.add_argument(
        "--out", type=Path, help=f"markdown file to write (default {out}; none with --quick)"
    )
    args = options.parse_args(argv)
    if args.out is None and not args.quick:
        args.out = out
    return args


def timing_main(
    argv: list[str] | None,
    module: str,
    doc: str,
    repeats: int,
    quick: str,
    out: Path,
    run: Callable[[int, int, torch.device, bool], Any],
    report: Callable[[Any, argparse.Namespace], str],
) -> str:
    """The ``main`` of a timing benchmark: its options (:func:`timing_options`), then
    ``run(repeats, threads, device, quick)`` with torch's thread count kept for the caller,
    and ``report(results, args)`` printed and written to ``--out`` (its default ``out``;
    nowhere for a ``--quick`` smoke test without it)."""
    args = timing_options(argv, module, doc, repeats, quick, out)
    with keeping_threads():
        results = run(args.repeats, args.threads, torch.device(args.device), args.quick)
        table = report(results, args)
    return write_report(table, args.out)
