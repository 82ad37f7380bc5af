"""BUnit-Net as a method: a thin adapter over :mod:`bunit`.

The target is a unit plan: a preset name (``bunitbench list`` shows them; ``"paper"`` picks the paper's
choice for the backbone at hand), a plan dict, or its JSON string; or a cost, ``{"macs_reduction": 0.8}`` /
``"macs:0.8"`` or ``{"params_reduction": 0.7}`` / ``"params:0.7"``, for which :mod:`baselines.bunit_plan` picks the
closest plan of a documented family and the row records target, chosen plan and achieved reductions. The model is
built in BUnit form and trained from scratch by the harness for the same total epochs the pruning pipeline spends.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

from baselines.base import Method, MethodContext, Pipeline, register_method
from baselines.bunit_plan import build_for_target, parse_cost_target
from bunit import PAPER, PRESETS, bunitify, resolve_plan
from bunit.autotune import autotune, has_unit_layers

__all__ = ["BUnit"]


@register_method("bunit")
class BUnit(Method):
    """BUnit-Net: layers built from independent basic units (Lan, Cheung et al., TPAMI 2024)."""

    family = "bunit"

    def pipeline(self, recipe: Any) -> Pipeline:
        """Built from a fresh backbone and trained from scratch for the pruning pipeline's whole budget."""
        epochs = 0 if recipe is None else recipe.epochs + recipe.finetune_epochs
        return Pipeline(start="scratch", scratch_epochs=epochs)

    def validate_target(self, target: Any) -> None:
        if target is None:
            raise ValueError(f"target: BUnit needs a unit plan; allowed: {PAPER!r}, {', '.join(sorted(PRESETS))}, "
                             "a plan table, or a cost: {macs_reduction = M} / {params_reduction = P}")
        if target != PAPER and parse_cost_target(target) is None:
            resolve_plan(target)

    def apply(self, model: nn.Module, target: Any, ctx: MethodContext) -> nn.Module:
        ctx.record.update({"epochs_sparse": 0, "epochs_finetune": 0, "epochs_finetune_final": 0})  # all from scratch
        cost = parse_cost_target(target)
        if cost is None:
            return bunitify(model, target)
        converted, achieved = build_for_target(model, cost, ctx.example_inputs)
        ctx.record.setdefault("achieved", {}).update(achieved)
        return converted

    def architecture(self, model: nn.Module) -> dict | None:
        return getattr(model, "bunit_plan", None)

    def rebuild(self, backbone: nn.Module, architecture: dict | None) -> nn.Module:
        return backbone if architecture is None else bunitify(backbone, architecture)

    def prepare_for_inference(self, model: nn.Module, example_inputs: torch.Tensor) -> dict[str, Any]:
        """Give every unit layer the execution backend measured fastest for inputs like ``example_inputs``."""
        return {"bunit_backend": autotune(model, example_inputs) if has_unit_layers(model) else None}
