"""EWC with DistributedDataParallel: every rank consolidates on its shard of each task, and all
ranks hold the same Fisher (that of the whole task) and the same anchors.

Run on CPU (gloo) or GPUs (nccl, one per process)::

    torchrun --nproc_per_node=2 examples/distributed_consolidate.py

Rank 0 finally recomputes the last task's Fisher alone on all of the task's data
(``distributed=False``) and prints how far the distributed result is from it, then saves the
regularizer's state, which every rank loads into a regularizer of a plain (unwrapped) model.
"""

from __future__ import annotations

import os
import tempfile

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, Subset, TensorDataset

from ewc_reg import EWCRegularizer, fisher_diagonal


def make_task(seed: int, n: int = 600) -> TensorDataset:
    """A synthetic 5-class problem: labels from a random linear map of the inputs."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 20, generator=g)
    y = (x @ torch.randn(20, 5, generator=g)).argmax(dim=1)
    return TensorDataset(x, y)


def main() -> None:
    use_cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if use_cuda else "gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device(f"cuda:{os.environ.get('LOCAL_RANK', 0)}" if use_cuda else "cpu")
    torch.manual_seed(0)  # DDP broadcasts rank 0's parameters anyway
    model = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(device)
    ddp = DistributedDataParallel(model, device_ids=[device.index] if use_cuda else None)
    reg = EWCRegularizer(ddp, strength=100.0, method="exact")  # keys without "module."
    optimizer = torch.optim.SGD(ddp.parameters(), lr=0.1)

    for task, dataset in enumerate([make_task(1), make_task(2)]):
        sampler = DistributedSampler(dataset, seed=task)
        for epoch in range(3):
            sampler.set_epoch(epoch)
            for x, y in DataLoader(dataset, batch_size=32, sampler=sampler):
                x, y = x.to(device), y.to(device)
                loss = F.cross_entropy(ddp(x), y) + reg.penalty()
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
        # The Fisher shard must not repeat samples: DistributedSampler pads the last ranks with
        # repeats, so take a strided subset instead (shards of unequal size are fine).
        shard = Subset(dataset, range(rank, len(dataset), world))
        fisher = reg.consolidate(DataLoader(shard, batch_size=64))
        total = sum(f.sum().item() for f in fisher.values())
        print(f"rank {rank}: task {task} consolidated on {len(shard)} samples, "
              f"sum of Fisher {total:.6f}", flush=True)

    if rank == 0:
        alone = fisher_diagonal(model, DataLoader(dataset, batch_size=64), distributed=False)
        gap = max(((fisher[n] - alone[n]).abs().max() / alone[n].abs().max()).item()
                  for n in alone)
        print(f"rank 0: largest relative gap to the single-process Fisher: {gap:.2e}")
    path = os.path.join(tempfile.gettempdir(), f"ewc_state_{os.environ.get('MASTER_PORT')}.pt")
    if rank == 0:
        torch.save(reg.state_dict(), path)
    dist.barrier()
    plain = nn.Sequential(nn.Linear(20, 64), nn.ReLU(), nn.Linear(64, 5)).to(device)
    plain.load_state_dict(model.state_dict())
    restored = EWCRegularizer(plain)
    restored.load_state_dict(torch.load(path, map_location=device))
    same = all(
        torch.equal(restored.fisher[n], reg.fisher[n])
        and torch.equal(restored.anchor[n], reg.anchor[n])
        for n in reg.fisher
    )
    print(f"rank {rank}: rank 0's saved state restores this rank's Fisher and anchors: {same}",
          flush=True)
    dist.barrier()
    if rank == 0:
        os.remove(path)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
