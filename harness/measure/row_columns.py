"""A row's measurement columns: size and arithmetic (params, MACs, checkpoint bytes), isolated speed, both."""
from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn as nn

from baselines.counting import count_costs
from harness.measure.latency import LATENCY_COLUMNS, measure_latency
from harness.measure.lowp import bf16_columns, semi24_columns

__all__ = ["checkpoint_bytes", "measure_size", "measure_speed"]


def checkpoint_bytes(model: nn.Module) -> int:
    """Size in bytes of ``torch.save(model.state_dict())``, written to memory."""
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    return buffer.getbuffer().nbytes


def measure_size(model: nn.Module, input_shape: Sequence[int]) -> dict[str, int]:
    """``params``, ``params_nonzero``, ``macs``, ``macs_nonzero`` (:mod:`baselines.counting`) and ``ckpt_bytes``.

    Args:
        model: the network in the form it was trained (count before preparing it for inference).
        input_shape: per-sample input shape, e.g. ``(3, 32, 32)``.
    """
    return {**count_costs(model, input_shape), "ckpt_bytes": checkpoint_bytes(model)}


def measure_speed(model: nn.Module, example_input: torch.Tensor, *, batch_sizes: Sequence[int] = (1, 64),
                  repeats: int = 30, warmup: int = 5, device: str | torch.device | None = None,
                  dtype: torch.dtype = torch.float32, memory_format: str = "contiguous", threads: int | None = None,
                  extras: bool = True) -> dict[str, Any]:
    """The isolated latency columns (:func:`harness.measure.latency.measure_latency`), plus on CUDA the bfloat16
    and 2:4 semi-structured copies when ``extras`` (:mod:`harness.measure.lowp`). Never raises for a failed
    timing: ``latency_error`` says what failed."""
    timed = measure_latency(model, example_input, batch_sizes=batch_sizes, repeats=repeats, warmup=warmup,
                            dtype=dtype, memory_format=memory_format, threads=threads, device=device)
    if timed["latency_device"].startswith("cuda") and extras and timed["latency_ms_p50_b1"] is not None:
        sizes = (1, timed["throughput_batch"]) if timed["throughput_batch"] else (1,)
        common = dict(batch_sizes=sizes, repeats=repeats, warmup=warmup, device=torch.device(timed["latency_device"]),
                      memory_format=timed["memory_format"])
        errors = bf16_columns(model, example_input, timed, common) + semi24_columns(model, example_input, timed,
                                                                                       common)
        if errors:
            timed["latency_error"] = "; ".join(filter(None, [timed["latency_error"], *errors]))
    return timed
