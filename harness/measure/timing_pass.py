"""The timing pass: re-time every trained model of a store against its dense reference, from artefacts alone.

Latency that users compare is measured here, in its own pass, not while training (docs/DESIGN.md). For each setting
(dataset, backbone, shortcut, image size) and each condition (runtime, device, dtype, threads, batch, memory
format) the pass builds one session: every model of the setting whose row is ``ok`` and not yet timed under
that condition, plus the dense reference of each. A model is rebuilt from its artefact
(:func:`harness.core.artefacts.load_model`), prepared by its method (``prepare_for_inference``: BUnit picks its
execution backends for this batch; not for ``onnx`` and ``openvino``, which export the model as rebuilt and let
ONNX Runtime or OpenVINO pick their kernels, nor ``openvino+units``, which exports BUnit's unit layers as its own
kernel), handed to its runtime (:mod:`harness.measure.runtimes`), and called once untimed. The input
is a fixed random batch of the model's input shape: latency does not depend on the values, and no data set is
needed.

All models of a session are then timed together by :func:`bunit.timing.interleaved_times`: ``warmup`` untimed
rounds, then ``rounds`` rounds in each of which every model, in a freshly shuffled order, gets ``settle`` untimed
calls and one timed call. A session runs ``repeats`` times (default 3), the sessions of a setting's conditions
taking turns (batch 1, batch 64, batch 1, ...), every model loaded afresh each time; the rounds are pooled, so each
figure spans the setting's whole timing and several loads of every model. Per model the row holds the median and p90
(``summary_ms``) and the **paired ratio to dense**: per round, the model's time over its dense reference's time in
the same round; ``latency_ratio`` is the median of these ratios and ``latency_ratio_lo``/``_hi`` a 95% bootstrap
interval of that median (2,000 resamples of the rounds, seed 0). The reference is the dense model of the same seed
when the store has one, else the dense model of the lowest seed (``dense_same_seed`` says which).

Load guard: around each session the pass reads the CPU time of the usable CPUs and of this process
(:func:`bunit.timing.cpu_snapshot`): the difference is the number of CPUs that other work (other processes, and
the hypervisor's steal) kept busy while the models were timed, measured directly, with no lag. The session is
**busy** when that exceeds, in any of its repeats, the CPUs the pass leaves free plus 0.25
(``others_cpus > max(0, cpus - threads) + 0.25``). A busy session warns and its rows say ``busy: true`` and
``others_cpus``; the 1-minute load average before and after (``load1_start``, ``load1_end``) and the usable CPUs
are recorded as well.

Steadiness: a machine can also change state without other work (on a virtual machine, batch-1 latency with two
threads was seen to switch for minutes between two levels, 1.1 and 2.3 ms for a dense ResNet-20, moving paired
ratios by up to 40%; ``benchmarks/bench_timing_sessions.py`` shows it). Each row keeps its model's median per
repeat (``repeat_p50_ms``) and the spread of its dense reference's (``dense_repeat_spread``: slowest over fastest
minus 1); above 0.15 the session warns and its rows say ``unsteady: true``.

Rows go to ``<store>/timings.jsonl``, one per (model key, condition), appended atomically
(:func:`harness.core.store.append_row`). A (key, condition) already in the table is skipped, so a pass killed at
any moment resumes: the rows of a setting are written once all its repeats are timed, and a re-run times the
models still missing (with their dense reference again, whose own row is not written twice).
"""
from __future__ import annotations

import datetime as _dt
import fnmatch
import os
import socket
import sys
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch
from torch.utils.benchmark.utils.common import set_torch_threads

from baselines import get_method
from bunit.timing import (cpu_snapshot, interleaved_times, machine_load, others_cpus, steady_allocator,
                          summary_ms)
from harness.measure.latency import MEMORY_FORMATS
from harness.measure.runtimes import ONNX_RUNTIMES, RUNTIMES, make_runner, runtime_context, runtime_version, variant_copy
from harness.measure.timing_table import (CONDITION_COLUMNS, TIMING_COLUMNS, TIMINGS_FILE, conditions_key,
                                          format_timings, load_timings)
from harness.core.devices import device_info, resolve_device
from harness.core.artefacts import CorruptArtefact, artefact_name, load_model, read_meta
from harness.core.schema import SETTING_KEYS
from harness.core.store import ResultStore, append_row, read_rows

__all__ = ["TIMINGS_FILE", "CONDITION_COLUMNS", "TIMING_COLUMNS", "TimingOutcome", "time_store", "load_timings",
           "format_timings", "paired_ratio", "is_busy"]

BUSY_MARGIN = 0.25  # CPUs of other work tolerated beyond those the pass leaves free
UNSTEADY_SPREAD = 0.15  # the dense reference's repeats may differ by this much (slowest / fastest median - 1)
TIMED_LAYOUTS = tuple(f for f in MEMORY_FORMATS if f != "auto")  # the pass times one layout, named
Timer = Callable[..., dict[str, list[float]]]
"""``timer(fns, *, rounds, warmup, device, settle, order, seed) -> name -> seconds per round`` (interleaved_times)."""


@dataclass
class TimingOutcome:
    """What a pass did: rows written, (key, condition) pairs already timed, models skipped and why."""

    path: Path
    written: int = 0
    skipped: int = 0
    sessions: int = 0
    busy_sessions: int = 0
    unsteady_sessions: int = 0
    errors: list[str] = field(default_factory=list)


def paired_ratio(times: Sequence[float], ref_times: Sequence[float], *, resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float, float]:
    """Median of the per-round ratios ``times[r] / ref_times[r]`` and its 95% bootstrap interval.

    Args:
        times: the model's seconds per round.
        ref_times: the reference's seconds in the same rounds.
        resamples: bootstrap resamples of the rounds.
        seed: seed of the resampling.

    Returns:
        ``(median, lo, hi)``.
    """
    t, ref = np.asarray(times, dtype=float), np.asarray(ref_times, dtype=float)
    if t.shape != ref.shape or t.size == 0:
        raise ValueError(f"times: need one timing per round for both; got {t.size} and {ref.size}")
    ratios = t / ref
    idx = np.random.default_rng(seed).integers(0, ratios.size, size=(resamples, ratios.size))
    lo, hi = np.percentile(np.median(ratios[idx], axis=1), [2.5, 97.5])
    return float(np.median(ratios)), float(lo), float(hi)


def is_busy(others: float | None, cpus: int, threads: int) -> bool | None:
    """The load rule of the module docstring: other work kept more CPUs busy than this pass leaves free."""
    return None if others is None else bool(others > max(0, cpus - threads) + BUSY_MARGIN)


def _spread(medians: Sequence[float] | None) -> float | None:
    """Slowest over fastest of a model's per-repeat medians, minus 1; None with fewer than two repeats."""
    if not medians or len(medians) < 2 or min(medians) <= 0:
        return None
    return round(max(medians) / min(medians) - 1, 4)


def _check_args(runtime, device, threads, batch_sizes, rounds, warmup, memory_format) -> tuple[torch.device, int]:
    if runtime not in RUNTIMES:
        raise ValueError(f"runtime: {runtime!r} not allowed; allowed: {', '.join(RUNTIMES)}")
    if memory_format not in TIMED_LAYOUTS or (runtime in ONNX_RUNTIMES and memory_format != "contiguous"):
        allowed = "contiguous" if runtime in ONNX_RUNTIMES else ", ".join(TIMED_LAYOUTS)
        raise ValueError(f"memory_format: {memory_format!r} not allowed with runtime {runtime}; allowed: {allowed}")
    if not batch_sizes or any(not isinstance(b, int) or isinstance(b, bool) or b < 1 for b in batch_sizes):
        raise ValueError(f"batch_sizes: {batch_sizes!r} not allowed; allowed: positive integers, e.g. 1,64")
    if threads is not None and (not isinstance(threads, int) or threads < 1):
        raise ValueError(f"threads: {threads!r} not allowed; allowed: a positive integer")
    if rounds < 3 or warmup < 0:  # repeats are checked by time_store
        raise ValueError(f"rounds/warmup: {rounds}/{warmup} not allowed; allowed: rounds >= 3, warmup >= 0")
    dev = resolve_device(device)
    if runtime.startswith("openvino") and dev.type != "cpu":
        raise ValueError(f"device: {device!r} not allowed with runtime {runtime}; allowed: cpu")
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    return dev, threads if threads is not None else torch.get_num_threads()


def _selected(rows: dict[str, dict], only: Sequence[str] | str | None) -> set[str]:
    pats = [only] if isinstance(only, str) else list(only or [])
    pats = [p if any(ch in p for ch in "*?[") else f"*{p}*" for p in pats]
    return {k for k in rows if not pats or any(fnmatch.fnmatch(k, p) for p in pats)}


def _dense_of(row: dict, denses: dict[int, str]) -> tuple[str | None, bool]:
    if row.get("seed") in denses:
        return denses[row["seed"]], True
    return (denses[min(denses)], False) if denses else (None, False)


def _macs_ratio(row: dict, dense: dict | None) -> float | None:
    mine = row.get("macs_nonzero", row.get("macs"))
    ref = None if dense is None else dense.get("macs")
    return mine / ref if mine and ref else None


def _input(row: dict, batch: int, device: torch.device, dtype: torch.dtype, memory_format: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, row["in_channels"], row["image_size"], row["image_size"], generator=gen)
    layout = torch.channels_last if memory_format == "channels_last" else torch.contiguous_format
    return x.to(device=device, dtype=dtype).contiguous(memory_format=layout)


def _store_rows(store: Path) -> dict[str, dict]:
    """Latest ok rows with a readable artefact meta, each with the meta fields the pass needs."""
    if not (store / "runs.jsonl").exists():
        raise ValueError(f"store: no runs.jsonl in {str(store)!r}; allowed: a suite directory written by "
                         "bunitbench run")
    out = {}
    for key, row in ResultStore(store).latest().items():
        if row.get("status") != "ok":
            continue
        try:
            meta = read_meta(store, key)
        except CorruptArtefact:
            continue  # no artefact (a run from before artefacts were kept): nothing to time
        out[key] = {**{c: meta.get(c) for c in ("in_channels", "image_size", "seed", "family", "method")},
                    **{c: v for c, v in row.items() if v is not None}}
    return out


def time_store(store_dir: str | os.PathLike, *, device: str = "cpu", runtime: str = "eager", threads: int | None = None,
               batch_sizes: Sequence[int] = (1, 64), rounds: int = 40, warmup: int = 5, settle: int = 2,
               memory_format: str = "contiguous", only: Sequence[str] | str | None = None, progress: bool = True,
               timer: Timer | None = None, seed: int = 0, repeats: int = 3) -> TimingOutcome:
    """Time every ``ok`` model of a store against its dense reference and append rows to ``timings.jsonl``.

    Args:
        store_dir: the suite directory (``runs.jsonl`` and ``models/``), or a copy of it.
        device: ``cpu``, ``cuda`` or ``cuda:N`` (``auto`` picks CUDA when present).
        runtime: ``eager``, ``compile``, ``onnx``, ``openvino`` or ``openvino+units`` (:mod:`harness.measure.runtimes`).
        threads: intra-op threads (torch, or the ONNX Runtime session); None keeps torch's current count.
        batch_sizes: one condition per batch size.
        rounds: timed rounds per session (every model one timed call per round).
        warmup: untimed rounds first.
        settle: untimed calls before each timed call.
        memory_format: ``contiguous`` or ``channels_last`` (eager and compile).
        only: wildcard patterns on keys (substring when no wildcard); dense references are timed regardless, and
            their rows are written only when they match.
        progress: one line per session on stderr.
        timer: replaces :func:`bunit.timing.interleaved_times` (tests inject timings).
        seed: seed of the shuffled order.
        repeats: every session of a setting runs this many times, the sessions of its conditions taking turns
            (batch 1, batch 64, batch 1, ...), every model loaded afresh each time (new allocations, a new shuffled
            order); the rounds of all repeats are pooled, pairs staying within their round. One load of a model can
            sit differently in memory than the next and time differently by 10-30% at batch 1 on CPU, and the
            machine drifts over minutes; spreading a condition's repeats over the setting's whole timing averages
            both out, where more rounds of one load at one time cannot.

    Returns:
        A :class:`TimingOutcome`.
    """
    dev, n_threads = _check_args(runtime, device, threads, tuple(batch_sizes), rounds, warmup, memory_format)
    if repeats < 1:
        raise ValueError(f"repeats: {repeats} not allowed; allowed: an integer >= 1")
    store = Path(store_dir)
    rows = _store_rows(store)
    wanted = _selected(rows, only)
    out = TimingOutcome(path=store / TIMINGS_FILE)
    done = {conditions_key(r) for r in read_rows(out.path)} if out.path.exists() else set()
    settings: dict[tuple, list[str]] = {}
    for key, row in rows.items():
        settings.setdefault(tuple(row.get(c) for c in SETTING_KEYS), []).append(key)
    dtypes = ["float32"] + (["bfloat16", "bfloat16+2:4"] if dev.type == "cuda" and runtime == "eager" else [])
    base = {"runtime": runtime, "device": str(dev), "device_name": device_info(dev)["device_name"],
            "threads": n_threads, "memory_format": memory_format}
    for setting, keys in sorted(settings.items(), key=lambda kv: str(kv[0])):
        denses = {rows[k].get("seed", 0): k for k in sorted(keys, reverse=True) if rows[k].get("family") == "dense"}
        sessions = []
        for dtype in dtypes:
            for batch in batch_sizes:
                cond = {**base, "dtype": dtype, "batch": int(batch)}
                todo = sorted(k for k in keys if k in wanted and conditions_key({"key": k, **cond}) not in done)
                out.skipped += sum(1 for k in keys if k in wanted) - len(todo)
                if todo:
                    sessions.append(_Session(cond, todo, {k: _dense_of(rows[k], denses) for k in todo}))
        for repeat in range(repeats):  # the conditions take turns: each one's repeats span the setting's timing
            for session in sessions:
                session.time_once(store, rows, dev, rounds=rounds, warmup=warmup, settle=settle,
                                  timer=timer or interleaved_times, seed=seed + repeat, out=out)
        for session in sessions:  # rows only once every repeat is in: a kill re-times the setting
            session.write(rows, out, setting=setting, rounds=rounds, warmup=warmup, settle=settle, repeats=repeats,
                          progress=progress)
    return out


@dataclass
class _Session:
    """The models of one setting timed under one condition: pooled timings over the repeats, the machine's state."""

    cond: dict
    todo: list[str]
    refs: dict[str, tuple[str | None, bool]]
    times: dict[str, list[float]] = field(default_factory=dict)
    infos: dict[str, dict] = field(default_factory=dict)
    failed: dict[str, str] = field(default_factory=dict)
    missing: set[str] = field(default_factory=set)
    start_load: dict | None = None  # machine_load() before the first repeat
    repeat_p50: dict[str, list[float]] = field(default_factory=dict)  # per model, the median (ms) of each repeat
    others: list[float | None] = field(default_factory=list)  # CPUs others kept busy, per repeat
    members: list[str] = field(init=False)  # todo and their dense references

    def __post_init__(self) -> None:
        self.members = sorted(set(self.todo) | {r for r, _ in self.refs.values() if r is not None})

    def time_once(self, store: Path, rows: dict, dev: torch.device, *, rounds: int, warmup: int, settle: int,
                  timer: Timer, seed: int, out: TimingOutcome) -> None:
        """Load every member afresh and time them all together once; pool the rounds."""
        cond = self.cond
        if cond["runtime"] == "compile":
            import torch._dynamo as dynamo

            dynamo.reset()  # compiled models of earlier sessions go; their guards would be checked on every call
        with set_torch_threads(cond["threads"]), runtime_context(cond["runtime"]):
            if self.start_load is None:
                self.start_load = machine_load()
            start = cpu_snapshot()
            fns = {}
            for key in self.members:
                if key in self.failed or key in self.missing:
                    continue
                try:
                    fns[key], self.infos[key] = _runner(store, rows[key], key, cond, dev)
                except (CorruptArtefact, FileNotFoundError) as err:  # no row: a re-run tries again
                    self.missing.add(key)
                    out.errors.append(str(err))
                except Exception as err:  # noqa: BLE001 - one model's failure is its row's error, not the pass's end
                    lines = str(err).strip().splitlines()
                    self.failed[key] = f"{type(err).__name__}: {lines[0] if lines else ''}"
                    out.errors.append(f"{key}: {self.failed[key]}")
            if fns:
                with torch.inference_mode():
                    got = timer(fns, rounds=rounds, warmup=warmup, device=dev if cond["runtime"] not in ONNX_RUNTIMES else "cpu",
                                settle=settle, order="shuffle", seed=seed)
                for key, values in got.items():  # round r of every model stays at the same index: pairs hold
                    self.times.setdefault(key, []).extend(values)
                    self.repeat_p50.setdefault(key, []).append(round(float(np.median(values)) * 1e3, 4))
            del fns
            self.others.append(others_cpus(start, cpu_snapshot()))

    def write(self, rows: dict, out: TimingOutcome, *, setting: tuple, rounds: int, warmup: int, settle: int,
              repeats: int, progress: bool) -> None:
        """Append one row per ``todo`` key (the models still missing their artefact get none)."""
        cond = self.cond
        with set_torch_threads(cond["threads"]):
            end_load = machine_load()
        start_load = self.start_load or end_load
        cpus = start_load["cpus"]
        known = [o for o in self.others if o is not None]
        others = max(known) if known else None
        busy = is_busy(others, cpus, cond["threads"])
        out.sessions += 1
        spreads = {ref: _spread(self.repeat_p50.get(ref)) for ref, _ in self.refs.values() if ref is not None}
        unsteady = {ref: None if v is None else v > UNSTEADY_SPREAD for ref, v in spreads.items()}
        if any(unsteady.values()):
            out.unsteady_sessions += 1
            worst = max(v for v in spreads.values() if v is not None)
            warnings.warn(f"timing pass: the dense reference's repeats differ by up to {worst:.0%} "
                          f"(batch {cond['batch']}): the machine changed state during the pass; rows flagged "
                          "unsteady=true", RuntimeWarning, stacklevel=3)
        if busy:
            out.busy_sessions += 1
            warnings.warn(f"timing pass: the machine was busy (other work kept {others} CPUs busy, {cpus} CPUs, "
                          f"{cond['threads']} threads): rows flagged busy=true", RuntimeWarning, stacklevel=3)
        if progress:
            print(f"[time] {'/'.join(str(s) for s in setting)} {cond['runtime']} {cond['dtype']} batch "
                  f"{cond['batch']}: {len(self.times)} models, {repeats} x {rounds} rounds, other work "
                  f"{others if others is not None else '?'} CPUs{' BUSY' if busy else ''}", file=sys.stderr)
        stamp = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        for key in self.todo:
            if key in self.missing:
                continue
            ref, same_seed = self.refs[key]
            row = {"key": key, **cond, **{c: rows[key].get(c) for c in (*SETTING_KEYS, "method", "family", "seed")},
                   "dense_key": ref, "dense_same_seed": same_seed if ref else None,
                   "macs_ratio": _macs_ratio(rows[key], rows.get(ref) if ref else None),
                   "busy": busy, "others_cpus": others, "repeat_p50_ms": self.repeat_p50.get(key),
                   "dense_repeat_spread": spreads.get(ref), "unsteady": unsteady.get(ref),
                   "load1_start": start_load["load1"], "load1_end": end_load["load1"], "cpus": cpus,
                   "rounds": rounds * repeats, "warmup": warmup,
                   "repeats": repeats, "settle": settle, "order": "shuffle", "ratio_interval": "bootstrap-95",
                   "session_models": len(self.members) - len(self.failed) - len(self.missing),
                   "timed_at": stamp, "hostname": socket.gethostname(), "torch": torch.__version__,
                   "runtime_version": runtime_version(cond["runtime"]),
                   "allocator": steady_allocator(), "model_path": f"models/{artefact_name(key)}.pt",
                   **self.infos.get(key, {}),
                   "error": self.failed.get(key) or (f"dense reference {ref}: unusable"
                                                     if ref in self.failed or ref in self.missing else None)}
            if key in self.times:
                row.update(summary_ms(self.times[key]))
                if ref in self.times and len(self.times[ref]) == len(self.times[key]):  # both timed in every repeat
                    row["latency_ratio"], row["latency_ratio_lo"], row["latency_ratio_hi"] = paired_ratio(
                        self.times[key], self.times[ref])
            append_row(out.path, row)
            out.written += 1


def _runner(store: Path, row: dict, key: str, cond: dict, dev: torch.device) -> tuple[Callable[[], Any], dict]:
    """Load, prepare and hand one model to its runtime for one condition."""

    model = load_model(store, key, device=dev)
    x32 = _input(row, cond["batch"], dev, torch.float32, cond["memory_format"])
    if cond["memory_format"] == "channels_last":
        model = model.to(memory_format=torch.channels_last)
    # ONNX exports the model as rebuilt: prepare_for_inference picks eager kernels, some of which (a C++ extension
    # op) tracing cannot see, and ONNX Runtime picks its own kernels for the exported graph.
    prepared = {} if cond["runtime"] in ONNX_RUNTIMES else get_method(row["method"]).prepare_for_inference(model, x32)
    net, info = (model, {}) if cond["dtype"] == "float32" else variant_copy(model, cond["dtype"], dev,
                                                                            cond["memory_format"])
    x = x32 if cond["dtype"] == "float32" else x32.to(torch.bfloat16)
    run, runtime_info = make_runner(cond["runtime"], net, x, threads=cond["threads"], device=dev)
    run()  # one untimed call outside the session: lazy caches (BUnit's block-diagonal weights) are built now
    return run, {"prepared": prepared or None, **info, **runtime_info}
