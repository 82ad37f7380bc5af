"""Network slimming: L1 sparse training of BatchNorm scales, then a global threshold on them."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from baselines.base import MethodContext, register_method
from baselines.structured import Score, StructuredMethod, bn_scales, finetune_in_place

__all__ = ["Slimming", "bn_scale_score"]


def bn_scale_score(group: Any) -> torch.Tensor:
    """Per channel: |gamma| of its BatchNorm, averaged over the BNs the group couples (residual streams)."""
    scales = bn_scales(group)
    if not scales:  # a group without BN (e.g. a bare linear layer) is never chosen first
        return torch.full((len(group[0].idxs),), float("inf"))
    return torch.stack([s.abs() for s in scales]).mean(0)


@register_method("slimming")
class Slimming(StructuredMethod):
    """Channels ranked by their BN scale factor after sparse training with an L1 penalty on all BN scales.

    Reference: Z. Liu, J. Li, Z. Shen, G. Huang, S. Yan, C. Zhang, "Learning Efficient Convolutional Networks
    through Network Slimming", ICCV 2017. Sparse training runs ``ctx.sparse_epochs`` epochs with ``l1`` = 1e-4 (the
    paper's value for VGG; 1e-5 for ResNets); pruning uses one global threshold over the (group-averaged) scales.
    """

    global_pruning = True
    uses_sparse_training = True
    l1 = 1e-4

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        return bn_scale_score

    def prepare(self, model: nn.Module, ctx: MethodContext) -> int:
        if ctx.sparse_epochs <= 0 or ctx.finetune is None:
            return 0
        if ctx.sparse_lambda is not None:
            self.l1 = ctx.sparse_lambda
        finetune_in_place(ctx, model, ctx.sparse_epochs, regularize=self.regularize)
        return ctx.sparse_epochs

    def regularize(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``loss + l1 * sum |gamma|`` over every affine BatchNorm of ``model``."""
        penalty = sum(m.weight.abs().sum() for m in model.modules()
                      if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.affine)
        return loss + self.l1 * penalty
