"""The shared machinery of unstructured (weight-level) pruning: target, schedule, masks made permanent, record.

Target: the sparsity of the prunable weights, a float in (0, 1): the fraction of zeros over the ``weight`` of
every ``nn.Conv2d`` and ``nn.Linear`` — the first convolution and the classifier included (biases and BN
parameters are not counted). Every method computes its masks through ``torch.nn.utils.prune`` and makes them
permanent with ``prune.remove``, so the returned model has plain ``weight`` parameters (no ``weight_orig``) with
exact zeros. Its keep-masks stay with the method: :meth:`UnstructuredMethod.after_optimizer_step`, which the
harness calls after every optimizer step, multiplies them back in, so fine-tuning never revives a pruned weight.
"""
from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn as nn
import torch.nn.utils.prune as prune

from baselines.base import Method, MethodContext, finetune_split
from baselines.counting import prunable_layers, weight_sparsity
from baselines.schedule import stage_targets

__all__ = ["UnstructuredMethod", "validate_sparsity", "make_pruning_permanent"]

SPARSITY_TOLERANCE = 0.005  # achieved sparsity must be this close to the target, else a warning


def make_pruning_permanent(model: nn.Module) -> nn.Module:
    """Turn every ``torch.nn.utils.prune`` re-parametrisation (``weight_orig * weight_mask``) of ``model`` into a
    plain parameter, in place; returns ``model``. A model some other code pruned that way (this project's methods
    already return plain weights) then saves, counts and runs like any other."""
    for module in model.modules():
        for hook in list(module._forward_pre_hooks.values()):
            if isinstance(hook, prune.BasePruningMethod):
                prune.remove(module, hook._tensor_name)
    return model


def validate_sparsity(target: Any) -> float:
    """The target as a float sparsity, or ``ValueError`` naming the allowed values."""
    if isinstance(target, bool) or not isinstance(target, (int, float)) or not 0.0 < float(target) < 1.0:
        raise ValueError(f"target: {target!r} not allowed for unstructured pruning; allowed: a sparsity in (0, 1)")
    return float(target)


class UnstructuredMethod(Method):
    """Base of the unstructured methods. Subclasses implement :meth:`prune_step`.

    A step receives the layers and the step's sparsity and must leave a ``torch.nn.utils.prune`` reparametrization
    (``weight_mask``) on every layer, whose masks together reach that sparsity and keep every weight pruned by an
    earlier step pruned (weights that are already zero).
    """

    family = "unstructured"
    schedules = ("oneshot", "iterative")

    def __init__(self) -> None:
        self._masks: dict[str, torch.Tensor] = {}

    def prune_step(self, layers: list[tuple[str, nn.Module]], sparsity: float, ctx: MethodContext, step: int) -> None:
        raise NotImplementedError(f"method {self.name!r} does not implement prune_step()")

    def validate_target(self, target: Any) -> None:
        validate_sparsity(target)

    def apply(self, model: nn.Module, target: Any, ctx: MethodContext) -> nn.Module:
        sparsity = validate_sparsity(target)
        per_step, final = finetune_split(ctx)
        targets = stage_targets(sparsity, ctx)
        spent = 0
        for step, step_sparsity in enumerate(targets):
            layers = prunable_layers(model)
            self.prune_step(layers, step_sparsity, ctx, step)
            self._masks = {}
            for name, module in layers:
                self._masks[name] = module.weight_mask.detach().bool()
                prune.remove(module, "weight")  # weight := weight_orig * mask, a plain Parameter again
            if step < len(targets) - 1 and per_step > 0:
                model = ctx.run_finetune(model, per_step)
                self.after_optimizer_step(model)  # in case the loop skipped the hook: the masks hold regardless
                spent += per_step
        self._record(model, sparsity, targets, ctx, spent, final)
        return model

    @torch.no_grad()
    def after_optimizer_step(self, model: nn.Module) -> None:
        """Zero the pruned weights again (the optimizer's momentum and weight decay move them)."""
        for name, mask in self._masks.items():
            weight = model.get_submodule(name).weight
            if mask.device != weight.device:
                mask = self._masks[name] = mask.to(weight.device)
            weight.mul_(mask)

    def _record(self, model: nn.Module, target: float, targets: list[float], ctx: MethodContext,
                spent: int, final: int) -> None:
        zeros, total = weight_sparsity(model)
        achieved = zeros / total
        if abs(achieved - target) > SPARSITY_TOLERANCE:
            warnings.warn(f"{self.name}: achieved sparsity {achieved:.4f} differs from the target {target:.4f}",
                          RuntimeWarning, stacklevel=3)
        per_layer = {n: float((m.weight == 0).float().mean()) for n, m in prunable_layers(model)}
        ctx.record.update({
            "sparsity": achieved,
            "epochs_sparse": 0,
            "epochs_finetune": spent + final,  # between steps (inside apply) + the harness's final share
            "epochs_finetune_final": final,
        })
        ctx.record.setdefault("achieved", {}).update({
            "weights_total": total,
            "weights_zero": zeros,
            "step_targets": targets,
            "layer_sparsity": per_layer,
            "classifier_included": True,
        })
