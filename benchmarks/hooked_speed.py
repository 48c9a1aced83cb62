"""What a user's forward hooks on a model's layers cost the Fisher.

Forward hooks on layers are common (feature extraction, activation logging, a distillation
loss reading a layer's output). A layer's own hooks keep its rule: its call is recorded after
its pre-hooks and its output before its hooks (:func:`ewc_reg.engines.rules.hooks_outside`).
Until then any hook sent the layer to the per-module fallback (``torch.func`` on the layer
alone). This benchmark times, side by side in one process, ``fisher_diagonal(model, [(x, y)],
method)`` (``backend="auto"``) on the reduced ResNet-18 of the Split CIFAR-10 benchmark
(C=10) as it is, with a read-only forward hook on every convolution and linear layer (each
stores its output), and with those layers on the per-module fallback, as hooked layers were
(each given a ``forward`` of its own, which keeps a layer off its rule, and that copies its
output, which keeps it off the products of :mod:`ewc_reg.engines.functional`); and a plain
forward+backward of the same batch (the gradient of the mean cross-entropy). Also the models
whose convolution and linear weights are made by a pre-hook (``torch.nn.utils.prune``: their
class's rule, :func:`ewc_reg.engines.rules.pruned_rule`) or a parametrization
(``torch.nn.utils.parametrizations.weight_norm``: their class's per-sample products pulled
back through it, :mod:`ewc_reg.engines.parametrized`), and those whose layers mask their
weight in a ``forward`` of their own, ``F.conv2d(x, self.weight * self.mask, ...)``, as
PackNet's, Piggyback's or HAT's do (the products pulled back through the masking,
:mod:`ewc_reg.engines.functional`), with ``"auto"`` and with ``backend="functorch"``. Rounds go
round-robin, order reversed every other round; medians, and ratios to the plain pass.

Run: ``python -m benchmarks.hooked_speed [--repeats 3] [--threads 2] [--device cpu] [--quick]
[--out FILE]``; writes ``benchmarks/results/hooked_speed.md``, or ``--out``; a ``--quick``
smoke test writes only where ``--out`` says.
"""

from __future__ import annotations

import argparse
import copy
import statistics
from collections.abc import Callable
from datetime import date
from pathlib import Path

import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from torch import nn
from torch.nn.utils import parametrizations

import ewc_reg
from ewc_reg import fisher_diagonal

from ._reports import machine, timing_main
from ._timing import measure
from .models import ReducedResNet18

RESULTS = Path(__file__).parent / "results" / "hooked_speed.md"
METHODS = ("exact", "empirical")
#: The models compared, as made from the plain one, and the backend each is computed with
#: (:func:`_variants`).
VARIANTS = (
    "no hooks",
    "hooked",
    "on the per-module fallback",
    "pruned",
    "pruned, functorch engine",
    "weight_norm",
    "weight_norm, functorch engine",
    "masked",
    "masked, functorch engine",
)


class MaskedConv2d(nn.Conv2d):
    """A convolution whose ``forward`` masks its weight with a fixed binary mask, as the layers
    of PackNet, Piggyback or HAT do (no class rule: a ``forward`` of its own)."""

    def __init__(self, layer: nn.Conv2d) -> None:
        super().__init__(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            layer.groups,
            layer.bias is not None,
            device=layer.weight.device,
        )
        self.load_state_dict(layer.state_dict())
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.5).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.weight * self.mask
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class MaskedLinear(nn.Linear):
    """:class:`MaskedConv2d`'s linear twin."""

    def __init__(self, layer: nn.Linear) -> None:
        has_bias = layer.bias is not None
        device = layer.weight.device
        super().__init__(layer.in_features, layer.out_features, has_bias, device=device)
        self.load_state_dict(layer.state_dict())
        self.register_buffer("mask", (torch.rand_like(self.weight) > 0.5).to(self.weight))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight * self.mask, self.bias)


def _copying(forward: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
    """``forward`` with its output copied: a module with it has no rule, and its output is not
    that of a product it calls (:mod:`ewc_reg.engines.functional` would take it), so it goes
    to the per-module fallback."""
    return lambda *args: forward(*args).clone()


def _masked(model: nn.Module) -> nn.Module:
    """A copy of ``model`` with each convolution and linear layer a masked one."""
    masked = copy.deepcopy(model)
    for parent in list(masked.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Conv2d:
                setattr(parent, name, MaskedConv2d(child))
            elif type(child) is nn.Linear:
                setattr(parent, name, MaskedLinear(child))
    return masked


def _variants(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """``model``, a copy with a read-only forward hook on every convolution and linear layer,
    a copy whose such layers take the per-module fallback (a ``forward`` of their own that
    copies the output: :func:`_copying`), and
    copies whose such layers' weights are pruned (half of each), weight-normalized or masked
    by a ``forward`` of their own (:class:`MaskedConv2d`), each of the last three on
    ``"auto"`` and on the functorch engine."""
    hooked, fallback, pruned, normed = (copy.deepcopy(model) for _ in range(4))
    stored: dict[str, torch.Tensor] = {}
    for name, layer in hooked.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.Linear)):
            layer.register_forward_hook(
                lambda module, args, out, name=name: stored.__setitem__(name, out.detach())
            )
    layers = [
        [m for m in copy_.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        for copy_ in (fallback, pruned, normed)
    ]
    for layer in layers[0]:
        layer.forward = _copying(layer.forward)  # (an instance forward: no rule)
    for layer in layers[1]:
        prune.l1_unstructured(layer, "weight", amount=0.5)
    for layer in layers[2]:
        parametrizations.weight_norm(layer)
    masked = _masked(model)
    models = (model, hooked, fallback, pruned, pruned, normed, normed, masked, masked)
    backends = ("auto", "auto", "auto", "auto", "functorch", "auto", "functorch")
    backends += ("auto", "functorch")
    return dict(zip(VARIANTS, zip(models, backends)))


def _calls(
    models: dict[str, tuple[nn.Module, str]], x: torch.Tensor, y: torch.Tensor, method: str
) -> dict[str, Callable[[], float]]:
    def plain() -> float:
        model = models["no hooks"][0]

        def step() -> None:
            model.zero_grad(set_to_none=True)
            F.cross_entropy(model(x), y).backward()

        return measure(step, x.device).seconds

    def fisher(model: nn.Module, backend: str) -> Callable[[], float]:
        def call() -> None:
            fisher_diagonal(model, [(x, y)], method, backend=backend)

        return lambda: measure(call, x.device).seconds

    return {"plain fwd+bwd": plain, **{name: fisher(*m) for name, m in models.items()}}


def run(
    repeats: int, threads: int, device: torch.device, quick: bool
) -> dict[str, dict[str, list[float]]]:
    """The timed seconds of each contender, by method."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    n = 4 if quick else 32
    model = ReducedResNet18(10).to(device).eval()
    x, y = torch.randn(n, 3, 32, 32, device=device), torch.randint(0, 10, (n,), device=device)
    models = _variants(model)
    timed: dict[str, dict[str, list[float]]] = {}
    for method in METHODS:
        calls = _calls(models, x, y, method)
        for call in calls.values():  # (warm-up: the hooks engine's checks run once)
            call()
        names = list(calls)
        times: dict[str, list[float]] = {name: [] for name in names}
        for round_ in range(repeats):
            for name in names if round_ % 2 == 0 else names[::-1]:
                times[name].append(calls[name]())
        timed[method] = times
    return timed


def report(timed: dict[str, dict[str, list[float]]], args: argparse.Namespace) -> str:
    """Markdown: one row per method and contender, the median in ms and its ratio."""
    device = torch.device(args.device)
    lines = [
        "# Forward hooks, and weights made by pre-hooks, parametrizations or a forward of their "
        "own: what they cost the Fisher",
        "",
        f"`python -m benchmarks.hooked_speed --repeats {args.repeats} --threads {args.threads} "
        f"--device {args.device}{' --quick' * args.quick}` · ewc_reg {ewc_reg.__version__} · "
        f"torch {torch.__version__} · {machine(device)} · {date.today()} · reduced ResNet-18, "
        f'float32, C=10, N={4 if args.quick else 32}, `backend="auto"` but where named · '
        f"medians of {args.repeats} rounds, order reversed every other round",
        "",
        "| method | contender | median (ms) | × plain fwd+bwd |",
        "|---|---|---:|---:|",
    ]
    for method, times in timed.items():
        base = statistics.median(times["plain fwd+bwd"])
        for name, seconds in times.items():
            median = statistics.median(seconds)
            lines.append(f"| {method} | {name} | {1e3 * median:.1f} | {median / base:.2f}× |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> str:
    """Run the benchmark ``argv`` asks for (:func:`._reports.timing_main`)."""
    quick = "a tiny batch: a smoke test, written only where --out says"
    return timing_main(argv, __spec__.name, __doc__, 3, quick, RESULTS, run, report)


if __name__ == "__main__":
    main()
