"""The ``stencil`` backend: each grouped convolution as ``k*k`` shifted, broadcast multiply-adds.

Slow eagerly (a temporary per tap); it exists to be compiled (``compiled`` with ``compile_base = "stencil"``):
inductor turns a whole group (conv, BN, ReLU) into one vectorised loop nest.
"""
from __future__ import annotations

import torch

from bunit.backends.base import Backend, register_backend
from bunit.functional import conv_stencil

__all__ = ["Stencil"]


@register_backend("stencil")
class Stencil(Backend):
    """The groups' convolutions through :func:`bunit.functional.conv_stencil`."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_groups(x, conv_stencil)  # (B, out, H/s, W/s)
