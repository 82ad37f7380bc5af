"""Trained models kept as artefacts: the architecture as data next to a checksummed ``state_dict``.

Every run keeps its trained model so that latency can be measured again later (another machine, runtime or
quiet moment) without training again. One artefact is two files under ``<store>/models/``:

- ``<name>.pt``: the ``state_dict`` (CPU tensors), written atomically with
  :func:`harness.core.checkpoints.save_checkpoint`; any ``torch.nn.utils.prune`` re-parametrisation is made
  permanent first, on a copy.
- ``<name>.json``: the meta the model is rebuilt from — ``method``, ``architecture`` (``method.architecture(model)``),
  ``backbone``, ``shortcut``, ``num_classes``, ``in_channels``, ``image_size``, ``dataset``, ``family``, ``git_rev``,
  ``config_hash`` (and ``seed`` when given) — plus the ``key``, the file's SHA-256 and its size.

``<name>`` is the run key made file-safe (:func:`artefact_name`): ``/`` becomes ``__`` and every character outside
``[A-Za-z0-9._=,-]`` becomes ``_``. Keys end in the config hash, so two keys never share a name.

Loading rebuilds the dense backbone with :func:`harness.core.models.create_backbone`, hands it to
``get_method(meta["method"]).rebuild(backbone, meta["architecture"])``, checks the digest, and loads the weights
with ``torch.load(weights_only=True)`` and ``strict=True``; a damaged artefact raises :class:`CorruptArtefact`.
Modules are never pickled.
"""
from __future__ import annotations

import copy
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from baselines import get_method
from baselines.unstructured import make_pruning_permanent
from harness.core.checkpoints import CheckpointError, read_checkpoint, save_checkpoint
from harness.core.models import create_backbone

__all__ = ["CorruptArtefact", "MODELS_DIR", "REQUIRED_META", "artefact_name", "save_model", "load_model",
           "list_models", "read_meta"]

MODELS_DIR = "models"
REQUIRED_META = ("method", "backbone", "shortcut", "num_classes", "in_channels", "image_size", "dataset")
"""Meta fields the caller must give; ``architecture``, ``family``, ``git_rev`` and ``config_hash`` are filled in."""

_UNSAFE = re.compile(r"[^A-Za-z0-9._=,-]")


class CorruptArtefact(ValueError):
    """An artefact whose files are missing, truncated or do not match their SHA-256."""


def artefact_name(key: str) -> str:
    """The file-safe name of the artefact of run ``key`` (no suffix).

    Args:
        key: the experiment key, e.g. ``digits/resnet20-B/l1-filter/{"macs_reduction":0.5}/oneshot/s0-ab12cd34ef56``.

    Returns:
        ``key`` with ``/`` as ``__`` and other characters outside ``[A-Za-z0-9._=,-]`` as ``_``.
    """
    if not key:
        raise ValueError("key: must be a non-empty run key")
    return _UNSAFE.sub("_", key.replace("/", "__"))


def _paths(store_dir: str | os.PathLike, key: str) -> tuple[Path, Path]:
    pt = Path(store_dir) / MODELS_DIR / f"{artefact_name(key)}.pt"
    return pt, pt.with_suffix(".json")


def save_model(store_dir: str | os.PathLike, key: str, model: nn.Module, *, meta: dict) -> str:
    """Keep the trained ``model`` of run ``key`` as an artefact of the store.

    Args:
        store_dir: the suite directory (``results/<suite>``).
        key: the run key.
        model: the trained model (not changed: pruning masks are made permanent on a copy).
        meta: at least the fields of ``REQUIRED_META``; ``architecture`` defaults to
            ``get_method(meta["method"]).architecture(model)``, ``family`` to the method's family, ``git_rev`` and
            ``config_hash`` to None. Plain JSON types only.

    Returns:
        The path of the ``.pt`` file relative to ``store_dir`` (``models/<name>.pt``), for the row's ``model_path``.
    """
    missing = [f for f in REQUIRED_META if f not in meta]
    if missing:
        raise ValueError(f"meta: missing {', '.join(missing)}; required: {', '.join(REQUIRED_META)}")
    method = get_method(meta["method"])
    net = make_pruning_permanent(copy.deepcopy(model))
    full = {"git_rev": None, "config_hash": None, **meta, "key": key}
    full.setdefault("architecture", method.architecture(net))
    full.setdefault("family", method.family)
    json.dumps(full)  # plain JSON types only: fail here, before anything is written
    pt, _ = _paths(store_dir, key)
    save_checkpoint(pt, net, full)
    return pt.relative_to(Path(store_dir)).as_posix()


def read_meta(store_dir: str | os.PathLike, key: str) -> dict:
    """The meta of the artefact of ``key`` (no weights read); raises :class:`CorruptArtefact` when unreadable."""
    _, side = _paths(store_dir, key)
    try:
        return json.loads(side.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CorruptArtefact(f"artefact {side}: unreadable meta ({type(err).__name__})") from None


def load_model(store_dir: str | os.PathLike, key: str, *, device: str | torch.device = "cpu") -> nn.Module:
    """Rebuild the trained model of run ``key`` from its artefact, in eval mode.

    Args:
        store_dir: the suite directory the artefact was saved in (or a copy of it).
        key: the run key.
        device: where to put the model.

    Returns:
        The model with its trained weights, ``eval()``.

    Raises:
        FileNotFoundError: the store has no artefact for ``key``.
        CorruptArtefact: the weights or the meta are truncated, damaged or do not fit the rebuilt architecture.
    """
    pt, side = _paths(store_dir, key)
    if not pt.exists() and not side.exists():
        raise FileNotFoundError(f"artefact: no model for key {key!r} under {Path(store_dir) / MODELS_DIR}")
    try:
        state, meta = read_checkpoint(pt)
    except CheckpointError as err:
        raise CorruptArtefact(f"artefact {pt}: {err.reason}") from None
    backbone = create_backbone(meta["backbone"], num_classes=meta["num_classes"], in_channels=meta["in_channels"],
                               shortcut=meta["shortcut"])
    model = get_method(meta["method"]).rebuild(backbone, meta.get("architecture"))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as err:
        first = str(err).strip().splitlines()[0]
        raise CorruptArtefact(f"artefact {pt}: weights do not fit the rebuilt architecture ({first})") from None
    return model.to(device).eval()


def list_models(store_dir: str | os.PathLike) -> list[dict[str, Any]]:
    """The metas of every artefact of a store, each with ``key`` and ``path`` (relative to ``store_dir``).

    Args:
        store_dir: the suite directory.

    Returns:
        One dict per artefact, sorted by key; an unreadable meta is skipped with a warning.
    """
    out = []
    folder = Path(store_dir) / MODELS_DIR
    for side in sorted(folder.glob("*.json")) if folder.is_dir() else []:
        try:
            meta = json.loads(side.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            warnings.warn(f"artefact {side}: unreadable meta, skipped", RuntimeWarning, stacklevel=2)
            continue
        if "key" not in meta:
            continue
        out.append({**meta, "path": side.with_suffix(".pt").relative_to(Path(store_dir)).as_posix()})
    return sorted(out, key=lambda m: m["key"])
