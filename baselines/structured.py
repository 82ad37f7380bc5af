"""The shared machinery of structured (channel) pruning on torch-pruning's DependencyGraph.

A structured method is a criterion plus this class. ``criterion(model, ctx)`` returns a callable
``score(group) -> Tensor[C]`` over a torch-pruning group (all layers coupled to one set of ``C`` channels, residual
connections included); the lowest-scoring channels go. :class:`StructuredMethod` owns the rest: the target, the
schedule, progressive pruning, the option-A shortcut fix, measurement and the record.

Target (``target`` of ``apply``):

- a float in (0, 1) (or ``"ratio:0.5"``, ``{"channel_ratio": 0.5}``): the channel ratio, i.e. the fraction of
  output channels removed, summed over every Conv2d except the classifier. Local methods (``global_pruning =
  False``) remove that fraction from each layer; global methods rank all groups together and may thin layers
  unevenly (no layer loses more than ``max_layer_ratio``).
- ``{"macs_reduction": 0.5}`` or ``"macs:0.5"``: the fraction of conv+linear MACs removed.

Schedules (``baselines.SCHEDULES``); the row records ``scoring_steps``, how many times channels were scored:

- ``oneshot``: one scoring pass. The channels are scored once on the trained model and removed in one step, by
  the smallest torch-pruning ratio whose result reaches the target. That ratio is found by bisection on copies
  (:data:`ONE_PASS_BISECTIONS` halvings; each copy scores the same weights, so it removes exactly what the final
  prune removes); ``ratio_search_trials`` counts them (a ratio of channels does not map to a MACs reduction in
  closed form). When even the largest ratio of one pass stops short of the target (global ranking, e.g.
  slimming and depgraph, can protect whole groups), re-scoring steps as in ``progressive`` finish the stage; the
  row counts them in ``correction_steps`` and ``scoring_steps`` then exceeds one.
- ``iterative``: ``ctx.steps`` one-pass prunes to the geometric stage targets of
  :func:`~baselines.schedule.stage_targets`, fine-tuning ``ctx.finetune_epochs // ctx.steps`` epochs between them
  (the rule of :mod:`baselines.base`).
- ``progressive``: re-scoring after every small step. torch-pruning's ratio is raised a little at a time and the
  achieved channel ratio or MACs reduction measured on the model after each step, until it reaches the target;
  steps shrink near the target, down to one channel's worth (no fine-tuning between steps).

Sparse training (slimming, depgraph) runs once, before the first stage. Whatever the schedule, the achieved value
never falls short (unless ``max_layer_ratio`` stops every layer, which the record and a warning show). Widths are
always measured, never taken from the knob: torch-pruning removes grouped-convolution channels only in multiples
of the group count and may silently remove nothing.

Option-A CIFAR ResNets are supported: their zero-padding shortcuts are replaced by the equivalent
:class:`~baselines.shortcut.ChannelMapShortcut`, which torch-pruning is taught to prune (see that module).
"""
from __future__ import annotations

import copy
import warnings
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning.pruner import function as tpf

from baselines.base import Method, MethodContext, finetune_split
from baselines.counting import count_macs, layer_widths
from baselines.schedule import stage_targets
from baselines.serialize import architecture_of, rebuild
from baselines.shortcut import ChannelMapPruner, ChannelMapShortcut, check_hidden_channel_ops, convert_pad_shortcuts

__all__ = [
    "TARGET_KINDS",
    "StructuredTarget",
    "parse_structured_target",
    "StructuredMethod",
    "Score",
    "classifier_of",
    "out_filters",
    "bn_scales",
    "finetune_in_place",
]

TARGET_KINDS = ("channel_ratio", "macs_reduction")
ONE_PASS_BISECTIONS = 12
"""Bisection steps of the one-pass ratio search: the ratio is found to ``max_layer_ratio / 4096``."""
_ALIASES = {"ratio": "channel_ratio", "channel_ratio": "channel_ratio", "macs": "macs_reduction",
            "macs_reduction": "macs_reduction"}
_ALLOWED = "a channel ratio in (0, 1), 'ratio:R', 'macs:M', {'channel_ratio': R} or {'macs_reduction': M}"

Score = Callable[[Any], torch.Tensor]


@dataclass(frozen=True)
class StructuredTarget:
    """A parsed structured target: ``kind`` in :data:`TARGET_KINDS`, ``value`` in (0, 1)."""

    kind: str
    value: float


def parse_structured_target(target: Any) -> StructuredTarget:
    """Parse a structured target (see the module docstring), or raise ``ValueError`` naming the allowed forms."""
    kind, value = "channel_ratio", target
    if isinstance(target, StructuredTarget):
        kind, value = target.kind, target.value
    elif isinstance(target, str):
        key, sep, rest = target.partition(":")
        kind, value = (_ALIASES.get(key.strip()), rest) if sep else ("channel_ratio", target)
    elif isinstance(target, dict):
        if len(target) != 1:
            raise ValueError(f"target: {target!r} not allowed; allowed: {_ALLOWED}")
        (key, value), = target.items()
        kind = _ALIASES.get(key)
    try:
        number = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        number = None
    if kind not in TARGET_KINDS or number is None or not 0.0 < number < 1.0:
        raise ValueError(f"target: {target!r} not allowed; allowed: {_ALLOWED}")
    return StructuredTarget(kind, number)


def classifier_of(model: nn.Module) -> nn.Module:
    """The classifier whose outputs must keep their size: the last ``nn.Linear`` (else the last ``nn.Conv2d``)."""
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if not linears and not convs:
        raise ValueError(f"model: {type(model).__name__} has no Conv2d or Linear layer to prune")
    return (linears or convs)[-1]


def _aligned(group: Any, pick: Callable[[nn.Module, Any, list[int]], torch.Tensor | None]) -> list[torch.Tensor]:
    """Apply ``pick(layer, handler, idxs)`` to every item of ``group``; rows re-ordered to the group's channels."""
    channels = len(group[0].idxs)
    out = []
    for item in group:
        root = item.root_idxs
        if root is None or any(r is None for r in root):
            continue
        rows = pick(item.dep.target.module, item.dep.handler, list(item.idxs))
        if rows is None:
            continue
        full = rows.new_zeros((channels,) + tuple(rows.shape[1:]))
        full[torch.as_tensor(root, dtype=torch.long, device=rows.device)] = rows
        out.append(full)
    return out


@torch.no_grad()
def out_filters(group: Any) -> list[torch.Tensor]:
    """Output filters of every Conv/Linear whose output channels ``group`` removes.

    Args:
        group: a torch-pruning group with full indices (as a criterion receives it).

    Returns:
        One ``(C, fan_in)`` tensor per such layer (detached), row ``c`` belonging to the group's channel ``c``.
    """
    def pick(layer: nn.Module, handler: Any, idxs: list[int]) -> torch.Tensor | None:
        if handler in (tpf.prune_conv_out_channels, tpf.prune_linear_out_channels,
                       tpf.prune_depthwise_conv_out_channels):
            return layer.weight.detach()[idxs].flatten(1)
        return None

    return _aligned(group, pick)


@torch.no_grad()
def bn_scales(group: Any) -> list[torch.Tensor]:
    """BatchNorm scales ``gamma`` of every affine BN in ``group``, one ``(C,)`` tensor per BN in channel order."""
    def pick(layer: nn.Module, handler: Any, idxs: list[int]) -> torch.Tensor | None:
        if handler == tpf.prune_batchnorm_out_channels and layer.affine:
            return layer.weight.detach()[idxs]
        return None

    return _aligned(group, pick)


class _TieBreak:
    """Wrap a criterion so that exactly tied scores become distinct (relative perturbation below 1e-9).

    Torch-pruning's global ranking removes every channel at or below a threshold and skips a group whose channels
    would all go, so a network of tied scores (e.g. freshly initialised BN scales of 1) would prune nothing.
    """

    def __init__(self, score: Score, seed: int):
        self.score, self.gen = score, torch.Generator().manual_seed(seed)

    def __call__(self, group: Any) -> torch.Tensor | None:
        s = self.score(group)
        if s is None:
            return None
        u = torch.rand(s.shape, generator=self.gen, dtype=torch.float64).to(s.device)
        return s.double() * (1.0 + 1e-9 * u) + 1e-200 * u  # float64: the perturbation must stay resolvable


def finetune_in_place(ctx: MethodContext, model: nn.Module, epochs: int, regularize=None) -> nn.Module:
    """``ctx.run_finetune`` that keeps ``model`` the trained object (copying weights back if the callback did not)."""
    out = ctx.run_finetune(model, epochs, regularize=regularize)
    out = getattr(out, "_orig_mod", out)  # a torch.compile wrapper around the same module
    if out is not model:
        model.load_state_dict(out.state_dict())
    return model


class _RatioDriver:
    """Drive a torch-pruning pruner step by step until a measured quantity reaches a target.

    Each step raises torch-pruning's pruning ratio (the fraction of every layer, or of all channels when global)
    by an amount aimed at the target from the slope seen so far, halved to approach from below, at least one
    channel's worth (``fine``) and at most ``max_ratio / coarse_steps``; a step that changed nothing doubles the
    next one, so plateaus cost few steps. torch-pruning 1.6 reads the ratio of
    step ``k`` from ``per_step_pruning_ratio[k]`` (``k = current_step`` after ``step()`` increments it), so the
    driver appends to that list instead of fixing a schedule up front.
    """

    def __init__(self, pruner: tp.pruner.BasePruner, max_ratio: float, coarse_steps: int, fine: float | None):
        self.pruner, self.max_ratio = pruner, max_ratio
        self.coarse = max_ratio / coarse_steps
        self.fine = fine if fine is not None else 1.0 / max(pruner.initial_total_channels, 1)
        self.ratio, self.steps = 0.0, 0
        pruner.per_step_pruning_ratio = [0.0]
        pruner.per_step_head_pruning_ratio = [0.0]
        pruner.iterative_steps = 1 << 30

    def reach(self, target: float, measure: Callable[[], float]) -> None:
        value, slope, grow = measure(), None, 1.0
        while value < target - 1e-9 and self.ratio < self.max_ratio - 1e-12:
            delta = self.coarse if not slope else 0.5 * (target - value) / slope
            delta = min(max(delta * grow, self.fine), self.coarse)
            previous, before = self.ratio, value
            self.ratio = min(self.ratio + delta, self.max_ratio)
            self.pruner.per_step_pruning_ratio.append(self.ratio)
            self.pruner.per_step_head_pruning_ratio.append(0.0)
            self.pruner.step()
            self.steps += 1
            value = measure()
            if value > before:
                slope, grow = (value - before) / (self.ratio - previous), 1.0
            else:
                grow *= 2.0


class StructuredMethod(Method):
    """Base of the structured methods. Subclasses implement :meth:`criterion`; hooks are optional.

    Attributes:
        global_pruning: rank all groups together (True) or prune each layer by the same fraction (False).
        max_layer_ratio: no layer loses more than this fraction of its channels.
        coarse_steps: the largest prune step is ``max_layer_ratio / coarse_steps`` of torch-pruning's ratio.
    """

    family = "structured"
    schedules = ("oneshot", "iterative", "progressive")
    global_pruning = False
    max_layer_ratio = 0.9
    coarse_steps = 32

    def criterion(self, model: nn.Module, ctx: MethodContext) -> Score:
        raise NotImplementedError(f"method {self.name!r} does not implement criterion()")

    def prepare(self, model: nn.Module, ctx: MethodContext) -> int:
        """Before pruning (e.g. sparse training); returns the epochs it trained."""
        return 0

    def before_stage(self, model: nn.Module, ctx: MethodContext) -> None:
        """Before each prune stage (e.g. gradients for a data-driven criterion)."""

    def finish(self, model: nn.Module) -> None:
        """After the last stage (e.g. drop gradients)."""

    def validate_target(self, target: Any) -> None:
        parse_structured_target(target)

    def architecture(self, model: nn.Module) -> dict:
        return architecture_of(model)

    def rebuild(self, backbone: nn.Module, architecture: dict | None) -> nn.Module:
        return backbone if architecture is None else rebuild(backbone, architecture)

    def apply(self, model: nn.Module, target: Any, ctx: MethodContext) -> nn.Module:
        goal = parse_structured_target(target)
        if ctx.schedule not in self.schedules:
            raise ValueError(f"schedule: {ctx.schedule!r} not allowed for {self.name}; allowed: "
                             f"{', '.join(self.schedules)}")
        per_step, final = finetune_split(ctx)
        stages = stage_targets(goal.value, ctx)
        was_training = model.training
        example = ctx.example_inputs
        with torch.enable_grad():  # torch-pruning traces the graph through autograd
            converted = convert_pad_shortcuts(model)
            check_hidden_channel_ops(model, example)
            sparse = self.prepare(model, ctx)
            dense_widths, dense_macs = layer_widths(model), count_macs(model, example)
            classifier = classifier_of(model)
            names = [n for n, m in model.named_modules() if isinstance(m, nn.Conv2d) and m is not classifier]
            dense_channels = sum(dense_widths[n] for n in names)

            def achieved(net: nn.Module) -> float:
                if goal.kind == "macs_reduction":
                    return 1.0 - count_macs(net, example) / dense_macs
                widths = layer_widths(net)
                return 1.0 - sum(widths[n] for n in names) / dense_channels

            spent, scoring, trials, corrections, ratio = 0, 0, 0, 0, 0.0
            for k, stage in enumerate(stages):
                self.before_stage(model, ctx)
                if ctx.schedule == "progressive":
                    fine = None if self.global_pruning else 1.0 / max(dense_widths[n] for n in names)  # one channel
                    driver = _RatioDriver(self._pruner(model, ctx, classifier_of(model)), self.max_layer_ratio,
                                          self.coarse_steps, fine)
                    driver.reach(stage, lambda: achieved(model))
                    scoring, ratio = scoring + driver.steps, driver.ratio
                else:
                    ratio, tried = self._one_pass(model, ctx, stage, achieved)
                    scoring, trials = scoring + 1, trials + tried
                    if achieved(model) < stage - 1e-9:  # one pass stops short (global ranking): the correction step
                        driver = _RatioDriver(self._pruner(model, ctx, classifier_of(model)), self.max_layer_ratio,
                                              self.coarse_steps, None)
                        driver.reach(stage, lambda: achieved(model))
                        scoring, corrections = scoring + driver.steps, corrections + driver.steps
                if k < len(stages) - 1 and per_step > 0:
                    model = finetune_in_place(ctx, model, per_step)
                    spent += per_step
            self.finish(model)
        model.train(was_training)
        reached = achieved(model) >= goal.value - 1e-9
        if not reached:
            warnings.warn(f"{self.name}: target {goal.kind}={goal.value} not reached ({achieved(model):.4f}); "
                          f"layers stop at max_layer_ratio={self.max_layer_ratio}", RuntimeWarning, stacklevel=2)
        self._record(model, ctx, goal, stages, dense_widths, dense_macs, names, dense_channels,
                     {"epochs": (sparse, spent, final), "scoring": scoring, "trials": trials,
                      "corrections": corrections, "ratio": ratio,
                      "reached": reached, "converted": converted})
        return model

    def _one_pass(self, model: nn.Module, ctx: MethodContext, stage: float,
                  achieved: Callable[[nn.Module], float]) -> tuple[float, int]:
        """Prune ``model`` once, scored once, by the smallest pruning ratio whose result reaches ``stage``.

        The ratio is found by bisection on copies (each copy scores the same weights, so every trial removes what a
        prune of the model at that ratio would remove); the model itself is then pruned in one step at that ratio.

        Returns:
            ``(ratio, trials)``: the ratio used and how many copies were pruned to find it.
        """
        def prune_at(net: nn.Module, ratio: float) -> nn.Module:
            if ratio > 0:
                self._pruner(net, ctx, classifier_of(net), ratio=ratio).step()
            return net

        def trial(ratio: float) -> float:
            probe = copy.deepcopy(model)
            for src, dst in zip(model.parameters(), probe.parameters()):  # data-driven criteria read gradients
                dst.grad = None if src.grad is None else src.grad.clone()
            return achieved(prune_at(probe, ratio))

        lo, hi, trials = 0.0, self.max_layer_ratio, 1
        if trial(hi) >= stage:
            for _ in range(ONE_PASS_BISECTIONS):
                mid = 0.5 * (lo + hi)
                trials += 1
                if trial(mid) >= stage:
                    hi = mid
                else:
                    lo = mid
        prune_at(model, hi)
        return hi, trials

    def _pruner(self, model: nn.Module, ctx: MethodContext, classifier: nn.Module,
                ratio: float | None = None) -> tp.pruner.BasePruner:
        """A torch-pruning pruner on ``model``: one step to ``ratio``, or (None) driven by :class:`_RatioDriver`."""
        return tp.pruner.BasePruner(
            model, ctx.example_inputs, importance=_TieBreak(self.criterion(model, ctx), ctx.seed),
            global_pruning=self.global_pruning, pruning_ratio=self.max_layer_ratio if ratio is None else ratio,
            max_pruning_ratio=self.max_layer_ratio, iterative_steps=1, ignored_layers=[classifier],
            customized_pruners={ChannelMapShortcut: ChannelMapPruner()},
        )

    def _record(self, model: nn.Module, ctx: MethodContext, goal: StructuredTarget, stages: list[float],
                dense_widths: dict[str, int], dense_macs: int, names: list[str], dense_channels: int,
                run: dict[str, Any]) -> None:
        widths = layer_widths(model)
        macs = count_macs(model, ctx.example_inputs)
        sparse, spent, final = run["epochs"]
        ctx.record.update({
            "channel_ratio": 1.0 - sum(widths[n] for n in names) / dense_channels,
            "macs_reduction": 1.0 - macs / dense_macs,
            "epochs_sparse": sparse,
            "epochs_finetune": spent + final,  # between steps (inside apply) + the harness's final share
            "epochs_finetune_final": final,
        })
        ctx.record.setdefault("achieved", {}).update({
            "target_kind": goal.kind,
            "target_value": goal.value,
            "target_reached": run["reached"],
            "step_targets": stages,
            "scoring_steps": run["scoring"],
            "ratio_search_trials": run["trials"],
            "correction_steps": run["corrections"],
            "pruner_ratio": run["ratio"],
            "macs": macs,
            "macs_dense": dense_macs,
            "widths": widths,
            "widths_dense": dense_widths,
            "unpruned_layers": [n for n in names if widths[n] == dense_widths[n]],
            "global_pruning": self.global_pruning,
            "option_a_shortcuts": run["converted"],
        })
