"""Paper-style table and accuracy-vs-λ figure from ``runs.jsonl``.

Usage::

    python -m benchmarks.report [RESULTS_DIR ...]

Each directory's ``runs.jsonl`` is grouped by configuration (benchmark, data, iterations, batch
size). For each configuration the best λ of every variant is the one with the highest mean
accuracy over seeds; ``results.md`` gets a table of mean ± standard error at that λ beside the
paper's numbers, plus the whole λ grid, and ``accuracy_vs_lambda_<config>.png`` one line per
variant (``none`` as a horizontal band). Without arguments, every directory under
``benchmarks/results`` that holds a ``runs.jsonl`` is reported.
"""

from __future__ import annotations

import argparse
import math
import statistics
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .protocol import LAMBDA_GRID, VARIANTS, read_runs

#: van de Ven (2025), Table 1: mean ± SE over 30 seeds at the best λ.
PAPER_ACCURACY = {
    "split_mnist": {
        "exact": (99.12, 0.16), "exact_n500": (98.93, 0.15), "sample": (99.12, 0.12),
        "empirical": (99.12, 0.12), "batched": (99.11, 0.16), "none": (85.41, 0.88),
    },
    "split_cifar10": {
        "exact": (84.91, 0.65), "exact_n500": (84.57, 0.72), "sample": (83.77, 0.72),
        "empirical": (83.28, 0.77), "batched": (83.38, 0.66), "none": (69.53, 1.34),
    },
}

#: The paper's iterations per task and batch size: its columns are shown beside runs of these.
PAPER_SETTINGS = {"split_mnist": (2000, 128), "split_cifar10": (2000, 256)}

#: Best λ ranges read off the paper's figures (approximate).
PAPER_BEST_LAMBDA = {
    "exact": "1e5–1e6", "exact_n500": "1e5–1e6", "sample": "1e8–1e9",
    "empirical": "1e8–1e9", "batched": "1e11–1e12", "none": "–",
}

LABELS = {
    "exact": "EXACT", "exact_n500": "EXACT (n=500)", "sample": "SAMPLE",
    "empirical": "EMPIRICAL", "batched": "BATCHED", "none": "None",
}

Config = tuple[str, str, int, int]  # benchmark, data, iters, batch_size


@dataclass(frozen=True)
class Stats:
    """Accuracy over seeds at one (variant, λ), with mean run times."""

    mean: float
    se: float  # NaN with a single seed
    n: int
    seconds: float  # wall clock, training + Fisher
    fisher_seconds: float
    cpu_seconds: float  # process CPU time (NaN for records without it)
    fisher_cpu_seconds: float
    by_seed: dict[int, float]  # accuracy of each seed

    @classmethod
    def of(cls, records: list[dict[str, Any]]) -> Stats:
        """Statistics of the records of one (variant, λ), one per seed."""
        acc = [r["accuracy"] for r in records]
        n = len(acc)
        mean = sum(acc) / n
        se = math.sqrt(sum((a - mean) ** 2 for a in acc) / (n - 1) / n) if n > 1 else math.nan

        def average(field: str) -> float:
            values = [r[field] for r in records if field in r]
            return sum(values) / len(values) if values else math.nan

        return cls(mean, se, n, average("seconds"), average("fisher_seconds"),
                   average("cpu_seconds"), average("fisher_cpu_seconds"),
                   {int(r["seed"]): r["accuracy"] for r in records})

    def text(self) -> str:
        """``mean ± se``."""
        se = "–" if math.isnan(self.se) else f"{self.se:.2f}"
        return f"{self.mean:.2f} ± {se}"


Summary = dict[str, dict[float | None, Stats]]  # variant -> λ -> stats


def group(records: Iterable[dict[str, Any]]) -> dict[Config, Summary]:
    """Statistics per configuration, variant and λ (the last record of a run wins)."""
    runs: dict[Config, dict[tuple[str, float | None], dict[int, dict[str, Any]]]] = (
        defaultdict(lambda: defaultdict(dict)))
    for r in records:
        config = (r["benchmark"], r["data"], int(r["iters"]), int(r["batch_size"]))
        runs[config][(r["method"], r["strength"])][int(r["seed"])] = r
    summaries: dict[Config, Summary] = {}
    for config, cells in runs.items():
        summary: Summary = defaultdict(dict)
        for (method, strength), by_seed in cells.items():
            summary[method][strength] = Stats.of(list(by_seed.values()))
        summaries[config] = {m: dict(sorted(summary[m].items(), key=lambda kv: kv[0] or 0))
                             for m in VARIANTS if m in summary}
    return summaries


def selection_seeds(per_lambda: dict[float | None, Stats]) -> set[int]:
    """The seeds run at every λ: those :func:`best` chooses λ on."""
    return set.intersection(*(set(stats.by_seed) for stats in per_lambda.values()))


def best(per_lambda: dict[float | None, Stats]) -> tuple[float | None, Stats]:
    """The λ with the highest mean accuracy over the seeds run at every λ
    (:func:`selection_seeds`), and its statistics over all its seeds.

    Selecting on the common seeds keeps the choice fair when some λ have extra seeds (added by
    ``--at-best-lambda``), and stable: adding seeds at the chosen λ cannot move it. The choice
    is made on test accuracy, as the paper's is (over its 30 seeds): the accuracy of those
    seeds at the chosen λ is biased upwards, that of seeds added afterwards is not
    (:func:`held_out_text`).
    """
    common = selection_seeds(per_lambda)

    def score(stats: Stats) -> float:
        if not common:
            return stats.mean
        return sum(stats.by_seed[seed] for seed in common) / len(common)

    return max(per_lambda.items(), key=lambda kv: score(kv[1]))


def held_out_text(per_lambda: dict[float | None, Stats], stats: Stats) -> str:
    """``mean (n)`` of the seeds run at the chosen λ that did not choose it (added by
    ``--at-best-lambda``), ``–`` if none; for a variant without λ (``none``), ``–``; and
    where no seed ran at every λ, when all seeds chose (:func:`best`), ``–``."""
    common = selection_seeds(per_lambda)
    if len(per_lambda) < 2 or not common:
        return "–"
    held = [acc for seed, acc in stats.by_seed.items() if seed not in common]
    return f"{sum(held) / len(held):.2f} ({len(held)})" if held else "–"


def _lambda_text(strength: float | None) -> str:
    if strength is None:
        return "–"
    if strength > 0 and math.log10(strength).is_integer():
        return f"1e{int(math.log10(strength))}"
    return f"{strength:g}"


def _seconds_text(total: float, fisher: float) -> str:
    return "–" if math.isnan(total) else f"{total:.0f} ({fisher:.0f})"


def lambda_axis(summary: Summary) -> tuple[float, float]:
    """The figure's λ axis: the paper's grid, widened to every λ run (``--lambdas`` takes any
    λ > 0: one outside the grid was drawn off the axis), a factor 3 beyond each end."""
    strengths = [s for per_lambda in summary.values() for s in per_lambda if s is not None]
    return min([*LAMBDA_GRID, *strengths]) / 3, max([*LAMBDA_GRID, *strengths]) * 3


def slug(config: Config) -> str:
    """File-name tag of a configuration."""
    benchmark, data, iters, batch_size = config
    return f"{benchmark}_{data}_{iters}it_b{batch_size}"


def markdown(config: Config, summary: Summary, figure: str) -> str:
    """The results section of one configuration."""
    benchmark, data, iters, batch_size = config
    as_paper = data == "real" and PAPER_SETTINGS.get(benchmark) == (iters, batch_size)
    paper = PAPER_ACCURACY.get(benchmark, {}) if as_paper else {}
    lines = [
        f"## {benchmark} — {data} data, {iters} iterations/task, batch {batch_size}",
        "",
    ]
    if data != "real":
        lines += ["**Synthetic smoke data: these accuracies say nothing about the paper.**", ""]
    elif not paper:
        lines += ["Not the paper's iterations and batch size: its columns are left out.", ""]
    lines += [
        "| Variant | best λ | accuracy (mean ± SE) | seeds | held-out seeds (n) "
        "| wall s/run (Fisher) | CPU s/run (Fisher) | paper best λ | paper (30 seeds) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, per_lambda in summary.items():
        strength, stats = best(per_lambda)
        ref = paper.get(method)
        ref_text = "–" if ref is None else f"{ref[0]:.2f} ± {ref[1]:.2f}"
        lines.append(
            f"| {LABELS[method]} | {_lambda_text(strength)} | {stats.text()} | {stats.n} "
            f"| {held_out_text(per_lambda, stats)} "
            f"| {_seconds_text(stats.seconds, stats.fisher_seconds)} "
            f"| {_seconds_text(stats.cpu_seconds, stats.fisher_cpu_seconds)} "
            f"| {PAPER_BEST_LAMBDA[method] if paper else '–'} | {ref_text} |"
        )
    lines += [
        "",
        "λ is chosen on test accuracy, as in the paper (no validation split): the best λ of a "
        "variant has the highest mean over the seeds run at every λ, so its accuracy over "
        "those seeds is biased upwards (by noise where the curve is flat). Seeds added at the "
        "chosen λ afterwards (`--at-best-lambda`) did not choose it: 'held-out seeds' is "
        "their mean.",
    ]
    strengths = sorted({s for m in summary.values() for s in m if s is not None})
    methods = [m for m in summary if m != "none"]
    if strengths and methods:
        lines += [
            "",
            "Mean accuracy (number of seeds) at every λ run so far:",
            "",
            "| λ | " + " | ".join(LABELS[m] for m in methods) + " |",
            "|---|" + "---|" * len(methods),
        ]
        for s in strengths:
            cells = [f"{summary[m][s].mean:.2f} ({summary[m][s].n})" if s in summary[m] else ""
                     for m in methods]
            lines.append(f"| {_lambda_text(s)} | " + " | ".join(cells) + " |")
    lines += ["", f"![accuracy vs λ]({figure})", ""]
    return "\n".join(lines)


def plot(config: Config, summary: Summary, path: Path) -> None:
    """Accuracy (mean ± SE) against λ, one line per variant, ``none`` as a band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for method, per_lambda in summary.items():
        if method == "none":
            stats = per_lambda[None]
            se = 0.0 if math.isnan(stats.se) else stats.se
            ax.axhspan(stats.mean - se, stats.mean + se, color="grey", alpha=0.3)
            ax.axhline(stats.mean, color="grey", ls="--", label=f"{LABELS[method]} (no EWC)")
            continue
        xs = list(per_lambda)
        means = [per_lambda[s].mean for s in xs]
        ses = [0.0 if math.isnan(per_lambda[s].se) else per_lambda[s].se for s in xs]
        ax.errorbar(xs, means, yerr=ses, marker="o", ms=4, capsize=2, label=LABELS[method])
    ax.set_xscale("log")
    ax.set_xlim(*lambda_axis(summary))
    ax.set_xlabel("λ (EWC strength)")
    ax.set_ylabel("mean test accuracy over tasks (%)")
    benchmark, data, iters, batch_size = config
    ax.set_title(f"{benchmark} ({data} data, {iters} it/task, batch {batch_size})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def devices_line(records: list[dict[str, Any]]) -> str:
    """Where the runs ran, with the median seconds per run on each device (runs mixing devices
    differ only in random streams, not in the protocol)."""
    by_device: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in records:
        by_device[f"{r.get('device', '?')} (torch {r.get('torch', '?')})"].append(r)
    parts = []
    for device, runs in sorted(by_device.items()):
        wall = statistics.median(r["seconds"] for r in runs)
        cpu = [r["cpu_seconds"] for r in runs if "cpu_seconds" in r]
        cpu_text = f", {statistics.median(cpu):.0f} s CPU" if cpu else ""
        parts.append(f"{device}: {len(runs)} runs, median {wall:.0f} s wall{cpu_text} per run")
    return "Devices: " + "; ".join(parts) + "."


def report(results_dir: Path) -> Path:
    """Write ``results.md`` and the figures of ``results_dir/runs.jsonl``; return the table."""
    records = read_runs(results_dir / "runs.jsonl")
    if not records:
        raise FileNotFoundError(f"no runs in {results_dir / 'runs.jsonl'}")
    sections = [
        f"# Results from `{results_dir.name}/runs.jsonl` ({len(records)} runs)",
        "",
        "Best λ per variant = highest mean accuracy over the seeds run at every λ of the "
        "variant (its other seeds then count in the accuracy); SE = standard "
        "error over seeds (the standard deviation with n − 1, over √n; the paper's script "
        "divides by n, which at 5 seeds gives 11% less); s/run = training + Fisher seconds "
        "per run at the best λ, wall clock and "
        "process CPU time (Fisher alone in brackets; CPU time is less affected by other load "
        "on the machine). "
        "Paper: van de Ven (2025), 30 seeds; its best λ are read off its figures.",
        "",
        devices_line(records),
        "",
    ]
    for config, summary in sorted(group(records).items()):
        figure = f"accuracy_vs_lambda_{slug(config)}.png"
        plot(config, summary, results_dir / figure)
        sections.append(markdown(config, summary, figure))
    table = results_dir / "results.md"
    table.write_text("\n".join(sections))
    return table


def main(argv: list[str] | None = None) -> None:
    """Command line: report each results directory."""
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="*", type=Path, help="results directories with runs.jsonl")
    args = p.parse_args(argv)
    dirs = args.dirs or sorted(p.parent for p in Path("benchmarks/results").glob("*/runs.jsonl"))
    for d in dirs:
        try:
            print(f"wrote {report(d)}")
        except FileNotFoundError as error:
            raise SystemExit(f"benchmarks.report: {error}") from None


if __name__ == "__main__":
    main()
