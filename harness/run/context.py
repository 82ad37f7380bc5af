"""The run context: everything one experiment needs from the suite, shared by every executor.

:class:`RunContext` holds the data on the device, the result folder (dense checkpoints, trained models), the
progress reporter and, under torchrun, the data-parallel group. Executors make one per process and hand it to
:func:`harness.run.experiment.run_experiment`; :mod:`harness.run.distributed` subclasses it so that rank 0 alone
reads and writes files.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from harness.core.checkpoints import dense_key, load_checkpoint, save_checkpoint
from harness.core.config import Experiment
from harness.core.data import ImageData
from harness.core.models import create_backbone
from harness.run.progress import Reporter
from harness.run.train import seed_everything, train_model

__all__ = ["RunContext"]


class RunContext:
    """What one experiment needs from its suite: data, device, folders, progress, and the training call.

    Attributes:
        data: the dataset (:class:`harness.core.data.ImageData`).
        device: where models train and are evaluated.
        results_dir: the suite's result folder; dense checkpoints live in ``results_dir/checkpoints`` and trained
            models in ``results_dir/models``.
        reporter: progress display.
        parallel: the data-parallel group under torchrun (:class:`harness.run.parallel.DataParallelGroup`), else None.
        keep_models: write every run's trained model into the store (the suite's ``keep_models``).
    """

    def __init__(self, data: ImageData, device: torch.device, results_dir: Path, reporter: Reporter, *,
                 parallel: Any = None, keep_models: bool = True):
        self.data, self.device, self.results_dir, self.reporter = data, device, Path(results_dir), reporter
        self.ckpt_dir = self.results_dir / "checkpoints"
        self.parallel = parallel
        self.keep_models = keep_models
        self.train_settings: list[dict] = []  # one per train() call: phase and setting

    @property
    def is_writer(self) -> bool:
        """Whether this process writes files (always, except on the ranks > 0 of a torchrun group)."""
        return self.parallel is None or self.parallel.is_writer

    def new_backbone(self, exp: Experiment) -> nn.Module:
        """A freshly initialised backbone of ``exp`` for this dataset, on the device."""
        return create_backbone(exp.backbone, num_classes=self.data.num_classes, in_channels=self.data.in_channels,
                               shortcut=exp.shortcut).to(self.device)

    def train(self, model: nn.Module, exp: Experiment, epochs: int, *, phase: str, lr: float | None = None,
              seed_offset: int = 0, warmup: bool = True, regularize=None, after_step=None) -> float:
        """Train ``model`` in place with the suite's recipe; returns the seconds spent.

        The training setting each call ran with (:mod:`harness.run.train_speed`) is appended to ``train_settings``
        with its phase; the experiment puts its own into the row.
        """
        self.reporter.start_phase(phase, epochs)
        result = train_model(model, self.data, exp.train, epochs=epochs, lr=lr, seed=exp.seed * 1000 + seed_offset,
                             regularize=regularize, after_step=after_step, warmup=warmup,
                             progress=self.reporter.epoch_done, parallel=self.parallel)
        if result.setting is not None:
            self.train_settings.append({"phase": phase, **result.setting})
        return result.seconds

    def load_dense(self, path: Path) -> tuple[dict, dict] | None:
        """A verified dense checkpoint, or None (under torchrun rank 0 reads it for every rank)."""
        return load_checkpoint(path)

    def save_dense(self, path: Path, model: nn.Module, meta: dict) -> None:
        """Write a dense checkpoint (under torchrun rank 0 only)."""
        save_checkpoint(path, model, meta)

    def dense_model(self, exp: Experiment) -> tuple[nn.Module, float, bool]:
        """The trained dense model for ``exp``: (model, seconds its training took, whether it was cached)."""
        path = self.ckpt_dir / f"{dense_key(exp)}.pt"
        model = self.new_backbone(exp)
        loaded = self.load_dense(path)
        if loaded is not None:
            model.load_state_dict(loaded[0])
            model.eval()
            return model, float(loaded[1].get("train_seconds") or 0.0), True
        seed_everything(exp.seed)
        model = self.new_backbone(exp)  # the same initialisation whichever run trains it first
        seconds = self.train(model, exp, exp.train.epochs, phase="dense pre-train")
        self.save_dense(path, model, {"key": dense_key(exp), "epochs": exp.train.epochs, "train_seconds": seconds})
        return model, seconds, False
