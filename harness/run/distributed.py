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
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn

from harness.core.checkpoints import load_checkpoint, save_checkpoint
from harness.core.config import Experiment, Suite, apply_overrides, expand, load_suite
from harness.core.data import load_suite_data
from harness.run.parallel import DataParallelGroup, init_distributed
from harness.run.progress import Reporter
from harness.run.context import RunContext
from harness.run.experiment import run_experiment
from harness.run.runner import RowSink, SuiteOutcome, load_plugin, open_suite, select

__all__ = ["run_suite_ddp", "load_rank_data", "build_parser", "main"]


class _DDPContext(RunContext):
    """The run context of one rank: DDP training; rank 0 reads and writes checkpoints and kept models."""

    def __init__(self, data, device: torch.device, results_dir: Path, reporter: Reporter, parallel: DataParallelGroup,
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


def load_rank_data(suite: Suite, parallel: DataParallelGroup):
    """This rank's dataset, loaded first by the first rank of each node (one download per node) and the way rank 0
    loaded it: ``data_loader = "auto"`` decides from the free memory a process sees, which differs between ranks
    and nodes, so every rank follows rank 0's choice and all ranks stream or none does."""
    data = None
    if parallel.local_rank == 0:
        data = load_suite_data(suite, parallel.device)  # on the device, or streamed as suite.data_loader says
    loader = parallel.broadcast(data.data_loader if parallel.is_writer else None)
    if data is not None and data.data_loader != loader:
        data = None
    parallel.barrier()
    if data is None:
        data = load_suite_data(dataclasses.replace(suite, data_loader=loader), parallel.device)
    return data


def run_suite_ddp(suite: Suite, parallel: DataParallelGroup, *, results_dir: str | os.PathLike = "results",
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
    data = load_rank_data(suite, parallel)
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
