"""Speed of the Fisher of timm models with the rules for timm's own layers, against the same
engine with those rules removed (the per-module ``torch.func`` fallback they replace).

Run from the repository root (needs ``timm``, an optional import: ``pip install --no-deps timm``
beside the pinned torch)::

    python -m benchmarks.timm_speed               # writes benchmarks/results/timm_speed.md
    python -m benchmarks.timm_speed --models mobilenetv3_small_050 --batch-size 8 --repeats 3

For each model (``timm.create_model(name, num_classes=10)``, eval mode, float32, random
``(B, 3, S, S)`` images and labels) and each of ``exact`` and ``empirical``, the hooks engine
runs with the rules for timm's layers (:func:`rule_names`: its ``Linear``, norms, layer scales
and the norm-activation layers of :mod:`ewc_reg.engines.norm_act`) and without them, side by
side in one process, the order reversed every other round (medians; one call of each first,
which pays the checks). The two Fisher diagonals are compared (max relative difference over
the parameters, of those whose largest entry is at least 1e-12 of the largest of all: a bias
before a softmax has a Fisher of 0 but for rounding, which differs between the two)."""

from __future__ import annotations

import argparse
import statistics
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from datetime import date
from importlib import metadata
from pathlib import Path

import torch

from ewc_reg import fisher_diagonal
from ewc_reg.engines import rules

from ._reports import keeping_threads, machine, write_report

RESULTS = Path(__file__).parent / "results" / "timm_speed.md"
MODELS = (
    "mobilenetv3_small_050",
    "resnetv2_18",
    "efficientnet_b0",
    "regnetx_002",
    "swiftformer_xs",
    "deit3_small_patch16_224",
)
#: Models whose size of images is a setting (made for the benchmark's size).
SIZED = ("deit3", "vit", "cait", "eva", "levit")


def rule_names() -> list[str]:
    """The qualified names of timm's layers in :data:`ewc_reg.engines.rules.RULES`."""
    return [name for name in rules.RULES if isinstance(name, str) and name.startswith("timm.")]


@contextmanager
def without_timm_rules() -> Iterator[None]:
    """Inside the block, timm's layers have no rule (the per-module fallback)."""
    removed = {name: rules.RULES.pop(name) for name in rule_names()}
    try:
        yield
    finally:
        rules.RULES.update(removed)


def fisher(
    model: torch.nn.Module, data: list, method: str, rules_on: bool
) -> dict[str, torch.Tensor]:
    """The model's Fisher with timm's rules on, or off (:func:`without_timm_rules`)."""
    with nullcontext() if rules_on else without_timm_rules():
        return fisher_diagonal(model, data, method)


def run(models: list[str], batch_size: int, size: int, repeats: int, threads: int) -> list[str]:
    import timm  # (optional: only this benchmark needs it)

    torch.set_num_threads(threads)
    rows = []
    for name in models:
        torch.manual_seed(0)
        sized = {"img_size": size} if name.startswith(SIZED) else {}
        model = timm.create_model(name, pretrained=False, num_classes=10, **sized).eval()
        x = torch.randn(batch_size, 3, size, size)
        data = [(x, torch.randint(0, 10, (batch_size,)))]
        for method in ("exact", "empirical"):
            times: dict[bool, list[float]] = {True: [], False: []}
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                # (the first call of each pays the checks)
                found = {on: fisher(model, data, method, on) for on in (True, False)}
            for r in range(repeats):
                for rules_on in (True, False) if r % 2 == 0 else (False, True):
                    start = time.perf_counter()
                    fisher(model, data, method, rules_on)
                    times[rules_on].append(time.perf_counter() - start)
            on, off = statistics.median(times[True]), statistics.median(times[False])
            largest = max(f.abs().max().item() for f in found[False].values())
            diff = max(
                (
                    (found[True][k] - found[False][k]).abs().max() / found[False][k].abs().max()
                ).item()
                for k in found[False]
                if found[False][k].abs().max().item() >= 1e-12 * largest
            )
            rows.append(
                f"| {name} | `{method}` | {on:.3f} | {off:.3f} | {on / off:.2f} | {diff:.1e} |"
            )
            print(rows[-1], flush=True)
    return rows


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated timm names")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown file to write")
    args = parser.parse_args(argv)
    if min(args.batch_size, args.image_size, args.repeats, args.threads) < 1:
        parser.error("--batch-size, --image-size, --repeats and --threads must be at least 1")
    with keeping_threads():
        rows = run(
            args.models.split(","), args.batch_size, args.image_size, args.repeats, args.threads
        )
    table = "\n".join(
        [
            "# Fisher speed of timm models: timm's layers on rules, or on the per-module fallback",
            "",
            f"{date.today()} · {machine(torch.device('cpu'))} · torch {torch.__version__} · "
            f"timm {metadata.version('timm')} · {args.threads} threads · float32 · C=10 · "
            f"B={args.batch_size} · {args.image_size}x{args.image_size} images · "
            f"medians of {args.repeats}",
            "",
            "| model | method | rules (s) | fallback (s) | rules / fallback | max rel. diff |",
            "|---|---|---:|---:|---:|---:|",
            *rows,
            "",
        ]
    )
    return write_report(table, args.out)


if __name__ == "__main__":
    main()
