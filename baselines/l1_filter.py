"""L1-norm filter pruning: each layer drops the filters with the smallest sum of absolute weights."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from baselines.base import MethodContext, register_method
from baselines.structured import Score, StructuredMethod, out_filters

__all__ = ["L1Filter", "l1_filter_score"]


def l1_filter_score(group: Any) -> torch.Tensor:
    """Per channel: the L1 norm of its output filter, averaged over the layers the group couples."""
    return torch.stack([f.abs().sum(1) for f in out_filters(group)]).mean(0)


@register_method("l1-filter")
class L1Filter(StructuredMethod):
    """Prune the same fraction of every layer's filters, smallest L1 norm first (local ranking).

    Reference: H. Li, A. Kadav, I. Durdanovic, H. Samet, H. P. Graf, "Pruning Filters for Efficient ConvNets",
    ICLR 2017. Where a residual connection couples several layers' filters, their norms are averaged.
    """

    global_pruning = False

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        return l1_filter_score
