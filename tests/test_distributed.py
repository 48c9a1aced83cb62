"""Data-parallel Fisher (issue #5, part 2): two CPU processes on gloo, spawned once for the
module, each holding an unequal shard; every rank must return the single-process Fisher of the
union of the shards."""

from __future__ import annotations

import contextlib
import datetime
import os
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ewc_reg import EWCRegularizer, fisher_diagonal
from ewc_reg.distributed import process_group_for, shard_generator, unwrap_model

WORLD = 2
SIZES = (3, 4, 2, 5, 1)  # batch sizes; rank 0 gets the first three (9 samples), rank 1 six
SPLIT = 3
SEED = 7
RTOL = 1e-6


def make_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(4, 6), nn.Tanh(), nn.Dropout(0.3), nn.Linear(6, 3)
    ).double()


def make_batches() -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(1)
    return [
        (
            torch.randn(n, 4, generator=g, dtype=torch.float64),
            torch.randint(0, 3, (n,), generator=g),
        )
        for n in SIZES
    ]


def shard(rank: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    batches = make_batches()
    return batches[:SPLIT] if rank == 0 else batches[SPLIT:]


def sample_fisher(model: nn.Module, data: Any, generator: torch.Generator, **kw: Any) -> dict:
    return fisher_diagonal(model, data, "sample", mc_samples=3, generator=generator, **kw)


def scenarios(rank: int, workdir: Path) -> dict[str, Any]:
    """Everything each rank computes; compared against one process by the tests."""
    model, data, out = make_model(), shard(rank), {}
    for method in ("exact", "empirical", "batched"):
        out[method] = fisher_diagonal(model, data, method)
    out["sample"] = sample_fisher(model, data, torch.Generator().manual_seed(SEED))
    out["local"] = fisher_diagonal(model, data, distributed=False)
    out["group"] = fisher_diagonal(model, data, process_group=dist.new_group([0, 1]))
    out["empty_shard"] = fisher_diagonal(model, make_batches() if rank == 0 else [])
    out["subset"] = fisher_diagonal(model, data, "empirical", params=["3.weight"])
    bad = data if rank == 0 else [(data[0][0], data[0][1] + 5)]
    try:
        fisher_diagonal(model, bad, "empirical")
    except Exception as error:  # the test inspects the type on each rank
        out["failure"] = f"{type(error).__name__}: {error}"

    # DDP: consolidate, one synchronous training step, consolidate again, save/load on rank 0/1.
    ddp = DistributedDataParallel(model)
    reg = EWCRegularizer(ddp, strength=100.0, method="exact", mode="separate")
    reg.consolidate(data)
    out["ddp_fisher_1"] = reg.fisher
    before = reg.state_dict()
    wrong_width = [(torch.randn(2, 7, dtype=torch.float64), torch.zeros(2, dtype=torch.long))]
    with contextlib.suppress(RuntimeError):  # the forward fails on rank 1, so both raise
        reg.consolidate(data if rank == 0 else wrong_width)
        out["ddp_bad_consolidate_returned"] = True
    after = reg.state_dict()
    out["ddp_unchanged_after_failure"] = after["num_tasks"] == before["num_tasks"] and all(
        torch.equal(after["fisher"][n], before["fisher"][n]) for n in before["fisher"]
    )
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)
    x, y = data[0]
    loss = F.cross_entropy(ddp(x), y) + reg.penalty()
    loss.backward()
    optimizer.step()
    out["ddp_trained"] = {n: p.detach().clone() for n, p in model.named_parameters()}
    grads = {}  # add_penalty_grad after a synchronised backward: the penalty in the loss's grads
    for how in ("in the loss", "added"):
        optimizer.zero_grad()
        torch.manual_seed(rank)  # (the same dropout both times)
        loss = F.cross_entropy(ddp(x), y)
        (loss + reg.penalty() if how == "in the loss" else loss).backward()
        if how == "added":
            reg.add_penalty_grad()
        grads[how] = [p.grad.clone() for p in model.parameters()]
    out["ddp_penalty_grad_gap"] = max(
        ((a - b).abs().max() / b.abs().max()).item() for a, b in zip(*grads.values())
    )
    out["ddp_fisher_2"] = reg.consolidate(data)  # this task's Fisher
    out["ddp_anchor"] = reg.anchor
    out["ddp_training"] = model.training
    out["ddp_keys"] = sorted(reg.state_dict()["fisher"])
    path = workdir / "reg_state.pt"
    if rank == 0:
        torch.save(reg.state_dict(), path)
    dist.barrier()
    twin = make_model()  # unwrapped, as a single-process user would build it
    twin.load_state_dict(model.state_dict())
    fresh = EWCRegularizer(twin)
    fresh.load_state_dict(torch.load(path, map_location="cpu"))
    out["loaded_penalty"] = (fresh.penalty().item(), reg.penalty().item())
    return out


def _worker(rank: int, workdir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo", init_method=f"file://{workdir}/rendezvous", rank=rank, world_size=WORLD,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        torch.save(scenarios(rank, Path(workdir)), os.path.join(workdir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> list[dict[str, Any]]:
    workdir = tmp_path_factory.mktemp("dist")
    mp.spawn(_worker, args=(str(workdir),), nprocs=WORLD, join=True)
    return [torch.load(workdir / f"rank{r}.pt") for r in range(WORLD)]


def assert_fisher_equal(actual: dict, expected: dict) -> None:
    assert list(actual) == list(expected)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=RTOL, atol=1e-12)


@pytest.mark.parametrize("method", ["exact", "empirical", "batched"])
def test_every_rank_gets_the_fisher_of_the_union(ranks: list, method: str) -> None:
    expected = fisher_diagonal(make_model(), make_batches(), method)
    for out in ranks:
        assert_fisher_equal(out[method], expected)


def test_sample_is_the_union_of_per_shard_streams(ranks: list) -> None:
    model = make_model()
    total = None
    for r in range(WORLD):
        derived = shard_generator(torch.Generator().manual_seed(SEED), r)
        f = sample_fisher(model, shard(r), derived)
        n = sum(x.shape[0] for x, _ in shard(r))
        total = {k: n * v for k, v in f.items()} if total is None else {
            k: total[k] + n * v for k, v in f.items()
        }
    expected = {k: v / sum(SIZES) for k, v in total.items()}
    for out in ranks:
        assert_fisher_equal(out["sample"], expected)
    # the shards' streams differ: the union is not two copies of one stream
    a, b = (shard_generator(torch.Generator().manual_seed(SEED), r) for r in range(WORLD))
    assert not torch.equal(torch.rand(5, generator=a), torch.rand(5, generator=b))


def test_switches(ranks: list) -> None:
    for r, out in enumerate(ranks):
        assert_fisher_equal(out["local"], fisher_diagonal(make_model(), shard(r)))
        assert_fisher_equal(out["group"], out["exact"])
        assert_fisher_equal(out["empty_shard"], out["exact"])
        expected = fisher_diagonal(make_model(), make_batches(), "empirical", params=["3.weight"])
        assert_fisher_equal(out["subset"], expected)


def test_a_failure_on_one_rank_raises_on_all(ranks: list) -> None:
    assert ranks[0]["failure"].startswith("RuntimeError: the Fisher computation failed on 1 ")
    assert ranks[1]["failure"].startswith("ValueError: target label")


def test_ddp_wrapped_model(ranks: list) -> None:
    model = make_model()
    expected_1 = fisher_diagonal(model, make_batches())
    for out in ranks:
        assert out["ddp_keys"] == [n for n, _ in sorted(model.named_parameters())]
        assert_fisher_equal(out["ddp_fisher_1"], expected_1)
        assert "ddp_bad_consolidate_returned" not in out
        assert out["ddp_unchanged_after_failure"]
        assert out["ddp_training"] is True
        assert out["ddp_penalty_grad_gap"] < 1e-12
    for name in ranks[0]["ddp_trained"]:  # replicas stayed identical, hence so did the anchors
        assert torch.equal(ranks[0]["ddp_trained"][name], ranks[1]["ddp_trained"][name])
        assert torch.equal(ranks[0]["ddp_anchor"][name], ranks[1]["ddp_anchor"][name])
    model.load_state_dict(ranks[0]["ddp_trained"])
    expected_2 = fisher_diagonal(model, make_batches())
    for out in ranks:
        assert_fisher_equal(out["ddp_fisher_2"], expected_2)
        loaded, own = out["loaded_penalty"]
        assert loaded == pytest.approx(own, rel=1e-12)


def test_switch_rules_without_a_process_group() -> None:
    assert not dist.is_initialized()
    assert process_group_for(None, True) is None
    assert process_group_for(None, False) is None
    with pytest.raises(ValueError, match="not initialised"):
        process_group_for(object(), True)
    with pytest.raises(ValueError, match="distributed=False"):
        fisher_diagonal(make_model(), make_batches(), process_group=object(), distributed=False)
    with pytest.raises(ValueError, match="True or False"):
        EWCRegularizer(make_model(), distributed="yes")
    model = make_model()
    assert unwrap_model(nn.DataParallel(model)) is model
    assert list(fisher_diagonal(nn.DataParallel(model), make_batches())) == [
        n for n, _ in model.named_parameters()
    ]
