"""Data-parallel training of large runs under ``torchrun``, with DistributedDataParallel.

One experiment too big for one device (ResNet-50 on ``imagefolder:`` data, say) trains on every rank at once::

    torchrun --nproc_per_node=8 -m harness.run.distributed SUITE [section.field=value ...] --only KEY

Every rank runs the same experiments in the same order, so the processes stay in lock-step:

- Data: each rank holds the dataset on its own device (local rank 0 of a node loads, and downloads, first).
  Every rank builds the very batch order and augmentation draws a single process would (same seed), and keeps
  its contiguous slice of each global batch: ``train.batch_size`` is the *global* batch, split evenly, so the
  recipe and its learning rate mean what they mean in a one-process run. No DataLoader, no worker processes.
- Gradients: the model's forward runs through ``DistributedDataParallel``, which averages gradients over the
  ranks in backward; the optimizer steps are then identical and so are the weights on every rank.
  BatchNorm normalises each rank's slice with that slice's statistics, and DDP broadcasts rank 0's running
  statistics at each forward (its default): the one known difference from a one-process run.
- Writes: rank 0 alone appends rows to the store and writes dense checkpoints; it reads an existing checkpoint
  and broadcasts it, so every rank starts from the same weights without a shared file system. Ranks other than 0
  skip latency timing, so they do not disturb rank 0's measurement.
- Backend: NCCL with one GPU per process (``cuda:LOCAL_RANK``) when CUDA is there, gloo on CPU otherwise.

Rows carry ``executor="torchrun"`` and ``world_size``. Resumption works as for the local executor: rank 0 reads
the keys already ``ok`` and every rank skips them.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from harness.run.checkpoints import load_checkpoint, save_checkpoint
from harness.run.config import Experiment, Suite, expand
from harness.run.data import DeviceLoader, load_suite_data
from harness.run.progress import Reporter
from harness.run.context import RunContext
from harness.run.experiment import run_experiment
from harness.run.runner import RowSink, SuiteOutcome, open_suite, select

__all__ = ["DataParallel", "ShardedLoader", "check_global_batch", "init_distributed", "run_suite_ddp", "build_parser",
           "main"]


def check_global_batch(batch_size: int, world_size: int) -> None:
    """``train.batch_size`` is the global batch: it must split evenly over the processes."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size: {batch_size} does not split evenly over {world_size} processes; "
                         f"allowed: a multiple of {world_size}")


class ShardedLoader:
    """One rank's slice of every batch of a :class:`~harness.run.data.DeviceLoader`.

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
class DataParallel:
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
        :class:`~harness.run.data.DeviceLoader` is wrapped in a :class:`ShardedLoader`."""
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


def init_distributed(device: str = "auto") -> DataParallel:
    """Join the process group ``torchrun`` set up (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``).

    Args:
        device: "auto" (CUDA when present), "cpu" or "cuda"; CUDA uses NCCL and ``cuda:LOCAL_RANK``, CPU gloo.

    Returns:
        This process's :class:`DataParallel`.
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
    return DataParallel(rank=rank, world_size=world, local_rank=local, device=dev)


class _DDPContext(RunContext):
    """The run context of one rank: DDP training; rank 0 reads and writes checkpoints and kept models."""

    def __init__(self, data, device: torch.device, results_dir: Path, reporter: Reporter, parallel: DataParallel,
                 keep_models: bool):
        super().__init__(data, device, results_dir, reporter, parallel=parallel, keep_models=keep_models)

    def load_dense(self, path: Path) -> tuple[dict, dict] | None:
        # Rank 0 decides for everyone: all ranks load the same weights, or all train them together.
        return self.parallel.broadcast(load_checkpoint(path) if self.parallel.is_writer else None)

    def save_dense(self, path: Path, model: nn.Module, meta: dict) -> None:
        if self.parallel.is_writer:
            save_checkpoint(path, model, {**meta, "world_size": self.parallel.world_size})


def _without_latency(exp: Experiment) -> Experiment:
    return dataclasses.replace(exp, measure=dataclasses.replace(exp.measure, latency=False))


def run_suite_ddp(suite: Suite, parallel: DataParallel, *, results_dir: str | os.PathLike = "results",
                  only: list[str] | None = None, progress: bool = True) -> SuiteOutcome:
    """Run the selected experiments of ``suite`` one after another, each data-parallel over all ranks.

    Every rank must call this with the same arguments.

    Args:
        suite: the validated suite.
        parallel: this rank's place in the group (:func:`init_distributed`).
        results_dir: rank 0 appends rows to ``results_dir/<suite name>/runs.jsonl``.
        only: wildcard patterns on experiment keys (as ``bunitbench run --only``).
        progress: show progress bars on rank 0.

    Returns:
        The outcome as rank 0 saw it, the same on every rank.
    """
    plan = open_suite(suite, results_dir, only) if parallel.is_writer else None
    todo_keys = parallel.broadcast([e.key for e in plan.todo] if parallel.is_writer else None)
    todo = [e for e in select(expand(suite), only) if e.key in set(todo_keys)]
    outcome = plan.outcome if parallel.is_writer else SuiteOutcome()
    if not todo:
        return outcome
    data = None
    if parallel.local_rank == 0:  # one download per node, then the others read the files
        data = load_suite_data(suite, parallel.device)  # on the device, or streamed as suite.data_loader says
    parallel.barrier()
    if data is None:
        data = load_suite_data(suite, parallel.device)  # on the device, or streamed as suite.data_loader says
    with Reporter(len(todo), enabled=progress and parallel.is_writer) as reporter:
        out_dir = Path(results_dir) / suite.name
        ctx = _DDPContext(data, parallel.device, out_dir, reporter, parallel, suite.keep_models)
        sink = RowSink(plan.store, outcome, reporter) if parallel.is_writer else None
        for exp in todo:
            reporter.start_run(exp.key)
            row = run_experiment(exp if parallel.is_writer else _without_latency(exp), ctx, executor="torchrun")
            if sink is not None:
                sink.add({**row, "world_size": parallel.world_size})
            status = parallel.broadcast(row["status"] if parallel.is_writer else None)  # also keeps ranks in step
            if sink is None:
                outcome.ran += 1
                outcome.keys.append(exp.key)
                outcome.ok += status == "ok"
                outcome.failed += status != "ok"
    return outcome


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m harness.run.distributed",
                                     description="Run suite experiments data-parallel; launch with torchrun.")
    parser.add_argument("suite", help="bundled suite name or path/to/suite.toml")
    parser.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.epochs=90")
    parser.add_argument("--only", action="append", metavar="PATTERN", help="run keys matching this wildcard")
    parser.add_argument("--device", default="auto", help="auto, cpu or cuda (each rank takes cuda:LOCAL_RANK)")
    parser.add_argument("--results-dir", default="results", help="rows go to RESULTS_DIR/<suite>/runs.jsonl")
    parser.add_argument("--plugin", action="append", default=[], metavar="FILE", help="a .py file registering methods")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_intermixed_args(argv)  # overrides may come after the options
    from harness.run.config import apply_overrides, load_suite
    from harness.run.runner import load_plugin

    try:
        for plugin in args.plugin:
            load_plugin(plugin)
        suite = apply_overrides(load_suite(args.suite), args.overrides)
        if args.only and not select(expand(suite), args.only):
            raise ValueError(f"--only: no experiment key matches {args.only}; see `bunitbench run --dry-run`")
        parallel = init_distributed(args.device)
    except ValueError as err:  # the same on every rank: each prints it and exits before any collective
        print(f"harness.run.distributed: error: {err}", file=sys.stderr)
        return 2
    try:
        outcome = run_suite_ddp(suite, parallel, results_dir=args.results_dir, only=args.only,
                                progress=not args.no_progress)
    finally:
        dist.destroy_process_group()
    if parallel.is_writer:
        print(f"suite {suite.name}: {outcome.ok} ok, {outcome.failed} failed, {outcome.skipped} already done "
              f"on {parallel.world_size} processes -> {args.results_dir}/{suite.name}/runs.jsonl")
    return 0 if outcome.failed == 0 else 1


if __name__ == "__main__":  # the imports above ran harness/__init__ (torchvision shim) first
    sys.exit(main())
