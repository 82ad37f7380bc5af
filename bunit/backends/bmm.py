"""The ``bmm`` backend: each grouped convolution as ``unfold`` + one batched matmul over the units of a group."""
from __future__ import annotations

import torch

from bunit.backends.base import Backend, register_backend
from bunit.functional import conv_bmm

__all__ = ["BatchedMatmul"]


@register_backend("bmm")
class BatchedMatmul(Backend):
    """The groups' convolutions through :func:`bunit.functional.conv_bmm`."""

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return layer.run_groups(x, conv_bmm)  # (B, out, H/s, W/s)
