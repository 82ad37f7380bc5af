"""Layer-wise magnitude pruning: every layer loses the same fraction of its smallest weights."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.utils.prune as prune

from baselines.base import MethodContext, register_method
from baselines.unstructured import UnstructuredMethod

__all__ = ["LayerMagnitude"]


@register_method("layer-magnitude")
class LayerMagnitude(UnstructuredMethod):
    """Remove the smallest-magnitude weights of each layer, the same sparsity in every layer.

    Reference: S. Han, J. Pool, J. Tran, W. Dally, "Learning both Weights and Connections for Efficient Neural
    Networks", NeurIPS 2015 (magnitude criterion); uniform layer-wise allocation as in Zhu & Gupta, "To prune,
    or not to prune", 2017.
    """

    def prune_step(self, layers: list[tuple[str, nn.Module]], sparsity: float, ctx: MethodContext, step: int) -> None:
        for _, m in layers:
            prune.l1_unstructured(m, "weight", amount=round(sparsity * m.weight.numel()))
