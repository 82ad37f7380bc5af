"""Run a suite: the grid of experiments, one row per run, resumable at any point.

The pieces here are shared by every executor (local, the GPU worker pool, Ray, torchrun): :func:`open_suite`
expands and filters the grid and finds what is left to do; :class:`RowSink` is the one writer that appends rows,
counts them and reports progress; :func:`run_suite` is the sequential loop. Each experiment runs through
:func:`harness.run.experiment.run_experiment`. A failing run becomes a ``failed`` row with a one-line reason and
the suite goes on; a key whose latest row is ``ok`` is skipped, so a killed suite resumes where it stopped.

Rows made by another code revision: a key's ``ok`` row counts as done whatever revision wrote it (the key
already covers everything that changes the trained weights); :func:`open_suite` warns once, naming how many
such rows it kept, and ``rerun_other_revisions=True`` (``bunitbench run --rerun-other-revisions``) runs them
again instead.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable


from harness.core.config import Experiment, Suite, expand
from harness.core.provenance import provenance
from harness.core.devices import resolve_device
from harness.run.context import RunContext
from harness.core.data import load_suite_data
from harness.run.experiment import run_experiment
from harness.run.progress import Reporter
from harness.core.store import ResultStore

__all__ = ["SuiteOutcome", "SuitePlan", "RowSink", "select", "open_suite", "run_suite", "load_plugin"]


@dataclass
class SuiteOutcome:
    ran: int = 0
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    keys: list[str] = field(default_factory=list)


def select(grid: list[Experiment], only: list[str] | None) -> list[Experiment]:
    """Experiments whose key matches any of the ``--only`` wildcard patterns (substring when no wildcard)."""
    if not only:
        return grid
    pats = [p if any(ch in p for ch in "*?[") else f"*{p}*" for p in only]
    return [e for e in grid if any(fnmatch.fnmatch(e.key, p) for p in pats)]


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


@dataclass
class SuitePlan:
    """What :func:`open_suite` found: the runs left to do, where rows go, and the outcome so far."""

    todo: list[Experiment]
    out_dir: Path
    store: ResultStore
    outcome: SuiteOutcome


def open_suite(suite: Suite, results_dir: str | os.PathLike, only: list[str] | None, *,
               rerun_other_revisions: bool = False) -> SuitePlan:
    """The selected grid minus the keys already ``ok`` in ``results_dir/<suite name>``.

    Args:
        suite: the validated suite.
        results_dir: the results root.
        only: wildcard patterns on experiment keys.
        rerun_other_revisions: run again the keys whose ``ok`` row another git revision wrote (default: keep
            them, with a warning).
    """
    grid = select(expand(suite), only)
    out_dir = Path(results_dir) / suite.name
    store = ResultStore(out_dir)
    latest = store.latest()
    done = {k for k, r in latest.items() if r.get("status") == "ok"}
    revision = provenance()["git_rev"]
    other = {k for k in done if revision and latest[k].get("git_rev") not in (None, revision)}
    wanted = {e.key for e in grid}
    if other & wanted:
        n = len(other & wanted)
        if rerun_other_revisions:
            done -= other
        else:
            warnings.warn(f"{n} ok rows in {out_dir} were made by another code revision; kept (use "
                          "--rerun-other-revisions to run them again)", RuntimeWarning, stacklevel=2)
    todo = [e for e in grid if e.key not in done]
    return SuitePlan(todo, out_dir, store, SuiteOutcome(skipped=len(grid) - len(todo)))


class RowSink:
    """The one writer of a suite's rows: appends each row to the store, counts it and reports progress."""

    def __init__(self, store: ResultStore, outcome: SuiteOutcome, reporter: Reporter,
                 on_row: Callable[[dict], None] | None = None):
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


def run_suite(suite: Suite, *, results_dir: str | os.PathLike = "results", device: str | None = "auto",
              only: list[str] | None = None, progress: bool = True,
              on_row: Callable[[dict], None] | None = None, rerun_other_revisions: bool = False) -> SuiteOutcome:
    """Run every experiment of ``suite`` that has no ``ok`` row yet, one after another on one device.

    Args:
        suite: the validated suite.
        results_dir: rows go to ``results_dir/<suite name>/runs.jsonl``.
        device: "auto", "cpu", "cuda" or "cuda:N".
        only: wildcard patterns on experiment keys.
        progress: show progress bars.
        on_row: called with every row written.
        rerun_other_revisions: see :func:`open_suite`.
    """
    dev = resolve_device(device)
    plan = open_suite(suite, results_dir, only, rerun_other_revisions=rerun_other_revisions)
    if not plan.todo:
        return plan.outcome
    with Reporter(len(plan.todo), enabled=progress) as reporter:
        reporter.message(f"loading {suite.dataset}")
        data = load_suite_data(suite, dev)
        ctx = RunContext(data, dev, plan.out_dir, reporter, keep_models=suite.keep_models)
        sink = RowSink(plan.store, plan.outcome, reporter, on_row)
        for exp in plan.todo:
            reporter.start_run(exp.key)
            sink.add(run_experiment(exp, ctx))
    return plan.outcome
