"""Latency of one model on its own: the protocol behind a row's latency columns.

A deep copy of the model is timed, so the caller's model is never touched (mode, device, dtype, memory format).
The copy is in eval mode, any ``torch.nn.utils.prune`` mask is made permanent (the mask multiply is not timed),
and it runs under ``torch.inference_mode``. Inputs are built before timing: the first ``batch`` rows of the
example input, or its first row repeated. ``warmup`` untimed calls, then ``repeats`` timed calls through
:func:`bunit.timing.call_times` (the one timer: ``perf_counter`` with the garbage collector off on CPU, CUDA
events with ``cudnn.benchmark`` on GPU); the row gets median, p90 and inter-quartile range in ms, at batch 1 and
at the throughput batch. Intra-op threads are pinned through ``torch.utils.benchmark``'s ``set_torch_threads``.

- ``peak_mem_mb`` (CUDA): the allocator's peak during the throughput-batch calls minus what was allocated before
  the copy was made. On CPU it is ``None``: RSS deltas are blurred by the allocator's caching.
- An out-of-memory error at the throughput batch halves the batch and retries; ``throughput_batch`` holds the
  batch that ran. Any other failure leaves the latency columns ``None`` and says why in ``latency_error``.
- ``memory_format="auto"`` times both layouts and keeps the one with the lower median at the throughput batch
  (batch 1 when there is none); ``memory_format`` holds the winner, ``memory_format_requested`` says it was chosen.

These columns time each model alone, right after its training ("isolated" in the report). Latency that users
compare comes from the interleaved timing pass over the store's trained models (``bunitbench time``).
"""
from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn
from torch.utils.benchmark.utils.common import set_torch_threads

from baselines.unstructured import make_pruning_permanent
from bunit.timing import call_times, summary_ms
from harness.core.config import MEMORY_FORMATS
from harness.core.devices import device_info, dtype_name, model_device, normalize_device

__all__ = ["LATENCY_COLUMNS", "MEMORY_FORMATS", "measure_latency", "peak_memory_mb", "prepared_copy", "make_batch",
           "timed_pass"]


LATENCY_COLUMNS = (
    "latency_ms_p50_b1", "latency_ms_p90_b1", "latency_iqr_ms_b1",
    "latency_ms_p50_bt", "latency_ms_p90_bt", "latency_iqr_ms_bt",
    "throughput_batch", "throughput_img_s",
    "latency_ms_p50_b1_semi24", "latency_ms_p50_bt_semi24", "semi24_layers",
    "latency_ms_p50_b1_bf16", "latency_ms_p50_bt_bf16",
    "peak_mem_mb", "latency_device", "device_name", "dtype", "memory_format", "memory_format_requested",
    "threads", "latency_error",
)

_MIB = 2**20


def prepared_copy(model: nn.Module, device: torch.device, dtype: torch.dtype, memory_format: str) -> nn.Module:
    net = make_pruning_permanent(copy.deepcopy(model)).to(device=device, dtype=dtype)
    if memory_format == "channels_last":
        net = net.to(memory_format=torch.channels_last)
    return net.eval()


def make_batch(example: torch.Tensor, batch: int, device: torch.device, dtype: torch.dtype,
                memory_format: str) -> torch.Tensor:
    x = example.detach()
    x = x[:batch] if x.shape[0] >= batch else x[:1].expand(batch, *x.shape[1:])
    x = x.to(device=device, dtype=dtype if x.is_floating_point() else x.dtype)
    layout = torch.channels_last if memory_format == "channels_last" and x.dim() == 4 else torch.contiguous_format
    return x.contiguous(memory_format=layout).clone(memory_format=layout)


def _times_ms(net: nn.Module, x: torch.Tensor, *, repeats: int, warmup: int, device: torch.device,
              grad_mode: Callable[[], contextlib.AbstractContextManager]) -> dict[str, float]:
    """Median, p90 and IQR (ms) of ``repeats`` timed calls of ``net(x)`` after ``warmup`` untimed calls."""
    with grad_mode():
        times = call_times(lambda: net(x), repeats=repeats, warmup=warmup, device=device)
    s = summary_ms(times)
    return {"p50": s["p50_ms"], "p90": s["p90_ms"], "iqr": s["iqr_ms"]}


def _is_oom(err: BaseException) -> bool:
    return isinstance(err, torch.OutOfMemoryError) or "out of memory" in str(err).lower()


def timed_pass(net: nn.Module, example: torch.Tensor, *, batch_sizes: tuple[int, ...], repeats: int, warmup: int,
                device: torch.device, dtype: torch.dtype, memory_format: str, mem_base: int | None,
                grad_mode: Callable[[], contextlib.AbstractContextManager] = torch.inference_mode) -> dict[str, Any]:
    """Time ``net`` at batch 1 and at the throughput batch (halved on out-of-memory)."""
    timing = dict(repeats=repeats, warmup=warmup, device=device, grad_mode=grad_mode)
    x = make_batch(example, 1, device, dtype, memory_format)
    result: dict[str, Any] = {"b1": _times_ms(net, x, **timing), "bt": None, "batch": None,
                              "peak_mem_mb": None}
    del x
    batch = batch_sizes[1] if len(batch_sizes) > 1 else 0
    while batch >= 1:
        try:
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
            x = make_batch(example, batch, device, dtype, memory_format)
            result["bt"] = _times_ms(net, x, **timing)
            result["batch"] = batch
            if device.type == "cuda" and mem_base is not None:
                result["peak_mem_mb"] = (torch.cuda.max_memory_allocated(device) - mem_base) / _MIB
            return result
        except (torch.OutOfMemoryError, RuntimeError) as err:
            if not _is_oom(err):
                raise
            x = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
            batch //= 2
    if len(batch_sizes) > 1:
        raise RuntimeError(f"out of memory down to batch 1 of the throughput batch {batch_sizes[1]}")
    return result


def _memory_allocated(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.memory_allocated(device)


def _check_latency_args(batch_sizes: Sequence[int], repeats: int, warmup: int, memory_format: str) -> tuple[int, ...]:
    sizes = tuple(int(b) for b in batch_sizes)
    if not 1 <= len(sizes) <= 2 or sizes[0] != 1 or any(b < 1 for b in sizes):
        raise ValueError(f"batch_sizes: expected (1,) or (1, throughput_batch >= 1); got {batch_sizes!r}")
    if repeats < 3:
        raise ValueError(f"repeats: need at least 3 timed calls for a median and p90; got {repeats}")
    if warmup < 0:
        raise ValueError(f"warmup: must be >= 0; got {warmup}")
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format: unknown {memory_format!r}; allowed: {', '.join(MEMORY_FORMATS)}")
    return sizes


def measure_latency(model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
                    repeats: int = 30, warmup: int = 5, dtype: torch.dtype = torch.float32,
                    memory_format: str = "contiguous", threads: int | None = None,
                    device: str | torch.device | None = None) -> dict[str, Any]:
    """Latency, throughput and peak memory of inference, as row columns (see the module docstring).

    Args:
        model: the network; a deep copy is timed, ``model`` itself is not changed.
        example_input: a batch of inputs ``(B, ...)``; its rows (or its first row repeated) form the timed batches.
        batch_sizes: ``(1, throughput_batch)`` or ``(1,)``.
        repeats: timed calls per batch size (at least 3).
        warmup: untimed calls before them.
        dtype: floating dtype of the timed copy and its input.
        memory_format: ``contiguous``, ``channels_last`` or ``auto`` (times both, keeps the faster).
        threads: torch intra-op threads while timing; ``None`` keeps the current count.
        device: where to time; ``None`` means where the model's parameters are.

    Returns:
        A dict with every key of ``LATENCY_COLUMNS``; values are ``None`` where not measured, and
        ``latency_error`` says why when a measurement failed.
    """
    sizes = _check_latency_args(batch_sizes, repeats, warmup, memory_format)
    device = normalize_device(device if device is not None else model_device(model))
    row: dict[str, Any] = dict.fromkeys(LATENCY_COLUMNS)
    row.update(latency_device=str(device), dtype=dtype_name(dtype), memory_format_requested=memory_format,
               throughput_batch=sizes[1] if len(sizes) > 1 else None)
    errors: list[str] = []
    with set_torch_threads(threads if threads is not None else torch.get_num_threads()):
        row.update(device_info(device))
        try:
            formats = ("contiguous", "channels_last") if memory_format == "auto" else (memory_format,)
            passes = {}
            for fmt in formats:
                mem_base = _memory_allocated(device)
                net = prepared_copy(model, device, dtype, fmt)
                passes[fmt] = timed_pass(net, example_input, batch_sizes=sizes, repeats=repeats, warmup=warmup,
                                         device=device, dtype=dtype, memory_format=fmt, mem_base=mem_base)
                del net
            chosen = min(formats, key=lambda f: (passes[f]["bt"] or passes[f]["b1"])["p50"])
            best = passes[chosen]
            row.update(memory_format=chosen, peak_mem_mb=best["peak_mem_mb"], latency_ms_p50_b1=best["b1"]["p50"],
                       latency_ms_p90_b1=best["b1"]["p90"], latency_iqr_ms_b1=best["b1"]["iqr"])
            if best["bt"] is not None:
                row.update(latency_ms_p50_bt=best["bt"]["p50"], latency_ms_p90_bt=best["bt"]["p90"],
                           latency_iqr_ms_bt=best["bt"]["iqr"], throughput_batch=best["batch"],
                           throughput_img_s=best["batch"] / (best["bt"]["p50"] / 1e3))
        except Exception as err:  # noqa: BLE001 - a failed measurement becomes an error column, never a crash
            errors.append(f"{type(err).__name__}: {err}")
    row["latency_error"] = "; ".join(errors) or None
    return row


def peak_memory_mb(model: nn.Module, example_input: torch.Tensor, *, batch_size: int = 64,
                   device: str | torch.device | None = None, dtype: torch.dtype = torch.float32,
                   memory_format: str = "contiguous") -> float | None:
    """Peak CUDA memory of one inference call at ``batch_size``, MiB; ``None`` on CPU.

    Counts what the call needs beyond what was allocated before: a copy of the weights, the input,
    activations and workspaces (``torch.cuda.max_memory_allocated`` minus the allocation before the copy).

    Args:
        model: the network (not changed).
        example_input: a batch of inputs whose rows form the batch.
        batch_size: the batch size.
        device: where to run; ``None`` means where the model's parameters are.
        dtype: floating dtype of the copy and its input.
        memory_format: ``contiguous`` or ``channels_last``.

    Returns:
        MiB, or ``None`` when the device is not CUDA.
    """
    if memory_format not in MEMORY_FORMATS[:2]:
        raise ValueError(f"memory_format: unknown {memory_format!r}; allowed: contiguous, channels_last")
    device = normalize_device(device if device is not None else model_device(model))
    if device.type != "cuda":
        return None
    base = _memory_allocated(device)
    net = prepared_copy(model, device, dtype, memory_format)
    x = make_batch(example_input, batch_size, device, dtype, memory_format)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.inference_mode():
        net(x)
    torch.cuda.synchronize(device)
    return (torch.cuda.max_memory_allocated(device) - base) / _MIB

