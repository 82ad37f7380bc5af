"""Run a suite: the grid of experiments, one row per run, resumable at any point.

For each experiment the runner builds the backbone, hands it to the method (trained first when the
method needs a pre-trained model: the dense checkpoint is shared across methods), trains or fine-tunes
it with :mod:`harness.run.train`, evaluates it, measures it with :mod:`harness.measure`, and appends one row
to ``results/<suite>/runs.jsonl``. A failing run becomes a ``failed`` row with a one-line reason and the
suite goes on; a key whose latest row is ``ok`` is skipped, so a killed suite resumes where it stopped.
"""
from __future__ import annotations

import copy
import datetime as _dt
import fnmatch
import functools
import json
import os
import platform
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn

from baselines import Method, MethodContext, get_method
from harness import measure
from harness.run.checkpoints import dense_key, load_checkpoint, save_checkpoint
from harness.run.config import Experiment, Suite, expand
from harness.run.data import Splits, load_dataset
from harness.run.models import create_backbone
from harness.run.progress import Reporter
from harness.run.store import ResultStore
from harness.run.train import evaluate, seed_everything, train_model

__all__ = ["SuiteOutcome", "select", "run_suite", "run_experiment", "resolve_device", "provenance",
           "load_plugin"]


@dataclass
class SuiteOutcome:
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    keys: list[str] = field(default_factory=list)


def resolve_device(name: str | None) -> torch.device:
    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device: {name!r} requested but CUDA is not available; allowed here: cpu, auto")
    if not (name == "cpu" or name.startswith("cuda")):
        raise ValueError(f"device: {name!r} not allowed; allowed: auto, cpu, cuda, cuda:N")
    return torch.device(name)


def select(grid: list[Experiment], only: list[str] | None) -> list[Experiment]:
    """Experiments whose key matches any of the ``--only`` wildcard patterns (substring when no wildcard)."""
    if not only:
        return grid
    pats = [p if any(ch in p for ch in "*?[") else f"*{p}*" for p in only]
    return [e for e in grid if any(fnmatch.fnmatch(e.key, p) for p in pats)]


@functools.lru_cache(maxsize=1)
def provenance() -> dict:
    """Git revision of the harness source, package versions, host."""
    root = Path(__file__).resolve().parents[2]

    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for dist in ("torchvision", "torch-pruning", "ptflops", "numpy"):
        try:
            versions[dist.replace("-", "_")] = version(dist)
        except PackageNotFoundError:
            versions[dist.replace("-", "_")] = None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"git_rev": git("rev-parse", "HEAD"), "git_dirty": bool(status) if status is not None else None,
            "versions": versions, "hostname": socket.gethostname()}


def load_plugin(path: str | os.PathLike) -> None:
    """Import a method file given with ``--plugin``; its ``@register_method`` classes join the registry."""
    import importlib.util

    path = Path(path)
    if not path.is_file():
        raise ValueError(f"plugin: no such file {str(path)!r}")
    spec = importlib.util.spec_from_file_location(f"bunitbench_plugin_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _one_line(err: BaseException) -> str:
    text = f"{type(err).__name__}: {err}".strip().splitlines()
    return (text[0] if text else type(err).__name__)[:500]


def _prunable_sparsity(model: nn.Module) -> float:
    zeros = total = 0
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            zeros += int((m.weight == 0).sum())
            total += m.weight.numel()
    return zeros / total if total else 0.0


class _Context:
    """Everything one experiment needs from the suite: data on the device, dense checkpoints, progress."""

    def __init__(self, data: Splits, device: torch.device, results_dir: Path, reporter: Reporter):
        self.data, self.device, self.results_dir, self.reporter = data, device, results_dir, reporter
        self.ckpt_dir = results_dir / "checkpoints"
        self.parallel = None  # harness.run.distributed sets a DataParallel under torchrun

    def new_backbone(self, exp: Experiment) -> nn.Module:
        return create_backbone(exp.backbone, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                               shortcut=exp.shortcut).to(self.device)

    def train(self, model: nn.Module, exp: Experiment, epochs: int, *, phase: str, lr: float | None = None,
              seed_offset: int = 0, warmup: bool = True, regularize=None, after_step=None) -> float:
        self.reporter.start_phase(phase, epochs)
        result = train_model(model, self.data, exp.train, epochs=epochs, lr=lr, seed=exp.seed * 1000 + seed_offset,
                             regularize=regularize, after_step=after_step, warmup=warmup,
                             progress=self.reporter.epoch_done, parallel=self.parallel)
        return result.seconds

    def load_dense(self, path: Path) -> tuple[dict, dict] | None:
        """A verified dense checkpoint, or None (harness.run.distributed: rank 0 reads it for every rank)."""
        return load_checkpoint(path)

    def save_dense(self, path: Path, model: nn.Module, meta: dict) -> None:
        """Write a dense checkpoint (harness.run.distributed: rank 0 only)."""
        save_checkpoint(path, model, meta)

    def dense_model(self, exp: Experiment) -> tuple[nn.Module, float, bool]:
        """The trained dense model for ``exp``: (model, seconds spent training now, was cached)."""
        path = self.ckpt_dir / f"{dense_key(exp)}.pt"
        model = self.new_backbone(exp)
        loaded = self.load_dense(path)
        if loaded is not None:
            model.load_state_dict(loaded[0])
            model.eval()
            return model, 0.0, True
        seed_everything(exp.seed)
        model = self.new_backbone(exp)  # same init as a fresh dense run of this seed
        seconds = self.train(model, exp, exp.train.epochs, phase="dense pre-train")
        self.save_dense(path, model, {"key": dense_key(exp), "epochs": exp.train.epochs, "train_seconds": seconds})
        return model, seconds, False


def _method_context(method: Method, exp: Experiment, ctx: _Context) -> MethodContext:
    data = ctx.data
    n_calib = min(4, max(1, data.x_train.shape[0] // exp.train.batch_size))
    bs = min(exp.train.batch_size, data.x_train.shape[0])
    calib = [(data.x_train[i * bs:(i + 1) * bs], data.y_train[i * bs:(i + 1) * bs]) for i in range(n_calib)]
    after_step = method.after_optimizer_step
    counter = {"calls": 0}

    def finetune(model: nn.Module, epochs: int, regularize=None) -> nn.Module:
        counter["calls"] += 1
        ctx.train(model, exp, epochs, phase="sparse train" if regularize else "fine-tune", lr=exp.train.finetune_lr,
                  seed_offset=100 + counter["calls"], warmup=False, regularize=regularize, after_step=after_step)
        return model

    return MethodContext(example_inputs=data.x_test[:min(8, data.x_test.shape[0])], calib_batches=calib,
                         finetune=finetune, device=ctx.device, schedule=exp.schedule, steps=exp.steps,
                         finetune_epochs=exp.train.finetune_epochs, sparse_epochs=exp.train.sparse_epochs,
                         sparse_lambda=exp.train.sparse_lambda,
                         backbone=exp.backbone, shortcut=exp.shortcut, num_classes=data.num_classes, seed=exp.seed)


def run_experiment(exp: Experiment, ctx: _Context) -> dict:
    """Run one experiment and return its row (status ok or failed)."""
    started, t0 = _now(), time.perf_counter()
    method = get_method(exp.method)
    row = {"key": exp.key, "suite": exp.suite, "dataset": exp.dataset, "image_size": ctx.data.image_size,
           "backbone": exp.backbone, "shortcut": exp.shortcut, "method": exp.method, "family": method.family,
           "target": exp.target, "schedule": exp.schedule, "steps": exp.steps, "seed": exp.seed,
           "config_hash": exp.config_hash, "config": exp.to_dict(), "device": str(ctx.device),
           "started_at": started, "executor": "local", **provenance()}
    try:
        row.update(_train_and_measure(exp, method, ctx))
        row["status"], row["reason"] = "ok", None
    except Exception as err:  # a failed run is a row, not a crash
        row["status"], row["reason"] = "failed", _one_line(err)
    row["finished_at"] = _now()
    row["run_seconds"] = round(time.perf_counter() - t0, 3)
    return row


def _train_and_measure(exp: Experiment, method: Method, ctx: _Context) -> dict:
    recipe = exp.train
    mctx = _method_context(method, exp, ctx)
    train_seconds = 0.0
    epochs = {"epochs_pretrain": 0, "epochs_sparse": 0, "epochs_finetune": 0}
    method.validate_target(exp.target)
    if method.family == "dense":
        model, train_seconds, _ = ctx.dense_model(exp)
        epochs["epochs_pretrain"] = recipe.epochs
    elif method.needs_pretrained:
        dense, _, _ = ctx.dense_model(exp)
        model = copy.deepcopy(dense)
        epochs["epochs_pretrain"] = recipe.epochs
        t = time.perf_counter()
        model = method.apply(model, exp.target, mctx).to(ctx.device)
        final = mctx.final_finetune_epochs()  # the harness's share under the rule in baselines/base.py
        ctx.train(model, exp, final, phase="fine-tune", lr=recipe.finetune_lr, seed_offset=99, warmup=False,
                  after_step=method.after_optimizer_step)
        train_seconds = time.perf_counter() - t
        mctx.record.pop("epochs_finetune_final", None)
        epochs["epochs_sparse"] = int(mctx.record.pop("epochs_sparse", 0))
        epochs["epochs_finetune"] = int(mctx.record.pop("epochs_finetune", final))
    else:  # built, then trained from scratch for the pruning pipeline's whole budget
        seed_everything(exp.seed)
        model = method.apply(ctx.new_backbone(exp), exp.target, mctx).to(ctx.device)
        budget = recipe.epochs + recipe.finetune_epochs
        train_seconds = ctx.train(model, exp, budget, phase=f"{exp.method} from scratch")
        epochs["epochs_pretrain"] = budget
    epochs["epochs_total"] = sum(epochs.values())
    model.eval()

    metrics = evaluate(model, ctx.data.x_test, ctx.data.y_test)
    ctx.reporter.evaluated(metrics["top1"])
    reference = ctx.new_backbone(exp).eval()
    example = ctx.data.x_test[:1]
    dense_counts = measure.count_macs(reference, tuple(example.shape[1:]))
    dense_params = measure.count_params(reference)
    prepared = _prepare_for_latency(model, exp, ctx)
    measured = measure.measure_model(model, example, latency=exp.measure.latency,
                                     batch_sizes=exp.measure.batch_sizes, repeats=exp.measure.repeats,
                                     warmup=exp.measure.warmup, memory_format=exp.measure.memory_format)
    record = dict(mctx.record)
    row = {**metrics, **measured, **epochs, **prepared, "train_seconds": round(train_seconds, 3)}
    row["sparsity"] = record.pop("sparsity", _prunable_sparsity(model))
    row["channel_ratio"] = record.pop("channel_ratio", None)
    row["macs_reduction"] = 1.0 - row["macs"] / dense_counts["macs"]
    row["params_reduction"] = 1.0 - row["params"] / dense_params
    row["architecture"] = method.architecture(model)
    extras = record.pop("achieved", None)
    if isinstance(extras, dict):
        record = {**extras, **record}
    row["achieved"] = json.loads(json.dumps(record, default=str)) if record else None
    return row


def _prepare_for_latency(model: nn.Module, exp: Experiment, ctx: _Context) -> dict:
    """Pick the fastest execution backend of every BUnit layer before timing (recorded in the row)."""
    if not exp.measure.latency or not exp.measure.autotune_bunit:
        return {"bunit_backend": None}
    try:
        from bunit.autotune import autotune, has_unit_layers
    except ImportError:
        return {"bunit_backend": None}
    if not has_unit_layers(model):
        return {"bunit_backend": None}
    example = ctx.data.x_test[:max(exp.measure.batch_sizes)]
    return {"bunit_backend": autotune(model, example)}


def run_suite(suite: Suite, *, results_dir: str | os.PathLike = "results", device: str | None = "auto",
              only: list[str] | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None) -> SuiteOutcome:
    """Run every experiment of ``suite`` that has no ``ok`` row yet.

    Args:
        suite: the validated suite.
        results_dir: rows go to ``results_dir/<suite name>/runs.jsonl``.
        device: "auto", "cpu", "cuda" or "cuda:N".
        only: wildcard patterns on experiment keys.
        progress: show progress bars.
        on_row: called with every row written.
    """
    dev = resolve_device(device)
    grid = select(expand(suite), only)
    out_dir = Path(results_dir) / suite.name
    store = ResultStore(out_dir)
    done = store.completed_keys()
    todo = [e for e in grid if e.key not in done]
    outcome = SuiteOutcome(skipped=len(grid) - len(todo))
    if not todo:
        return outcome
    with Reporter(len(todo), enabled=progress) as reporter:
        reporter.message(f"loading {suite.dataset}")
        data = load_dataset(suite.dataset, image_size=suite.image_size, data_dir=suite.data_dir, device=dev)
        ctx = _Context(data, dev, out_dir, reporter)
        for exp in todo:
            reporter.start_run(exp.key)
            row = run_experiment(exp, ctx)
            store.append(row)
            outcome.ran += 1
            outcome.keys.append(exp.key)
            if row["status"] == "ok":
                outcome.ok += 1
            else:
                outcome.failed += 1
                reporter.message(f"[failed] {exp.key}: {row['reason']}")
            reporter.run_done(row)
            if on_row is not None:
                on_row(row)
    return outcome
