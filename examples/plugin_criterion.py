"""A new structured pruning criterion as a plugin: channels ranked by the L2 norm of their filters.

Run it in a suite with ``bunitbench run SUITE --plugin examples/plugin_criterion.py`` and name the method
``l2-filter`` in the suite's ``[[methods]]`` table, with a channel ratio or ``"macs:0.5"`` as its target.
"""
from typing import Any

import torch
import torch.nn as nn

from baselines import MethodContext, register_method
from baselines.structured import StructuredMethod, out_filters


def l2_filter_score(group: Any) -> torch.Tensor:
    """Score each channel of a torch-pruning group: the L2 norm of its filters, averaged over coupled layers.

    ``out_filters(group)`` gives one ``(C, fan_in)`` matrix per layer whose outputs the group removes, rows in
    the group's channel order; the ``C`` channels with the lowest scores are pruned first.
    """
    return torch.stack([filters.norm(p=2, dim=1) for filters in out_filters(group)]).mean(0)


@register_method("l2-filter")
class L2Filter(StructuredMethod):
    """L2-norm filter pruning, the same fraction of every layer (Li et al., ICLR 2017, compare L1 with L2)."""

    global_pruning = False  # True ranks all layers' channels together

    def criterion(self, model: nn.Module, ctx: MethodContext):
        return l2_filter_score
