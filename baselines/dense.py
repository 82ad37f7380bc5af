"""The dense reference: the backbone as it is, trained from scratch by the harness."""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from baselines.base import Method, MethodContext, register_method

__all__ = ["Dense"]


@register_method("dense")
class Dense(Method):
    """The uncompressed backbone, the origin of every method's trade-off curve.

    Reference: the backbones' own papers (He et al. 2016; Simonyan & Zisserman 2015). Nothing is removed: the
    row is the trained dense checkpoint itself, the very weights every pruning method starts from.
    """

    family = "dense"

    def apply(self, model: nn.Module, target: Any, ctx: MethodContext) -> nn.Module:
        ctx.record.update({"epochs_sparse": 0, "epochs_finetune": 0, "epochs_finetune_final": 0})
        return model
