"""Measurement: what a row says about a trained model's size, arithmetic and speed.

- :mod:`harness.measure.row_columns`: parameters, MACs (from the one counter, :mod:`baselines.counting`) and checkpoint
  size; :func:`measure_model` puts them together with the isolated latency columns.
- :mod:`harness.measure.latency`: the per-row latency protocol (one model on its own, right after training).
- :mod:`harness.measure.lowp`: bfloat16 and 2:4 semi-structured copies timed on CUDA.
- :mod:`harness.core.devices`: device name, threads, dtype names.
- :mod:`harness.measure.inspection`: ``bunitbench inspect``, dense vs BUnit per stage.
- :mod:`harness.measure.timing_pass`: ``bunitbench time``, every kept model re-timed against its dense reference,
  interleaved; :mod:`harness.measure.runtimes` (eager, compile, ONNX Runtime) and
  :mod:`harness.measure.timing_table` (``timings.jsonl`` read and printed) serve it.

Every timing goes through :mod:`bunit.timing`, every count through :mod:`baselines.counting`.
"""
from harness.measure.latency import LATENCY_COLUMNS, MEMORY_FORMATS, measure_latency, peak_memory_mb
from harness.measure.row_columns import checkpoint_bytes, measure_model, measure_size, measure_speed

__all__ = ["LATENCY_COLUMNS", "MEMORY_FORMATS", "measure_latency", "peak_memory_mb", "checkpoint_bytes",
           "measure_model", "measure_size", "measure_speed"]
