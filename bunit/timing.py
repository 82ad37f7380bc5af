"""The one timing primitive of bunit-bench: wall time of calls, alone or interleaved with other calls.

Every latency figure of the project goes through this module: the autotuner's backend choice
(:mod:`bunit.autotune`), the latency columns and the timing pass of the harness, and the scripts under
``benchmarks/``. It lives in ``bunit/`` because that is the lowest package that times anything; it imports
torch and numpy only.

How one call is timed:

- CPU: ``time.perf_counter`` around the call, with the garbage collector off for the whole timed loop, and
  the process's allocator made steady first (:func:`steady_allocator`, once per process, not undone): glibc
  otherwise serves buffers of a few MB (a batch-64 activation) with fresh ``mmap`` pages and returns them on
  free, so every call pays ~1,500 page faults, and whether it does depends on the process's allocation history
  (glibc moves its threshold as it goes). With the steady allocator a ResNet-20 at batch 64 (2 threads) takes no
  page faults per call; without it, ~1,500 per call and about a quarter more time, by an amount that depends on
  what the process did before.
- CUDA: an event pair around the call and a synchronize after it (one call at a time: latency, not queue
  depth); ``cudnn.benchmark`` is on while timing and restored afterwards.

:func:`interleaved_times` gives several functions turns within each round (rotated or shuffled order), with a
few untimed calls before each timed one, so that a slow spell of the machine hits every candidate alike and
the allocator and caches hold the candidate's own data when its call is timed. Paired statistics (the ratio of
two candidates within one round) are then meaningful.
"""
from __future__ import annotations

import contextlib
import functools
import gc
import os
import random
import time
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

__all__ = ["call_times", "interleaved_times", "summary_ms", "machine_load", "steady_allocator", "cpu_snapshot",
           "others_cpus", "ORDERS"]

ORDERS = ("rotate", "shuffle")
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3  # glibc's mallopt parameter numbers (malloc.h)
MMAP_THRESHOLD = 32 << 20  # glibc's largest allowed value (4 * 1024 * 1024 * sizeof(long))
TRIM_THRESHOLD = 1 << 30


@functools.lru_cache(maxsize=None)
def steady_allocator() -> str:
    """Make glibc's malloc keep freed buffers for reuse: a fixed mmap threshold of 32 MiB (only larger blocks get
    their own pages) and a 1 GiB trim threshold (freed heap memory is not handed back). Process-wide, once per
    process (cached), never undone; the harness and benchmarks time nothing without it.

    Returns:
        What the process's allocator is now, as recorded in timing rows: ``"glibc-steady"``, or ``"default"``
        where the C library is not glibc (musl, macOS, Windows), which this leaves alone.
    """
    try:
        import ctypes
        import ctypes.util

        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return "default"
    if not (hasattr(libc, "mallopt") and hasattr(libc, "gnu_get_libc_version")):
        return "default"
    ok = libc.mallopt(_M_MMAP_THRESHOLD, MMAP_THRESHOLD) and libc.mallopt(_M_TRIM_THRESHOLD, TRIM_THRESHOLD)
    return "glibc-steady" if ok else "default"


@contextlib.contextmanager
def _quiet_runtime(device: torch.device) -> Iterator[None]:
    """GC off (CPU and CUDA) and ``cudnn.benchmark`` on (CUDA) for the duration, both restored; the steady
    allocator from now on."""
    steady_allocator()
    gc_was_enabled = gc.isenabled()
    previous = torch.backends.cudnn.benchmark
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    gc.disable()
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = previous
        if gc_was_enabled:
            gc.enable()


def _time_one(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of one call of ``fn``."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(device)  # events are read only after the work is done
        return start.elapsed_time(end) / 1e3
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def call_times(fn: Callable[[], Any], *, repeats: int, warmup: int, device: torch.device | str = "cpu",
               settle: int = 0) -> list[float]:
    """Seconds of each of ``repeats`` timed calls of ``fn`` after ``warmup`` untimed calls.

    Args:
        fn: a function of no arguments (bind the input in it).
        repeats: timed calls.
        warmup: untimed calls first.
        device: where ``fn`` runs (CUDA events on ``cuda``).
        settle: untimed calls before each timed call.

    Returns:
        ``repeats`` timings in seconds.
    """
    return interleaved_times({"fn": fn}, rounds=repeats, warmup=warmup, device=device, settle=settle)["fn"]


def interleaved_times(fns: dict[str, Callable[[], Any]], *, rounds: int, warmup: int,
                      device: torch.device | str = "cpu", settle: int = 2, order: str = "rotate",
                      seed: int = 0, on_round: Callable[[int], None] | None = None) -> dict[str, list[float]]:
    """Seconds of one call of each function per round, the functions taking turns.

    Each round gives every function a turn: ``settle`` untimed calls, then one timed call. The untimed calls
    matter on CPU: right after a candidate that allocates a lot, the allocator has returned memory to the OS
    and the caches hold the other candidate's data, and timing that first call measures the neighbour.

    Args:
        fns: name -> a function of no arguments.
        rounds: timed rounds; every function gets one timed call per round.
        warmup: untimed rounds first (every function called ``warmup`` times).
        device: where the functions run.
        settle: untimed calls before the timed one in each turn.
        order: ``rotate`` (the order shifts by one each round) or ``shuffle`` (a fresh random order each round,
            drawn from ``seed``).
        seed: seed of the shuffled order.
        on_round: called with the round index after every round (progress).

    Returns:
        name -> ``rounds`` timings in seconds, in round order (index ``r`` of every list is round ``r``).
    """
    if order not in ORDERS:
        raise ValueError(f"order: {order!r} not allowed; allowed: {', '.join(ORDERS)}")
    if rounds < 1 or warmup < 0 or settle < 0:
        raise ValueError(f"rounds >= 1, warmup >= 0, settle >= 0 required; got {rounds}, {warmup}, {settle}")
    device = torch.device(device)
    names = list(fns)
    rng = random.Random(seed)
    times: dict[str, list[float]] = {name: [] for name in names}
    with _quiet_runtime(device):
        for _ in range(warmup):
            for name in names:
                fns[name]()
        for r in range(rounds):
            if order == "shuffle":
                turn = rng.sample(names, len(names))
            else:
                shift = r % len(names)
                turn = names[shift:] + names[:shift]
            for name in turn:
                for _ in range(settle):
                    fns[name]()
                times[name].append(_time_one(fns[name], device))
            if on_round is not None:
                on_round(r)
    return times


def summary_ms(times_s: Sequence[float]) -> dict[str, float]:
    """Median, p90 and inter-quartile range of timings, in milliseconds."""
    q25, q50, q75, q90 = np.percentile(np.asarray(times_s, dtype=float) * 1e3, [25, 50, 75, 90])
    return {"p50_ms": float(q50), "p90_ms": float(q90), "iqr_ms": float(q75 - q25)}


def machine_load() -> dict[str, float | int | None]:
    """The 1-minute load average and the CPUs this process may use (other work competes when load > cpus)."""
    try:
        load1: float | None = round(os.getloadavg()[0], 2)
    except OSError:
        load1 = None
    usable = _usable_cpus()
    return {"load1": load1, "cpus": len(usable) if usable else (os.cpu_count() or 1)}


def _usable_cpus() -> set[int] | None:
    """The CPUs this process may run on; None where the OS does not say (macOS, Windows)."""
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def cpu_snapshot() -> dict[str, float] | None:
    """CPU seconds spent so far: busy on this process's usable CPUs (``/proc/stat``: user, nice, system, irq,
    softirq and steal, the time the hypervisor gave to other machines) and by this process itself; None where
    ``/proc/stat`` does not exist (macOS, Windows).

    Two snapshots give :func:`others_cpus`: how many CPUs other work kept busy in between, at once and without the
    minute-long lag of the load average.
    """
    usable = _usable_cpus()
    try:
        with open("/proc/stat", encoding="ascii") as fh:
            lines = [ln.split() for ln in fh if ln.startswith("cpu") and not ln.startswith("cpu ")]
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    for parts in lines:
        if usable is None or int(parts[0][3:]) in usable:
            user, nice, system, _idle, _iowait, irq, softirq, steal = (int(v) for v in parts[1:9])
            busy += user + nice + system + irq + softirq + steal
    return {"wall": time.monotonic(), "busy": busy / hz, "own": time.process_time()}


def others_cpus(start: dict[str, float] | None, end: dict[str, float] | None) -> float | None:
    """CPUs kept busy by anything but this process between two :func:`cpu_snapshot` calls (0 on a quiet machine,
    1.0 when another process ran one core flat out), or None when either snapshot is missing."""
    if start is None or end is None or end["wall"] <= start["wall"]:
        return None
    others = (end["busy"] - start["busy"]) - (end["own"] - start["own"])
    return round(max(0.0, others) / (end["wall"] - start["wall"]), 3)
