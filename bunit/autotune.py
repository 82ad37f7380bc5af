"""Pick the fastest execution backend for every fused unit layer of a model, by measurement.

Each distinct (unit row, stride, input shape incl. batch, dtype, device, threads, torch version, sources of the
``fused_cpu`` and ``unit_train`` kernels) is timed once per backend through :mod:`bunit.timing` (the project's one
timer): the median of single calls, at least ``repeats`` of them and enough to fill ``min_time_s``. Timings are
inference timings (eval mode, ``no_grad``); the model's mode is restored afterwards. Choices and the medians behind
them are cached on disk as JSON (default ``~/.cache/bunitbench/autotune.json``; the folder can be moved with
``BUNITBENCH_CACHE_DIR`` and the file given directly with ``cache_path``), so a second call with the same shapes
times nothing.
The candidates are the registered backends (:mod:`bunit.backends`): by default every eager one, a backend
registered later included. ``fused_cpu`` takes part like every backend; where its C++ extension cannot be built it
raises, is recorded as failed and never chosen.

The ``compiled`` backend is timed last, compiling the fastest eager backend (``layer.compile_base``) and,
when ``stencil`` is among the backends tried, compiling ``stencil`` too (that backend exists to be compiled);
the faster compile is kept, and every compile's median is cached under ``compiled_ms``. ``compiled`` is left
out of the default set because compiling every shape can take minutes. A backend that raises is recorded
with its error and never chosen.
"""
from __future__ import annotations

import json
import math
import os
import platform
import statistics
import tempfile
from pathlib import Path
from typing import Callable, Iterable

import torch
import torch.nn as nn

from bunit import fused_cpu, unit_train
from bunit.functional import is_channels_last
from bunit.fused_cpu import cache_dir
from bunit.backends import EAGER_BACKENDS, list_backends
from bunit.layers import UnitLayer, unit_layers
from bunit.spec import compact_specs
from bunit.timing import call_times, interleaved_times, summary_ms

__all__ = ["autotune", "has_unit_layers", "default_cache_path", "time_backend", "layer_key", "compare_backends",
           "DEFAULT_BACKENDS"]

DEFAULT_BACKENDS = EAGER_BACKENDS
"""Backends tried when ``backends`` is None: every registered eager backend (a live view of the registry; all but
``compiled`` among the built-in ones)."""

TimerFn = Callable[[UnitLayer, torch.Tensor, str, int], float]
"""``timer(layer, x, backend, repeats) -> median seconds`` (injectable for tests)."""


def default_cache_path() -> Path:
    """``$BUNITBENCH_CACHE_DIR/autotune.json``, else ``~/.cache/bunitbench/autotune.json``."""
    return cache_dir() / "autotune.json"


def has_unit_layers(model: nn.Module) -> bool:
    """True when ``model`` holds at least one fused unit layer (the only kind the autotuner changes)."""
    return any(m.impl == "fused" for _, m in unit_layers(model))


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"cuda:{torch.cuda.get_device_name(device)}"
    return f"{device.type}:{platform.machine()}:{platform.processor() or 'unknown'}"


def layer_key(layer: UnitLayer, x: torch.Tensor) -> str:
    """The cache key of timing ``layer`` on inputs like ``x``."""
    threads = torch.get_num_threads() if x.device.type == "cpu" else 0
    fmt = "cl" if is_channels_last(x) else "nchw"
    return "|".join([",".join(compact_specs(layer.specs)), f"s{layer.stride}", "x".join(map(str, x.shape)), fmt,
                     str(x.dtype).removeprefix("torch."), _device_name(x.device), f"threads={threads}",
                     f"torch={torch.__version__}", f"fused_cpu={fused_cpu.source_tag()}",
                     f"unit_train={unit_train.source_tag()}"])


def time_backend(layer: UnitLayer, x: torch.Tensor, backend: str, repeats: int, *, warmup: int = 3,
                 min_time_s: float = 0.02) -> float:
    """Median seconds of one ``layer(x)`` call on ``backend`` (eval, no_grad), timed by :mod:`bunit.timing`.

    Args:
        layer: a fused unit layer (its backend is restored afterwards).
        x: an input batch.
        backend: the backend to time.
        repeats: the fewest timed calls; fast layers get more, up to ``min_time_s`` of timed calls (at most 1000).
        warmup: untimed calls first (the first ``compiled`` call compiles).
        min_time_s: the least time spent in timed calls.

    Returns:
        The median time of one call, in seconds.
    """
    previous = layer.backend
    layer.backend = backend
    try:
        with torch.no_grad():
            once = call_times(lambda: layer(x), repeats=1, warmup=warmup, device=x.device)[0]
            calls = max(repeats, min(1000, math.ceil(min_time_s / max(once, 1e-7))))
            return statistics.median(call_times(lambda: layer(x), repeats=calls, warmup=0, device=x.device))
    finally:
        layer.backend = previous


def _load(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
        return data if isinstance(data, dict) and data.get("version") == 1 else {"version": 1, "entries": {}}
    except (OSError, ValueError):
        return {"version": 1, "entries": {}}


def _save(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".autotune-", suffix=".json")
    with os.fdopen(fd, "w") as fh:
        json.dump(data, fh, indent=1, sort_keys=True)
    os.replace(tmp, path)  # atomic: readers see the old or the new file, never half of one


def _capture_inputs(model: nn.Module, layers: list[tuple[str, UnitLayer]], example_input: torch.Tensor) -> dict:
    captured: dict[str, torch.Tensor] = {}

    def hook(name: str):
        def fn(_module: nn.Module, args: tuple) -> None:
            captured.setdefault(name, args[0].detach().clone())
        return fn

    handles = [layer.register_forward_pre_hook(hook(name)) for name, layer in layers]
    previous = [layer.backend for _, layer in layers]
    try:
        for _, layer in layers:  # capture on the default backend: the current one may not run here
            layer.backend = "grouped"
        with torch.no_grad():
            model(example_input)
    finally:
        for h in handles:
            h.remove()
        for (_, layer), backend in zip(layers, previous):
            layer.backend = backend
    return captured


def autotune(model: nn.Module, example_input: torch.Tensor, *, backends: Iterable[str] | None = None,
             repeats: int = 7, cache_path: str | os.PathLike | None = None, timer: TimerFn | None = None,
             ) -> dict[str, str]:
    """Time every backend on every distinct fused unit layer, pick the fastest median, set it, cache it.

    Args:
        model: a model containing fused :class:`UnitLayer` s (reference-form layers are left alone).
        example_input: a batch as the model will see it (batch size, dtype, device, memory format).
        backends: backends to try (default: every eager backend); ``compiled`` may be included.
        repeats: timed repetitions per backend (the median is compared).
        cache_path: JSON cache file (default :func:`default_cache_path`).
        timer: replaces :func:`time_backend` (``timer(layer, x, backend, repeats) -> seconds``).

    Returns:
        ``{layer name: chosen backend}``. Each layer also gets ``autotune_ms``: the medians (ms) it was
        chosen from.
    """
    tried = list(DEFAULT_BACKENDS if backends is None else backends)
    allowed = list_backends()
    bad = [b for b in tried if b not in allowed]
    if bad or not tried:
        raise ValueError(f"backends: {bad or tried} not allowed; allowed: {', '.join(allowed)}")
    if repeats < 1:
        raise ValueError(f"repeats: must be >= 1, got {repeats}")
    timer = timer or time_backend
    layers = [(n, m) for n, m in unit_layers(model) if m.impl == "fused"]
    if not layers:
        return {}
    path = Path(cache_path) if cache_path is not None else default_cache_path()
    cache = _load(path)
    entries = cache["entries"]
    was_training = model.training
    model.eval()
    changed = False
    chosen: dict[str, str] = {}
    try:
        inputs = _capture_inputs(model, layers, example_input)
        for name, layer in layers:
            if name not in inputs:
                continue  # the example never reached this layer
            x = inputs[name]
            key = layer_key(layer, x)
            entry = entries.setdefault(key, {"timings_ms": {}, "errors": {}, "compile_base": None})
            eager = [b for b in tried if b != "compiled"]
            for backend in eager:
                if backend not in entry["timings_ms"] and backend not in entry["errors"]:
                    changed |= _measure(entry, layer, x, backend, repeats, timer)
            if "compiled" in tried:
                changed |= _tune_compiled(entry, layer, x, tried, repeats, timer)
            best = _fastest(entry, tried)
            if best is None:
                raise RuntimeError(f"autotune: every backend failed on {name}: {entry['errors']}")
            if best == "compiled":
                layer.compile_base = entry["compile_base"]
            layer.backend = best
            layer.autotune_ms = {b: entry["timings_ms"][b] for b in tried if b in entry["timings_ms"]}
            chosen[name] = best
    finally:
        model.train(was_training)
    if changed:
        _save(path, cache)
    return chosen


def _measure(entry: dict, layer: UnitLayer, x: torch.Tensor, backend: str, repeats: int, timer: TimerFn) -> bool:
    try:
        seconds = float(timer(layer, x, backend, repeats))
        if not math.isfinite(seconds) or seconds <= 0:
            raise ValueError(f"timer returned {seconds}")
        entry["timings_ms"][backend] = seconds * 1e3
    except Exception as err:  # a backend that cannot run here (e.g. no compiler) is recorded and skipped
        entry["errors"][backend] = f"{type(err).__name__}: {err}"[:500]
    return True


def _compile_bases(entry: dict, tried: list[str]) -> list[str]:
    """What ``compiled`` is timed on: the fastest eager backend, and ``stencil`` when it was tried too."""
    best_eager = _fastest(entry, [b for b in EAGER_BACKENDS if b in entry["timings_ms"]]) or "grouped"
    return [best_eager] + (["stencil"] if "stencil" in tried and best_eager != "stencil" else [])


def _tune_compiled(entry: dict, layer: UnitLayer, x: torch.Tensor, tried: list[str], repeats: int,
                   timer: TimerFn) -> bool:
    """Time ``compiled`` on each compile base not timed yet; keep the fastest as the entry's ``compiled``."""
    per_base = entry.setdefault("compiled_ms", {})
    if not per_base and entry.get("compile_base") and "compiled" in entry["timings_ms"]:
        per_base[entry["compile_base"]] = entry["timings_ms"]["compiled"]  # a cache written before compiled_ms
    bases = _compile_bases(entry, tried)
    changed = False
    for base in bases:
        if base in per_base or f"compiled:{base}" in entry["errors"]:
            continue
        layer.compile_base = base
        probe = {"timings_ms": {}, "errors": {}}
        changed |= _measure(probe, layer, x, "compiled", repeats, timer)
        if "compiled" in probe["timings_ms"]:
            per_base[base] = probe["timings_ms"]["compiled"]
        else:
            entry["errors"][f"compiled:{base}"] = probe["errors"]["compiled"]
    timed = [(per_base[b], b) for b in bases if b in per_base]
    if timed:
        ms, base = min(timed)
        entry["timings_ms"]["compiled"], entry["compile_base"] = ms, base
        entry["errors"].pop("compiled", None)
    else:
        entry["timings_ms"].pop("compiled", None)
        entry["errors"]["compiled"] = "; ".join(entry["errors"].get(f"compiled:{b}", "") for b in bases)
    return changed


def _fastest(entry: dict, candidates: Iterable[str]) -> str | None:
    timed = [(entry["timings_ms"][b], b) for b in candidates if b in entry["timings_ms"]]
    return min(timed)[1] if timed else None


def compare_backends(specs: Iterable[str], *, batch: int = 64, size: int = 16, stride: int = 1, device: str = "cpu",
                     dtype: torch.dtype = torch.float32, backends: Iterable[str] | None = None,
                     repeats: int = 15) -> dict[str, float]:
    """Median ms of one unit layer on each backend and of the dense conv-BN-ReLU pair it replaces (``"dense"``).

    All of them are timed side by side (:func:`bunit.timing.interleaved_times`), eval mode, ``no_grad``.

    Args:
        specs: the unit row, e.g. ``["32x2-4-2"]``.
        batch: batch size.
        size: input height and width.
        stride: stride of the first convs.
        device: device to run on.
        dtype: parameter and input dtype.
        backends: backends to time (default: every eager backend).
        repeats: timed rounds (the median is reported).

    Returns:
        ``{backend: ms}`` plus ``"dense"``; a backend that fails maps to ``nan``.
    """
    layer = UnitLayer(list(specs), stride=stride).to(device=device, dtype=dtype).eval()
    x = torch.randn(batch, layer.in_channels, size, size, device=device, dtype=dtype)
    cin, cout = layer.in_channels, layer.out_channels
    dense = nn.Sequential(nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(),
                          nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU())
    dense = dense.to(device=device, dtype=dtype).eval()
    fns: dict[str, Callable[[], torch.Tensor]] = {"dense": lambda: dense(x)}
    out: dict[str, float] = {}
    with torch.no_grad():
        for backend in DEFAULT_BACKENDS if backends is None else backends:
            unit = UnitLayer(layer.specs, stride=stride).to(device=device, dtype=dtype).eval()
            unit.load_state_dict(layer.state_dict())
            unit.backend = backend
            try:
                unit(x)
                fns[backend] = lambda unit=unit: unit(x)
            except Exception:  # reported as nan: the caller prints what ran
                out[backend] = float("nan")
        times = interleaved_times(fns, rounds=repeats, warmup=2, device=device)
    out.update({name: summary_ms(t)["p50_ms"] for name, t in times.items()})
    return out


def _main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description="Time one unit layer on each backend against its dense conv pair.")
    parser.add_argument("specs", nargs="+", help="unit row, e.g. 32x2-4-2")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=16)
    parser.add_argument("--stride", type=int, default=1)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--backends", default=",".join(DEFAULT_BACKENDS))
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args(argv)
    if args.device.startswith("cuda"):
        torch.backends.cudnn.benchmark = True
    timings = compare_backends(args.specs, batch=args.batch, size=args.size, stride=args.stride, device=args.device,
                               dtype=getattr(torch, args.dtype), backends=args.backends.split(","),
                               repeats=args.repeats)
    on_gpu = args.device.startswith("cuda")
    name = torch.cuda.get_device_name(args.device) if on_gpu else f"cpu x{torch.get_num_threads()} threads"
    print(f"{' '.join(args.specs)}: batch {args.batch}, {args.size}x{args.size}, stride {args.stride}, "
          f"{args.dtype}, {name}")
    for backend, ms in sorted(timings.items(), key=lambda kv: (math.isnan(kv[1]), kv[1])):
        print(f"  {backend:11s} {ms:10.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(_main())
