import pytest
import torch

torch.set_num_threads(2)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=["cpu", "launch_bound"])
def engine_ways(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Runs a test twice: with the engines' ways for the CPU, and with those of a launch-bound
    device (a GPU: one pull-back batched over the vectors, gathers, chunks bounded by the
    budget alone; :func:`ewc_reg.engines.base.launch_bound`), here on the CPU, so that the
    GPU's ways are checked against the same references without a GPU."""
    if request.param == "launch_bound":
        from ewc_reg.engines import base

        monkeypatch.setattr(base, "launch_bound", lambda device: True)
    return request.param
