"""Models compiled with ``torch.compile``: the Fisher runs their eager code (the engines hook,
``vmap`` and pull back layer by layer), is keyed like the uncompiled model, and leaves the
compiled code to be used again without a recompile.

The models are compiled with dynamo's ``"eager"`` backend, which traces them as ``inductor``
would but needs no C++ compiler; it was dynamo's tracing of the engine's hooks that failed
(``TypeError: '<=' not supported between instances of 'torch.Size' and 'int'``)."""

from __future__ import annotations

import copy
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from benchmarks._paths import engine_ways
from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.distributed import unwrap_model

from .models import cnn


@pytest.fixture(autouse=True)
def fresh_compiler():
    """Each test compiles anew: dynamo's caches (per code object, at most 8 graphs each) would
    otherwise fill up over the parametrised cases and run the rest uncompiled."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


class CountingBackend:
    """A ``torch.compile`` backend that counts the graphs it is given and runs them as they
    are."""

    def __init__(self) -> None:
        self.graphs = 0

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> object:
        self.graphs += 1
        return graph.forward


def whole(model: nn.Module, backend: CountingBackend) -> nn.Module:
    return torch.compile(model, backend=backend)


def in_place(model: nn.Module, backend: CountingBackend) -> nn.Module:
    model.compile(backend=backend)
    return model


def first_layer(model: nn.Module, backend: CountingBackend) -> nn.Module:
    model[0] = torch.compile(model[0], backend=backend)
    return model


def data(seed: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(7, 2, 6, 6, generator=g, dtype=torch.float64)
    y = torch.randint(0, 4, (7,), generator=g)
    return [(x[:4], y[:4]), (x[4:], y[4:])]


def plain_name(name: str) -> str:
    return name.replace("_orig_mod.", "")


@pytest.mark.parametrize("compile_", [whole, in_place, first_layer])
@pytest.mark.parametrize("backend", ["auto", "hooks", "functorch", "loop"])
@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_fisher_of_a_compiled_model_is_that_of_the_eager_model(compile_, backend, method):
    eager = cnn()
    counter = CountingBackend()
    compiled = compile_(copy.deepcopy(eager), counter)
    x, _ = data()[0]
    torch.testing.assert_close(compiled.eval()(x), eager.eval()(x))  # compiled once
    graphs = counter.graphs
    if graphs == 0 and compile_ is in_place:
        pytest.skip(f"model.compile() compiled nothing on torch {torch.__version__} (2.11)")
    assert graphs > 0
    kwargs = {} if method == "batched" else {"backend": backend}
    want = fisher_diagonal(eager, data(), method, **kwargs)
    got = fisher_diagonal(compiled, data(), method, **kwargs)
    # a compiled whole model is looked through, as a DDP wrapper is: no "_orig_mod." prefix
    names = [plain_name(n) for n in got] if compile_ is first_layer else list(got)
    assert names == list(want)
    for name, f in got.items():
        torch.testing.assert_close(f, want[plain_name(name)], rtol=1e-10, atol=1e-14)
    compiled(x)  # the compiled code is used again: nothing was recompiled
    assert counter.graphs == graphs


@pytest.mark.parametrize("compile_", [whole, first_layer])
def test_a_gpus_batched_pull_back_through_a_compiled_model(compile_):
    """With a GPU's ways (the conv/BN model's pull-back batched over the vectors under
    ``torch.func.vmap``), a compiled model's Fisher is still the eager model's."""
    eager = cnn()
    want = fisher_diagonal(eager, data(), "exact", backend="hooks")
    compiled = compile_(copy.deepcopy(eager), CountingBackend())
    with engine_ways("launch-bound"):
        got = fisher_diagonal(compiled, data(), "exact", backend="hooks")
    for name, f in got.items():
        torch.testing.assert_close(f, want[plain_name(name)], rtol=1e-10, atol=1e-14)


def test_regularizer_trains_a_compiled_model_and_its_state_fits_the_eager_model():
    eager = cnn()
    compiled = torch.compile(copy.deepcopy(eager), backend=CountingBackend())
    reg = EWCRegularizer(compiled, strength=5.0)
    assert reg.model is unwrap_model(compiled) is compiled._orig_mod
    fisher = reg.consolidate(data())
    torch.testing.assert_close(fisher, fisher_diagonal(eager, data()), rtol=1e-10, atol=1e-14)
    anchor = {n: p.detach().clone() for n, p in compiled._orig_mod.named_parameters()}
    optimizer = torch.optim.SGD(compiled.parameters(), lr=0.1)
    x, y = data(1)[0]
    for _ in range(2):  # the compiled forward, then the penalty's gradient on top
        optimizer.zero_grad()
        (F.cross_entropy(compiled.train()(x), y) + reg.penalty()).backward()
        optimizer.step()
    optimizer.zero_grad()
    penalty = reg.penalty()
    assert penalty.item() > 0  # the parameters moved away from the anchor
    penalty.backward()
    for name, p in compiled._orig_mod.named_parameters():
        torch.testing.assert_close(p.grad, 5.0 * fisher[name] * (p.detach() - anchor[name]))
    twin = EWCRegularizer(eager, strength=1.0)
    twin.load_state_dict(reg.state_dict())  # keys without "_orig_mod."
    torch.testing.assert_close(twin.fisher, reg.fisher, rtol=0, atol=0)


def test_unwrap_looks_through_compile_and_data_parallel_in_any_nesting():
    model = cnn()
    backend = CountingBackend()
    assert unwrap_model(torch.compile(nn.DataParallel(model), backend=backend)) is model
    assert unwrap_model(nn.DataParallel(torch.compile(model, backend=backend))) is model


def test_a_fisher_without_compiled_code_does_not_import_dynamo():
    """Setting compiled code aside needs torch._dynamo, whose import takes about a second: it
    is only done where something could have been compiled (dynamo already imported)."""
    script = (
        "import sys, torch\n"
        "from ewc_reg import fisher_diagonal\n"
        "model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))\n"
        "fisher_diagonal(model, [(torch.randn(5, 3), torch.randint(0, 2, (5,)))])\n"
        "print('torch._dynamo' in sys.modules)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=120
    )
    assert result.stdout.strip() == "False"
