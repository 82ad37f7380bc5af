"""The ``fused_cpu`` backend: one C++ kernel per group of same-spec units (:mod:`bunit.fused_cpu`), BatchNorm folded
into the convolutions, a residual block's shortcut and final ReLU inside the kernel. Float32 on CPU in eval mode;
in training mode, or while autograd records, the layer runs ``grouped`` instead (exact gradients and BN
statistics). It keeps the folded weights per layer (``fused_cpu.FOLD_CACHE``)."""
from __future__ import annotations

import torch

from bunit import fused_cpu
from bunit.backends.base import Backend, register_backend
from bunit.functional import conv_module

__all__ = ["FusedCPU"]


@register_backend("fused_cpu")
class FusedCPU(Backend):
    """:func:`bunit.fused_cpu.forward` over the layer's kernel plan, in eval mode without autograd."""

    devices = ("cpu",)
    trains = False
    fuses_residual = True
    caches = (fused_cpu.FOLD_CACHE,)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        return self.run_with_residual(layer, x, None, (1, 0))

    def run_with_residual(self, layer, x: torch.Tensor, residual: torch.Tensor | None,
                          residual_map: tuple[int, int]) -> torch.Tensor:
        records = torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in layer.parameters()))
        if layer.training or records:  # the kernel has no backward and uses running statistics
            return layer.add_residual(layer.run_groups(x, conv_module), residual, residual_map)
        return fused_cpu.forward(layer, x, layer.kernel_plan, residual, residual_map)  # (B, out, H/s, W/s)
