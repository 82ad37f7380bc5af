"""Dense checkpoints: trained once per (dataset, image size, backbone, shortcut, seed, recipe), reused by
every method that needs a trained model, so every baseline prunes the very same weights.

A checkpoint is written atomically (temporary file, fsync, rename) next to a small JSON sidecar holding
its SHA-256. Loading checks the digest first and then uses ``torch.load(weights_only=True)``; a missing,
truncated or corrupt file is reported as absent, and the caller retrains — never trusts it.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import warnings
from dataclasses import asdict
from pathlib import Path

import torch
import torch.nn as nn

from harness.core.config import Experiment

__all__ = ["dense_key", "save_checkpoint", "load_checkpoint", "read_checkpoint", "CheckpointError",
           "atomic_write_bytes"]

# Recipe fields that change the dense weights (fine-tune and sparse settings do not).
_DENSE_RECIPE_FIELDS = ("epochs", "batch_size", "lr", "momentum", "nesterov", "weight_decay", "warmup_epochs",
                        "label_smoothing", "augment", "bf16", "bf16_cpu", "channels_last")


def dense_key(exp: Experiment) -> str:
    """Stable name of the dense checkpoint an experiment starts from."""
    recipe = {k: v for k, v in asdict(exp.train).items() if k in _DENSE_RECIPE_FIELDS}
    ident = {"dataset": exp.dataset, "image_size": exp.image_size, "backbone": exp.backbone,
             "shortcut": exp.shortcut, "seed": exp.seed, "recipe": recipe}
    digest = hashlib.sha256(json.dumps(ident, sort_keys=True).encode()).hexdigest()[:12]
    return f"dense-{exp.variant}-s{exp.seed}-{digest}"


def atomic_write_bytes(path: Path, payload: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as fh:
        fh.write(payload)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def save_checkpoint(path: Path, model: nn.Module, meta: dict) -> None:
    """Write ``model``'s state_dict and ``meta`` (JSON) atomically, the sidecar last."""
    buf = io.BytesIO()
    torch.save({k: v.detach().cpu() for k, v in model.state_dict().items()}, buf)
    payload = buf.getvalue()
    atomic_write_bytes(path, payload)
    sidecar = {**meta, "sha256": hashlib.sha256(payload).hexdigest(), "bytes": len(payload)}
    atomic_write_bytes(path.with_suffix(".json"), json.dumps(sidecar, sort_keys=True).encode())


class CheckpointError(ValueError):
    """A checkpoint that is missing, truncated, damaged or not a state_dict; ``reason`` says which."""

    def __init__(self, path: Path, reason: str):
        super().__init__(f"checkpoint {path}: {reason}")
        self.path, self.reason = path, reason


def read_checkpoint(path: Path) -> tuple[dict, dict]:
    """``(state_dict, meta)`` of a checkpoint whose size and SHA-256 match its sidecar.

    Raises:
        CheckpointError: naming the file and what is wrong with it.
    """
    sidecar = path.with_suffix(".json")
    if not path.exists() or not sidecar.exists():
        raise CheckpointError(path, f"{'weights' if not path.exists() else 'sidecar'} file missing")
    try:
        meta = json.loads(sidecar.read_text())
        payload = path.read_bytes()
        if len(payload) != meta["bytes"] or hashlib.sha256(payload).hexdigest() != meta["sha256"]:
            raise ValueError("size or SHA-256 does not match its sidecar")
        state = torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)
    except Exception as err:  # any damage means the same: do not trust it
        raise CheckpointError(path, f"unusable ({err})") from None
    return state, meta


def load_checkpoint(path: Path) -> tuple[dict, dict] | None:
    """``(state_dict, meta)``, or None (with a warning) when the checkpoint is missing, truncated or corrupt: the
    caller retrains."""
    try:
        return read_checkpoint(path)
    except CheckpointError as err:
        if path.exists() or path.with_suffix(".json").exists():
            warnings.warn(f"{err}; it will be retrained", RuntimeWarning, stacklevel=2)
        return None
