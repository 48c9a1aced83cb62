"""What the coverage benchmarks (:mod:`.timm_coverage`, :mod:`.peft_coverage`,
:mod:`.transformers_coverage`) share: the
engine ``auto`` ends on for a model's ``exact`` Fisher and the modules it sends to the
per-module fallback, read from the library's log (loggers ``"ewc_reg"`` and
``"ewc_reg.fallback"``), the difference from the loop engine's Fisher (plain autograd, one
sample at a time), and running each case in its own process (a crash or a hang costs that row
only); and, with the speed benchmarks built on the same packages (:mod:`.timm_speed`,
:mod:`.transformers_speed`), the check that those optional packages import before any work."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import re
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from datetime import date
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ewc_reg import fisher_diagonal

from ._reports import (
    at_least,
    command_line,
    keeping_threads,
    machine,
    report_file,
    write_report,
)

#: The optional packages the benchmarks are built on, each with the command that installs it
#: beside the pinned torch (``--no-deps``: its dependencies would replace that torch).
INSTALL = {
    "timm": "pip install --no-deps timm",
    "transformers": "pip install --no-deps transformers tokenizers huggingface_hub safetensors",
    "peft": "pip install --no-deps peft",
}


def require(parser: argparse.ArgumentParser, packages: Iterable[str]) -> None:
    """An error of ``parser``'s command line (exit 2, before any work and nothing written)
    where one of the optional ``packages`` (:data:`INSTALL`) does not import, naming the
    command that installs it; without this check a run would fail only after its cases (each
    a row ``not run``), or at its report's header."""
    missing = []
    for package in packages:
        try:
            importlib.import_module(package)
        except Exception as error:  # (not installed, or installed without what it imports)
            missing.append(
                f"needs {package}, which does not import here ({type(error).__name__}: "
                f"{error}); install it with: {INSTALL[package]}"
            )
    if missing:
        parser.error("; ".join(missing))


class _Messages(logging.Handler):
    """Keeps the messages of the loggers it is added to."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.messages: list[tuple[str, str]] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append((record.name, record.getMessage()))


def engine_and_fallbacks(messages: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """The engine the messages say ``auto`` ended on, and the classes of the modules they say
    went to the per-module fallback. ``auto`` starts on the hooks engine; a message of the
    engine it is on that says it is using another moves it there (the functorch engine's own,
    when it runs a module of the per-module fallback and goes to the loop engine for it, does
    not move the model)."""
    engine = "hooks"
    for _, message in messages:
        used = re.match(r"(\w+) engine: .*using the (\w+) engine", message)
        if used and used.group(1) == engine:
            engine = used.group(2)
    classes = [
        found.group(1)
        for name, message in messages
        if name == "ewc_reg.fallback"
        for found in [re.search(r"\(([\w, ]+)\): its per-sample gradients", message)]
        if found
    ]
    return engine, classes


def relative_difference(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> float:
    """``max_p max|got_p - want_p| / max|want_p|``, each denominator at least 1e-12 of the
    largest entry of ``want`` (where ``want`` is 0 everywhere: 0 if ``got`` is too, else
    infinity)."""
    largest = max(t.abs().max().item() for t in want.values() if t.numel())
    if largest == 0:
        return 0.0 if all(not got[name].any() for name in want) else float("inf")
    return max(
        (got[name] - t).abs().max().item() / max(t.abs().max().item(), 1e-12 * largest)
        for name, t in want.items()
        if t.numel()
    )


def measure(model: nn.Module, data: list[Any]) -> dict[str, Any]:
    """The engine ``auto`` ends on for ``model``'s ``exact`` Fisher on the batches ``data``, the
    classes of its modules on the per-module fallback, its difference from the loop engine's
    Fisher (:func:`relative_difference`) and the two times."""
    handler = _Messages()  # (on "ewc_reg", which "ewc_reg.fallback" propagates to)
    loggers = [logging.getLogger(name) for name in ("ewc_reg", "ewc_reg.fallback")]
    levels = [logger.level for logger in loggers]
    loggers[0].addHandler(handler)
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
    try:
        start = time.perf_counter()
        auto = fisher_diagonal(model, data, "exact")
        auto_time = time.perf_counter() - start
    finally:
        loggers[0].removeHandler(handler)
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)
    start = time.perf_counter()
    loop = fisher_diagonal(model, data, "exact", backend="loop")
    loop_time = time.perf_counter() - start
    engine, fallbacks = engine_and_fallbacks(handler.messages)
    return {
        "engine": engine,
        "fallbacks": fallbacks,
        "difference": relative_difference(auto, loop),
        "fisher_is_zero": not any(t.any() for t in loop.values()),
        "auto_s": auto_time,
        "loop_s": loop_time,
    }


def _row(name: str, result: dict[str, Any]) -> str:
    if "error" in result:
        return f"| {name} | not run: {result['error'].splitlines()[0]} | | | | |"
    fallbacks = ", ".join(
        f"{cls} ×{count}" if count > 1 else cls
        for cls, count in sorted(Counter(result["fallbacks"]).items())
    )
    difference = f"{result['difference']:.1e}"
    if result.get("fisher_is_zero"):  # (nothing compared: a row to look into)
        difference += " (the Fisher is 0)"
    return (
        f"| {name} | {result['engine']} | {fallbacks or '–'} | {difference} | "
        f"{result['auto_s']:.2f} | {result['loop_s']:.2f} |"
    )


def run(
    module: str,
    cases: list[str],
    timeout: float,
    threads: int,
    sizes: dict[str, int] | None = None,
) -> dict[str, dict[str, Any]]:
    """Each case's result, each from ``python -m module --one case`` in its own process (which
    prints it as a line of JSON), with the options ``sizes`` (by name, ``batch_size`` for
    ``--batch-size``)."""
    options = [
        arg for name, value in (sizes or {}).items() for arg in (_option(name), str(value))
    ]
    results = {}
    for name in cases:
        command = [
            sys.executable, "-m", module, "--one", name, "--threads", str(threads), *options
        ]
        try:
            done = subprocess.run(
                command, capture_output=True, text=True, timeout=timeout,
                cwd=Path(__file__).parent.parent,
            )
            lines = [line for line in done.stdout.splitlines() if line.startswith("{")]
            result = (
                json.loads(lines[-1]) if lines
                else {"error": f"exit {done.returncode}: {done.stderr.strip()[-150:]}"}
            )
        except subprocess.TimeoutExpired:
            result = {"error": f"over {timeout:g} s"}
        results[name] = result
        print(_row(name, result), flush=True)
    return results


def report(results: dict[str, dict[str, Any]], title: str, setting: str, first: str) -> str:
    """The markdown table of ``results`` under ``title``, with the run's ``setting`` (after the
    date, machine and torch) and counts; ``first`` heads the cases' column."""
    ran = {name: r for name, r in results.items() if "error" not in r}
    engines = Counter(r["engine"] for r in ran.values())
    clean = sum(1 for r in ran.values() if r["engine"] == "hooks" and not r["fallbacks"])
    worst = max((r["difference"] for r in ran.values()), default=float("nan"))
    return "\n".join(
        [
            f"# {title}",
            "",
            f"{date.today()} · {machine(torch.device('cpu'))} · torch {torch.__version__} · "
            + setting,
            "",
            f"{len(ran)} of {len(results)} ran: "
            + ", ".join(f"{count} on {engine}" for engine, count in engines.most_common())
            + f"; {clean} on hooks with no module on the per-module fallback; largest "
            f"difference from the loop engine {worst:.1e}.",
            "",
            f"| {first} | engine | modules on the per-module fallback | difference from loop "
            "| auto (s) | loop (s) |",
            "|---|---|---|---:|---:|---:|",
            *(_row(name, result) for name, result in results.items()),
            "",
        ]
    )


def _option(name: str) -> str:
    return "--" + name.replace("_", "-")


def _case_names(known: list[str]) -> Callable[[str], list[str]]:
    """``--cases``'s type for ``argparse``: comma-separated names, each one of ``known``, else an
    error of the command line that lists them."""

    def names(text: str) -> list[str]:
        chosen = list(dict.fromkeys(name.strip() for name in text.split(",") if name.strip()))
        unknown = [name for name in chosen if name not in known]
        if unknown or not chosen:
            said = f"no case {', '.join(unknown)}" if unknown else f"{text!r} names no case"
            raise argparse.ArgumentTypeError(f"{said}; the cases are {', '.join(known)}")
        return chosen

    return names


def main(
    argv: list[str] | None,
    doc: str,
    module: str,
    cases: dict[str, tuple[str, ...]],
    measure_case: Callable[..., dict[str, Any]],
    header: Callable[..., tuple[str, str, str]],
    out: Path,
    sizes: dict[str, tuple[int, int, str]] | None = None,
) -> str | None:
    """The command line of a coverage benchmark, ``python -m module`` (described by the first
    line of ``doc``: :func:`._reports.command_line`): ``--cases`` (default: all
    of ``cases``, each named with the optional packages it imports, which must import before
    the run: :func:`require`), ``--timeout`` per case, ``--threads``, ``--out`` and an integer
    option for each of ``sizes`` (by name, ``batch_size`` for ``--batch-size``: its default,
    its least value and its help); the child process's ``--one CASE`` prints
    ``measure_case(CASE, **sizes)`` as JSON. ``header(threads, **sizes)`` gives the report's
    title, setting and first column's heading (see :func:`report`). The table goes to ``--out``;
    without it, to ``out`` only for a run of all cases at the default sizes (the committed
    table), else it is printed only, so that a partial run never replaces the full table."""
    parser = command_line(module, doc)
    parser.add_argument(
        "--cases", type=_case_names(list(cases)), help="comma-separated names (default: all)"
    )
    parser.add_argument("--timeout", type=float, default=300, help="seconds per case")
    parser.add_argument("--threads", type=at_least(1), default=1)
    for name, (default, least, text) in (sizes or {}).items():
        parser.add_argument(_option(name), type=at_least(least), default=default, help=text)
    parser.add_argument(
        "--out", type=Path,
        help=f"markdown file to write (default: benchmarks/results/{out.name} for all cases at "
        "the default sizes; other runs are only printed without --out)",
    )
    parser.add_argument("--one", help=argparse.SUPPRESS)  # (the child process's case)
    args = parser.parse_args(argv)
    if args.timeout <= 0:
        parser.error(f"--timeout must be positive, got {args.timeout:g}")
    chosen_sizes = {name: getattr(args, name) for name in sizes or {}}
    if args.one:
        with keeping_threads():
            torch.set_num_threads(args.threads)
            print(json.dumps(measure_case(args.one, **chosen_sizes)), flush=True)
        return None
    chosen = args.cases or list(cases)
    require(parser, dict.fromkeys(package for name in chosen for package in cases[name]))
    results = run(module, chosen, args.timeout, args.threads, chosen_sizes)
    table = report(results, *header(args.threads, **chosen_sizes))
    every_case = set(chosen) == set(cases)  # (named one by one, too)
    return write_report(table, report_file(parser, args, out if every_case else None, sizes or ()))
