"""Speed benchmark of the diagonal Fisher estimators (issue #3).

Run from the repository root::

    python -m benchmarks.fisher_speed                 # full run, writes results/fisher_speed.md
    python -m benchmarks.fisher_speed --quick         # tiny smoke test (seconds)
    python -m benchmarks.fisher_speed --models mlp --repeats 3 --threads 2 --device cpu

For every workload (Split MNIST MLP and reduced ResNet-18 with C=2 and C=10 output units, a
small Transformer-encoder text classifier with C=10) it times, in one process, round-robin over
the contenders for several rounds, reversing their order every other round (medians reported):

* a plain forward+backward of the mean cross-entropy at the same batch size (the unit);
* every estimator of :func:`ewc_reg.fisher_diagonal` on every backend in
  :data:`ewc_reg.engines.BACKENDS` (whatever is there at run time) but ``"auto"`` and ``"loop"``
  (the loop engine is the naive loop below, which runs on a subset);
* a naive per-sample loop as in the paper's reference code (batch size 1, one backward per class,
  squared gradients weighted by the predicted probability), timed on a subset and scaled;
* BackPACK (``DiagGGNExact``, ``SumGradSquared``) and nngeometry (``FIM`` with ``PMatDiag``)
  when they are installed (optional; they are never dependencies of ``ewc_reg``).

Every Fisher is checked against the torch.func engine's (max relative difference), and the
issue's targets are evaluated at the end.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import os
import platform
import statistics
import subprocess
import sys
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, fx, nn

from ewc_reg import fisher_diagonal
from ewc_reg.engines import BACKENDS, get_engine

from ._reports import at_least, command_line, cpu_name, device_name, keeping_threads
from ._timing import Measurement, measure, memory_method
from .models import (
    LSTMCellClassifier,
    LSTMClassifier,
    ReducedResNet18,
    SharedBlockMLP,
    TextTransformer,
    evaluated,
    small_vit,
    split_mnist_mlp,
    upsampling_cnn,
    volume_cnn,
)

#: Where a full (non-quick) run writes its report.
RESULTS_PATH = Path(__file__).resolve().parent / "results" / "fisher_speed.md"
#: Largest accepted max relative difference from the torch.func engine's Fisher.
AGREEMENT_TOL = 1e-5
#: The engine every Fisher is compared with.
REFERENCE_BACKEND = "functorch"
TIMED_BACKENDS = tuple(b for b in BACKENDS if b not in ("auto", "loop"))
#: Estimators computed by an engine (``batched`` takes plain backward passes).
ENGINE_METHODS = ("exact", "empirical", "sample")
MODEL_KEYS = ("mlp", "resnet", "transformer")
#: Models run only when named in ``--models`` (the targets are those of :data:`MODEL_KEYS`): a
#: torchvision ViT (class token and position embedding on the model), an LSTM classifier,
#: without and with ``proj_size``, and with an ``nn.LSTMCell`` stepped by hand instead, an MLP
#: whose hidden block is applied three times, and the Transformer with one encoder layer applied
#: twice (the last three: modules called more than once); a stack of transposed convolutions
#: (a DCGAN-style generator's), a 3-d CNN, the Transformer sequence-first, and the reduced
#: ResNet-18 in ``torch.channels_last`` memory (model and inputs).
EXTRA_MODEL_KEYS = (
    "vit",
    "lstm",
    "lstm_proj",
    "lstm_cell",
    "shared_mlp",
    "transformer_shared",
    "upsampling",
    "conv3d",
    "transformer_seq_first",
    "resnet_channels_last",
)
ALL_MODEL_KEYS = MODEL_KEYS + EXTRA_MODEL_KEYS
PEERS = {"BackPACK": "backpack-for-pytorch", "nngeometry": "nngeometry"}

Fisher = dict[str, Tensor]


@dataclass(eq=False)
class Workload:
    """A model, one batch of ``N`` samples and the number ``C`` of output units used."""

    model_key: str
    title: str
    model: nn.Module
    inputs: Tensor
    targets: Tensor
    num_classes: int
    naive_subset: int
    #: Name of the final ``nn.Linear``, whose first ``num_classes`` rows produce the outputs.
    head: str

    @property
    def size(self) -> int:
        """``N``, the number of samples."""
        return int(self.targets.shape[0])

    @property
    def sliced(self) -> bool:
        """Whether ``C`` is less than the model's outputs (``output_fn`` then selects them)."""
        return self.num_classes < self.model.get_submodule(self.head).out_features

    def output_fn(self, output: Tensor) -> Tensor:
        """The model's first ``C`` output units (the task's classes)."""
        return output[:, : self.num_classes]


@dataclass
class Contender:
    """One timed computation; ``run`` returns a Fisher (or ``None`` for the unit)."""

    name: str
    method: str
    run: Callable[[], Fisher | None]
    #: Fisher it must agree with (``None``: not checked).
    reference: Callable[[], Fisher] | None = None
    #: Factor from the measured time to the time for all ``N`` samples.
    time_scale: float = 1.0
    note: str = ""


@dataclass
class Row:
    """The measurements of one contender on one workload."""

    workload: Workload
    name: str
    method: str
    seconds: float | None = None
    best_seconds: float | None = None
    runs: int = 0
    peak_bytes: int | None = None
    agreement: float | None = None
    status: str = ""
    note: str = ""
    ratio: float | None = None
    best_ratio: float | None = None  # of the minima: the least disturbed runs
    memory_ratio: float | None = None


@dataclass
class Report:
    """Everything a run measured, plus the rendered markdown."""

    rows: list[Row]
    targets: list[tuple[str, str, bool | None]]
    markdown: str
    #: The engine ``backend="auto"`` used, per model.
    auto_backend: dict[str, str]

    @property
    def agreement_ok(self) -> bool:
        """Every checked Fisher but the peers' agrees with the torch.func engine's to
        :data:`AGREEMENT_TOL` (the peers' differences are reported: nngeometry's Fisher of a
        layer applied more than once is not the Fisher, see ``shared_mlp``)."""
        checked = [r for r in self.rows if r.agreement is not None and r.name not in PEERS]
        return bool(checked) and all(r.agreement <= AGREEMENT_TOL for r in checked)


# ----------------------------------------------------------------------------------- workloads


def make_workloads(
    models: Sequence[str], quick: bool, samples: int | None, device: torch.device
) -> list[Workload]:
    """The benchmark's workloads (tiny ones with ``quick``), seeded, in eval mode on ``device``."""
    workloads = []
    for key in models:
        for num_classes in (2, 10) if key in ("mlp", "resnet") else (10,):
            torch.manual_seed(0)
            if key == "mlp":
                model: nn.Module = split_mnist_mlp(10)
                n, subset, head, title = 256, 16, "5", "Split MNIST MLP"
                inputs = torch.randn(samples or (8 if quick else n), 1, 28, 28)
            elif key in ("resnet", "resnet_channels_last"):
                model = ReducedResNet18(10, widths=(4, 4, 4, 4) if quick else (20, 40, 80, 160))
                n, subset, head, title = 128, 8, "linear", "reduced ResNet-18"
                inputs = torch.randn(samples or (4 if quick else n), 3, 32, 32)
                if key == "resnet_channels_last":
                    model = model.to(memory_format=torch.channels_last)
                    inputs = inputs.contiguous(memory_format=torch.channels_last)
                    title += " in channels_last"
            elif key == "vit":
                model = small_vit(10, quick)
                n, subset, head, title = 128, 8, "heads.head", "ViT (torchvision)"
                inputs = torch.randn(samples or (4 if quick else n), 3, 32, 32)
            elif key == "shared_mlp":
                model = SharedBlockMLP(10, width=16 if quick else 400)
                n, subset, head, title = 256, 16, "linear", "MLP, hidden block applied 3 times"
                inputs = torch.randn(samples or (8 if quick else n), 1, 28, 28)
            elif key == "upsampling":
                model = upsampling_cnn(10, width=4 if quick else 32)
                n, subset, head, title = 128, 8, "7", "transposed convolutions (4x4 to 32x32)"
                inputs = torch.randn(samples or (4 if quick else n), 16, 4, 4)
            elif key == "conv3d":
                model = volume_cnn(10, width=4 if quick else 16)
                n, subset, head, title = 64, 8, "7", "3-d CNN (16x16x16 volumes)"
                inputs = torch.randn(samples or (4 if quick else n), 3, 16, 16, 16)
            elif key in ("lstm", "lstm_proj", "lstm_cell"):
                sizes = {"vocab_size": 50, "dim": 8} if quick else {}
                projected = key == "lstm_proj"
                if key == "lstm_cell":
                    model = LSTMCellClassifier(10, **sizes)
                    title = "LSTMCell stepped by hand, text classifier"
                else:
                    model = LSTMClassifier(10, **sizes, proj_size=(4 if quick else 32) * projected)
                    title = f"LSTM{' (proj_size)' * projected} text classifier"
                n, subset, head = 128, 16, "linear"
                vocab, seq = (50, 8) if quick else (1000, 32)
                inputs = torch.randint(0, vocab, (samples or (8 if quick else n), seq))
            else:
                sizes = dict(vocab_size=50, seq_len=8, d_model=16, d_feedforward=32)
                shared, seq_first = key == "transformer_shared", key == "transformer_seq_first"
                model = TextTransformer(
                    10, **(sizes if quick else {}), shared=shared, batch_first=not seq_first
                )
                n, subset, head = 128, 16, "linear"
                title = "Transformer text classifier" + (", one layer applied twice" * shared)
                title += ", sequence-first" * seq_first
                vocab, seq = (50, 8) if quick else (1000, 32)
                inputs = torch.randint(0, vocab, (samples or (8 if quick else n), seq))
            targets = torch.randint(0, num_classes, (inputs.shape[0],))
            workloads.append(
                Workload(
                    model_key=key,
                    title=title,
                    model=evaluated(model.to(device)),
                    inputs=inputs.to(device),
                    targets=targets.to(device),
                    num_classes=num_classes,
                    naive_subset=min(2 if quick else subset, inputs.shape[0]),
                    head=head,
                )
            )
    return workloads


# ---------------------------------------------------------------------------------- contenders


def plain_forward_backward(w: Workload) -> Contender:
    """Gradient of the batch-mean cross-entropy: the unit of every ratio."""
    params = [p for p in w.model.parameters() if p.requires_grad]

    def run() -> None:
        loss = F.cross_entropy(w.output_fn(w.model(w.inputs)), w.targets)
        torch.autograd.grad(loss, params)

    return Contender("plain fwd+bwd", "fwd+bwd", run)


def naive_loop(w: Workload, references: dict[str, Fisher]) -> Contender:
    """The exact Fisher the way the paper's reference code computes it, on a subset."""
    subset = w.naive_subset
    inputs, model = w.inputs[:subset], w.model

    def run() -> Fisher:
        fisher = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
        for i in range(subset):
            output = w.output_fn(model(inputs[i : i + 1]))
            probs = torch.softmax(output, dim=1).detach()
            for label in range(w.num_classes):
                target = torch.tensor([label], device=output.device)
                model.zero_grad()
                F.cross_entropy(output, target).backward(retain_graph=label < w.num_classes - 1)
                for name, p in model.named_parameters():
                    if p.grad is not None:
                        fisher[name] += probs[0, label] * p.grad.detach() ** 2
        model.zero_grad()
        return {name: f / subset for name, f in fisher.items()}

    def reference() -> Fisher:
        if "exact@subset" not in references:
            data = [(inputs, w.targets[:subset])]
            references["exact@subset"] = fisher_diagonal(
                model, data, "exact", output_fn=w.output_fn, backend=REFERENCE_BACKEND
            )
        return references["exact@subset"]

    note = f"batch size 1, timed on {subset} samples, scaled ×{w.size / subset:g}"
    return Contender("naive loop (paper)", "exact", run, reference, w.size / subset, note)


def ewc_reg_contenders(w: Workload, references: dict[str, Fisher]) -> list[Contender]:
    """Every estimator on every backend; the reference backend first so it fills ``references``."""
    data = [(w.inputs, w.targets)]
    output_fn = w.output_fn if w.sliced else None
    backends = sorted(TIMED_BACKENDS, key=lambda b: b != REFERENCE_BACKEND)
    contenders = []
    for backend in backends:
        for method in ENGINE_METHODS:

            def run(method: str = method, backend: str = backend) -> Fisher:
                generator = None
                if method == "sample":
                    generator = torch.Generator(w.inputs.device).manual_seed(0)
                fisher = fisher_diagonal(
                    w.model, data, method, output_fn=output_fn, generator=generator,
                    backend=backend,
                )
                if backend == REFERENCE_BACKEND:
                    references[method] = fisher
                return fisher

            reference = None if backend == REFERENCE_BACKEND else _lookup(references, method)
            contenders.append(Contender(f"ewc_reg [{backend}]", method, run, reference))
    contenders.append(
        Contender(
            "ewc_reg", "batched",
            lambda: fisher_diagonal(w.model, data, "batched", output_fn=output_fn),
            note="one mini-batch of N: one backward pass",
        )
    )
    return contenders


def backpack_contenders(w: Workload, references: dict[str, Fisher]) -> list[Contender]:
    """BackPACK's exact (``DiagGGNExact``) and empirical (``SumGradSquared``) diagonals.

    Raises:
        ImportError: BackPACK is not installed.
        Exception: BackPACK cannot handle the model (reported as unsupported).
    """
    from backpack import backpack, extend
    from backpack.extensions import DiagGGNExact, SumGradSquared

    model = evaluated(extend(_module_form(_restricted_head(w)), use_converter=True))
    shapes = {n: p.shape for n, p in w.model.named_parameters()}
    mean_loss = extend(nn.CrossEntropyLoss(reduction="mean"))
    sum_loss = extend(nn.CrossEntropyLoss(reduction="sum"))

    def collect(attribute: str, scale: float) -> Fisher:
        fisher = {}
        for name, p in model.named_parameters():
            fisher[name] = getattr(p, attribute) * scale
            p.grad = None
            delattr(p, attribute)
        return _pad_head(fisher, w, shapes)

    def exact() -> Fisher:
        # CrossEntropyLoss(reduction="mean") makes DiagGGNExact (1/N) Σ_n J_nᵀ H_n J_n: the
        # exact Fisher with ewc_reg's 1/N normalisation, so no rescaling.
        loss = mean_loss(model(w.inputs), w.targets)
        with backpack(DiagGGNExact()):
            loss.backward()
        return collect("diag_ggn_exact", 1.0)

    def empirical() -> Fisher:
        # reduction="sum": sum_grad_squared is Σ_n g_n², so divide by N.
        loss = sum_loss(model(w.inputs), w.targets)
        with backpack(SumGradSquared()):
            loss.backward()
        return collect("sum_grad_squared", 1.0 / w.size)

    return [
        Contender("BackPACK", "exact", exact, _lookup(references, "exact"), note="DiagGGNExact"),
        Contender(
            "BackPACK", "empirical", empirical, _lookup(references, "empirical"),
            note="SumGradSquared / N",
        ),
    ]


def nngeometry_contenders(w: Workload, references: dict[str, Fisher]) -> list[Contender]:
    """nngeometry's exact Fisher (``FIM(..., PMatDiag, variant="classif_logits")``).

    Raises:
        ImportError: nngeometry is not installed.
        Exception: nngeometry cannot handle the model (reported as unsupported).
    """
    from nngeometry.layercollection import LayerCollection
    from nngeometry.metrics import FIM
    from nngeometry.object import PMatDiag

    layers = LayerCollection.from_model(w.model)
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(w.inputs, w.targets), batch_size=w.size
    )

    def exact() -> Fisher:
        fim = FIM(
            w.model, loader, PMatDiag, variant="classif_logits", layer_collection=layers,
            function=lambda inputs, targets: w.output_fn(w.model(inputs)),
        )
        flat, fisher, start = fim.get_diag(), {}, 0
        for layer_name, layer in layers.layers.items():
            for kind in ("weight", "bias"):
                shape = getattr(layer, kind).size if getattr(layer, kind) else None
                if shape is not None:
                    # (in the parameter's own layout: for a transposed convolution, the
                    # layer's stated size is (out, in, ...) where the weight is (in, out, ...))
                    name = f"{layer_name}.{kind}"
                    real = w.model.get_parameter(name).shape
                    fisher[name] = flat[start : start + real.numel()].view(real)
                    start += real.numel()
        return fisher

    return [
        Contender(
            "nngeometry", "exact", exact, _lookup(references, "exact"), note="FIM + PMatDiag"
        )
    ]


def _lookup(references: dict[str, Fisher], key: str) -> Callable[[], Fisher]:
    return lambda: references[key]


def _restricted_head(w: Workload) -> nn.Module:
    """A copy of the model whose head produces only the ``C`` used outputs (for peers, which
    take no ``output_fn``)."""
    model = copy.deepcopy(w.model)
    if not w.sliced:
        return model
    old = model.get_submodule(w.head)
    new = nn.Linear(old.in_features, w.num_classes, bias=old.bias is not None)
    with torch.no_grad():
        new.weight.copy_(old.weight[: w.num_classes])
        if old.bias is not None:
            new.bias.copy_(old.bias[: w.num_classes])
    parent, _, attribute = w.head.rpartition(".")
    setattr(model.get_submodule(parent), attribute, new.to(old.weight.device))
    return model


def _pad_head(fisher: Fisher, w: Workload, shapes: dict[str, torch.Size]) -> Fisher:
    """Zero rows for the head's unused outputs, so peers' Fishers compare with ours."""
    padded = {}
    for name, f in fisher.items():
        if f.shape != shapes[name]:
            full = f.new_zeros(shapes[name])
            full[: f.shape[0]] = f
            f = full
        padded[name] = f
    return padded


def _module_form(model: nn.Module) -> nn.Module:
    """An ``fx`` copy of ``model`` with ``torch.relu``/``F.relu`` calls replaced by ``nn.ReLU``
    modules (BackPACK only sees modules); parameters and their names are unchanged."""
    graph_module = fx.symbolic_trace(model)
    for i, node in enumerate(list(graph_module.graph.nodes)):
        if node.op == "call_function" and node.target in (torch.relu, F.relu):
            name = f"_relu{i}"
            graph_module.add_submodule(name, nn.ReLU())
            with graph_module.graph.inserting_after(node):
                module_node = graph_module.graph.call_module(name, (node.args[0],))
            node.replace_all_uses_with(module_node)
            graph_module.graph.erase_node(node)
    graph_module.recompile()
    return graph_module


# --------------------------------------------------------------------------------- measuring


def max_relative_difference(got: Fisher, reference: Fisher) -> float:
    """``max_θ max|got_θ - ref_θ| / max|ref_θ|`` over the parameters (``inf`` if one is
    missing)."""
    worst = 0.0
    for name, ref in reference.items():
        if name not in got or got[name].shape != ref.shape:
            return float("inf")
        diff = float((got[name].double() - ref.double()).abs().max())
        scale = float(ref.double().abs().max())
        worst = max(worst, diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf")))
    return worst


def benchmark_workload(
    w: Workload, repeats: int, max_seconds: float, device: torch.device, log: Callable[[str], None]
) -> list[Row]:
    """Warm up and check every contender, then time them round-robin; one row each."""
    references: dict[str, Fisher] = {}
    rows: list[Row] = []
    unsupported: list[Row] = []
    contenders = [plain_forward_backward(w), *ewc_reg_contenders(w, references)]
    peers = {"BackPACK": backpack_contenders, "nngeometry": nngeometry_contenders}
    for label, factory in peers.items():
        try:
            contenders += factory(w, references)
        except ImportError:
            continue
        except Exception as error:  # the peer cannot handle this model
            unsupported.append(Row(w, label, "exact", status=f"unsupported: {_brief(error)}"))
    contenders.append(naive_loop(w, references))

    active: list[tuple[Contender, Row]] = []
    warm_up: dict[int, Measurement] = {}
    for c in contenders:  # warm-up round, also the agreement check
        row = Row(w, c.name, c.method, note=c.note)
        try:
            warm_up[id(c)] = measure(c.run, device)
        except Exception as error:
            row.status = f"not run: {_brief(error)}"
            rows.append(row)
            continue
        fisher = warm_up[id(c)].result
        if c.reference is not None and fisher is not None:
            row.agreement = max_relative_difference(fisher, c.reference())
        active.append((c, row))
        rows.append(row)

    timed: dict[int, list[Measurement]] = {id(c): [] for c, _ in active}
    for round_ in range(repeats):
        for c, _ in active if round_ % 2 == 0 else active[::-1]:
            if round_ > 0 and sum(m.seconds for m in timed[id(c)]) >= max_seconds:
                continue
            timed[id(c)].append(measure(c.run, device))
        log(f"  {w.title} C={w.num_classes}: round {round_ + 1}/{repeats} done")
    for c, row in active:
        runs = timed[id(c)]
        row.runs = len(runs)
        runs = runs or [warm_up[id(c)]]  # --repeats 0
        row.seconds = statistics.median(m.seconds for m in runs) * c.time_scale
        row.best_seconds = min(m.seconds for m in runs) * c.time_scale
        peaks = [m.peak_bytes for m in runs if m.peak_bytes is not None]
        row.peak_bytes = int(statistics.median(peaks)) if peaks else None
    rows += unsupported
    unit = rows[0]  # the plain forward+backward
    for row in rows:
        if row.seconds is not None and unit.seconds:
            row.ratio = row.seconds / unit.seconds
        if row.best_seconds is not None and unit.best_seconds:
            row.best_ratio = row.best_seconds / unit.best_seconds
        if row.peak_bytes is not None and unit.peak_bytes:
            row.memory_ratio = row.peak_bytes / unit.peak_bytes
    return rows


def auto_backend(w: Workload, rows: list[Row]) -> str:
    """The engine ``backend="auto"`` uses for the workload: the one ``get_engine`` picks, or the
    torch.func engine it falls back to when that one turned out not to cover the model."""
    picked = get_engine("auto", w.model).name
    failed = any(r.name == f"ewc_reg [{picked}]" and r.status for r in rows)
    return REFERENCE_BACKEND if failed else picked


def _brief(error: BaseException, limit: int = 160) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return text if len(text) <= limit else text[: limit - 1] + "…"


# --------------------------------------------------------------------------------- reporting


def _ratios(row: Row) -> str:
    """The row's ratio of medians (which the verdict uses) and of minima."""
    text = f"{row.ratio:.2f}×"
    return text if row.best_ratio is None else f"{text} (of the minima: {row.best_ratio:.2f}×)"


def evaluate_targets(rows: list[Row], auto: dict[str, str]) -> list[tuple[str, str, bool | None]]:
    """The issue's targets: (target, measured value, pass/fail or ``None`` if not measurable)."""

    def find(w: Workload, name: str, method: str) -> Row | None:
        return next(
            (r for r in rows if r.workload is w and r.name == name and r.method == method), None
        )

    workloads = list(dict.fromkeys(r.workload for r in rows))
    targets: list[tuple[str, str, bool | None]] = []
    for w in workloads:
        if w.model_key not in MODEL_KEYS:
            continue
        tag = f"{w.title} C={w.num_classes}"
        ours = f"ewc_reg [{auto[w.model_key]}]"
        exact, empirical = find(w, ours, "exact"), find(w, ours, "empirical")
        peer = find(w, "BackPACK", "exact")
        if peer is not None and peer.seconds is not None and exact and exact.seconds:
            targets.append((
                f"exact no slower than BackPACK ({tag})",
                f"{exact.seconds:.3g} s vs {peer.seconds:.3g} s",
                exact.seconds <= peer.seconds,
            ))
        if w.num_classes == 10 and exact and exact.ratio is not None:
            targets.append((
                f"exact ≤ 6× fwd+bwd ({tag})", _ratios(exact), exact.ratio <= 6.0
            ))
        if empirical and empirical.ratio is not None:
            targets.append((
                f"empirical ≤ 2.5× fwd+bwd ({tag})", _ratios(empirical), empirical.ratio <= 2.5
            ))
        unit = find(w, "plain fwd+bwd", "fwd+bwd")
        if w.model_key == "resnet" and exact and exact.memory_ratio is not None and unit:
            targets.append((
                f"exact peak memory ≤ 2× fwd+bwd ({tag})",
                f"{exact.memory_ratio:.2f}× ({_mib(exact.peak_bytes)} vs "
                f"{_mib(unit.peak_bytes)} MiB)",
                exact.memory_ratio <= 2.0,
            ))
    others = {f"ewc_reg [{b}]" for b in TIMED_BACKENDS if b != REFERENCE_BACKEND}
    engine_rows = [r for r in rows if r.name in others]
    checked = [r.agreement for r in engine_rows if r.agreement is not None]
    not_run = sum(1 for r in engine_rows if r.status)
    name = f"agreement with {REFERENCE_BACKEND} ≤ 1e-5 relative, float32 (other engines)"
    if not checked:
        targets.append((name, f"no other engine ran ({not_run} not run)", None))
    else:
        measured = f"max {max(checked):.2e} over {len(checked)} Fishers"
        if not_run:
            measured += f" ({not_run} not run, see table)"
        targets.append((name, measured, max(checked) <= AGREEMENT_TOL))
    return targets


def _mib(value: int | None) -> str:
    return "n/a" if value is None else f"{value / 2**20:.1f}"


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "–" if value is None else f"{value:{spec}}{suffix}"


def results_table(rows: list[Row]) -> str:
    """The markdown table of all rows."""
    lines = [
        "| model | C | N | contender | estimator | median time (s) | min (s) | runs | × fwd+bwd "
        "| peak mem (MiB) | mem × fwd+bwd | max rel diff vs functorch | notes |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        w = r.workload
        cells = [
            w.title, str(w.num_classes), str(w.size), r.name, r.method,
            r.status or _fmt(r.seconds, ".4g"),
            _fmt(r.best_seconds, ".4g"),
            "–" if r.status else str(r.runs),
            _fmt(r.ratio, ".2f", "×"),
            "–" if r.peak_bytes is None else _mib(r.peak_bytes),
            _fmt(r.memory_ratio, ".2f", "×"),
            _fmt(r.agreement, ".1e"),
            r.note,
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets_table(targets: list[tuple[str, str, bool | None]]) -> str:
    """The markdown table of the issue's targets."""
    lines = ["| target | measured | result |", "|---|---|---|"]
    for name, value, ok in targets:
        verdict = "n/a" if ok is None else ("PASS" if ok else "FAIL")
        lines.append(f"| {name} | {value} | {verdict} |")
    return "\n".join(lines)


def _library_revision() -> str:
    """The repository's commit, and whether ``ewc_reg/`` has uncommitted changes."""
    root = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "ewc_reg"], cwd=root, capture_output=True,
            text=True, check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown (not a git checkout)"
    return f"commit {commit}" + (" + uncommitted changes in ewc_reg/" if dirty else "")


def _peer_versions() -> str:
    found = []
    for label, distribution in PEERS.items():
        try:
            found.append(f"{label} {metadata.version(distribution)}")
        except metadata.PackageNotFoundError:
            found.append(f"{label} not installed (skipped)")
    return ", ".join(found)


def render(
    args: argparse.Namespace,
    command: str,
    device: torch.device,
    rows: list[Row],
    targets: list[tuple[str, str, bool | None]],
    auto: dict[str, str],
    revision: str,
    status: str = "",
) -> str:
    """The markdown report (``status``: say it is partial)."""
    machine = (
        f"{cpu_name()}, {os.cpu_count()} logical CPUs, {platform.platform()}; load average "
        f"(1 min) at the end {os.getloadavg()[0]:.2f} (other jobs share the machine)"
    )
    if device.type == "cuda":
        machine += f"; GPU {torch.cuda.get_device_name(device)}"
    picks = ", ".join(f"{key}: {backend}" for key, backend in auto.items())
    header = [
        "# Fisher speed benchmark (issue #3)" + (f" ({status})" if status else ""),
        "",
        f"- command: `{command}`",
        f"- date: {datetime.datetime.now(datetime.timezone.utc):%Y-%m-%d %H:%M UTC}",
        f"- machine: {machine}",
        f"- torch {torch.__version__}, device {device}, threads {torch.get_num_threads()}, "
        f"float32{' (TF32 off)' if device.type == 'cuda' else ''}, "
        f"Python {platform.python_version()}",
        f"- ewc_reg {revision} (at the start); backends: {', '.join(BACKENDS)} "
        f"(`auto` picks {picks})",
        f"- peers: {_peer_versions()}",
        "",
        "## Method",
        "",
        f"- One process. Each contender runs once untimed (warm-up; its Fisher is checked), "
        f"then {args.repeats} rounds round-robin over the contenders, in reverse order every other "
        f"round (so none always follows the same neighbour); a contender whose timed "
        f"runs already took ≥ {args.max_seconds:g} s sits out later rounds (`runs` column: "
        "timed runs; 0: the warm-up run is reported). "
        "Times are medians (the minimum is shown too: other jobs share the CPUs, and the "
        "minimum is the least disturbed run); ratios are of medians, to the plain "
        "forward+backward (gradient of the mean cross-entropy of the same N-sample batch, "
        "`torch.autograd.grad`).",
        "- ewc_reg contenders call `fisher_diagonal` on one batch of N samples (default "
        "`chunk_size`); C=2 uses `output_fn` slicing the first 2 of the 10 output units.",
        f"- {memory_method(device)}. Median over the timed runs.",
        "- Naive loop: the paper's reference code's exact Fisher (batch size 1; for each sample "
        "and each class, cross-entropy backward, squared gradient weighted by the predicted "
        "probability), timed on a subset of the samples and scaled per sample to N; its "
        "memory is that of the subset run (it does not grow with N).",
        "- Peers get a copy of the model (BackPACK: `torch.fx` copy with module ReLUs, "
        "`extend(..., use_converter=True)`); for C=2 their head is restricted to the 2 used "
        "rows and the other rows are zero-padded before the comparison.",
        "- Agreement: max over parameters of `max|F − F_ref| / max|F_ref|` against "
        f"`ewc_reg [{REFERENCE_BACKEND}]` for the same estimator (`sample`: same generator seed; "
        "naive loop: functorch exact on the same subset).",
        "",
        "## Results",
        "",
        results_table(rows),
        "",
        "## Targets of issue #3",
        "",
        "Our figures are those of the backend `auto` picks.",
        "",
        targets_table(targets),
        "",
    ]
    return "\n".join(header)


# -------------------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options (see ``--help``)."""
    parser = command_line(__spec__.name, __doc__)
    parser.add_argument(
        "--threads", type=at_least(1), default=2, help="torch CPU threads (default 2)"
    )
    parser.add_argument(
        "--device", type=device_name, default="cpu", help="cpu or cuda (default cpu)"
    )
    parser.add_argument(
        "--repeats", type=at_least(0), default=5,
        help="timed rounds (default 5; 0 reports the warm-up run, as --quick does)",
    )
    parser.add_argument(
        "--models", default=",".join(MODEL_KEYS),
        help=f"comma-separated subset of {','.join(ALL_MODEL_KEYS)} (default "
        f"{','.join(MODEL_KEYS)})",
    )
    parser.add_argument(
        "--samples", type=at_least(1), default=None,
        help="N for every model (default: 256 MLP, 128 ResNet-18 and Transformer)",
    )
    parser.add_argument(
        "--max-seconds", type=float, default=30.0,
        help="timed seconds after which a contender sits out later rounds (default 30)",
    )
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke test")
    parser.add_argument(
        "--out", "--output", type=Path, default=None,
        help="markdown report path (default benchmarks/results/fisher_speed.md; none with "
        "--quick); --output is its older name",
    )
    args = parser.parse_args(argv)
    args.models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = set(args.models) - set(ALL_MODEL_KEYS)
    if unknown or not args.models:
        parser.error(f"--models takes a comma-separated subset of {','.join(ALL_MODEL_KEYS)}")
    if args.quick:
        args.repeats = 0
    if args.out is None and not args.quick:
        args.out = RESULTS_PATH
    return args


def run(args: argparse.Namespace, command: str | None = None) -> Report:
    """Run the benchmark described by ``args``; write the report if ``args.out`` is set.

    torch's thread count is set to ``args.threads`` for the run and restored after it.
    On CUDA, TF32 is turned off for the run (and restored after it), so every contender computes
    in true float32 and the agreement check means something: with TF32 convolutions the engines
    differ from each other by about 1e-2.
    """
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with keeping_threads():
        torch.set_num_threads(args.threads)
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
        try:
            return _run(args, command or "python -m benchmarks.fisher_speed")
        finally:
            torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32


def _run(args: argparse.Namespace, command: str) -> Report:
    device = torch.device(args.device)
    revision = _library_revision()  # the code this process imported, not the code at the end

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    rows: list[Row] = []
    auto: dict[str, str] = {}
    workloads = make_workloads(args.models, args.quick, args.samples, device)
    with warnings.catch_warnings():  # peers' and torch.func's performance warnings
        warnings.simplefilter("ignore", UserWarning)
        for done, w in enumerate(workloads, 1):
            log(f"{w.title}, C={w.num_classes}, N={w.size}")
            workload_rows = benchmark_workload(w, args.repeats, args.max_seconds, device, log)
            auto[w.model_key] = auto_backend(w, workload_rows)
            rows += workload_rows
            targets = evaluate_targets(rows, auto)
            status = "" if done == len(workloads) else f"partial, {done}/{len(workloads)} workloads"
            markdown = render(args, command, device, rows, targets, auto, revision, status)
            if args.out is not None:  # after each workload, so a long run shows progress
                args.out.parent.mkdir(parents=True, exist_ok=True)
                args.out.write_text(markdown)
    return Report(rows, targets, markdown, auto)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point; prints the report's tables."""
    argv = list(sys.argv[1:] if argv is None else argv)
    report = run(parse_args(argv), " ".join(["python -m benchmarks.fisher_speed", *argv]))
    print(report.markdown)
    return 0


if __name__ == "__main__":
    sys.exit(main())
