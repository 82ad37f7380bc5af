"""Executors for the grid: where the experiments of a suite run.

- ``local`` (:func:`run_suite_local`): one process runs the grid in order (:func:`harness.run.runner.run_suite`),
  or, with several visible GPUs, one worker process per GPU takes experiments from a shared queue.
- ``ray`` (:func:`harness.run.ray_executor.run_suite_ray`): every experiment is a Ray task on a local Ray
  instance or an existing cluster; Ray is an optional extra, imported only when chosen.

Both follow the sequential runner's rules (:func:`harness.run.runner.open_suite`, :class:`harness.run.runner.RowSink`,
:func:`harness.run.experiment.run_experiment`). :func:`plan_jobs` puts one checkpoint-only pre-training job first for
every dense checkpoint that a selected run starts from (its method's pipeline starts from ``dense``) and that does
not exist yet; such a run starts only once its checkpoint exists, and runs that need none start at once. The
driver process alone appends rows to the store, as each run ends; keys already ``ok`` are skipped, so either
executor resumes where any executor stopped.
"""
from __future__ import annotations

import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from baselines import get_method
from harness.core.checkpoints import dense_key, load_checkpoint
from harness.core.config import Experiment, Suite
from harness.core.data import load_suite_data
from harness.run.progress import Reporter
from harness.core.provenance import one_line
from harness.run.context import RunContext
from harness.run.experiment import failed_row, run_experiment
from harness.core.devices import resolve_device
from harness.run.runner import RowSink, SuiteOutcome, load_plugin, open_suite, run_suite

__all__ = ["Job", "plan_jobs", "run_job", "have_checkpoint", "run_suite_local", "visible_gpus"]


# --- what runs before what ------------------------------------------------------------------------


@dataclass(frozen=True)
class Job:
    """One unit of work for an executor.

    Attributes:
        exp: the experiment.
        writes_row: False for a checkpoint-only job, which pre-trains the dense model of ``exp`` and writes no row.
        dense: the dense checkpoint (``dense_key``) this job starts from or produces; None when it needs none.
    """

    exp: Experiment
    writes_row: bool = True
    dense: str | None = None


def _needs_dense(exp: Experiment) -> bool:
    return get_method(exp.method).pipeline(exp.train).start == "dense"


def plan_jobs(todo: list[Experiment], have_checkpoint: Callable[[str], bool]) -> tuple[list[Job], list[Job]]:
    """Split the runs still to do into dense pre-training jobs and the runs themselves.

    Args:
        todo: the experiments without an ``ok`` row, in grid order.
        have_checkpoint: whether a verified dense checkpoint with this ``dense_key`` exists.

    Returns:
        ``(first, then)``: ``first`` holds one checkpoint-only job (no row) per missing dense checkpoint that a run
        of ``todo`` starts from (its method's pipeline starts from ``dense``); ``then`` holds every run of ``todo``.
        A job of ``then`` whose ``dense`` is produced by a job of ``first`` must wait for it.
    """
    first: dict[str, Job] = {}
    for exp in todo:
        if _needs_dense(exp):
            key = dense_key(exp)
            if key not in first and not have_checkpoint(key):
                first[key] = Job(exp, writes_row=False, dense=key)
    then = [Job(e, dense=dense_key(e) if _needs_dense(e) else None) for e in todo]
    return list(first.values()), then


def run_job(job: Job, ctx: RunContext, executor: str) -> tuple[dict | None, str | None]:
    """Run ``job`` in ``ctx``: (its row or None, why a checkpoint-only job failed or None)."""
    if job.writes_row:
        return run_experiment(job.exp, ctx, executor=executor), None
    try:
        ctx.dense_model(job.exp)
    except Exception as err:  # its dependants will retry the pre-training and record the failure in their rows
        return None, one_line(err)
    return None, None


def have_checkpoint(ckpt_dir: Path) -> Callable[[str], bool]:
    return lambda key: load_checkpoint(ckpt_dir / f"{key}.pt") is not None


# --- local: sequential, or one worker process per GPU ---------------------------------------------


def visible_gpus(device: str | None) -> list[str]:
    """The devices the local executor spreads over: every visible GPU for "auto" or "cuda", else none."""
    if device in (None, "auto", "cuda") and torch.cuda.is_available() and torch.cuda.device_count() > 1:
        return [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    return []


def run_suite_local(suite: Suite, *, results_dir: str | os.PathLike = "results", device: str | None = "auto",
                    only: list[str] | None = None, progress: bool = True,
                    on_row: Callable[[dict], None] | None = None, devices: list[str] | None = None,
                    plugins: list[str] | tuple[str, ...] = (), rerun_other_revisions: bool = False) -> SuiteOutcome:
    """Run the suite on this machine: sequentially on one device, or one worker process per device.

    Args:
        suite: the validated suite.
        results_dir: rows go to ``results_dir/<suite name>/runs.jsonl``.
        device: "auto", "cpu", "cuda" or "cuda:N"; "auto" and "cuda" use every visible GPU when there are several.
        only: wildcard patterns on experiment keys.
        progress: show progress bars.
        on_row: called with every row written.
        devices: explicit worker devices (e.g. ``["cuda:0", "cuda:2"]``, or ``["cpu", "cpu"]`` for tests);
            overrides ``device``. One device means the sequential runner.
        plugins: ``--plugin`` files, loaded in every worker process.
        rerun_other_revisions: see :func:`harness.run.runner.open_suite`.

    Returns:
        What ran, as :func:`harness.run.runner.run_suite` reports it.
    """
    devices = list(devices) if devices is not None else visible_gpus(device)
    if len(devices) <= 1:
        return run_suite(suite, results_dir=results_dir, device=devices[0] if devices else device, only=only,
                         progress=progress, on_row=on_row, rerun_other_revisions=rerun_other_revisions)
    for d in devices:
        resolve_device(d)
    plan = open_suite(suite, results_dir, only, rerun_other_revisions=rerun_other_revisions)
    todo, out_dir, store, outcome = plan.todo, plan.out_dir, plan.store, plan.outcome
    if not todo:
        return outcome
    first, then = plan_jobs(todo, have_checkpoint(out_dir / "checkpoints"))
    jobs = first + then
    with Reporter(sum(j.writes_row for j in jobs), enabled=progress) as reporter:
        reporter.message(f"{len(jobs)} jobs on {len(devices)} worker processes ({', '.join(devices)})")
        _run_pool(suite, jobs, len(first), devices, out_dir, list(plugins), RowSink(store, outcome, reporter, on_row))
    return outcome


def _pool_worker(device: str, threads: int, suite: Suite, out_dir: str, plugins: list[str], load_lock, jobs,
                 conn) -> None:
    """One worker process: load the data once on ``device``, then run jobs until the ``None`` sentinel.

    Messages go back through ``conn``, this worker's own pipe; ``send`` returns once the message is in the pipe,
    so the parent knows which job a worker held even when the worker is killed in the middle of it.
    """
    torch.set_num_threads(threads)  # the workers share the CPU cores instead of each taking all of them
    for plugin in plugins:
        load_plugin(plugin)
    dev = torch.device(device)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    with load_lock:  # one at a time: the first one downloads, the others read the files
        data = load_suite_data(suite, dev)
    ctx = RunContext(data, dev, Path(out_dir), Reporter(1, enabled=False), keep_models=suite.keep_models)
    while (item := jobs.get()) is not None:
        index, job = item
        conn.send(("started", index))
        conn.send(("done", index, *run_job(job, ctx, "local")))


def _waiting_runs(jobs: list[Job], n_first: int) -> dict[int, list[int]]:
    """Pre-training job index -> the runs that start from its checkpoint (they wait for it)."""
    producers = {jobs[i].dense: i for i in range(n_first)}
    waiting: dict[int, list[int]] = {}
    for i in range(n_first, len(jobs)):
        if jobs[i].dense in producers:
            waiting.setdefault(producers[jobs[i].dense], []).append(i)
    return waiting


def _start_workers(spawn, suite: Suite, devices: list[str], out_dir: Path, plugins: list[str], job_q,
                   load_lock) -> dict:
    """One process per device, its torch threads a share of the CPUs; ``{reading end: [process, held job]}``.
    ``load_lock`` must outlive the workers' start: a spawned child unpickles it after this returns."""
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers = {}
    for device in devices:
        reader, writer = spawn.Pipe(duplex=False)
        proc = spawn.Process(target=_pool_worker, args=(device, threads, suite, str(out_dir), plugins, load_lock,
                                                        job_q, writer), daemon=True)
        proc.start()
        writer.close()  # the worker holds the only writing end: its exit shows here as end-of-file
        workers[reader] = [proc, None]
    return workers


def _receive(reader, workers: dict, jobs: list[Job], tally: RowSink, suite: Suite) -> int | None:
    """Handle one message of a worker; the index of the job that ended (a died worker's held job included)."""
    proc, held = workers[reader]
    try:
        msg = reader.recv()
    except EOFError:  # the worker exited: after its sentinel, or killed
        del workers[reader]
        proc.join()
        if held is not None and jobs[held].writes_row:
            tally.add(failed_row(jobs[held].exp, f"worker process died (exit code {proc.exitcode})",
                                 executor="local", image_size=suite.image_size))
        return held
    if msg[0] == "started":
        workers[reader][1] = msg[1]
        return None
    _, index, row, error = msg
    workers[reader][1] = None
    if row is not None:
        tally.add(row)
    if error is not None:
        tally.reporter.message(f"[failed] dense pre-training {jobs[index].dense}: {error}")
    return index


def _run_pool(suite: Suite, jobs: list[Job], n_first: int, devices: list[str], out_dir: Path, plugins: list[str],
              tally: RowSink) -> None:
    """Feed ``jobs`` to one process per device; a run waits for the pre-training job of its checkpoint."""
    spawn = mp.get_context("spawn")
    job_q = spawn.Queue()
    waiting = _waiting_runs(jobs, n_first)
    dependants = {i for group in waiting.values() for i in group}
    for i in range(len(jobs)):
        if i not in dependants:
            job_q.put((i, jobs[i]))  # pre-training jobs first, then runs that need no new checkpoint
    load_lock = spawn.Lock()  # held here for the pool's life (a collected lock is gone before a child opens it)
    workers = _start_workers(spawn, suite, devices, out_dir, plugins, job_q, load_lock)
    finished: set[int] = set()
    stopping = False

    def release(index: int) -> None:
        nonlocal stopping
        for j in waiting.pop(index, []):
            job_q.put((j, jobs[j]))
        if not waiting and not stopping:  # everything is queued: one stop sentinel per worker
            stopping = True
            for _ in devices:
                job_q.put(None)

    release(-1)
    try:
        while len(finished) < len(jobs) and workers:
            for reader in mp_connection.wait(list(workers)):
                index = _receive(reader, workers, jobs, tally, suite)
                if index is not None:
                    finished.add(index)
                    release(index)
        if len(finished) < len(jobs):
            tally.reporter.message(f"every worker stopped; {len(jobs) - len(finished)} runs are left for a re-run")
    finally:
        for proc, _ in workers.values():
            proc.join(timeout=5 if len(finished) == len(jobs) else 0)
            if proc.is_alive():
                proc.terminate()
