"""Random channel pruning: the structured sanity-check baseline."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from baselines.base import MethodContext, register_method
from baselines.structured import Score, StructuredMethod

__all__ = ["RandomChannel"]


@register_method("random-channel")
class RandomChannel(StructuredMethod):
    """Remove uniformly random channels, the same fraction of every layer (seeded by ``ctx.seed``).

    Reference: Y. Li, K. Adamczewski, W. Li, S. Gu, R. Timofte, L. Van Gool, "Revisiting Random Channel Pruning for
    Neural Network Compression", CVPR 2022; also the random baseline of Liu et al., "Rethinking the Value of
    Network Pruning", ICLR 2019.
    """

    global_pruning = False

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        gen = torch.Generator().manual_seed(ctx.seed)

        def score(group: Any) -> torch.Tensor:
            return torch.rand(len(group[0].idxs), generator=gen)

        return score
