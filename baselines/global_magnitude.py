"""Global magnitude pruning: one threshold on |w| across all layers."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.utils.prune as prune

from baselines.base import MethodContext, register_method
from baselines.unstructured import UnstructuredMethod

__all__ = ["GlobalMagnitude"]


@register_method("global-magnitude")
class GlobalMagnitude(UnstructuredMethod):
    """Remove the smallest-magnitude weights of the whole network (one global threshold).

    Reference: S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015 (iterative magnitude pruning with retraining; ranked globally as in most re-runs).
    """

    def prune_step(self, layers: list[tuple[str, nn.Module]], sparsity: float, ctx: MethodContext, step: int) -> None:
        total = sum(m.weight.numel() for _, m in layers)
        prune.global_unstructured([(m, "weight") for _, m in layers], pruning_method=prune.L1Unstructured,
                                  amount=round(sparsity * total))
