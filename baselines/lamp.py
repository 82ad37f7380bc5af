"""LAMP: layer-adaptive magnitude scores, one global threshold."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from baselines.base import MethodContext, register_method
from baselines.unstructured import UnstructuredMethod

__all__ = ["LAMP", "lamp_scores"]


@torch.no_grad()
def lamp_scores(weight: torch.Tensor) -> torch.Tensor:
    """LAMP score of every weight: ``w_u^2 / sum_{v >= u} w_v^2`` with the weights sorted by ascending magnitude.

    Args:
        weight: one layer's weight tensor.

    Returns:
        Scores shaped like ``weight``; the largest weight of a layer scores 1, so no layer is emptied.
    """
    sq = weight.detach().flatten().float().pow(2)
    sorted_sq, order = sq.sort()
    tail = sorted_sq.flip(0).cumsum(0).flip(0)  # sum over the weights at least as large
    scores = torch.empty_like(sq)
    scores[order] = torch.nan_to_num(sorted_sq / tail, nan=0.0)
    return scores.view_as(weight)


@register_method("lamp")
class LAMP(UnstructuredMethod):
    """Prune the weights with the smallest LAMP scores across the network (global threshold on the scores).

    Reference: J. Lee, S. Park, S. Mo, S. Ahn, J. Shin, "Layer-adaptive Sparsity for the Magnitude-based Pruning",
    ICLR 2021.
    """

    def prune_step(self, layers: list[tuple[str, nn.Module]], sparsity: float, ctx: MethodContext, step: int) -> None:
        scores = [lamp_scores(m.weight).flatten().cpu() for _, m in layers]
        flat = torch.cat(scores)
        keep = torch.ones_like(flat, dtype=torch.bool)
        keep[flat.argsort(stable=True)[: round(sparsity * flat.numel())]] = False
        offset = 0
        for (_, m), s in zip(layers, scores):
            mask = keep[offset: offset + s.numel()].view_as(m.weight)
            prune.custom_from_mask(m, "weight", mask.to(m.weight.device))
            offset += s.numel()
