"""The ``grouped`` backend (the default): one grouped convolution per group of same-spec units and conv, NCHW."""
from __future__ import annotations

import torch

from bunit.backends.base import Backend, register_backend
from bunit.functional import conv_module

__all__ = ["Grouped"]


@register_backend("grouped")
class Grouped(Backend):
    """Each group's conv modules as they are: ``conv(x)`` with ``groups`` = the group's units."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_groups(x, conv_module)  # (B, out, H/s, W/s)
