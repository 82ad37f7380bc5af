"""The ``unit_train`` backend: ``grouped`` with each grouped 3x3 conv run by the C++ kernel of
:mod:`bunit.unit_train`, which has its own backward (the training path on CPU). Where the kernel does not run
(other devices, dtypes, kernel sizes, or no compiler) each conv runs as in ``grouped``."""
from __future__ import annotations

import torch

from bunit import unit_train
from bunit.backends.base import Backend, register_backend

__all__ = ["UnitTrain"]


@register_backend("unit_train")
class UnitTrain(Backend):
    """The groups' convolutions through :func:`bunit.unit_train.conv`; BN and ReLU are PyTorch's."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_groups(x, unit_train.conv)  # (B, out, H/s, W/s)
