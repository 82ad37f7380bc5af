"""The Ray executor: every experiment of a suite is a Ray task, on a local Ray instance or an existing cluster.

Each task asks for one GPU (or CPUs when the cluster has none). Dense pre-training jobs are submitted first and a
run that starts from a checkpoint waits for the task that trains it (:func:`harness.run.executors.plan_jobs`).
Ray workers need no shared file system: the driver loads the dataset once and puts it in Ray's object store,
plugin files travel as source text, and dense checkpoints and kept models go back to the driver, which alone
writes files and appends rows (the same resume rule as the local executor). Ray is an optional extra, imported
only when this executor is chosen.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Any, Callable

import torch

from harness.core.checkpoints import atomic_write_bytes, load_checkpoint
from harness.core.config import Suite
from harness.core.provenance import one_line
from harness.run.context import RunContext
from harness.core.data import load_suite_data, pack_data, unpack_data
from harness.run.executors import Job, have_checkpoint, plan_jobs, run_job
from harness.run.experiment import failed_row
from harness.run.progress import Reporter
from harness.run.runner import RowSink, SuiteOutcome, load_plugin, open_suite

__all__ = ["run_suite_ray"]


_LOADED_PLUGINS: set[str] = set()


def _import_ray():
    try:
        import ray
    except ImportError:
        raise ValueError("--executor ray: Ray is not installed; allowed: install it with "
                         "pip install 'bunit-bench[ray]', or use --executor local") from None
    return ray


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
              use_gpu: bool, keep_models: bool) -> tuple[dict | None, dict | None]:
    """Body of one Ray task: (the row or None, the dense checkpoint this task trained or None).

    A kept model travels back inside the row, as ``row["_model_files"]`` (path relative to the store -> bytes);
    the driver writes the files and drops the field.
    """
    _load_plugin_sources(plugins)
    device = torch.device("cuda" if use_gpu else "cpu")  # Ray sets CUDA_VISIBLE_DEVICES to the task's GPU
    with tempfile.TemporaryDirectory(prefix="bunitbench-ray-") as scratch:
        ctx = RunContext(unpack_data(packed, device), device, Path(scratch), Reporter(1, enabled=False),
                         keep_models=keep_models)
        if blob is not None:
            _write_blob(ctx.ckpt_dir, blob)
        row, error = run_job(job, ctx, "ray")
        produced = _read_blob(ctx.ckpt_dir, job.dense) if job.dense and blob is None else None
        models = Path(scratch) / "models"
        if row is not None and models.is_dir():
            row["_model_files"] = {str(f.relative_to(scratch)): f.read_bytes() for f in sorted(models.rglob("*"))
                                   if f.is_file()}
    if error is not None:
        print(f"bunitbench: dense pre-training {job.dense} failed: {error}")
    return row, produced


def run_suite_ray(suite: Suite, *, results_dir: str | os.PathLike = "results", device: str | None = "auto",
                  only: list[str] | None = None, address: str | None = None,
                  plugins: list[str] | tuple[str, ...] = (), progress: bool = True,
                  on_row: Callable[[dict], None] | None = None, cpus_per_task: int = 1,
                  runtime_env: dict | None = None, max_retries: int = 1,
                  rerun_other_revisions: bool = False) -> SuiteOutcome:
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
        rerun_other_revisions: see :func:`harness.run.runner.open_suite`.

    Returns:
        What ran, as :func:`harness.run.runner.run_suite` reports it.
    """
    ray = _import_ray()
    plan = open_suite(suite, results_dir, only, rerun_other_revisions=rerun_other_revisions)
    todo, out_dir, store, outcome = plan.todo, plan.out_dir, plan.store, plan.outcome
    if not todo:
        return outcome
    ckpt_dir = out_dir / "checkpoints"
    started_here = not ray.is_initialized()
    if started_here:
        ray.init(address=address, runtime_env=runtime_env)
    try:
        use_gpu = _ray_use_gpu(ray, device)
        first, then = plan_jobs(todo, have_checkpoint(ckpt_dir))
        with Reporter(sum(j.writes_row for j in first + then), enabled=progress) as reporter:
            reporter.message(f"loading {suite.dataset}")
            data = load_suite_data(suite, "cpu")
            resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_task}
            task = ray.remote(_ray_task).options(num_returns=2, max_retries=max_retries, **resources)
            args = (ray.put(pack_data(data)), [(str(p), Path(p).read_text()) for p in plugins], use_gpu,
                    suite.keep_models)
            pending = _submit(ray, task, first, then, ckpt_dir, args)
            reporter.message(f"{len(pending)} Ray tasks submitted ({'1 GPU' if use_gpu else f'{cpus_per_task} CPU'}"
                             " each)")
            _collect(ray, pending, RowSink(store, outcome, reporter, on_row), out_dir, data.image_size)
    finally:
        if started_here:
            ray.shutdown()
    return outcome


def _submit(ray, task, first: list[Job], then: list[Job], ckpt_dir: Path, args: tuple) -> dict[Any, tuple[Job, Any]]:
    """Submit every job: the pre-training jobs first (Ray schedules them first), then the jobs that start from a
    dense checkpoint, each handed the ObjectRef of the pre-training that produces it (Ray starts it when that
    ends) or the checkpoint read from disk. Returns ``{row ref: (job, checkpoint ref)}``."""
    data_ref, sources, use_gpu, keep_models = args
    pending: dict[Any, tuple[Job, Any]] = {}
    produced: dict[str, Any] = {}
    for job in first:
        row_ref, ckpt_ref = task.remote(job, data_ref, None, sources, use_gpu, keep_models)
        pending[row_ref] = (job, ckpt_ref)
        produced[job.dense] = ckpt_ref
    on_disk: dict[str, Any] = {}
    for job in then:
        blob = None
        if job.dense in produced:
            blob = produced[job.dense]
        elif job.dense is not None:
            if job.dense not in on_disk:
                on_disk[job.dense] = ray.put(_read_blob(ckpt_dir, job.dense))
            blob = on_disk[job.dense]
        row_ref, ckpt_ref = task.remote(job, data_ref, blob, sources, use_gpu, keep_models)
        pending[row_ref] = (job, ckpt_ref)
    return pending


def _collect(ray, pending: dict[Any, tuple[Job, Any]], tally: RowSink, out_dir: Path, image_size: int | None) -> None:
    """Write rows, kept models and checkpoints as tasks end (a dead worker's job becomes a failed row); on any
    interruption cancel what is still pending."""
    ckpt_dir = out_dir / "checkpoints"
    try:
        while pending:
            ready, _ = ray.wait(list(pending), num_returns=1)
            job, ckpt_ref = pending.pop(ready[0])
            try:
                row, blob = ray.get([ready[0], ckpt_ref])
            except ray.exceptions.RayError as err:  # the worker died, or its pre-training task did
                row, blob = None, None
                if job.writes_row:
                    row = failed_row(job.exp, f"Ray task failed: {one_line(err)}", executor="ray",
                                     image_size=image_size)
            if blob is not None and load_checkpoint(ckpt_dir / f"{blob['key']}.pt") is None:
                _write_blob(ckpt_dir, blob)
            if row is not None:
                for rel, payload in row.pop("_model_files", {}).items():
                    atomic_write_bytes(out_dir / rel, payload)
                tally.add(row)
    except BaseException:
        for ref in pending:
            ray.cancel(ref)
        raise


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
