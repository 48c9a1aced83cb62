"""``memory_budget``: with ``chunk_size=None`` the engine's working set stays within the budget
however many samples a batch holds (issue #5, part 3).

Memory is measured without timing or RSS: a dispatch mode sees every tensor the computation
creates (under ``vmap`` it sees the physical, chunk-batched tensors) and records the largest.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

import ewc_reg.engines.functorch as functorch_engine
import ewc_reg.fisher as fisher_module
from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.engines import ENGINES
from ewc_reg.engines.base import DEFAULT_MEMORY_BUDGET, default_memory_budget, resolve_chunk_size

D_IN, HIDDEN, CLASSES = 16, 64, 4
PARAM_BYTES = 8 * (D_IN * HIDDEN + HIDDEN + HIDDEN * CLASSES + CLASSES)  # float64
SAMPLE_BYTES = 3 * (CLASSES - 1) * PARAM_BYTES  # exact: K = C - 1 pull-backs per sample


class LargestTensor(TorchDispatchMode):
    """Records the size in bytes of the largest tensor any operation returns."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for leaf in pytree.tree_leaves(out):
            if isinstance(leaf, torch.Tensor):
                self.largest = max(self.largest, leaf.nbytes)
        return out


@pytest.fixture
def chunk_sizes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The chunk sizes the functorch engine resolves: per batch, of samples, preceded by one of
    vectors when a single sample exceeds the budget."""
    used: list[int] = []

    def spy(chunk_size: int | None, memory_budget: int, bytes_per_sample: int) -> int:
        used.append(resolve_chunk_size(chunk_size, memory_budget, bytes_per_sample))
        return used[-1]

    monkeypatch.setattr(functorch_engine, "resolve_chunk_size", spy)
    return used


def make_model() -> nn.Module:
    return nn.Sequential(
        nn.Linear(D_IN, HIDDEN), nn.Tanh(), nn.Linear(HIDDEN, CLASSES)
    ).double()


def one_batch(n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [(torch.randn(n, D_IN, dtype=torch.float64), torch.randint(0, CLASSES, (n,)))]


def test_resolve_chunk_size() -> None:
    assert resolve_chunk_size(7, 10, 1000) == 7
    assert resolve_chunk_size(None, 10_000, 1000) == 10
    assert resolve_chunk_size(None, 999, 1000) == 1  # at least one sample


@pytest.mark.parametrize(
    ("free", "reserved", "allocated", "want"),
    [
        (40 * 2**30, 3 * 2**30, 2 * 2**30, 41 * 2**30 // 4),  # a quarter of free + cached
        (2**30, 0, 0, DEFAULT_MEMORY_BUDGET),  # a quarter of 1 GiB: 256 MiB
        (10 * 2**20, 0, 0, DEFAULT_MEMORY_BUDGET),  # never less than 256 MiB
    ],
)
def test_the_default_budget_on_a_gpu_is_a_share_of_its_free_memory(
    monkeypatch: pytest.MonkeyPatch, free: int, reserved: int, allocated: int, want: int
) -> None:
    asked: list[torch.device] = []

    def mem_get_info(device: torch.device) -> tuple[int, int]:
        asked.append(device)
        return free, 80 * 2**30

    monkeypatch.setattr(torch.cuda, "mem_get_info", mem_get_info)
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda device: reserved)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda device: allocated)
    assert default_memory_budget(torch.device("cuda", 1)) == want
    assert asked == [torch.device("cuda", 1)]
    for device in ("cpu", "meta"):
        assert default_memory_budget(torch.device(device)) == DEFAULT_MEMORY_BUDGET


def test_a_call_without_a_budget_takes_its_devices_default(
    monkeypatch: pytest.MonkeyPatch, chunk_sizes: list[int]
) -> None:
    """Looked up once per call, for the device of the parameters."""
    devices: list[torch.device] = []

    def default(device: torch.device) -> int:
        devices.append(device)
        return 5 * SAMPLE_BYTES

    monkeypatch.setattr(fisher_module, "default_memory_budget", default)
    functorch_fisher(make_model(), one_batch(12) * 2)
    assert devices == [torch.device("cpu")] and chunk_sizes == [5, 5]
    functorch_fisher(make_model(), one_batch(12), memory_budget=2 * SAMPLE_BYTES)
    assert len(devices) == 1 and chunk_sizes[-1] == 2


class RunsOutAbove:
    """An engine that runs out of device memory at budgets above ``limit`` bytes, and
    otherwise is ``engine``; it records the budgets it is called with."""

    def __init__(self, engine, limit: int) -> None:
        self.engine, self.limit, self.budgets = engine, limit, []

    def __call__(self, *args):
        self.budgets.append(args[-1])
        if args[-1] > self.limit:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return self.engine(*args)


@pytest.mark.parametrize("method", ["exact", "sample"])
def test_the_default_budget_is_halved_when_the_device_runs_out_of_memory(
    monkeypatch: pytest.MonkeyPatch, method: str, caplog
) -> None:
    """Where the budget is the device's default, an out-of-memory error makes the batch run
    again with half of it (its ``sample`` draws kept), and the later batches start there; a
    budget or chunk size of the caller's, or the least default, lets the error through."""
    real_engine, b = fisher_module.get_engine, DEFAULT_MEMORY_BUDGET
    made: list[RunsOutAbove] = []
    limit = 3 * b

    def get_engine(*args) -> RunsOutAbove:
        made.append(RunsOutAbove(real_engine(*args), limit))
        return made[-1]

    monkeypatch.setattr(fisher_module, "get_engine", get_engine)
    monkeypatch.setattr(fisher_module, "default_memory_budget", lambda d: 9 * b)
    model, data = make_model(), one_batch(12) * 2

    def fisher(**kwargs) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return fisher_diagonal(model, data, method, generator=generator, **kwargs)

    with caplog.at_level("INFO", logger="ewc_reg"):
        got = fisher()
    assert made[-1].budgets == [9 * b, 9 * b // 2, 9 * b // 4, 9 * b // 4]
    assert [r.getMessage()[-8:] for r in caplog.records] == ["1152 MiB", " 576 MiB"]
    want = fisher(memory_budget=9 * b // 4)
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-12, atol=0)
    for kwargs in ({"memory_budget": 4 * b}, {"chunk_size": 4}):
        with pytest.raises(torch.OutOfMemoryError):
            fisher(**kwargs)
    limit = b - 1
    with pytest.raises(torch.OutOfMemoryError):
        fisher()
    assert made[-1].budgets == [9 * b, 9 * b // 2, 9 * b // 4, 9 * b // 8, b]


def functorch_fisher(*args, **kwargs) -> dict[str, torch.Tensor]:
    return fisher_diagonal(*args, backend="functorch", **kwargs)


def test_functorch_engine_chunks_by_the_budget(chunk_sizes: list[int]) -> None:
    model, data = make_model(), one_batch(50)
    reference = functorch_fisher(model, data, chunk_size=50)
    chunked = functorch_fisher(model, data, memory_budget=7 * SAMPLE_BYTES + 1)
    assert chunk_sizes == [50, 7]
    for name in reference:
        torch.testing.assert_close(chunked[name], reference[name], rtol=1e-12, atol=1e-15)
    functorch_fisher(model, data)  # default budget: the whole batch at once
    assert chunk_sizes[-1] == DEFAULT_MEMORY_BUDGET // SAMPLE_BYTES
    functorch_fisher(model, data, method="sample", mc_samples=2, memory_budget=3 * SAMPLE_BYTES)
    assert chunk_sizes[-1] == 4  # K = 2 vectors per sample instead of 3
    functorch_fisher(model, data, chunk_size=5, memory_budget=1)
    assert chunk_sizes[-1] == 5  # an explicit chunk_size wins


@pytest.mark.parametrize("backend", list(ENGINES))
def test_largest_tensor_stays_within_the_budget_as_the_batch_grows(backend: str) -> None:
    model = make_model()
    budget = 2**20
    largest = {}
    for n in (16, 128, 512):
        data = one_batch(n)
        with LargestTensor() as probe:
            fisher_diagonal(model, data, memory_budget=budget, backend=backend)
        largest[n] = probe.largest
    assert max(largest.values()) <= budget
    if backend == "functorch":  # beyond one chunk only the forward pass over the batch grows
        assert largest[512] <= max(largest[128], 512 * HIDDEN * 8)
        with LargestTensor() as unbounded:
            fisher_diagonal(model, one_batch(512), backend=backend)
        assert unbounded.largest > 4 * budget  # the default budget takes the batch at once


def test_functorch_engine_splits_a_sample_that_exceeds_the_budget(
    chunk_sizes: list[int],
) -> None:
    """K = 4 pull-backs of one sample (4 labels drawn) need 3 K P bytes; half of it pulls back
    2 at a time."""
    model, data = make_model(), one_batch(6)
    sample_bytes = 3 * 4 * PARAM_BYTES

    def fisher(**kwargs) -> dict[str, torch.Tensor]:
        generator = torch.Generator().manual_seed(0)
        return functorch_fisher(model, data, "sample", mc_samples=4, generator=generator, **kwargs)

    reference = fisher()
    with LargestTensor() as whole:
        fisher(memory_budget=sample_bytes)
    with LargestTensor() as split:
        halves = fisher(memory_budget=sample_bytes // 2)
    assert chunk_sizes[-2:] == [2, 1]  # 2 vectors at a time, 1 sample at a time
    assert split.largest * 2 == whole.largest <= sample_bytes
    for name in reference:
        torch.testing.assert_close(halves[name], reference[name], rtol=1e-12, atol=1e-15)


def test_budget_reaches_the_engine_through_consolidate(chunk_sizes: list[int]) -> None:
    reg = EWCRegularizer(make_model())
    reg.consolidate(one_batch(20), memory_budget=3 * SAMPLE_BYTES, backend="functorch")
    assert chunk_sizes == [3]


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_budget(bad: object) -> None:
    with pytest.raises(ValueError, match="memory_budget"):
        fisher_diagonal(make_model(), one_batch(4), memory_budget=bad)
