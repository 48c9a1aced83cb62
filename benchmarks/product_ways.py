"""Which way of forming the squared per-sample products is faster, and which the engine picks.

A convolution's weight sums :math:`\\sum_{n,k} (G_{nk} U_n^\\top)^{\\odot 2}` come from
``ewc_reg.engines.rules.squared_products``, directly (the per-sample products in one batched
matmul, squared and summed) or through Gram matrices over pairs of output positions; its
``_gram_is_faster`` picks one from estimated costs (``MATMUL_SPEEDUP``, ``DIRECT_PASSES``,
``GRAM_PASSES``). A ``Linear`` on ``(B, S, in)`` inputs either forms its own per-sample products
or hands its sums to ``squared_products`` (``_squared_products_are_faster``:
``LINEAR_GRAM_COST``, ``LINEAR_GRAM_READS``). This benchmark times both ways on a grid of
shapes (random gradients and inputs; each way once untimed, then ``--repeats`` rounds in
alternating order; medians: ``_timing.side_by_side``) and reports, per shape, the faster way
and the one picked, and in all how often the pick was the faster and how much time the other
picks lose. Those constants were fitted to its shapes (session 23).

Run: ``python -m benchmarks.product_ways [--repeats 7] [--threads 2] [--device cpu]
[--quick] [--out FILE]``; writes ``benchmarks/results/product_ways.md``, or ``--out``; a
``--quick`` smoke test writes only where ``--out`` says (it would replace the grid's table).
"""

from __future__ import annotations

import argparse
import itertools
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from unittest import mock

import torch

import ewc_reg
from ewc_reg.engines import rules
from ewc_reg.engines.convolution import _patches

from ._reports import machine, timing_main
from ._timing import side_by_side

RESULTS = Path(__file__).parent / "results" / "product_ways.md"
BUDGET = 2**28  # (bytes: the rules' own chunk cap decides on the CPU)


@dataclass(frozen=True)
class Shape:
    """One layer's sums: ``K`` vectors, ``B`` samples, ``O`` outputs, ``P`` patch numbers
    (inputs times kernel taps), ``L`` positions; ``kernel`` for a convolution (square, stride
    1, padded to keep its size), 0 for a ``Linear`` (``L`` is then its sequence length)."""

    family: str
    vectors: int
    batch: int
    out: int
    patch: int
    positions: int
    kernel: int = 0


@dataclass(frozen=True)
class Timed:
    """One shape's medians of its two ways and whether the engine picks the second."""

    shape: Shape
    first: float  # ms: the direct way (convolution) or the Linear's own products
    second: float  # ms: the Gram way (convolution) or squared_products (Linear)
    picked_second: bool

    @property
    def lost(self) -> float:
        """What the pick loses against the faster way, in ms."""
        picked = self.second if self.picked_second else self.first
        return picked - min(self.first, self.second)


def shapes(quick: bool) -> Iterator[Shape]:
    """The grid: 3x3 and 1x1 convolutions, K=9 and (3x3 only) K=3, 16 to 256 channels, 2x2 to
    6x6 outputs, B=32; ``Linear`` layers with K=9 and B=128, S from 4 to 32, 64 or 256 features
    each side, and K=944 (an LM's exact Fisher) with B=8 and fewer shapes."""
    if quick:
        yield Shape("convolution", 3, 4, 4, 36, 4, kernel=3)
        yield Shape("convolution", 3, 4, 4, 4, 9, kernel=1)
        yield Shape("Linear", 3, 4, 8, 8, 4)
        return
    for vectors, kernel, channels, side in itertools.product(
        (9, 3), (3, 1), (16, 32, 64, 128, 256), range(2, 7)
    ):
        if vectors == 9 or kernel == 3:
            patch = channels * kernel * kernel
            yield Shape("convolution", vectors, 32, channels, patch, side * side, kernel)
    for vectors, positions, out, features in itertools.product(
        (9, 944), (4, 8, 16, 32), (64, 256), (64, 256)
    ):
        if vectors == 9 or positions <= 8 or out == features == 64:
            yield Shape("Linear", vectors, 128 if vectors == 9 else 8, out, features, positions)


def _ways(shape: Shape, device: torch.device) -> tuple[Callable[[], object], ...]:
    """The two ways of ``shape``'s sums, as calls: the direct way and the Gram way of a
    convolution, or a ``Linear``'s own products and ``squared_products``."""
    k, b, o, p, length = shape.vectors, shape.batch, shape.out, shape.patch, shape.positions
    if shape.family == "Linear":
        grads = torch.randn(b, k, length, o, device=device).transpose(0, 1)  # (the storage's)
        x = torch.randn(b, length, p, device=device)

        def linear(second: bool) -> object:
            constants = (0, 0) if second else (10**12, 0)
            with mock.patch.multiple(
                rules, LINEAR_GRAM_COST=constants[0], LINEAR_GRAM_READS=constants[1]
            ):
                return rules._linear_weight(grads, x, BUDGET)

        return (lambda: linear(False), lambda: linear(True))
    channels = p // (shape.kernel * shape.kernel)
    side = int(length**0.5)
    pad = shape.kernel // 2
    x = torch.randn(b, channels, side + 2 * pad, side + 2 * pad, device=device)
    grads = torch.randn(b, k, o, length, device=device).transpose(0, 1).unsqueeze(2)
    settings = ((shape.kernel,) * 2, (1, 1), (1, 1))

    def patches_of(chunk: slice) -> torch.Tensor:
        cut = _patches(x[chunk], *settings)
        return cut.view(cut.shape[0], 1, p, -1)

    def convolution(gram: bool) -> object:
        with mock.patch.object(rules, "_gram_is_faster", lambda *args: gram):
            return rules.squared_products(grads, patches_of, p, BUDGET)

    return (lambda: convolution(False), lambda: convolution(True))


def _picks_second(shape: Shape) -> bool:
    """Whether the engine takes the second way for ``shape``."""
    args = (shape.vectors, shape.out, shape.patch, shape.positions)
    if shape.family == "Linear":
        return rules._squared_products_are_faster(*args)
    return rules._gram_is_faster(*args)


def run(repeats: int, threads: int, device: torch.device, quick: bool) -> list[Timed]:
    """Each shape's two ways timed (medians in ms) with the engine's pick."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    results = []
    for shape in shapes(quick):
        first, second = _ways(shape, device)
        timed = side_by_side({"first": first, "second": second}, repeats, device)
        ms = {name: 1e3 * seconds for name, (seconds, _) in timed.items()}
        results.append(Timed(shape, ms["first"], ms["second"], _picks_second(shape)))
    return results


def report(results: list[Timed], args: argparse.Namespace) -> str:
    """Markdown: a table per family of layers and a summary line under each."""
    device = torch.device(args.device)
    lines = [
        "# The two ways of the squared per-sample products: faster and picked",
        "",
        f"`python -m benchmarks.product_ways --repeats {args.repeats} --threads {args.threads} "
        f"--device {args.device}{' --quick' * args.quick}` · ewc_reg {ewc_reg.__version__} · "
        f"torch {torch.__version__} · {machine(device)} · {date.today()} · float32 · medians "
        f"of {args.repeats} rounds, order alternating, in ms",
        "",
        f"Constants: MATMUL_SPEEDUP {rules.MATMUL_SPEEDUP}, DIRECT_PASSES {rules.DIRECT_PASSES}, "
        f"GRAM_PASSES {rules.GRAM_PASSES}, LINEAR_GRAM_COST {rules.LINEAR_GRAM_COST}, "
        f"LINEAR_GRAM_READS {rules.LINEAR_GRAM_READS}.",
    ]
    names = {"convolution": ("direct", "Gram"), "Linear": ("own products", "squared_products")}
    for family, (first, second) in names.items():
        rows = [r for r in results if r.shape.family == family]
        if not rows:
            continue
        kernel = " kernel |" if family == "convolution" else ""
        lines += [
            "",
            f"## {family}",
            "",
            f"| K | B |{kernel} O | P | L | {first} | {second} | faster | picked | lost |",
            "|---:|---:|" + "---:|" * (5 + bool(kernel)) + "---|---|---:|",
        ]
        for r in rows:
            s = r.shape
            faster = second if r.second < r.first else first
            picked = second if r.picked_second else first
            cells = [s.vectors, s.batch, *([s.kernel] if kernel else []), s.out, s.patch]
            lines.append(
                "| " + " | ".join(map(str, cells)) + f" | {s.positions} | {r.first:.2f} | "
                f"{r.second:.2f} | {faster} | {picked} | {r.lost:.2f} |"
            )
        right = sum(r.lost == 0 for r in rows)
        best = sum(min(r.first, r.second) for r in rows)
        lost = sum(r.lost for r in rows)
        lines += [
            "",
            f"Picked the faster way in {right} of {len(rows)} shapes; the other picks lose "
            f"{lost:.1f} ms against {best:.1f} ms for the faster ways of all shapes.",
        ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark ``argv`` asks for (:func:`._reports.timing_main`)."""
    quick = "three tiny shapes: a smoke test, written only where --out says"
    return timing_main(argv, __spec__.name, __doc__, 7, quick, RESULTS, run, report)


if __name__ == "__main__":
    main()
