"""Random unstructured pruning: the sanity-check baseline every criterion must beat."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from baselines.base import MethodContext, register_method
from baselines.unstructured import UnstructuredMethod

__all__ = ["RandomUnstructured"]


@register_method("random-unstructured")
class RandomUnstructured(UnstructuredMethod):
    """Remove uniformly random weights, the same sparsity in every layer (seeded by ``ctx.seed``).

    Reference: the random baseline of D. Blalock, J. J. Gonzalez Ortiz, J. Frankle, J. Guttag, "What is the State
    of Neural Network Pruning?", MLSys 2020 (ShrinkBench); weights pruned by an earlier step stay pruned.
    """

    def prune_step(self, layers: list[tuple[str, nn.Module]], sparsity: float, ctx: MethodContext, step: int) -> None:
        gen = torch.Generator().manual_seed(ctx.seed * 1000 + step)
        for _, m in layers:
            keep = (m.weight.detach() != 0).flatten().cpu()
            extra = round(sparsity * keep.numel()) - int((~keep).sum())  # zeros still to make
            alive = keep.nonzero().flatten()
            if extra > 0:
                chosen = alive[torch.randperm(alive.numel(), generator=gen)[:extra]]
                keep[chosen] = False
            prune.custom_from_mask(m, "weight", keep.view_as(m.weight).to(m.weight.device))
