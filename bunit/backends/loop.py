"""The ``loop`` backend: the per-unit loop over slices of the fused weights (the reference algorithm)."""
from __future__ import annotations

import torch

from bunit.backends.base import Backend, register_backend

__all__ = ["Loop"]


@register_backend("loop")
class Loop(Backend):
    """Each unit's conv-BN-ReLU pair on its own channel slice, one after another (:meth:`UnitLayer.run_unit_loop`)."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_unit_loop(x)  # (B, out, H/s, W/s)
