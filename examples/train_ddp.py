"""A small, real DDP training run on CPU (gloo), for `ddplaunch --nproc 2 examples/train_ddp.py`.

It fits a two-layer MLP to a noisy synthetic regression target, with DistributedSampler and
set_epoch so each rank sees its own shard in a fresh order every epoch. Rank 0 logs the loss.
At the end every rank checks that all replicas hold identical weights (the point of DDP), and
the run fails if they do not or if the loss did not fall.
"""

from __future__ import annotations

import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset


def make_dataset(samples: int, features: int) -> TensorDataset:
    generator = torch.Generator().manual_seed(0)  # the same data on every rank
    inputs = torch.randn(samples, features, generator=generator)
    true_weights = torch.randn(features, 1, generator=generator)
    targets = torch.tanh(inputs @ true_weights) + 0.05 * torch.randn(samples, 1, generator=generator)
    return TensorDataset(inputs, targets)


def replicas_identical(model: nn.Module) -> bool:
    """Every rank's weights equal rank 0's, to the last bit."""
    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    reference = flat.clone()
    dist.broadcast(reference, src=0)
    same = torch.tensor([int(torch.equal(flat, reference))])
    dist.all_reduce(same, op=dist.ReduceOp.MIN)
    return bool(same.item())


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--lr", type=float, default=0.05)
    parser.add_argument("--samples", type=int, default=2048)
    parser.add_argument("--hang-rank", type=int, default=None, metavar="R",
                        help="Make rank R wait for data that never comes before its first step, "
                             "so the others hang in their first all_reduce: try Ctrl-\\ then.")
    return parser.parse_args()


def wait_for_data(seconds: float) -> None:
    """--hang-rank: the stuck rank's "data loading" (the others wait for it in a collective)."""
    time.sleep(seconds)


def train(args: argparse.Namespace, rank: int, world_size: int) -> tuple[bool, float, float]:
    """Train; return (replicas identical?, first epoch's loss, last epoch's loss)."""
    torch.manual_seed(1234)  # DDP broadcasts rank 0's initial weights anyway
    dataset = make_dataset(args.samples, features=16)
    sampler = DistributedSampler(dataset, num_replicas=world_size, rank=rank, shuffle=True, seed=0)
    loader = DataLoader(dataset, batch_size=args.batch_size, sampler=sampler)
    model = DistributedDataParallel(nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 1)))
    optimizer = torch.optim.SGD(model.parameters(), lr=args.lr, momentum=0.9)
    loss_fn = nn.MSELoss()

    losses = []
    if args.hang_rank == rank:
        wait_for_data(3600.0)
    for epoch in range(args.epochs):
        sampler.set_epoch(epoch)  # a different shuffle each epoch, the same on every rank
        total = torch.zeros(2)
        for inputs, targets in loader:
            optimizer.zero_grad()
            loss = loss_fn(model(inputs), targets)
            loss.backward()  # DDP averages gradients across ranks here
            optimizer.step()
            total += torch.tensor([loss.item() * len(inputs), len(inputs)])
        dist.all_reduce(total)
        losses.append((total[0] / total[1]).item())
        if rank == 0:
            print(f"epoch {epoch + 1}/{args.epochs}  loss {losses[-1]:.4f}  "
                  f"({world_size} ranks, {len(loader)} steps/rank)")
    return replicas_identical(model.module), losses[0], losses[-1]


def main() -> None:
    args = parse_args()
    dist.init_process_group("gloo")  # env://: RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    rank, world_size = dist.get_rank(), dist.get_world_size()
    identical, first_loss, last_loss = train(args, rank, world_size)
    # Free the DDP model (it sits in reference cycles) while the interpreter is fully alive,
    # before its process group goes: otherwise torch 2.13 sometimes aborts a rank at exit
    # ("terminate called without an active exception"), under torchrun as under ddplaunch.
    gc.collect()
    if rank == 0:
        verdict = "identical" if identical else "DIFFERENT"
        print(f"replicas {verdict} on all {world_size} ranks; loss {first_loss:.4f} -> {last_loss:.4f}")
    dist.barrier()  # every rank done with every collective before any tears gloo down
    dist.destroy_process_group()
    if not identical:
        raise SystemExit(f"rank {rank}: replicas differ after training")
    if args.epochs > 1 and last_loss >= first_loss:
        raise SystemExit(f"rank {rank}: the loss did not fall ({first_loss:.4f} -> {last_loss:.4f})")


if __name__ == "__main__":
    if "RANK" not in os.environ:
        raise SystemExit("run me through a launcher, e.g.: ddplaunch --nproc 2 examples/train_ddp.py")
    main()
