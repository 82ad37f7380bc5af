"""Executors for the grid: where the experiments of a suite run.

- ``local`` (:func:`run_suite_local`): one process runs the grid in order (:func:`harness.run.runner.run_suite`), or,
  with several visible GPUs, one worker process per GPU takes experiments from a shared queue.
- ``ray`` (:func:`run_suite_ray`): every experiment is a Ray task asking for one GPU (or CPUs when the cluster has
  none), on a local Ray instance or an existing cluster (``address="auto"`` or ``ray://host:10001``). Ray is an
  optional extra, imported only here and only when chosen.

Both follow the same rules as the sequential runner. A dense pre-training job (the dense run itself, or a
checkpoint-only job when the dense run is not selected) goes first for every dense checkpoint that a selected
run needs and that does not exist yet; a pruning run starts only once its checkpoint exists, and runs that need
none start at once. The driver process alone appends rows to the store, as each run ends, so rows land atomically
from one writer; keys already ``ok`` are skipped, so either executor resumes where any executor stopped.

Ray workers need no shared file system: the driver loads the dataset once and puts it in Ray's object store,
plugin files travel as source text, and dense checkpoints go back to the driver (which writes them under
``results/<suite>/checkpoints``) and on to the runs that need them through the object store.
"""
from __future__ import annotations

import hashlib
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from baselines import get_method
from harness.run.checkpoints import atomic_write_bytes, dense_key, load_checkpoint
from harness.run.config import Experiment, Suite, expand
from harness.run.data import Splits, load_dataset
from harness.run.progress import Reporter
from harness.run.runner import (SuiteOutcome, _Context, _now, _one_line, load_plugin, provenance, resolve_device,
                            run_experiment, run_suite, select)
from harness.run.store import ResultStore

__all__ = ["Job", "plan_jobs", "run_suite_local", "run_suite_ray", "visible_gpus"]


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
    method = get_method(exp.method)
    return method.family == "dense" or method.needs_pretrained


def plan_jobs(todo: list[Experiment], have_checkpoint: Callable[[str], bool]) -> tuple[list[Job], list[Job]]:
    """Split the runs still to do into dense pre-training jobs and the rest.

    Args:
        todo: the experiments without an ``ok`` row, in grid order.
        have_checkpoint: whether a verified dense checkpoint with this ``dense_key`` exists.

    Returns:
        ``(first, then)``: ``first`` holds one job per missing checkpoint that ``todo`` needs (the dense run of
        that key when it is in ``todo``, else a checkpoint-only job); ``then`` holds every other run. A job of
        ``then`` whose ``dense`` is produced by a job of ``first`` must wait for it.
    """
    first: dict[str, Job] = {}
    for exp in todo:
        if not _needs_dense(exp):
            continue
        key = dense_key(exp)
        if have_checkpoint(key):
            continue
        is_dense_run = get_method(exp.method).family == "dense"
        if key not in first or (is_dense_run and not first[key].writes_row):
            first[key] = Job(exp, writes_row=is_dense_run, dense=key)
    chosen = {id(job.exp) for job in first.values() if job.writes_row}
    then = [Job(e, dense=dense_key(e) if _needs_dense(e) else None) for e in todo if id(e) not in chosen]
    return list(first.values()), then


def _run_job(job: Job, ctx: _Context, executor: str) -> tuple[dict | None, str | None]:
    """Run ``job`` in ``ctx``: (its row or None, why a checkpoint-only job failed or None)."""
    if job.writes_row:
        row = run_experiment(job.exp, ctx)
        row["executor"] = executor
        return row, None
    try:
        ctx.dense_model(job.exp)
    except Exception as err:  # its dependants will retry the pre-training and record the failure in their rows
        return None, _one_line(err)
    return None, None


def _failed_row(exp: Experiment, reason: str, *, executor: str, image_size: int | None) -> dict:
    """The row of a run whose worker died before it could write one."""
    return {"key": exp.key, "suite": exp.suite, "dataset": exp.dataset, "image_size": image_size,
            "backbone": exp.backbone, "shortcut": exp.shortcut, "method": exp.method,
            "family": get_method(exp.method).family, "target": exp.target, "schedule": exp.schedule,
            "steps": exp.steps, "seed": exp.seed, "config_hash": exp.config_hash, "config": exp.to_dict(),
            "status": "failed", "reason": reason[:500], "finished_at": _now(), "executor": executor, **provenance()}


class _Tally:
    """Appends rows (the one writer), counts them and reports progress."""

    def __init__(self, store: ResultStore, outcome: SuiteOutcome, reporter: Reporter,
                 on_row: Callable[[dict], None] | None):
        self.store, self.outcome, self.reporter, self.on_row = store, outcome, reporter, on_row

    def add(self, row: dict) -> None:
        self.store.append(row)
        self.outcome.ran += 1
        self.outcome.keys.append(row["key"])
        if row["status"] == "ok":
            self.outcome.ok += 1
        else:
            self.outcome.failed += 1
            self.reporter.message(f"[failed] {row['key']}: {row['reason']}")
        self.reporter.run_done(row)
        if self.on_row is not None:
            self.on_row(row)


def _prepare(suite: Suite, results_dir, only) -> tuple[list[Experiment], Path, ResultStore, SuiteOutcome]:
    grid = select(expand(suite), only)
    out_dir = Path(results_dir) / suite.name
    store = ResultStore(out_dir)
    done = store.completed_keys()
    todo = [e for e in grid if e.key not in done]
    return todo, out_dir, store, SuiteOutcome(skipped=len(grid) - len(todo))


def _have_checkpoint(ckpt_dir: Path) -> Callable[[str], bool]:
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
                    plugins: list[str] | tuple[str, ...] = ()) -> SuiteOutcome:
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

    Returns:
        What ran, as :func:`harness.run.runner.run_suite` reports it.
    """
    devices = list(devices) if devices is not None else visible_gpus(device)
    if len(devices) <= 1:
        return run_suite(suite, results_dir=results_dir, device=devices[0] if devices else device, only=only,
                         progress=progress, on_row=on_row)
    for d in devices:
        resolve_device(d)
    todo, out_dir, store, outcome = _prepare(suite, results_dir, only)
    if not todo:
        return outcome
    first, then = plan_jobs(todo, _have_checkpoint(out_dir / "checkpoints"))
    jobs = first + then
    with Reporter(sum(j.writes_row for j in jobs), enabled=progress) as reporter:
        reporter.message(f"{len(jobs)} jobs on {len(devices)} worker processes ({', '.join(devices)})")
        _run_pool(suite, jobs, len(first), devices, out_dir, list(plugins), _Tally(store, outcome, reporter, on_row))
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
        data = load_dataset(suite.dataset, image_size=suite.image_size, data_dir=suite.data_dir, device=dev)
    ctx = _Context(data, dev, Path(out_dir), Reporter(1, enabled=False))
    while (item := jobs.get()) is not None:
        index, job = item
        conn.send(("started", index))
        conn.send(("done", index, *_run_job(job, ctx, "local")))


def _run_pool(suite: Suite, jobs: list[Job], n_first: int, devices: list[str], out_dir: Path, plugins: list[str],
              tally: _Tally) -> None:
    """Feed ``jobs`` to one process per device; a run waits for the pre-training job of its checkpoint."""
    spawn = mp.get_context("spawn")
    job_q = spawn.Queue()
    producers = {jobs[i].dense: i for i in range(n_first)}
    waiting: dict[int, list[int]] = {}  # pre-training job -> the runs that start from its checkpoint
    for i in range(n_first, len(jobs)):
        if jobs[i].dense in producers:
            waiting.setdefault(producers[jobs[i].dense], []).append(i)
    dependants = {i for group in waiting.values() for i in group}
    for i in range(len(jobs)):
        if i not in dependants:
            job_q.put((i, jobs[i]))  # pre-training jobs first, then runs that need no new checkpoint
    load_lock = spawn.Lock()
    threads = max(1, (os.cpu_count() or 1) // len(devices))
    workers = {}  # reading end of a worker's pipe -> (process, index of the job it holds or None)
    for device in devices:
        reader, writer = spawn.Pipe(duplex=False)
        proc = spawn.Process(target=_pool_worker, args=(device, threads, suite, str(out_dir), plugins, load_lock,
                                                        job_q, writer), daemon=True)
        proc.start()
        writer.close()  # the worker holds the only writing end: its exit shows here as end-of-file
        workers[reader] = [proc, None]
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
                proc, held = workers[reader]
                try:
                    msg = reader.recv()
                except EOFError:  # the worker exited: after its sentinel, or killed
                    del workers[reader]
                    proc.join()
                    if held is not None:
                        finished.add(held)
                        if jobs[held].writes_row:
                            tally.add(_failed_row(jobs[held].exp, f"worker process died (exit code {proc.exitcode})",
                                                  executor="local", image_size=suite.image_size))
                        release(held)
                    continue
                if msg[0] == "started":
                    workers[reader][1] = msg[1]
                    continue
                _, index, row, error = msg
                workers[reader][1] = None
                finished.add(index)
                if row is not None:
                    tally.add(row)
                if error is not None:
                    tally.reporter.message(f"[failed] dense pre-training {jobs[index].dense}: {error}")
                release(index)
        if len(finished) < len(jobs):
            tally.reporter.message(f"every worker stopped; {len(jobs) - len(finished)} runs are left for a re-run")
    finally:
        for proc, _ in workers.values():
            proc.join(timeout=5 if len(finished) == len(jobs) else 0)
            if proc.is_alive():
                proc.terminate()


# --- Ray ------------------------------------------------------------------------------------------

_LOADED_PLUGINS: set[str] = set()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed; allowed: install it with "
                         "pip install 'bunit-bench[ray]', or use --executor local") from None
    return ray


def _pack(data: Splits) -> dict:
    """The dataset as numpy arrays (Ray's object store shares them zero-copy between workers of a node)."""
    return {"name": data.name, "num_classes": data.num_classes, "hflip": data.hflip,
            **{k: getattr(data, k).cpu().numpy() for k in ("x_train", "y_train", "x_test", "y_test")}}


def _unpack(packed: dict, device: torch.device) -> Splits:
    tensors = {k: torch.tensor(packed[k], device=device) for k in ("x_train", "y_train", "x_test", "y_test")}
    return Splits(packed["name"], num_classes=packed["num_classes"], hflip=packed["hflip"], **tensors)


def _read_blob(ckpt_dir: Path, key: str) -> dict | None:
    path = ckpt_dir / f"{key}.pt"
    if load_checkpoint(path) is None:
        return None
    return {"key": key, "payload": path.read_bytes(), "sidecar": path.with_suffix(".json").read_bytes()}


def _write_blob(ckpt_dir: Path, blob: dict) -> None:
    """Write a checkpoint that travelled as bytes, in the order save_checkpoint uses (payload, then sidecar)."""
    path = ckpt_dir / f"{blob['key']}.pt"
    atomic_write_bytes(path, blob["payload"])
    atomic_write_bytes(path.with_suffix(".json"), blob["sidecar"])


def _load_plugin_sources(plugins: list[tuple[str, str]]) -> None:
    """Register ``--plugin`` files in this worker once, from their source text (no shared file system needed)."""
    for filename, source in plugins:
        digest = hashlib.sha256(source.encode()).hexdigest()[:16]
        if digest in _LOADED_PLUGINS:
            continue
        folder = Path(tempfile.gettempdir()) / f"bunitbench-plugins-{digest}"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / Path(filename).name
        path.write_text(source)
        load_plugin(path)
        _LOADED_PLUGINS.add(digest)


def _ray_task(job: Job, packed: dict, blob: dict | None, plugins: list[tuple[str, str]],
              use_gpu: bool) -> tuple[dict | None, dict | None]:
    """Body of one Ray task: (the row or None, the dense checkpoint this task trained or None)."""
    _load_plugin_sources(plugins)
    device = torch.device("cuda" if use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
    with tempfile.TemporaryDirectory(prefix="bunitbench-ray-") as scratch:
        ctx = _Context(_unpack(packed, device), device, Path(scratch), Reporter(1, enabled=False))
        if blob is not None:
            _write_blob(ctx.ckpt_dir, blob)
        row, error = _run_job(job, ctx, "ray")
        produced = _read_blob(ctx.ckpt_dir, job.dense) if job.dense and blob is None else None
    if error is not None:
        print(f"bunitbench: dense pre-training {job.dense} failed: {error}")
    return row, produced


def run_suite_ray(suite: Suite, *, results_dir: str | os.PathLike = "results", device: str | None = "auto",
                  only: list[str] | None = None, address: str | None = None,
                  plugins: list[str] | tuple[str, ...] = (), progress: bool = True,
                  on_row: Callable[[dict], None] | None = None, cpus_per_task: int = 1,
                  runtime_env: dict | None = None, max_retries: int = 1) -> SuiteOutcome:
    """Run the suite as Ray tasks, one per experiment; rows are appended here, by the driver, as tasks end.

    Args:
        suite: the validated suite.
        results_dir: rows go to ``results_dir/<suite name>/runs.jsonl`` on the driver's machine.
        device: "auto" (GPUs when the cluster has them), "cpu", or "cuda" (one GPU per task; "cuda:N" means the
            same: Ray assigns the GPU).
        only: wildcard patterns on experiment keys.
        address: the Ray cluster ("auto", "HOST:6379", "ray://HOST:10001"); None does what ``ray.init()`` does
            (``RAY_ADDRESS``, else a cluster started on this machine with ``ray start``, else a new local
            instance). When Ray is already initialised in this process, that connection is used.
        plugins: ``--plugin`` files; their source is shipped to and registered in every worker.
        progress: show progress bars.
        on_row: called with every row written.
        cpus_per_task: CPUs a task asks for when it runs on CPU (its torch threads).
        runtime_env: Ray runtime environment for the workers (e.g. ``{"pip": [...]}``) when Ray is started here.
        max_retries: Ray re-runs a task whose worker process died this many times.

    Returns:
        What ran, as :func:`harness.run.runner.run_suite` reports it.
    """
    ray = _import_ray()
    todo, out_dir, store, outcome = _prepare(suite, results_dir, only)
    if not todo:
        return outcome
    ckpt_dir = out_dir / "checkpoints"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, runtime_env=runtime_env)
    try:
        use_gpu = _ray_use_gpu(ray, device)
        first, then = plan_jobs(todo, _have_checkpoint(ckpt_dir))
        with Reporter(sum(j.writes_row for j in first + then), enabled=progress) as reporter:
            reporter.message(f"loading {suite.dataset}")
            data = load_dataset(suite.dataset, image_size=suite.image_size, data_dir=suite.data_dir, device="cpu")
            data_ref = ray.put(_pack(data))
            sources = [(str(p), Path(p).read_text()) for p in plugins]
            resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_task}
            task = ray.remote(_ray_task).options(num_returns=2, max_retries=max_retries, **resources)
            pending: dict[Any, tuple[Job, Any]] = {}
            produced: dict[str, Any] = {}
            for job in first:  # submitted first, so Ray schedules them first
                row_ref, ckpt_ref = task.remote(job, data_ref, None, sources, use_gpu)
                pending[row_ref] = (job, ckpt_ref)
                produced[job.dense] = ckpt_ref
            on_disk: dict[str, Any] = {}
            for job in then:
                blob = None
                if job.dense in produced:
                    blob = produced[job.dense]  # an ObjectRef: Ray starts this task once the pre-training ended
                elif job.dense is not None:
                    if job.dense not in on_disk:
                        on_disk[job.dense] = ray.put(_read_blob(ckpt_dir, job.dense))
                    blob = on_disk[job.dense]
                row_ref, ckpt_ref = task.remote(job, data_ref, blob, sources, use_gpu)
                pending[row_ref] = (job, ckpt_ref)
            reporter.message(f"{len(pending)} Ray tasks submitted ({'1 GPU' if use_gpu else f'{cpus_per_task} CPU'}"
                             " each)")
            tally = _Tally(store, outcome, reporter, on_row)
            try:
                while pending:
                    ready, _ = ray.wait(list(pending), num_returns=1)
                    job, ckpt_ref = pending.pop(ready[0])
                    try:
                        row, blob = ray.get([ready[0], ckpt_ref])
                    except ray.exceptions.RayError as err:  # the worker died, or its pre-training task did
                        row, blob = None, None
                        if job.writes_row:
                            row = _failed_row(job.exp, f"Ray task failed: {_one_line(err)}", executor="ray",
                                              image_size=data.image_size)
                    if blob is not None and load_checkpoint(ckpt_dir / f"{blob['key']}.pt") is None:
                        _write_blob(ckpt_dir, blob)
                    if row is not None:
                        tally.add(row)
            except BaseException:
                for ref in pending:
                    ray.cancel(ref)
                raise
    finally:
        if started_here:
            ray.shutdown()
    return outcome


def _ray_use_gpu(ray, device: str | None) -> bool:
    gpus = ray.cluster_resources().get("GPU", 0)
    if device in (None, "auto"):
        return gpus > 0
    if device == "cpu":
        return False
    if device.startswith("cuda"):
        if not gpus:
            raise ValueError(f"device: {device!r} but the Ray cluster has no GPUs; allowed: auto, cpu")
        return True
    raise ValueError(f"device: {device!r} not allowed; allowed: auto, cpu, cuda")
