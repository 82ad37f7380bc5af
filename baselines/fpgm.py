"""FPGM: prune the filters nearest the geometric median of their layer (the most replaceable ones)."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from baselines.base import MethodContext, register_method
from baselines.structured import Score, StructuredMethod, out_filters

__all__ = ["FPGM", "fpgm_score"]


def fpgm_score(group: Any) -> torch.Tensor:
    """Per channel: the summed Euclidean distance of its filter to the layer's other filters (low = redundant)."""
    return torch.stack([torch.cdist(f[None], f[None]).squeeze(0).sum(1) for f in out_filters(group)]).mean(0)


@register_method("fpgm")
class FPGM(StructuredMethod):
    """Filter pruning via geometric median, the same fraction of every layer (local ranking).

    Reference: Y. He, P. Liu, Z. Wang, Z. Hu, Y. Yang, "Filter Pruning via Geometric Median for Deep Convolutional
    Neural Networks Acceleration", CVPR 2019 (the distance-sum approximation of their eq. 6, hard pruning after
    training rather than their soft pruning during it).
    """

    global_pruning = False

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        return fpgm_score
