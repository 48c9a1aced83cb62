"""The shared protocol of the Split MNIST / Split CIFAR-10 benchmarks of van de Ven (2025).

Task-incremental learning with five tasks of two classes each:

* the class-to-task assignment is a random permutation of the ten classes per seed;
* one 10-unit output layer; a task uses only its two units (in training, in the Fisher
  computation through ``output_fn`` and at test time), with labels remapped to 0/1;
* Adam (0.9, 0.999), lr 0.001, never reset; ``iters`` iterations of random mini-batches per
  task; loss = mean cross-entropy + ``EWCRegularizer.penalty()`` over all parameters;
* online EWC with γ = 1: after every task but the last, ``consolidate`` on that task's training
  set (model in eval mode, done by the library);
* score: after the last task, the mean over tasks of the test accuracy with each task's units.

This module also holds the command line shared by ``benchmarks.split_mnist`` and
``benchmarks.split_cifar10`` (parallel runs, resumable ``runs.jsonl``, progress with ETA).
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor, as_completed
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import ewc_reg
from ewc_reg import EWCRegularizer

from ._reports import at_least, device_name, keeping_threads
from .data import ArrayData, DataUnavailable, default_root

NUM_CLASSES = 10
NUM_TASKS = 5

#: Benchmark variants: the paper's five Fisher estimators, plus ``none`` (no regularizer).
VARIANTS = ("exact", "exact_n500", "sample", "empirical", "batched", "none")


@dataclass(frozen=True)
class FisherSetting:
    """How a variant computes the Fisher: library ``method``, samples used, batch size."""

    method: str
    n_samples: int | None
    batch_size: int


FISHER_SETTINGS = {
    "exact": FisherSetting("exact", None, 256),
    "exact_n500": FisherSetting("exact", 500, 256),
    "sample": FisherSetting("sample", None, 256),
    "empirical": FisherSetting("empirical", None, 256),
    "batched": FisherSetting("batched", None, 128),  # mini-batches of 128, as in the paper
}

#: The paper's λ grid: 1, 10, ..., 1e13.
LAMBDA_GRID = tuple(10.0**k for k in range(14))

#: Centre (log10) of the best-λ range read off the paper's figures; sweeps run the λ values
#: nearest to it first so that partial results are already informative.
TYPICAL_LOG10_LAMBDA = {
    "exact": 5.5,
    "exact_n500": 5.5,
    "sample": 8.5,
    "empirical": 8.5,
    "batched": 11.5,
}

#: ``--quick`` preset: one seed, fewer iterations, one λ per variant (nearest the typical one).
QUICK_SEEDS = (0,)
QUICK_ITERS = 500

#: Where results go by default (see :func:`parse_args`): this repository's, beside this file.
RESULTS = Path(__file__).parent / "results"


@dataclass(frozen=True)
class Benchmark:
    """One benchmark: its network, data and default batch size."""

    name: str
    make_model: Callable[[], nn.Module]
    load_data: Callable[[str], ArrayData]
    synthetic_data: Callable[..., ArrayData]  # keyword train_per_class overrides its size
    batch_size: int


@dataclass(frozen=True)
class RunSpec:
    """One training run; its fields identify it in ``runs.jsonl``."""

    benchmark: str
    data: str  # "real" or "synthetic"
    method: str
    strength: float | None  # None for method "none"
    seed: int
    iters: int
    batch_size: int

    def key(self) -> tuple[Any, ...]:
        """Identity of the run (used to skip runs already recorded)."""
        return tuple(asdict(self).values())

    def describe(self) -> str:
        """Short human-readable label."""
        strength = "" if self.strength is None else f" λ={self.strength:.3g}"
        return f"{self.method}{strength} seed {self.seed}"


def record_key(record: dict[str, Any]) -> tuple[Any, ...]:
    """The :meth:`RunSpec.key` of a ``runs.jsonl`` record."""
    strength = record["strength"]
    return RunSpec(
        record["benchmark"], record["data"], record["method"],
        None if strength is None else float(strength), int(record["seed"]),
        int(record["iters"]), int(record["batch_size"]),
    ).key()


# ----------------------------------------------------------------------------- task split


def task_split(seed: int, num_classes: int = NUM_CLASSES, num_tasks: int = NUM_TASKS
               ) -> list[list[int]]:
    """Classes of each task: a seeded random permutation of the classes cut into equal parts."""
    perm = torch.randperm(num_classes, generator=torch.Generator().manual_seed(seed)).tolist()
    per_task = num_classes // num_tasks
    return [perm[t * per_task:(t + 1) * per_task] for t in range(num_tasks)]


def task_subset(x: Tensor, y: Tensor, classes: list[int]) -> tuple[Tensor, Tensor]:
    """The samples of ``classes``, with labels remapped to their position in ``classes``."""
    classes_t = torch.tensor(classes, device=y.device)
    match = y.unsqueeze(1) == classes_t.unsqueeze(0)  # (N, len(classes))
    keep = match.any(1)
    return x[keep], match[keep].long().argmax(1)


def head(classes: list[int], device: torch.device | str) -> Callable[[Tensor], Tensor]:
    """``output_fn`` that keeps the output units of ``classes`` (the task's head)."""
    index = torch.tensor(classes, device=device)

    def output_fn(out: Tensor) -> Tensor:
        return out.index_select(-1, index)

    return output_fn


# ----------------------------------------------------------------------- train / Fisher / test


def batch_indices(n: int, batch_size: int, iters: int, generator: torch.Generator
                  ) -> Iterator[Tensor]:
    """``iters`` index batches drawn epoch by epoch from fresh random permutations of ``n``
    (the last batch of an epoch may be smaller, as with a shuffling ``DataLoader``)."""
    perm, pos = torch.randperm(n, generator=generator), 0
    for _ in range(iters):
        if pos >= n:
            perm, pos = torch.randperm(n, generator=generator), 0
        yield perm[pos:pos + batch_size]
        pos += batch_size


def train_task(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    reg: EWCRegularizer | None,
    x: Tensor,
    y: Tensor,
    output_fn: Callable[[Tensor], Tensor],
    iters: int,
    batch_size: int,
    generator: torch.Generator,
) -> None:
    """``iters`` Adam steps on mean cross-entropy (+ the EWC penalty) over random batches."""
    model.train()
    for idx in batch_indices(len(y), batch_size, iters, generator):
        idx = idx.to(y.device)
        loss = F.cross_entropy(output_fn(model(x[idx])), y[idx])
        if reg is not None:
            loss = loss + reg.penalty()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def fisher_batches(x: Tensor, y: Tensor, batch_size: int, generator: torch.Generator
                   ) -> list[tuple[Tensor, Tensor]]:
    """The task's training set, shuffled, as a list of ``(inputs, targets)`` batches."""
    perm = torch.randperm(len(y), generator=generator).to(y.device)
    return [(x[i], y[i]) for i in perm.split(batch_size)]


@torch.no_grad()
def evaluate(model: nn.Module, x: Tensor, y: Tensor, output_fn: Callable[[Tensor], Tensor],
             batch_size: int = 1000) -> float:
    """Test accuracy (percent) of the task's head, model in eval mode."""
    model.eval()
    correct = sum(
        int((output_fn(model(xb)).argmax(1) == yb).sum())
        for xb, yb in zip(x.split(batch_size), y.split(batch_size))
    )
    return 100.0 * correct / len(y)


class Stopwatch:
    """Wall-clock and process CPU seconds accumulated per phase; waits for CUDA work at the
    phase boundaries so that GPU time is attributed to the right phase."""

    def __init__(self, device: torch.device | str) -> None:
        # (the device itself: synchronize() without one waits for the current device only)
        self.cuda = torch.device(device) if torch.device(device).type == "cuda" else None
        self.wall: dict[str, float] = defaultdict(float)
        self.cpu: dict[str, float] = defaultdict(float)

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the body as part of phase ``name``."""
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        wall, cpu = time.perf_counter(), time.process_time()
        yield
        if self.cuda is not None:
            torch.cuda.synchronize(self.cuda)
        self.wall[name] += time.perf_counter() - wall
        self.cpu[name] += time.process_time() - cpu


def run(spec: RunSpec, bench: Benchmark, data: ArrayData, device: torch.device | str,
        fisher_chunk: int | None = None) -> dict[str, Any]:
    """Train one run of the protocol; return its ``runs.jsonl`` record."""
    tasks = task_split(spec.seed)
    torch.manual_seed(spec.seed)
    model = bench.make_model().to(device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3, betas=(0.9, 0.999), fused=True)
    reg = None
    if spec.method != "none":
        setting = FISHER_SETTINGS[spec.method]
        reg = EWCRegularizer(model, strength=spec.strength, method=setting.method,
                             mode="online", gamma=1.0, n_samples=setting.n_samples, mc_samples=1)
    train_gen = torch.Generator().manual_seed(spec.seed)
    shuffle_gen = torch.Generator().manual_seed(spec.seed + 10_000)
    sample_gen = torch.Generator(device=device).manual_seed(spec.seed + 20_000)
    fisher_kwargs = {} if fisher_chunk is None else {"chunk_size": fisher_chunk}
    clock = Stopwatch(device)
    for t, classes in enumerate(tasks):
        x, y = task_subset(data.train_x, data.train_y, classes)
        output_fn = head(classes, device)
        with clock.phase("train"):
            train_task(model, optimizer, reg, x, y, output_fn, spec.iters, spec.batch_size,
                       train_gen)
        if reg is not None and t < len(tasks) - 1:
            with clock.phase("fisher"):
                batches = fisher_batches(x, y, FISHER_SETTINGS[spec.method].batch_size,
                                         shuffle_gen)
                reg.consolidate(batches, output_fn=output_fn, generator=sample_gen,
                                **fisher_kwargs)
    per_task = [
        evaluate(model, *task_subset(data.test_x, data.test_y, classes), head(classes, device))
        for classes in tasks
    ]
    return {
        **asdict(spec),
        "accuracy": sum(per_task) / len(per_task),
        "per_task": per_task,
        "tasks": tasks,
        "seconds": clock.wall["train"] + clock.wall["fisher"],
        "train_seconds": clock.wall["train"],
        "fisher_seconds": clock.wall["fisher"],
        "cpu_seconds": clock.cpu["train"] + clock.cpu["fisher"],
        "fisher_cpu_seconds": clock.cpu["fisher"],
        "fisher_chunk": fisher_chunk,
        "device": str(device),
        "threads": torch.get_num_threads(),
        "version": ewc_reg.__version__,
        "torch": torch.__version__,
        "finished": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }


# ----------------------------------------------------------------------------- runs.jsonl


def read_runs(path: Path) -> list[dict[str, Any]]:
    """Records of ``runs.jsonl`` (none when it does not exist; a torn last line is ignored)."""
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def append_run(path: Path, record: dict[str, Any]) -> None:
    """Append one record as a JSON line (on a line of its own after a torn last line, which
    :func:`read_runs` skips: written onto it, the record was lost with it)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torn = path.exists() and path.stat().st_size > 0 and not path.read_bytes().endswith(b"\n")
    with path.open("a") as f:
        f.write("\n" * torn + json.dumps(record) + "\n")


# ----------------------------------------------------------------------------- planning


def plan_runs(benchmark: str, data: str, methods: Iterable[str], seeds: Iterable[int],
              lambdas: dict[str, tuple[float, ...]], iters: int, batch_size: int
              ) -> list[RunSpec]:
    """Every run, most informative first: by distance of log10 λ from the variant's typical
    best (``none`` first), then seed, then variant."""
    specs = []
    for seed in seeds:
        for method in methods:
            strengths: tuple[float | None, ...] = (None,) if method == "none" else lambdas[method]
            specs += [RunSpec(benchmark, data, method, s, seed, iters, batch_size)
                      for s in strengths]

    def priority(spec: RunSpec) -> tuple[float, int, int]:
        distance = 0.0 if spec.strength is None else abs(
            math.log10(spec.strength) - TYPICAL_LOG10_LAMBDA[spec.method])
        return distance, spec.seed, VARIANTS.index(spec.method)

    return sorted(dict.fromkeys(specs), key=priority)


def nearest_typical_lambda(method: str) -> float:
    """The grid value nearest the variant's typical best λ (the lower one on a tie)."""
    return min(LAMBDA_GRID, key=lambda s: abs(math.log10(s) - TYPICAL_LOG10_LAMBDA[method]))


# ----------------------------------------------------------------------------- command line


def strength_value(text: str) -> float:
    """``--lambdas``' type for ``argparse``: a finite λ > 0, else an error of the command line.

    The library accepts λ = 0, but a sweep does not: it orders its runs by log10 λ and the report
    plots λ on a log axis. EWC at λ = 0 trains as the variant ``none`` does (at the cost of the
    Fisher), so ``--methods none`` is that run."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(
            f"{text!r}: λ must be finite and > 0 (the sweep is log-spaced); "
            "for training without EWC use --methods none"
        )
    return value


def seed_value(text: str) -> int:
    """A ``--seeds`` value: an integer a torch generator takes (a 64-bit one)."""
    try:
        seed = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if not -(2**63) <= seed < 2**63:
        raise argparse.ArgumentTypeError(f"{seed} is not a 64-bit integer")
    return seed


def parse_args(bench: Benchmark, argv: list[str] | None) -> argparse.Namespace:
    """The shared command line. Every value is checked here (counts at least 1, λ > 0, a device
    this machine has), so that a wrong option stops the command before any run rather than
    failing after one, or recording junk runs."""
    p = argparse.ArgumentParser(
        prog=f"python -m benchmarks.{bench.name}",
        description=f"{bench.name}: EWC with each Fisher estimator (van de Ven, 2025). Each "
                    "finished run is appended to <out>/runs.jsonl; runs already there are "
                    "skipped, so an interrupted sweep resumes.",
    )
    p.add_argument("--methods", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    strengths = p.add_mutually_exclusive_group()
    strengths.add_argument(
        "--lambdas", nargs="+", type=strength_value,
        help="λ values (> 0) for every variant (default: the paper's grid 1..1e13)")
    strengths.add_argument(
        "--at-best-lambda", action="store_true",
        help="run each variant only at its best λ so far in <out>/runs.jsonl (same data, "
             "iterations and batch size), e.g. to add seeds")
    p.add_argument("--seeds", nargs="+", type=seed_value, help="default: 0 1 2")
    p.add_argument("--iters", type=at_least(1),
                   help=f"iterations per task (default: 2000, with --quick {QUICK_ITERS})")
    p.add_argument("--batch-size", type=at_least(1), default=bench.batch_size)
    p.add_argument("--device", type=device_name,
                   default="cuda" if torch.cuda.is_available() else "cpu",
                   help="cpu or cuda (default: cuda when available, else cpu)")
    p.add_argument("--data-root", default=default_root(),
                   help="torchvision data directory (default: $EWC_REG_DATA or ./data); "
                        "downloaded when missing")
    # (const 0: the benchmark's own small size; a number given must be at least 1)
    p.add_argument("--synthetic", nargs="?", type=at_least(1), const=0,
                   metavar="TRAIN_PER_CLASS",
                   help="smoke run on small synthetic data of the benchmark's shape "
                        "(accuracies say nothing about the paper); with a number, that many "
                        "training images per class, e.g. 5000 to time the full protocol")
    p.add_argument("--workers", type=at_least(1), default=1,
                   help="runs in parallel (processes)")
    p.add_argument("--threads", type=at_least(1),
                   help="torch threads per worker (default: torch's own choice)")
    p.add_argument("--fisher-chunk", type=at_least(1),
                   help="chunk_size passed to consolidate (default: the library's choice)")
    p.add_argument("--out", type=Path, help="results directory (default: "
                   f"benchmarks/results/{bench.name}[_quick][_synthetic][_iters<N>][_batch<B>] "
                   "in this repository, the last two where --iters or --batch-size are not "
                   "the protocol's)")
    p.add_argument("--quick", action="store_true",
                   help=f"preset: seed {QUICK_SEEDS[0]}, {QUICK_ITERS} iterations per task, "
                        "one λ per variant (the paper's typical best)")
    args = p.parse_args(argv)
    if args.seeds is None:
        args.seeds = list(QUICK_SEEDS if args.quick else (0, 1, 2))
    protocol_iters = QUICK_ITERS if args.quick else 2000
    if args.iters is None:
        args.iters = protocol_iters
    if args.out is None:  # (runs of another protocol apart from the committed ones)
        suffix = "_quick" * args.quick + "_synthetic" * (args.synthetic is not None)
        if args.iters != protocol_iters:
            suffix += f"_iters{args.iters}"
        if args.batch_size != bench.batch_size:
            suffix += f"_batch{args.batch_size}"
        args.out = RESULTS / f"{bench.name}{suffix}"
    return args


def lambdas_per_method(args: argparse.Namespace, benchmark: str, data: str
                       ) -> dict[str, tuple[float, ...]]:
    """λ values of each variant: ``--lambdas``; else with ``--at-best-lambda`` the best so far
    in ``runs.jsonl``; else one typical value (``--quick``) or the whole grid."""
    if args.lambdas:
        return dict.fromkeys(TYPICAL_LOG10_LAMBDA, tuple(args.lambdas))
    if args.at_best_lambda:
        from .report import best, group

        config = (benchmark, data, args.iters, args.batch_size)
        summary = group(read_runs(args.out / "runs.jsonl")).get(config, {})
        lambdas = {m: (best(per_lambda)[0],) for m, per_lambda in summary.items() if m != "none"}
        missing = [m for m in args.methods if m != "none" and m not in lambdas]
        if missing:
            raise SystemExit(f"--at-best-lambda: no runs of {missing} with this configuration "
                             f"in {args.out / 'runs.jsonl'}")
        return lambdas
    if args.quick:
        return {m: (nearest_typical_lambda(m),) for m in TYPICAL_LOG10_LAMBDA}
    return dict.fromkeys(TYPICAL_LOG10_LAMBDA, LAMBDA_GRID)


_WORKER: dict[str, Any] = {}


def _data_kind(synthetic: int | None) -> str:
    """``runs.jsonl``'s ``data`` field: ``real``, ``synthetic`` or ``synthetic-<per class>``."""
    if synthetic is None:
        return "real"
    return f"synthetic-{synthetic}" if synthetic else "synthetic"


def _load(bench: Benchmark, synthetic: int | None, root: str, device: str) -> ArrayData:
    if synthetic is None:
        data = bench.load_data(root)
    else:
        data = bench.synthetic_data(**({"train_per_class": synthetic} if synthetic else {}))
    return data.to(device)


def _init_worker(bench: Benchmark, synthetic: int | None, root: str, device: str,
                 threads: int | None, fisher_chunk: int | None) -> None:
    if threads is not None:
        torch.set_num_threads(threads)
    _WORKER.update(bench=bench, data=_load(bench, synthetic, root, device), device=device,
                   fisher_chunk=fisher_chunk)


def _run_in_worker(spec: RunSpec) -> dict[str, Any]:
    return run(spec, _WORKER["bench"], _WORKER["data"], _WORKER["device"],
               _WORKER["fisher_chunk"])


def _format_duration(seconds: float) -> str:
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


def main(bench: Benchmark, argv: list[str] | None = None) -> list[dict[str, Any]]:
    """Run the sweep the command line asks for; return the records of the runs it finished."""
    args = parse_args(bench, argv)
    data_kind = _data_kind(args.synthetic)
    runs_path = args.out / "runs.jsonl"
    specs = plan_runs(bench.name, data_kind, args.methods, args.seeds,
                      lambdas_per_method(args, bench.name, data_kind), args.iters, args.batch_size)
    done = {record_key(r) for r in read_runs(runs_path)}
    todo = [s for s in specs if s.key() not in done]
    print(f"{bench.name} ({data_kind} data, {args.iters} it/task, batch {args.batch_size}, "
          f"{args.device}): {len(specs)} runs, {len(specs) - len(todo)} already in {runs_path}, "
          f"{len(todo)} to do with {args.workers} worker(s)", flush=True)
    if not todo:
        return []
    init = (bench, args.synthetic, args.data_root, args.device, args.threads, args.fisher_chunk)
    finished: list[dict[str, Any]] = []
    start = time.perf_counter()

    def report(record: dict[str, Any]) -> None:
        append_run(runs_path, record)
        finished.append(record)
        elapsed = time.perf_counter() - start
        eta = elapsed / len(finished) * (len(todo) - len(finished))
        spec = RunSpec(*(record[k] for k in RunSpec.__dataclass_fields__))
        print(f"[{len(finished)}/{len(todo)}] {spec.describe()}: {record['accuracy']:.2f}% "
              f"(tasks {' '.join(f'{a:.1f}' for a in record['per_task'])}) in "
              f"{record['seconds']:.0f}s wall, {record['cpu_seconds']:.0f}s CPU (Fisher "
              f"{record['fisher_seconds']:.0f}s wall, {record['fisher_cpu_seconds']:.0f}s CPU) | "
              f"ETA {_format_duration(eta)}", flush=True)

    with keeping_threads():  # (one worker runs here: the caller's thread count after)
        try:
            if args.workers == 1:
                _init_worker(*init)
            elif args.synthetic is None:
                bench.load_data(args.data_root)  # downloads once, not by every worker at once
        except DataUnavailable as err:
            raise SystemExit(
                f"{bench.name}: {err}. The data root is --data-root, by default the EWC_REG_DATA "
                "environment variable, else ./data; with internet, torchvision downloads the data "
                "there."
            ) from err
        if args.workers == 1:
            for spec in todo:
                report(_run_in_worker(spec))
        else:
            ctx = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(args.workers, mp_context=ctx, initializer=_init_worker,
                                     initargs=init) as pool:
                futures = [pool.submit(_run_in_worker, spec) for spec in todo]
                for future in as_completed(futures):
                    report(future.result())
    print(f"done in {_format_duration(time.perf_counter() - start)}; results in {runs_path}; "
          f"table and figure: python -m benchmarks.report {args.out}", file=sys.stderr,
          flush=True)
    return finished
