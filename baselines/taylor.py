"""First-order Taylor importance: the loss change estimated from weights times gradients."""
from __future__ import annotations

import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp

from baselines.base import MethodContext, register_method
from baselines.structured import Score, StructuredMethod

__all__ = ["Taylor"]


@register_method("taylor")
class Taylor(StructuredMethod):
    """Channels ranked globally by ``|sum(w * dL/dw)|`` over their parameters, averaged over coupled layers.

    Reference: P. Molchanov, A. Mallya, S. Tyree, I. Frosio, J. Kautz, "Importance Estimation for Neural Network
    Pruning", CVPR 2019 (Taylor-FO on weights, global ranking), in torch-pruning's grouped form. The gradient is
    the mean over ``ctx.calib_batches`` with BN in eval mode (so the pretrained statistics stay untouched), taken
    again before every prune stage; the paper instead averages per-batch squared scores during training.
    """

    global_pruning = True

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        if not ctx.calib_batches:
            raise ValueError("ctx.calib_batches: empty; allowed: at least one (inputs, labels) batch for taylor")
        return tp.importance.GroupTaylorImportance(multivariable=True, normalizer=None)

    def before_stage(self, model: nn.Module, ctx: MethodContext) -> None:
        model.eval()
        model.zero_grad(set_to_none=True)
        for inputs, labels in ctx.calib_batches:
            loss = F.cross_entropy(model(inputs), labels) / len(ctx.calib_batches)
            loss.backward()  # torch-pruning prunes .grad along with each weight, so it stays aligned

    def finish(self, model: nn.Module) -> None:
        model.zero_grad(set_to_none=True)
