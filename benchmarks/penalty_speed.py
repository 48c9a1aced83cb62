"""Cost of ``EWCRegularizer.penalty()`` and its backward inside an Adam training step.

Target (issue #3): the penalty adds at most 10% to an Adam step of the Split MNIST MLP at batch
128. Four contenders are timed round-robin in one process (so machine noise hits all alike), in
forward order on even rounds and reverse order on odd ones (so none always runs after the same
neighbour, whose freed buffers and cache lines it would inherit), and medians are reported:

* ``step``: forward, mean cross-entropy on the task's 2 units, backward, Adam step;
* ``step + penalty``: the same with ``reg.penalty()`` added to the loss;
* ``step + add_penalty_grad``: the step without the penalty in the loss, and
  ``reg.add_penalty_grad()`` between backward and the Adam step (the same gradient, no graph);
* ``penalty``: ``reg.penalty().backward()`` alone, after ``zero_grad()`` as in a training step
  (so the gradient lands in ``.grad`` as it does there, not added to an old one);
* ``read θ, μ, A once``: one norm per tensor of the parameters, the anchor and the Fisher, the
  least memory traffic any penalty needs (it must read all three), as a floor: after a training
  step they come from main memory rather than cache.

Each contender's median count of minor page faults is reported too. On Linux with glibc's
``malloc`` defaults, freed buffers of a few MB go back to the system and the next allocation
faults its pages in again: Adam's temporaries and the fresh gradient buffers of every step pay
that, and it moves the timings by as much as the penalty costs. The allocator settings in the
environment (``MALLOC_*``, ``GLIBC_TUNABLES``, ``LD_PRELOAD``) are printed with the results, so a
run with, say, ``MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=17179869184`` (no
faults after the first steps) shows the cost of the work alone.

With ``--compile BACKEND`` (``inductor`` fuses elementwise kernels; it needs a C++ compiler on
the CPU), three more contenders show what fusing the penalty's kernels gains:

* ``compiled step``: ``step`` with the loss (forward and cross-entropy, and so their backward)
  compiled by ``torch.compile``;
* ``compiled step + penalty``: the same with ``reg.penalty()`` in the compiled loss;
* ``step + compiled add_penalty_grad``: ``step + add_penalty_grad`` with
  ``torch.compile(reg.add_penalty_grad)``.

With ``--fused-floor`` (CPU only), two more contenders time a penalty fused by hand in C++
(:mod:`benchmarks.fused_penalty`, built on first use; it needs a C++ compiler and ``ninja``):
the least any implementation of the penalty can add to a step, since each reads θ, μ and A once:

* ``step + fused penalty (C++)``: ``step + penalty`` with the penalty node's forward as one
  loop that writes λA(θ − μ) and the value;
* ``step + fused add_penalty_grad (C++)``: ``step + add_penalty_grad`` as one loop that adds
  λA(θ − μ) to ``.grad``.

Their value and gradients are checked against ``reg.penalty()``'s before timing.

The ``operators`` column counts the ATen operators one call dispatches, views apart
(:class:`benchmarks.host_overhead.OperatorCount`): on a GPU, where a step of this small model is
launch-bound, that count rather than the memory traffic decides the penalty's share.

Run: ``python -m benchmarks.penalty_speed [--repeats 300] [--threads 1 2] [--device cpu]
[--compile inductor] [--fused-floor]``;
writes ``benchmarks/results/penalty_speed.md``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F

import ewc_reg
from ewc_reg import EWCRegularizer

from . import fused_penalty
from ._reports import at_least, command_line, cpu_name, device_name, keeping_threads, write_report
from .host_overhead import OperatorCount
from .models import split_mnist_mlp

try:
    import resource
except ImportError:  # (not on Windows)
    resource = None

RESULTS = Path(__file__).parent / "results" / "penalty_speed.md"
ALLOCATOR_VARIABLES = ("MALLOC_", "GLIBC_TUNABLES", "LD_PRELOAD")


def page_faults() -> int:
    """Minor page faults of this process so far (0 where ``resource`` is missing)."""
    return 0 if resource is None else resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def allocator_settings() -> str:
    """The environment variables that change the C allocator, or the glibc defaults."""
    found = sorted(f"{k}={v}" for k, v in os.environ.items() if k.startswith(ALLOCATOR_VARIABLES))
    return " ".join(f"`{item}`" for item in found) or "none set (the C library's defaults)"


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


def measure(
    repeats: int,
    batch_size: int,
    device: torch.device,
    compile_backend: str | None = None,
    fused_floor: bool = False,
) -> dict[str, tuple[float, float, int | None]]:
    """Median seconds, median minor page faults and computing operators (of one call after a
    warm-up call; ``None`` for compiled code, which runs its own fused kernels) of each
    contender (see the module docstring); the compiled ones with ``compile_backend``, the
    C++ ones with ``fused_floor``."""
    torch.manual_seed(0)
    model = split_mnist_mlp().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.rand(batch_size, 1, 28, 28, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device)
    reg = EWCRegularizer(model, strength=1e5, method="exact")
    reg.consolidate([(x, y)], output_fn=lambda out: out[:, :2])

    def task_loss(with_penalty: bool) -> torch.Tensor:
        loss = F.cross_entropy(model(x)[:, :2], y)
        return loss + reg.penalty() if with_penalty else loss

    def step(
        penalty: str | None = None,
        loss_fn: Callable[[bool], torch.Tensor] = task_loss,
        add_grad: Callable[[], None] = reg.add_penalty_grad,
    ) -> None:
        loss = loss_fn(penalty == "in the loss")
        optimizer.zero_grad()
        loss.backward()
        if penalty == "gradient":
            add_grad()
        optimizer.step()

    def penalty_only() -> None:
        optimizer.zero_grad()
        reg.penalty().backward()

    operands = [*model.parameters(), *reg.fisher.values(), *reg.anchor.values()]

    def read_once() -> None:
        with torch.no_grad():
            torch._foreach_norm(operands)

    contenders = {
        "step": step,
        "step + penalty": lambda: step("in the loss"),
        "step + add_penalty_grad": lambda: step("gradient"),
        "penalty": penalty_only,
        "read θ, μ, A once": read_once,
    }
    compiled = {}
    if compile_backend is not None:
        loss_fn = torch.compile(task_loss, backend=compile_backend)
        add_grad = torch.compile(reg.add_penalty_grad, backend=compile_backend)
        compiled = {
            "compiled step": lambda: step(loss_fn=loss_fn),
            "compiled step + penalty": lambda: step("in the loss", loss_fn=loss_fn),
            "step + compiled add_penalty_grad": lambda: step("gradient", add_grad=add_grad),
        }
    operators: dict[str, int | None] = {}
    for name, fn in contenders.items():
        fn()
        with OperatorCount() as counter:
            fn()
        operators[name] = counter.total - counter.views
    if fused_floor:  # (their kernel's work is no ATen operator: not counted either)
        compiled.update(_fused_contenders(model, reg, step, x, y))
    for name, fn in compiled.items():
        fn()  # compiles
        operators[name] = None
    contenders.update(compiled)
    time_once = _timer(device)
    times: dict[str, list[float]] = {name: [] for name in contenders}
    faults: dict[str, list[int]] = {name: [] for name in contenders}
    warmup = max(repeats // 10, 3)
    names = list(contenders)
    for i in range(repeats + warmup):
        for name in names if i % 2 == 0 else names[::-1]:
            fn = contenders[name]
            before = page_faults()
            t = time_once(fn)
            if i >= warmup:
                times[name].append(t)
                faults[name].append(page_faults() - before)
    return {
        name: (statistics.median(times[name]), statistics.median(faults[name]), operators[name])
        for name in contenders
    }


def _fused_contenders(
    model: torch.nn.Module,
    reg: EWCRegularizer,
    step: Callable[..., None],
    x: torch.Tensor,
    y: torch.Tensor,
) -> dict[str, Callable[[], None]]:
    """The ``--fused-floor`` contenders (module docstring), after checking that the fused
    penalty gives ``reg.penalty()``'s value and gradients."""
    names, params = map(list, zip(*model.named_parameters()))
    state = reg.state_dict()
    precision = [state["fisher"][name].contiguous() for name in names]
    center = [state["anchor"][name].contiguous() for name in names]
    offset = float(state["offset"])

    def fused_value() -> torch.Tensor:
        return fused_penalty.FusedPenalty.apply(reg.strength, offset, precision, center, *params)

    def task_loss(with_penalty: bool) -> torch.Tensor:
        loss = F.cross_entropy(model(x)[:, :2], y)
        return loss + fused_value() if with_penalty else loss

    def add_grad() -> None:
        fused_penalty.add_grad(params, precision, center, reg.strength)

    def check() -> None:
        expected_value = reg.penalty()
        expected = torch.autograd.grad(expected_value, params)
        value = fused_value()
        got = torch.autograd.grad(value, params)
        torch.testing.assert_close(value, expected_value, rtol=1e-5, atol=0)
        for g, e in zip(got, expected):
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())
        for p in params:
            p.grad = torch.zeros_like(p)
        add_grad()
        for p, e in zip(params, expected):
            torch.testing.assert_close(p.grad, e, rtol=1e-5, atol=1e-6 * e.abs().max().item())

    check()
    return {
        "step + fused penalty (C++)": lambda: step("in the loss", loss_fn=task_loss),
        "step + fused add_penalty_grad (C++)": lambda: step("gradient", add_grad=add_grad),
    }


def report(
    results: dict[int, dict[str, tuple[float, float, int | None]]], args: argparse.Namespace
) -> str:
    """Markdown: one table per thread count, with the overhead and the verdict."""
    compile_flag = f" --compile {args.compile}" if args.compile else ""
    compile_flag += " --fused-floor" if args.fused_floor else ""
    lines = [
        "# Penalty cost in an Adam step (Split MNIST MLP)",
        "",
        f"`python -m benchmarks.penalty_speed --repeats {args.repeats} --threads "
        f"{' '.join(map(str, args.threads))} --batch-size {args.batch_size} --device "
        f"{args.device}{compile_flag}` · ewc_reg {ewc_reg.__version__} · torch "
        f"{torch.__version__} · {cpu_name()} ({os.cpu_count()} logical CPUs) · "
        f"{date.today()} · medians of {args.repeats} interleaved repeats",
        "",
        f"Allocator settings: {allocator_settings()}.",
    ]
    for threads, medians in results.items():
        step = medians["step"][0]
        overhead = medians["step + penalty"][0] / step - 1
        gradient = medians["step + add_penalty_grad"][0] / step - 1
        alone = medians["penalty"][0] / step
        floor = medians["read θ, μ, A once"][0] / step
        verdict = "pass" if max(overhead, alone) <= 0.10 else "FAIL"
        lines += [
            "",
            f"## {threads} thread{'s' if threads > 1 else ''}",
            "",
            "| contender | median ms | ratio to step | page faults | operators |",
            "|---|---:|---:|---:|---:|",
        ]
        for name, (seconds, faults, ops) in medians.items():
            counted = "—" if ops is None else ops
            lines.append(
                f"| {name} | {seconds * 1e3:.3f} | {seconds / step:.3f} | {faults:g} | {counted} |"
            )
        lines += [
            "",
            f"Added by the penalty: {overhead:.1%} of a step (step + penalty vs step); penalty "
            f"and its backward alone: {alone:.1%}. Target ≤ 10%: {verdict}. Reading θ, μ and A "
            f"once takes {floor:.1%}. The same gradient by `add_penalty_grad()` (no graph, no "
            f"value) added {_against_target(gradient)}.",
        ]
        if "compiled step" in medians:
            fused = medians["compiled step + penalty"][0] / medians["compiled step"][0] - 1
            fused_gradient = medians["step + compiled add_penalty_grad"][0] / step - 1
            lines += [
                "",
                f"Compiled with `{args.compile}`: the penalty in the compiled loss added "
                f"{fused:.1%} to the compiled step; the compiled `add_penalty_grad()` added "
                f"{_against_target(fused_gradient)} to the step.",
            ]
        if "step + fused penalty (C++)" in medians:
            node = medians["step + fused penalty (C++)"][0] / step - 1
            by_hand = medians["step + fused add_penalty_grad (C++)"][0] / step - 1
            lines += [
                "",
                f"Fused by hand in C++ (one pass over θ, μ and A): the penalty in the loss added "
                f"{_against_target(node)} to the step, `add_penalty_grad` "
                f"{_against_target(by_hand)}.",
            ]
    return "\n".join(lines) + "\n"


def _against_target(share: float) -> str:
    """``share`` of a step, and how it stands to the 10% target: ``12.3% (> 10%)``."""
    return f"{share:.1%} ({'≤' if share <= 0.10 else '>'} 10%)"


def main(argv: list[str] | None = None) -> str:
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument("--repeats", type=at_least(1), default=300)
    parser.add_argument("--threads", type=at_least(1), nargs="+", default=[1, 2])
    parser.add_argument("--batch-size", type=at_least(1), default=128)
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--compile",
        metavar="BACKEND",
        help="also time the step and add_penalty_grad compiled by torch.compile with this "
        "backend (inductor fuses kernels)",
    )
    parser.add_argument(
        "--fused-floor",
        action="store_true",
        help="also time the penalty fused by hand in C++ (CPU; built on first use, needs a C++ "
        "compiler and ninja)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    if args.fused_floor:
        if args.device != "cpu":
            parser.error("argument --fused-floor: the C++ kernel runs on the CPU only")
        try:
            fused_penalty.kernel()
        except fused_penalty.BuildError as error:
            parser.error(f"argument --fused-floor: {error}")
    results = {}
    with keeping_threads():
        for threads in args.threads:
            torch.set_num_threads(threads)
            results[threads] = measure(
                args.repeats,
                args.batch_size,
                torch.device(args.device),
                args.compile,
                args.fused_floor,
            )
    return write_report(report(results, args), args.out)


if __name__ == "__main__":
    main()
