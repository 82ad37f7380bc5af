"""The ``eager`` runtime: the model itself (the caller runs the timing under ``torch.inference_mode``)."""
from __future__ import annotations

import torch
import torch.nn as nn

from harness.measure.runtimes.base import Runner, Runtime, register_runtime

__all__ = ["Eager"]


@register_runtime("eager")
class Eager(Runtime):
    """``net(x)``: the reference every other runtime is checked against."""

    def build(self, net: nn.Module, x: torch.Tensor, *, threads: int, device: torch.device) -> Runner:
        def output() -> torch.Tensor:
            with torch.inference_mode():
                return net(x)

        return Runner(lambda: net(x), output, {})
