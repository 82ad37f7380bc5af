"""Measurement: what a row says about a trained model's size, arithmetic and speed.

- :mod:`harness.measure.row_columns`: parameters, MACs (from the one counter, :mod:`baselines.counting`) and checkpoint
  size (:func:`measure_size`), and the isolated latency columns (:func:`measure_speed`); the experiment calls
  both, the backends chosen for inference between them.
- :mod:`harness.measure.latency`: the per-row latency protocol (one model on its own, right after training).
- :mod:`harness.measure.lowp`: bfloat16 and 2:4 semi-structured copies timed on CUDA.
- :mod:`harness.measure.inspection`: ``bunitbench inspect``, dense vs BUnit per stage.
- :mod:`harness.measure.timing_pass`: ``bunitbench time``, every kept model re-timed against its dense reference,
  interleaved; :mod:`harness.measure.runtimes` (eager, compile, ONNX Runtime, OpenVINO, OpenVINO with the unit op) and
  :mod:`harness.measure.timing_table` (``timings.jsonl`` read and printed) serve it.

Every timing goes through :mod:`bunit.timing`, every count through :mod:`baselines.counting`.
"""
from harness.measure.latency import LATENCY_COLUMNS, MEMORY_FORMATS, measure_latency, peak_memory_mb
from harness.measure.row_columns import checkpoint_bytes, measure_size, measure_speed

__all__ = ["LATENCY_COLUMNS", "MEMORY_FORMATS", "measure_latency", "peak_memory_mb", "checkpoint_bytes",
           "measure_size", "measure_speed"]
