"""DepGraph group pruning: group L2-norm importance after sparse training with the group regularizer."""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from baselines.base import MethodContext, register_method
from baselines.shortcut import ChannelMapPruner, ChannelMapShortcut
from baselines.structured import Score, StructuredMethod, classifier_of, finetune_in_place

__all__ = ["DepGraph", "group_penalty"]


def _channel_sq(group: Any) -> torch.Tensor:
    """Per channel of ``group``: the sum of squares of every parameter slice it removes (differentiable)."""
    sq = None
    for item in group:
        layer, handler, idxs = item.dep.target.module, item.dep.handler, list(item.idxs)
        if handler in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels):
            part = layer.weight[idxs].flatten(1).pow(2).sum(1)
        elif handler in (tpf.prune_conv_in_channels, tpf.prune_linear_in_channels) and getattr(layer, "groups", 1) == 1:
            part = layer.weight[:, idxs].transpose(0, 1).flatten(1).pow(2).sum(1)
        elif handler == tpf.prune_batchnorm_out_channels and layer.affine:
            part = layer.weight[idxs].pow(2)
        else:
            continue
        root = torch.as_tensor(item.root_idxs, dtype=torch.long, device=part.device)
        sq = (part.new_zeros(len(group[0].idxs)) if sq is None else sq).index_add(0, root, part)
    return sq


def group_penalty(groups: list[Any], reg: float, alpha: float) -> torch.Tensor:
    """The DepGraph sparse-training term: ``reg/2 * sum_g sum_c gamma_gc * ||w_gc||^2``.

    ``gamma_gc = 2 ** (alpha * (n_max - n_c) / (n_max - n_min))``, in ``[1, 2**alpha]``, with ``n_c`` the L2 norm
    of channel ``c`` over the whole group (treated as a constant): the weakest channels are pushed hardest. Its
    gradient is torch-pruning's ``GroupNormPruner.regularize`` update (whose default base is ``2**4``), written
    as a loss so that the harness's plain training loop can use it.
    """
    total = None
    for group in groups:
        sq = _channel_sq(group)
        if sq is None:
            continue
        with torch.no_grad():
            norm = sq.detach().sqrt()
            gamma = 2.0 ** (alpha * (norm.max() - norm) / (norm.max() - norm.min() + 1e-12))
        term = 0.5 * reg * (gamma * sq).sum()
        total = term if total is None else total + term
    return total


@register_method("depgraph")
class DepGraph(StructuredMethod):
    """Group-level pruning: every coupled group is ranked by its L2 norm, globally, after group-sparse training.

    Reference: G. Fang, X. Ma, M. Song, M. B. Mi, X. Wang, "DepGraph: Towards Any Structural Pruning", CVPR 2023
    (torch-pruning's GroupMagnitudeImportance(p=2) and its GroupNormPruner regularizer, reg=1e-4, alpha=4, i.e.
    strengths from 1 to 16); sparse training runs ``ctx.sparse_epochs`` epochs before pruning.
    """

    global_pruning = True
    uses_sparse_training = True
    reg = 1e-4
    alpha = 4.0

    def __init__(self) -> None:
        self._groups: list[Any] = []
        self._groups_of: nn.Module | None = None
        self._example: torch.Tensor | None = None

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        return tp.importance.GroupMagnitudeImportance(p=2, group_reduction="mean", normalizer="mean")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> int:
        if ctx.sparse_epochs <= 0 or ctx.finetune is None:
            return 0
        self._example = ctx.example_inputs
        if ctx.sparse_lambda is not None:
            self.reg = ctx.sparse_lambda
        self._trace_groups(model)
        finetune_in_place(ctx, model, ctx.sparse_epochs, regularize=self.regularize)
        return ctx.sparse_epochs

    def regularize(self, model: nn.Module, loss: torch.Tensor) -> torch.Tensor:
        """``loss`` plus :func:`group_penalty` over the coupled groups of ``model``."""
        if self._groups_of is not model:
            self._trace_groups(model)
        penalty = group_penalty(self._groups, self.reg, self.alpha)
        return loss if penalty is None else loss + penalty

    def _trace_groups(self, model: nn.Module) -> None:
        if self._example is None:
            raise ValueError("depgraph.regularize: called before apply(); allowed: inside apply's sparse training")
        was_training = model.training
        with torch.enable_grad():
            graph = tp.DependencyGraph().build_dependency(
                model, self._example, customized_pruners={ChannelMapShortcut: ChannelMapPruner()}, verbose=False)
        model.train(was_training)
        ignored = [classifier_of(model)]
        self._groups = list(graph.get_all_groups(ignored_layers=ignored, root_module_types=[nn.Conv2d, nn.Linear]))
        self._groups_of = model
