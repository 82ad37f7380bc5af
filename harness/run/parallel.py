"""The data-parallel group under ``torchrun``: ranks, global-batch slicing and gradient averaging.

:class:`DataParallelGroup` is this process's place in the group; :func:`init_distributed` makes it from torchrun's
environment (NCCL with one GPU per process when CUDA is there, gloo on CPU otherwise). :class:`ShardedLoader`
keeps this rank's contiguous slice of every global batch, so ``train.batch_size`` is the *global* batch and the
recipe means what it means in a one-process run. Training (:mod:`harness.run.train`) takes a ``DataParallelGroup``;
the torchrun entry point and its suite loop are in :mod:`harness.run.distributed`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from harness.core.device_loader import DeviceLoader

__all__ = ["DataParallelGroup", "ShardedLoader", "check_global_batch", "init_distributed"]


def check_global_batch(batch_size: int, world_size: int) -> None:
    """``train.batch_size`` is the global batch: it must split evenly over the processes."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size: {batch_size} does not split evenly over {world_size} processes; "
                         f"allowed: a multiple of {world_size}")


class ShardedLoader:
    """One rank's slice of every batch of a :class:`~harness.core.device_loader.DeviceLoader`.

    The wrapped loader yields the global batches a single process would see (its generator is seeded the same on
    every rank, so permutation and augmentation draws agree); this rank keeps rows ``[lo, hi)`` of each, with
    ``lo = rank * B // world`` and ``hi = (rank + 1) * B // world``. Gathering and augmenting the whole global batch
    on every rank costs one input batch per rank, small next to the activations, and makes the union of the
    slices exactly the one-process batch.

    Args:
        base: the loader of the whole training split.
        rank: this process's rank.
        world_size: number of processes.
    """

    def __init__(self, base: DeviceLoader, rank: int, world_size: int):
        check_global_batch(base.batch_size, world_size)
        self.base, self.rank, self.world_size = base, rank, world_size

    def __len__(self) -> int:
        return len(self.base)  # the same number of steps on every rank

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        for xb, yb in self.base:  # xb: (B, C, H, W), the global batch
            lo = xb.shape[0] * self.rank // self.world_size
            hi = xb.shape[0] * (self.rank + 1) // self.world_size
            yield xb[lo:hi], yb[lo:hi]  # (B / world, C, H, W)


@dataclass(frozen=True)
class DataParallelGroup:
    """This process's place in a data-parallel group, and what training needs from it.

    Attributes:
        rank: global rank (0 writes rows and checkpoints).
        world_size: number of processes.
        local_rank: rank within the node (its GPU index).
        device: the device this rank trains on.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_writer(self) -> bool:
        return self.rank == 0

    def shard(self, loader):
        """This rank's slice of every global batch of ``loader``: a loader with its own ``shard(rank, world_size)``
        (the streaming loader, which then decodes only this rank's files) does it itself, a
        :class:`~harness.core.device_loader.DeviceLoader` is wrapped in a :class:`ShardedLoader`."""
        check_global_batch(loader.batch_size, self.world_size)
        if hasattr(loader, "shard"):
            return loader.shard(self.rank, self.world_size)
        return ShardedLoader(loader, self.rank, self.world_size)

    def wrap(self, model: nn.Module) -> nn.Module:
        """``model`` under DDP: rank 0's weights are broadcast now, gradients averaged in every backward."""
        from torch.nn.parallel import DistributedDataParallel

        device_ids = [self.device.index] if self.device.type == "cuda" else None
        return DistributedDataParallel(model, device_ids=device_ids)

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """The mean of ``value`` over the ranks (a new tensor; gloo has no AVG, so SUM then divide)."""
        total = value.detach().clone()
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
        return total / self.world_size

    def broadcast(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (pickled, so any picklable value: a key set, a checkpoint)."""
        box = [obj if self.is_writer else None]
        dist.broadcast_object_list(box, src=0, device=self.device if self.device.type == "cuda" else None)
        return box[0]

    def barrier(self) -> None:
        if self.device.type == "cuda":
            dist.barrier(device_ids=[self.device.index])
        else:
            dist.barrier()


def init_distributed(device: str = "auto") -> DataParallelGroup:
    """Join the process group ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``).

    Args:
        device: "auto" (CUDA when present), "cpu" or "cuda"; CUDA uses NCCL and ``cuda:LOCAL_RANK``, CPU gloo.

    Returns:
        This process's :class:`DataParallelGroup`.
    """
    missing = [k for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        raise ValueError(f"{', '.join(missing)} not set; run this under torchrun, e.g. "
                         "torchrun --nproc_per_node=2 -m harness.run.distributed SUITE --only KEY")
    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device: {device!r} not allowed under torchrun; allowed: auto, cpu, cuda "
                         "(each rank takes cuda:LOCAL_RANK)")
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise ValueError("device: 'cuda' requested but CUDA is not available; allowed here: cpu, auto")
        if local >= torch.cuda.device_count():
            raise ValueError(f"--nproc_per_node: local rank {local} but only {torch.cuda.device_count()} GPUs visible")
        dev = torch.device("cuda", local)
        torch.cuda.set_device(dev)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if use_cuda else "gloo", rank=rank, world_size=world)
    return DataParallelGroup(rank=rank, world_size=world, local_rank=local, device=dev)
