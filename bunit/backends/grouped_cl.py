"""The ``grouped_cl`` backend: ``grouped`` on an input in channels_last memory format."""
from __future__ import annotations

import torch

from bunit.backends.base import Backend, register_backend
from bunit.functional import conv_module

__all__ = ["GroupedChannelsLast"]


@register_backend("grouped_cl")
class GroupedChannelsLast(Backend):
    """The grouped convolutions on ``x.contiguous(memory_format=torch.channels_last)``."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_groups(x.contiguous(memory_format=torch.channels_last), conv_module)  # (B, out, H/s, W/s)
