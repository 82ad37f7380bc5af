"""The ``blockdiag`` backend: each conv of the layer as one dense convolution whose weight is zero off the unit
blocks (:mod:`bunit.blockdiag`). The dense weights are rebuilt differentiably while autograd records, otherwise kept
per layer (``blockdiag.WEIGHT_CACHE``) until a group weight changes."""
from __future__ import annotations

import torch

from bunit import blockdiag
from bunit.backends.base import Backend, register_backend

__all__ = ["BlockDiagonal"]


@register_backend("blockdiag")
class BlockDiagonal(Backend):
    """Two dense convolutions, each followed by its BNs and ReLU (:func:`bunit.blockdiag.forward`)."""

    caches = (blockdiag.WEIGHT_CACHE,)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return blockdiag.forward(layer, x)  # (B, out, H/s, W/s)
