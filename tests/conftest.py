from collections.abc import Iterator

import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(autouse=True)
def _looped_at_any_size(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """The hooks engine's looped pull-back on the CPU for passes of any size: the suite's
    models and batches are small, and would otherwise take the batched one
    (``hooks.looped_min_bytes``), which the launch-bound ways (``engine_ways``) and
    ``pull_back("batched")`` test; so the CPU's looped way keeps its tests. Tests of that
    threshold itself use ``looped_min_bytes``."""
    if "looped_min_bytes" not in request.fixturenames:
        from ewc_reg.engines import hooks

        monkeypatch.setattr(hooks, "LOOPED_MIN_BYTES_PER_THREAD", 0)


@pytest.fixture
def looped_min_bytes() -> Iterator[int]:
    """The hooks engine's own threshold in the test (``hooks.looped_min_bytes()``, not the
    suite's 0), with torch on the suite's 2 threads (it depends on the thread count)."""
    from ewc_reg.engines import hooks

    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        yield hooks.looped_min_bytes()
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(params=["cpu", "launch-bound"])
def engine_ways(request: pytest.FixtureRequest) -> Iterator[str]:
    """Runs a test twice: with the engines' ways for the CPU, and with those of a launch-bound
    device (a GPU: one pull-back batched over the vectors, gathers, chunks bounded by the
    budget alone; :func:`ewc_reg.engines.base.launch_bound`), here on the CPU, so that the
    GPU's ways are checked against the same references without a GPU."""
    from benchmarks._paths import engine_ways

    with engine_ways(request.param):
        yield request.param


@pytest.fixture
def unchecked_sums(monkeypatch: pytest.MonkeyPatch) -> None:
    """For tests that count the hooks engine's forward passes or pull-backs: without the check
    of its sums against the loop engine's on two samples (``HookEngine._check_sums``, once per
    model and shapes), whose passes are its own (tested on their own)."""
    from ewc_reg.engines.hooks import HookEngine

    monkeypatch.setattr(HookEngine, "_check_sums", lambda self, *args: None)


@pytest.fixture
def pull_back_modes(monkeypatch: pytest.MonkeyPatch, unchecked_sums: None) -> list[bool]:
    """Whether each pull-back of the hooks engine in the test looped over the vectors (``True``)
    or was batched (``False``), in order (the check of the sums left out: ``unchecked_sums``)."""
    from ewc_reg.engines import hooks

    modes: list[bool] = []
    pull_back = hooks._pull_back

    def spy(output, edges, vectors, looped, *args, **kwargs):
        modes.append(looped)
        return pull_back(output, edges, vectors, looped, *args, **kwargs)

    monkeypatch.setattr(hooks, "_pull_back", spy)
    return modes
