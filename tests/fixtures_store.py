"""A synthetic result store for the metrics/plots/report tests. NOT measured results.

``write_fixture_store(directory)`` writes rows through ``harness.core.store.ResultStore`` that look like a small
CIFAR-10 suite: backbones resnet56 (shortcut A) and vgg16, methods dense, bunit, global-magnitude (unstructured),
l1-filter and slimming (structured) at two targets each, three seeds, and one failed run. Every number is drawn
from a seeded generator around plausible magnitudes; the suite is named ``synthetic-fixture`` and the hostname
``synthetic`` so such rows can never pass for real ones.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from harness.core.store import ResultStore

__all__ = ["write_fixture_store", "FIXTURE_SUITE", "FIXTURE_SEEDS", "FIXTURE_FAILED"]

FIXTURE_SUITE = "synthetic-fixture"
FIXTURE_SEEDS = (0, 1, 2)
FIXTURE_FAILED = ("vgg16", "slimming", 0.6, 2)  # backbone, method, target, seed of the failed run

# backbone -> shortcut, params, macs, top-1 (%), latency b1 / bt (ms)
_DENSE = {
    "resnet56": ("A", 853_018, 125_485_706, 93.30, 2.90, 9.40),
    "vgg16": (None, 14_728_266, 313_733_632, 93.80, 1.10, 20.5),
}
# (method, family, target) -> (params kept, macs kept, b1 latency factor, bt latency factor, top-1 drop in points)
# global-magnitude keeps every parameter (params_nonzero shrinks) and runs at dense speed.
_METHODS = {
    ("bunit", "bunit", "stage2-3"): (0.62, 0.55, 1.30, 0.80, 0.55),
    ("bunit", "bunit", "stage1-3"): (0.30, 0.24, 1.45, 0.55, 1.60),
    ("global-magnitude", "unstructured", 0.5): (0.50, 0.51, 1.00, 1.00, 0.05),
    ("global-magnitude", "unstructured", 0.9): (0.10, 0.12, 1.00, 1.00, 0.70),
    ("l1-filter", "structured", 0.3): (0.52, 0.50, 0.78, 0.60, -0.10),
    ("l1-filter", "structured", 0.5): (0.27, 0.25, 0.66, 0.38, 0.95),
    ("slimming", "structured", 0.4): (0.45, 0.58, 0.82, 0.66, 0.20),
    ("slimming", "structured", 0.6): (0.22, 0.40, 0.70, 0.48, 0.80),
}


def _row(rng, backbone, method, family, target, seed, dense_acc) -> dict:
    shortcut, params_d, macs_d, _, lat_b1_d, lat_bt_d = _DENSE[backbone]
    if method == "dense":
        keep_p, keep_m, f_b1, f_bt, drop = 1.0, 1.0, 1.0, 1.0, 0.0
    else:
        keep_p, keep_m, f_b1, f_bt, drop = _METHODS[(method, family, target)]
    unstructured = family == "unstructured"
    params = params_d if unstructured else int(params_d * keep_p)
    params_nz = int(params_d * keep_p) - (0 if unstructured else int(rng.integers(0, 4)))
    macs = macs_d if unstructured else int(macs_d * keep_m)
    macs_nz = int(macs_d * keep_m)
    top1 = dense_acc if method == "dense" else dense_acc - drop + float(rng.normal(0, 0.08))
    lat_b1 = lat_b1_d * f_b1 * (1 + float(rng.normal(0, 0.015)))
    lat_bt = lat_bt_d * f_bt * (1 + float(rng.normal(0, 0.01)))
    schedule = "oneshot"
    config = {"dataset": "cifar10", "backbone": backbone, "shortcut": shortcut, "method": method,
              "target": target, "schedule": schedule, "seed": seed, "epochs": 160 if method == "dense" else 40}
    config_hash = hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:12]
    bb = f"{backbone}-{shortcut}" if shortcut else backbone
    pretrain = 0 if family in ("dense", "bunit") else 160
    finetune = 0 if family in ("dense", "bunit") else 40
    return {
        "key": f"cifar10/{bb}/{method}/{target}/{schedule}/{seed}-{config_hash}",
        "suite": FIXTURE_SUITE, "dataset": "cifar10", "image_size": 32, "backbone": backbone,
        "shortcut": shortcut, "method": method, "family": family, "target": target, "schedule": schedule,
        "steps": 1, "seed": seed, "config_hash": config_hash, "config": config, "status": "ok", "reason": None,
        "top1": round(top1, 2), "top5": round(min(99.9, 99.7 - drop / 4), 2), "test_loss": round(0.25 + drop / 20, 4),
        "params": params, "params_nonzero": params_nz, "macs": macs, "macs_nonzero": macs_nz,
        "ckpt_bytes": 4 * params + 9_000,
        "sparsity": round(1 - keep_p, 4) if unstructured else 0.0,
        "channel_ratio": round(1 - keep_p ** 0.5, 4) if family == "structured" else 0.0,
        "macs_reduction": round(1 - macs / macs_d, 6), "params_reduction": round(1 - params / params_d, 6),
        "achieved": {"keep_params": keep_p}, "architecture": None,
        "latency_ms_p50_b1": round(lat_b1, 4), "latency_ms_p90_b1": round(lat_b1 * 1.04, 4),
        "latency_ms_p50_bt": round(lat_bt, 4), "latency_ms_p90_bt": round(lat_bt * 1.02, 4),
        "latency_iqr_ms_b1": round(lat_b1 * 0.02, 4), "latency_iqr_ms_bt": round(lat_bt * 0.01, 4),
        "throughput_batch": 256, "throughput_img_s": round(256 / lat_bt * 1000, 1), "peak_mem_mb": 512.0,
        "inference": {"bunit_backend": {"layer2": "grouped"}} if family == "bunit" else None,
        "latency_device": "cuda:0", "device_name": "NVIDIA H100 80GB HBM3 (synthetic)", "dtype": "float32",
        "memory_format": "channels_last", "threads": 16,
        "epochs_pretrain": pretrain, "epochs_sparse": 20 if method == "slimming" else 0,
        "epochs_finetune": finetune, "epochs_total": 200 if method != "dense" else 160,
        "train_seconds": 100.0 + 10 * seed, "run_seconds": 130.0 + 10 * seed,
        "git_rev": "0123456789abcdef0123456789abcdef01234567", "git_dirty": False,
        "versions": {"torch": "2.13.0", "torchvision": "0.28.0", "torch_pruning": "1.6.1", "ptflops": "0.7.5",
                     "python": "3.11.9"},
        "device": "cuda:0", "hostname": "synthetic", "started_at": f"2025-01-0{seed + 1}T10:00:00Z",
        "finished_at": f"2025-01-0{seed + 1}T10:02:10Z", "executor": "local",
    }


def write_fixture_store(directory: str | Path, *, seed: int = 0) -> Path:
    """Write the synthetic store under ``directory`` (appending to any ``runs.jsonl`` there).

    Args:
        directory: the suite directory to create.
        seed: seed of the value generator.

    Returns:
        The directory (holds ``runs.jsonl``): 2 backbones x (1 dense + 8 method/target) x 3 seeds = 54 rows,
        of which one (``FIXTURE_FAILED``) is failed.
    """
    rng = np.random.default_rng(seed)
    store = ResultStore(directory)
    for backbone, (_, _, _, acc_d, _, _) in _DENSE.items():
        for s in FIXTURE_SEEDS:
            dense_acc = round(acc_d + float(rng.normal(0, 0.15)), 2)
            store.append(_row(rng, backbone, "dense", "dense", None, s, dense_acc))
            for method, family, target in _METHODS:
                row = _row(rng, backbone, method, family, target, s, dense_acc)
                if (backbone, method, target, s) == FIXTURE_FAILED:
                    row.update(status="failed", top1=None, top5=None, test_loss=None, latency_ms_p50_b1=None,
                               latency_ms_p50_bt=None, throughput_img_s=None,
                               reason="ValueError: slimming: target 0.6 removes every channel of features.37")
                store.append(row)
    return Path(directory)
