"""BUnit at a chosen cost: the unit plan, out of a documented family, whose MACs or parameters are closest to a target.

A BUnit target such as ``{"macs_reduction": 0.8}`` (or ``"macs:0.8"``) or ``{"params_reduction": 0.7}`` (or
``"params:0.7"``) asks for a fraction of the dense backbone's conv+linear MACs (:func:`baselines.counting.count_macs`)
or of its parameters (all of them, BN included) to be removed. The planner enumerates the *candidate family* and
picks the member closest to the target.

The candidate family:

- **Groups.** A residual backbone's stages (``layer1`` .. ``layerN``: every block of the stage is converted; the
  two 3x3 convs of a basic block, the 3x3 ``conv2`` of a bottleneck); a VGG's conv stages (the convs between two
  max-pools of ``features``; a conv that a unit shape cannot split, such as the RGB input conv, stays dense).
- **Unit shapes** (:data:`SHAPES`): the uniform rows ``uniform:A-B`` of ``in/A`` units ``A-B-(A*out/in)`` for A-B in
  8-8, 4-4, 2-4 (the paper's 2-4-k), 2-2 (2-2-k), 1-2 (1-2-1 on equal widths), 2-1, 1-1, and ``hybrid`` (mixes
  drawn from the paper's catalogue, seed 0, exactly as ``bunit.bunitify`` draws them).
- **Candidates:** every assignment of one shape, or "dense", to each group; (shapes + 1) ** groups plans
  (729 for a CIFAR ResNet, 6,561 for a torchvision ResNet, 59,049 for VGG-16).

Counting: the cost of a candidate is the dense count minus the saving of each converted group, and a group's
saving is counted once per shape by running the dense layers it replaces and the unit layer that replaces them
through :func:`baselines.counting.count_macs` on the layer's own input (savings of different layers add up exactly:
conversion keeps every feature-map size). The chosen plan is then built with ``bunit.bunitify`` and counted whole.

Choice: the smallest distance ``|achieved - target|`` (reductions as fractions); candidates within 0.001 of the
best count as equal and the simplest wins (fewest distinct shapes, then fewest converted groups, then the
enumeration order). A target whose closest candidate is further than :data:`TOLERANCE` (0.03, i.e. 3 points of
reduction) is refused with the range the family reaches and the nearest plans, so a row never claims a cost it did
not reach. Measured on this family (32x32 inputs, 10 classes): every MACs and parameter target on the 0.05 grid
inside the family's reach lands within 0.02 on CIFAR ResNet-20/56 and VGG-16; on ResNet-18 within 0.03, except
parameter targets 0.30-0.35 (one layer4 block holds 42% of the parameters: the nearest plans save 26% or 40%);
ResNet-50 (only the bottlenecks' 3x3 convs become units) reaches at most 45% of MACs and 48% of parameters.
tests/test_bunit_plan.py checks landing within the tolerance for every backbone with a BUnit form.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import torch.nn as nn

from baselines.counting import count_macs, count_params
from bunit import CATALOGUE, UnitLayer, bunitify, compact_specs, hybrid_mix, uniform_units
from bunit.blocks import block_io, block_kind
from bunit.convert import layer_seed

__all__ = ["COST_KINDS", "SHAPES", "TOLERANCE", "CostTarget", "parse_cost_target", "GroupOption", "PlanFamily",
           "PlanChoice", "plan_family", "choose_plan", "build_for_target"]

COST_KINDS = ("macs_reduction", "params_reduction")
_ALIASES = {"macs": "macs_reduction", "macs_reduction": "macs_reduction", "params": "params_reduction",
            "params_reduction": "params_reduction"}
SHAPES = ("uniform:8-8", "uniform:4-4", "uniform:2-4", "uniform:2-2", "uniform:1-2", "uniform:2-1", "uniform:1-1",
          "hybrid")
TOLERANCE = 0.03
_TIE = 1e-3
_ALLOWED = "{'macs_reduction': M}, {'params_reduction': P}, 'macs:M' or 'params:P' with M, P in (0, 1)"


@dataclass(frozen=True)
class CostTarget:
    """A BUnit cost target: ``kind`` in :data:`COST_KINDS`, ``value`` the fraction to remove, in (0, 1)."""

    kind: str
    value: float


def parse_cost_target(target: Any) -> CostTarget | None:
    """The cost target in ``target``, or None when ``target`` is a plan (preset name, plan dict, JSON string).

    Raises:
        ValueError: for a cost target with a bad value or more than one key (the message names the allowed forms).
    """
    kind, value = None, None
    if isinstance(target, CostTarget):
        return target
    if isinstance(target, str) and ":" in target and not target.lstrip().startswith("{"):
        key, _, value = target.partition(":")
        kind = _ALIASES.get(key.strip())
        if kind is None:
            return None
    elif isinstance(target, dict) and set(target) & set(_ALIASES):
        if len(target) != 1:
            raise ValueError(f"target: {target!r} not allowed; a cost target has one key; allowed: {_ALLOWED}")
        (key, value), = target.items()
        kind = _ALIASES[key]
    else:
        return None
    try:
        number = None if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        number = None
    if number is None or not 0.0 < number < 1.0:
        raise ValueError(f"target: {target!r} not allowed; allowed: {_ALLOWED}")
    return CostTarget(kind, number)


@dataclass(frozen=True)
class GroupOption:
    """One way to convert a group: ``shape`` on its last ``blocks`` layers; their savings and every layer's specs."""

    shape: str
    blocks: int
    macs_saved: int
    params_saved: int
    layers: dict[str, list[str]]


@dataclass
class PlanFamily:
    """The candidate family of one backbone at one input size.

    Attributes:
        groups: group names in order (``layer2``, or ``convs 2-3`` for a VGG stage).
        sizes: layers of each group that some shape converts.
        options: ``options[g]``: the :class:`GroupOption` s of group ``g`` (dense is implicit).
        macs_dense: conv+linear MACs of the dense model; ``params_dense`` its parameters.
    """

    groups: list[str]
    sizes: list[int]
    options: list[list[GroupOption]]
    macs_dense: int
    params_dense: int
    _table: tuple[np.ndarray, np.ndarray] | None = field(default=None, repr=False)

    def reductions(self) -> tuple[np.ndarray, np.ndarray]:
        """MACs and parameter reductions of every candidate (flat index over the product of the groups' options,
        option 0 = dense; :meth:`decode` turns an index back into a choice)."""
        if self._table is None:
            macs, params = np.zeros(1), np.zeros(1)
            for opts in self.options:
                macs = np.add.outer(macs, [0] + [o.macs_saved for o in opts]).ravel()
                params = np.add.outer(params, [0] + [o.params_saved for o in opts]).ravel()
            self._table = (macs / self.macs_dense, params / self.params_dense)
        return self._table

    def decode(self, index: np.ndarray) -> np.ndarray:
        """Option numbers (0 = dense, ``i`` = ``options[g][i - 1]``) per group, one row per candidate index."""
        return np.stack(np.unravel_index(index, [len(o) + 1 for o in self.options]), axis=-1)

    def reach(self, kind: str) -> tuple[float, float]:
        """The smallest and largest reduction of ``kind`` the family offers (the all-dense plan left out)."""
        values = self.reductions()[COST_KINDS.index(kind)][1:]
        return float(values.min()), float(values.max())


@dataclass(frozen=True)
class PlanChoice:
    """The plan picked for a target: the ``bunitify`` plan, the group -> option text and its predicted reductions."""

    plan: dict[str, Any]
    choice: dict[str, str]
    macs_reduction: float
    params_reduction: float


def _param_count(*modules: nn.Module) -> int:
    return sum(count_params(m) for m in modules)


def _specs(shape: str, path: str, cin: int, cout: int) -> list:
    if shape == "hybrid":
        return hybrid_mix(cin, cout, CATALOGUE, layer_seed(0, path))  # what bunitify draws for seed 0
    a, b = (int(v) for v in shape.split(":")[1].split("-"))
    return uniform_units(cin, cout, a, b)


def _groups(model: nn.Module) -> list[tuple[str, list[tuple[str, str]]]]:
    """``[(group name, [(module path, kind), ...]), ...]`` with kind ``basic|bottleneck|conv``."""
    groups = []
    for name, child in model.named_children():
        if isinstance(child, nn.Sequential) and len(child) and all(block_kind(b) for b in child):
            groups.append((name, [(f"{name}.{i}", block_kind(b)) for i, b in child.named_children()]))
    features = getattr(model, "features", None)
    if not groups and isinstance(features, nn.Sequential):
        stage: list[tuple[str, str]] = []
        ordinal, first = 0, 0
        for i, m in enumerate(list(features) + [nn.MaxPool2d(1)]):
            if isinstance(m, nn.Conv2d):
                stage.append((f"features.{i}", "conv"))
                ordinal += 1
            elif isinstance(m, nn.MaxPool2d) and stage:
                groups.append((f"convs {first}-{ordinal - 1}", stage))
                stage, first = [], ordinal
    if not groups:
        raise ValueError(f"model: {type(model).__name__} has no residual stages (layer1..) and no VGG `features`; "
                         "BUnit cost targets need one of them")
    return groups


def _replaced(model: nn.Module, path: str, kind: str) -> tuple[list[str], list[nn.Module], str]:
    """Convs whose MACs a conversion removes, every module whose parameters it removes, and the unit input conv."""
    if kind == "conv":
        parent, _, index = path.rpartition(".")
        bn = model.get_submodule(parent)[int(index) + 1]
        return [path], [model.get_submodule(path), bn], path
    block = model.get_submodule(path)
    if kind == "basic":
        return [f"{path}.conv1", f"{path}.conv2"], [block.conv1, block.bn1, block.conv2, block.bn2], f"{path}.conv1"
    return [f"{path}.conv2"], [block.conv2, block.bn2], f"{path}.conv2"


@contextmanager
def _one_thread():
    """Count on one thread: the many tiny forwards are ~100x slower when threads contend with other work."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _layer_savings(model: nn.Module, path: str, kind: str, shape: str,
                   inputs: dict[str, torch.Size]) -> tuple[int, int, list[str]] | None:
    """MACs and parameters saved by converting one layer with ``shape``, and its specs; None if it does not fit."""
    module = model.get_submodule(path)
    cin, cout, stride = block_io(module) if kind != "conv" else (module.in_channels, module.out_channels,
                                                                  module.stride[0])
    try:
        specs = _specs(shape, path, cin, cout)
    except ValueError:
        return None
    convs, removed, entry = _replaced(model, path, kind)
    units = UnitLayer(specs, stride=stride)
    dense_macs = sum(count_macs(model.get_submodule(c), torch.zeros(inputs[c])) for c in convs)
    macs = dense_macs - count_macs(units, torch.zeros(inputs[entry]))
    return macs, _param_count(*removed) - _param_count(units), compact_specs(specs)


def plan_family(model: nn.Module, example_inputs: torch.Tensor) -> PlanFamily:
    """Count the savings of every layer of ``model`` under every shape, for inputs like ``example_inputs``.

    A group's options are "shape s on the last k layers of the group" for every shape that fits those layers and
    k = 1 .. the group's size (the first layers go last: they carry the stride and the shortcut projection).

    Args:
        model: a dense CIFAR ResNet, torchvision ResNet or VGG (not modified).
        example_inputs: a batch shaped like real inputs (only the first sample's shape is used).

    Returns:
        The :class:`PlanFamily`.
    """
    x = torch.zeros_like(example_inputs[:1])
    inputs: dict[str, torch.Size] = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, n=n: inputs.__setitem__(n, inp[0].shape))
             for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    names, sizes, options = [], [], []
    with _one_thread():
        try:
            macs_dense = count_macs(model, x)
        finally:
            for h in hooks:
                h.remove()
        for group, members in _groups(model):
            per_shape = {shape: [_layer_savings(model, path, kind, shape, inputs) for path, kind in members]
                         for shape in SHAPES}
            # a layer that no shape splits (VGG's RGB input conv) is not part of the group
            fits = [any(per_shape[s][i] is not None for s in SHAPES) for i in range(len(members))]
            members = [m for m, ok in zip(members, fits) if ok]
            opts = []
            for shape, savings in per_shape.items():
                kept = [(path, sv) for (path, _), sv in zip(members, [v for v, ok in zip(savings, fits) if ok])]
                for k in range(1, len(kept) + 1):
                    tail = kept[-k:]
                    if any(sv is None for _, sv in tail):
                        continue
                    opts.append(GroupOption(shape, k, sum(sv[0] for _, sv in tail), sum(sv[1] for _, sv in tail),
                                            {path: sv[2] for path, sv in tail}))
            if opts:
                names.append(group)
                sizes.append(len(members))
                options.append(opts)
    return PlanFamily(names, sizes, options, macs_dense, _param_count(model))


def choose_plan(family: PlanFamily, target: CostTarget, *, tolerance: float = TOLERANCE) -> PlanChoice:
    """The candidate of ``family`` closest to ``target`` (rule in the module docstring).

    Raises:
        ValueError: when the closest candidate misses the target by more than ``tolerance``; the message gives the
            range the family reaches.
    """
    values = family.reductions()[COST_KINDS.index(target.kind)]
    distance = np.abs(values - target.value)
    distance[0] = np.inf  # the all-dense plan is not a BUnit network
    best = float(distance.min())
    if best > tolerance:
        lo, hi = family.reach(target.kind)
        below, above = values[1:][values[1:] < target.value], values[1:][values[1:] > target.value]
        nearest = ", ".join(f"{v:.3f}" for v in (below.max() if len(below) else None,
                                                  above.min() if len(above) else None) if v is not None)
        raise ValueError(f"target: {target.kind} = {target.value:g} is out of reach of the BUnit plan family on this "
                         f"backbone within the tolerance {tolerance:g} (reachable: {lo:.3f} to {hi:.3f}; "
                         f"nearest plans: {nearest})")
    near = np.flatnonzero(distance <= best + _TIE)
    picks = family.decode(near)  # (n, groups) option numbers
    shape_ids = np.array([[-1] + [SHAPES.index(o.shape) for o in opts] for opts in family.options], dtype=object)
    ids = np.array([[shape_ids[g][p] for g, p in enumerate(row)] for row in picks]).reshape(len(near), -1)
    ordered = np.sort(ids, axis=1)
    distinct = ((np.diff(ordered, axis=1) != 0) & (ordered[:, 1:] >= 0)).sum(1) + (ordered[:, :1] >= 0).sum(1)
    converted = (ids >= 0).sum(1)
    winner = np.lexsort((near, converted, distinct))[0]
    layers: dict[str, list[str]] = {}
    choice: dict[str, str] = {}
    for g, option in enumerate(picks[winner]):
        if option:
            o = family.options[g][option - 1]
            layers.update(o.layers)
            choice[family.groups[g]] = f"{o.shape}, last {o.blocks} of {family.sizes[g]}"
    macs_r, params_r = (float(v[near[winner]]) for v in family.reductions())
    return PlanChoice({"layers": layers}, choice, macs_r, params_r)


def build_for_target(model: nn.Module, target: CostTarget, example_inputs: torch.Tensor, *,
                     tolerance: float = TOLERANCE) -> tuple[nn.Module, dict[str, Any]]:
    """Convert ``model`` with the plan closest to ``target``; returns the model and what to record.

    The record holds the target, the choice (group -> shape), the candidate family, and the MACs and parameters of
    the built model counted whole (``macs_reduction``, ``params_reduction`` achieved).
    """
    family = plan_family(model, example_inputs)
    pick = choose_plan(family, target, tolerance=tolerance)
    converted = bunitify(model, pick.plan)
    with _one_thread():
        macs = count_macs(converted, example_inputs)
    params = _param_count(converted)
    achieved = {"macs_reduction": 1.0 - macs / family.macs_dense,
                "params_reduction": 1.0 - params / family.params_dense}
    record = {
        "target_kind": target.kind, "target_value": target.value,
        "target_reached": abs(achieved[target.kind] - target.value) <= tolerance, "tolerance": tolerance,
        "plan_choice": pick.choice, "plan_family": {"groups": family.groups, "shapes": list(SHAPES),
                                                     "candidates": int(len(family.reductions()[0]) - 1)},
        "macs": macs, "macs_dense": family.macs_dense, "params": params, "params_dense": family.params_dense,
        **achieved,
    }
    return converted, record
