"""The columns of a result row, documented in one place.

A row is one flat JSON object per run in ``results/<suite>/runs.jsonl``. Rows are built as explicit
dicts by :mod:`harness.run.experiment`; this table documents every column (units in the names) and lets the
store check that a row names no unknown column. Analysis reads rows by column name.
"""
from __future__ import annotations

import math

__all__ = ["SETTING_KEYS", "ROW_COLUMNS", "TIMING_ROW_COLUMNS", "unknown_columns", "check_ok_row"]

SETTING_KEYS = ("dataset", "backbone", "shortcut", "image_size")
"""The row columns that make a setting: rows share a dense reference, a timing pass session and a verdict only
within one setting."""

ROW_COLUMNS: dict[str, str] = {
    # identity of the experiment
    "key": "stable experiment key: dataset/backbone-shortcut/method/target/schedule/seed-confighash",
    "suite": "suite name",
    "dataset": "dataset name (digits, mnist, cifar10, imagefolder:PATH ...)",
    "image_size": "input side in pixels after resizing",
    "backbone": "dense backbone name (resnet56, vgg16 ...)",
    "shortcut": "CIFAR-ResNet shortcut variant, 'A' (zero-pad) or 'B' (1x1 conv); null for others",
    "method": "registered method name",
    "family": "dense | bunit | unstructured | structured",
    "target": "the method's knob as given in the suite (number, preset name or JSON string)",
    "schedule": "oneshot | iterative | progressive (baselines.SCHEDULES)",
    "steps": "prune steps of the iterative schedule (1 otherwise)",
    "seed": "experiment seed",
    "config_hash": "sha256 (first 12 hex) of the canonical experiment config, measurement settings excluded",
    "config": "the whole experiment config as a nested JSON object",
    # outcome
    "status": "ok | failed",
    "reason": "why it failed (one line); null when ok",
    "top1": "top-1 accuracy on the held-out split, percent",
    "top5": "top-5 accuracy on the held-out split, percent (top-k with k = min(5, classes))",
    "test_loss": "mean cross-entropy on the held-out split",
    "n_test": "images in the held-out split (one image is 100 / n_test points of top-1: the verdict's resolution)",
    # size and arithmetic (baselines.counting, the one counter)
    "params": "all parameters",
    "params_nonzero": "parameters that are not exactly zero",
    "macs": "multiply-accumulates of conv and linear layers plus bias adds, one input (= ptflops aten backend)",
    "macs_nonzero": "MACs counting only non-zero weights (sparse-aware)",
    "ckpt_bytes": "size of the saved state_dict in bytes",
    # what the method achieved against its knob
    "sparsity": "achieved fraction of zero weights among prunable conv/linear weights",
    "channel_ratio": "achieved fraction of conv output channels removed",
    "macs_reduction": "1 - macs / macs of the dense backbone",
    "params_reduction": "1 - params / params of the dense backbone",
    "achieved": "method-specific achieved values (JSON object)",
    "architecture": "JSON description the compressed model is rebuilt from (widths / unit plan)",
    # latency (harness.measure): b1 = batch 1, bt = throughput batch
    "latency_ms_p50_b1": "median latency at batch 1, milliseconds",
    "latency_ms_p90_b1": "90th percentile latency at batch 1, milliseconds",
    "latency_ms_p50_bt": "median latency at the throughput batch, milliseconds",
    "latency_ms_p90_bt": "90th percentile latency at the throughput batch, milliseconds",
    "latency_iqr_ms_b1": "inter-quartile range at batch 1, milliseconds",
    "latency_iqr_ms_bt": "inter-quartile range at the throughput batch, milliseconds",
    "throughput_batch": "the throughput batch size",
    "throughput_img_s": "images per second at the throughput batch (from the median)",
    "latency_ms_p50_b1_semi24": "median batch-1 latency of the 2:4 semi-structured form (GPU only)",
    "latency_ms_p50_bt_semi24": "median throughput-batch latency of the 2:4 semi-structured form (GPU only)",
    "semi24_layers": "conv/linear layers run 2:4 semi-structured in the semi24 timing, as 'converted/total' (GPU only)",
    "latency_ms_p50_b1_bf16": "median batch-1 latency in bf16 (GPU only)",
    "latency_ms_p50_bt_bf16": "median throughput-batch latency in bf16 (GPU only)",
    "peak_mem_mb": "peak memory of inference at the throughput batch, MiB (CUDA allocator; CPU: null)",
    "inference": "what the method chose for inference before timing (JSON object, e.g. BUnit's bunit_backend per "
                 "layer from the autotuner); null when nothing",
    "latency_device": "device the latency was measured on (cpu, cuda:0)",
    "device_name": "CPU model or GPU name",
    "dtype": "dtype of the latency measurement",
    "memory_format": "contiguous | channels_last",
    "memory_format_requested": "contiguous | channels_last | auto (auto: memory_format holds the faster one measured)",
    "threads": "torch intra-op threads during measurement",
    "latency_error": "why a latency measurement (or its bf16 / semi24 part) failed; null when all ran",
    # cost of getting there
    "epochs_pretrain": "epochs of dense pre-training the model started from",
    "epochs_sparse": "epochs of sparsity-inducing training before pruning",
    "epochs_finetune": "epochs of fine-tuning after pruning",
    "epochs_total": "pretrain + sparse + finetune, or from-scratch epochs for dense/BUnit",
    "train_seconds": "wall time of compressing and training in this run, after its starting point",
    "pretrain_seconds": "wall time it took to train the dense checkpoint the run started from (0 from scratch)",
    "train_settings": "per training phase of this run: the setting it ran with (harness.run.train_speed: setting, "
                      "bf16, channels_last, unit_backend, layer_backends when per-layer, measured, step_ms per "
                      "candidate, layer_ms per unit layer and backend), None if none trained",
    "model_path": "the kept trained model, relative to the store (harness.core.artefacts); null when not kept",
    "run_seconds": "wall time of the whole run",
    # provenance
    "git_rev": "git revision of the harness",
    "git_dirty": "true when the work tree had uncommitted changes",
    "versions": "package versions (torch, torchvision, torch_pruning, ptflops, python)",
    "device": "training device (cpu, cuda:0)",
    "data_loader": "device (decoded once into tensors on the device) | stream (decoded from disk by workers)",
    "hostname": "machine name",
    "started_at": "UTC ISO time the run started",
    "finished_at": "UTC ISO time the run ended",
    "executor": "local | ray | torchrun",
    "world_size": "data-parallel processes that trained the run (torchrun); absent for one-process runs",
}

TIMING_ROW_COLUMNS: dict[str, str] = {
    # rows of results/<suite>/timings.jsonl (harness.measure.timing_pass), one per (key, condition); the main ones
    "runtime": "what ran the model: eager | compile | onnx (ONNX Runtime) | openvino (OpenVINO CPU plugin, f32) | "
               "openvino+units (OpenVINO, BUnit's unit layers as the bunit.UnitGroup custom operation)",
    "runtime_version": "the software behind the timing: 'torch <v>', 'onnxruntime <v>' or 'openvino <v>'",
    "memory_format": "the input's layout, the 'format' of a deployment: contiguous (NCHW) | channels_last",
    "p50_ms": "median latency of one call in the session (ms)",
    "latency_ratio": "median over rounds of model time / dense reference time in the same round (paired)",
    "openvino_unit_nodes": "openvino+units: bunit.UnitGroup nodes in the export (one per group of same-spec units)",
    "openvino_max_abs_err": "openvino runtimes: max abs difference of the output from eager (checked before timing)",
    # columns of harness.measure.timing_table.best_deployment, one row per (key, device, dtype, threads, batch)
    "best_runtime": "best deployment: the runtime of the model's fastest row among those timed",
    "best_memory_format": "best deployment: the memory format of that row",
    "best_ratio": "best deployment: the model at its fastest over its dense reference at dense's own fastest",
    "dense_runtime": "best deployment: the dense reference's fastest runtime (may differ from best_runtime)",
    "paired": "best deployment: both fastest in the same (runtime, memory format), so best_ratio is the paired ratio",
}
"""What the timing table's columns and its best-deployment view hold (the full lists: ``TIMING_COLUMNS`` and
``BEST_COLUMNS`` in :mod:`harness.measure.timing_table`, whose docstrings carry the rules)."""


def unknown_columns(row: dict) -> list[str]:
    """Columns of ``row`` that the schema does not document."""
    return sorted(set(row) - set(ROW_COLUMNS))


def check_ok_row(row: dict) -> None:
    """Refuse an ``ok`` row without a finite top-1 in [0, 100]: a seed that analysis would otherwise drop silently.

    Raises:
        ValueError: naming the column and what was found.
    """
    if row.get("status") != "ok":
        return
    top1 = row.get("top1")
    if isinstance(top1, bool) or not isinstance(top1, (int, float)) or not math.isfinite(top1) or not 0 <= top1 <= 100:
        raise ValueError(f"top1: an ok row needs a finite top-1 between 0 and 100; got {top1!r}")
