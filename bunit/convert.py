"""Turn a dense backbone into its BUnit-Net form from a JSON-able plan.

After Lan, Cheung et al., "Compact Neural Network via Stacking Hybrid Units" (TPAMI 2024). A plan names
what to replace and how to draw the units:

```
{"stages": ["layer2", "layer3"], "units": "uniform:2-4"}           # every block of two stages
{"stages": ["layer2"], "units": "hybrid", "catalogue": ["1-2-1", ...], "seed": 0}
{"convs": [2, 3, 4], "units": "uniform:2-4"}                          # VGG conv ordinals in `features`
{"layers": {"layer2.0": ["32x2-4-4"], "features.7": ["64x2-4-2"]}}    # explicit, per module path
```

Keys: ``stages`` (residual stages: every block becomes a BUnit block), ``convs`` (0-based ordinals of the
Conv2d layers of a VGG ``features`` Sequential; each conv-BN-ReLU triple becomes a :class:`BUnitConv` and
its BN/ReLU slots become Identity so later indices keep their names), ``units`` (``"uniform:A-B"``:
``in/A`` units ``A-B-(A*out/in)``; ``"hybrid"``: :func:`bunit.spec.hybrid_mix` with ``catalogue`` and a
per-layer seed ``crc32("{seed}:{path}")``), ``layers`` (explicit spec lists by module path; they override
the rule), ``impl`` and ``backend`` (of the unit layers). A dict given as ``units`` is read as ``layers``.

The converted model carries ``model.bunit_plan``: the resolved plan with ``layers`` filled in for every
converted layer (run-length spec strings), so ``bunitify(create_backbone(...), model.bunit_plan)``
rebuilds the same architecture from data alone.
"""
from __future__ import annotations

import copy
import json
import re
import zlib
from typing import Any

import torch.nn as nn

from bunit.blocks import BUnitBasicBlock, BUnitBottleneck, BUnitConv, block_io, block_kind
from bunit.backends import get_backend
from bunit.layers import IMPLS
from bunit.spec import CATALOGUE, UnitSpec, compact_specs, hybrid_mix, parse_spec, parse_specs, uniform_units

__all__ = ["PRESETS", "PLAN_KEYS", "PAPER", "paper_preset", "resolve_plan", "bunitify", "plan_targets", "layer_seed"]

_UNIFORM = {"units": "uniform:2-4"}
PRESETS: dict[str, dict[str, Any]] = {
    # torchvision ResNet-18/50 as in the paper's public code: stages 2 and 3 of four are units, 1 and 4 dense.
    "resnet-paper": {"stages": ["layer2", "layer3"], **_UNIFORM},
    "resnet-all": {"stages": ["layer1", "layer2", "layer3", "layer4"], **_UNIFORM},
    # CIFAR ResNets (three stages): the paper's choice carried over as "every stage but the first", i.e. the
    # same stage names layer2+layer3 (the first, narrowest stage stays dense as in the paper).
    "cifar-resnet-paper": {"stages": ["layer2", "layer3"], **_UNIFORM},
    "cifar-resnet-middle": {"stages": ["layer2"], **_UNIFORM},
    "cifar-resnet-all": {"stages": ["layer1", "layer2", "layer3"], **_UNIFORM},
    "cifar-resnet-hybrid": {"stages": ["layer2", "layer3"], "units": "hybrid", "catalogue": list(CATALOGUE), "seed": 0},
    # VGG-16 (13 convs, ordinals 0..12 in five stages 2-2-3-3-3): the middle stages 2-4 (ordinals 2..9),
    # or every conv but the RGB input conv (3 channels cannot split into a=2 units).
    "vgg16-middle": {"convs": list(range(2, 10)), **_UNIFORM},
    "vgg16-all": {"convs": list(range(1, 13)), **_UNIFORM},
    "vgg16-hybrid": {"convs": list(range(2, 10)), "units": "hybrid", "catalogue": list(CATALOGUE), "seed": 0},
}
"""Named plans. ``resnet-paper`` and ``cifar-resnet-paper`` name the same stages; both names are kept so a
row says which family the choice was made for."""

PLAN_KEYS = ("preset", "stages", "convs", "units", "catalogue", "seed", "layers", "impl", "backend")
_UNIFORM_RE = re.compile(r"^uniform(?::(\d+)-(\d+))?$")
_UNITS_FORM = "'uniform:A-B' (e.g. 'uniform:2-4'), 'uniform' (= 2-4), 'hybrid', or a dict of explicit layers"


def _preset_error(name: str) -> ValueError:
    return ValueError(f"plan: unknown preset {name!r}; presets: {', '.join(sorted(PRESETS))} "
                      "(or give a dict / JSON string)")


def resolve_plan(target: str | dict[str, Any]) -> dict[str, Any]:
    """Normalise a plan: a preset name, a dict, or a JSON string -> a validated, JSON-able dict.

    Args:
        target: the plan.

    Returns:
        A new dict with defaults filled in (``units``, ``impl``, ``backend``; ``catalogue``/``seed`` for hybrid).

    Raises:
        ValueError: for an unknown preset, an unknown key, or a malformed value (the message names it).
    """
    if isinstance(target, str):
        text = target.strip()
        if text.startswith("{"):
            try:
                plan = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"plan: invalid JSON ({err})") from None
        elif text in PRESETS:
            plan = {"preset": text, **copy.deepcopy(PRESETS[text])}
        else:
            raise _preset_error(text)
    elif isinstance(target, dict):
        plan = copy.deepcopy(target)
    else:
        raise ValueError(f"plan: expected a preset name, a dict or a JSON string; got {type(target).__name__}")
    if not isinstance(plan, dict):
        raise ValueError("plan: the JSON must be an object")
    unknown = sorted(set(plan) - set(PLAN_KEYS))
    if unknown:
        raise ValueError(f"plan: unknown keys {unknown}; allowed: {', '.join(PLAN_KEYS)}")
    if isinstance(plan.get("units"), dict):
        plan["layers"] = {**plan.pop("units"), **plan.get("layers", {})}
    plan.setdefault("units", "uniform:2-4")
    plan.setdefault("impl", "fused")
    plan.setdefault("backend", "grouped")
    units = plan["units"]
    if units == "hybrid":
        plan.setdefault("catalogue", list(CATALOGUE))
        plan.setdefault("seed", 0)
        plan["catalogue"] = [str(parse_spec(s)) for s in plan["catalogue"]]
        if not isinstance(plan["seed"], int) or isinstance(plan["seed"], bool):
            raise ValueError(f"plan.seed: must be an int, got {plan['seed']!r}")
    elif not (isinstance(units, str) and _UNIFORM_RE.match(units)):
        raise ValueError(f"plan.units: {units!r} is not allowed; allowed: {_UNITS_FORM}")
    if plan["impl"] not in IMPLS:
        raise ValueError(f"plan.impl: {plan['impl']!r} is not allowed; allowed: {', '.join(IMPLS)}")
    get_backend(plan["backend"], field="plan.backend")  # raises naming the registered backends
    if not isinstance(plan.get("stages", []), list) or not all(isinstance(s, str) for s in plan.get("stages", [])):
        raise ValueError("plan.stages: must be a list of stage names such as ['layer2', 'layer3']")
    if not isinstance(plan.get("convs", []), list) or not all(isinstance(i, int) for i in plan.get("convs", [])):
        raise ValueError("plan.convs: must be a list of conv ordinals (ints)")
    layers = plan.get("layers", {})
    if not isinstance(layers, dict):
        raise ValueError("plan.layers: must map module paths to lists of spec strings")
    plan["layers"] = {str(k): compact_specs(parse_specs(v)) for k, v in layers.items()}
    if not (plan.get("stages") or plan.get("convs") or plan["layers"]):
        raise ValueError("plan: names nothing to convert; give 'stages', 'convs' or 'layers'")
    return plan


def layer_seed(seed: int, path: str) -> int:
    """The per-layer seed of hybrid draws: ``crc32(f"{seed}:{path}")`` (stable across processes)."""
    return zlib.crc32(f"{seed}:{path}".encode())


def _draw(plan: dict[str, Any], path: str, cin: int, cout: int) -> list[UnitSpec]:
    if path in plan["layers"]:
        return parse_specs(plan["layers"][path])
    if plan["units"] == "hybrid":
        return hybrid_mix(cin, cout, plan["catalogue"], layer_seed(plan["seed"], path))
    match = _UNIFORM_RE.match(plan["units"])
    a, b = (int(match[1]), int(match[2])) if match[1] else (2, 4)
    try:
        return uniform_units(cin, cout, a, b)
    except ValueError as err:
        raise ValueError(f"plan.units: {plan['units']!r} does not fit {path} ({cin}->{cout}): {err}") from None


def _vgg_convs(model: nn.Module) -> list[int]:
    """Indices in ``model.features`` of its Conv2d layers."""
    features = getattr(model, "features", None)
    if not isinstance(features, nn.Sequential):
        raise ValueError("plan.convs: needs a VGG-style model with a `features` nn.Sequential")
    return [i for i, m in enumerate(features) if isinstance(m, nn.Conv2d)]


def plan_targets(model: nn.Module, plan: dict[str, Any]) -> list[tuple[str, str]]:
    """The modules a resolved plan converts, as ``(path, kind)`` with kind ``basic|bottleneck|conv``, in order."""
    targets: list[tuple[str, str]] = []
    stage_names = [n for n, _ in model.named_children()]
    for stage in plan.get("stages", []):
        module = getattr(model, stage, None) if stage in stage_names else None
        if not isinstance(module, nn.Sequential):
            allowed = [n for n, m in model.named_children() if isinstance(m, nn.Sequential)]
            raise ValueError(f"plan.stages: {stage!r} is not a stage of {type(model).__name__}; allowed: {allowed}")
        for name, block in module.named_children():
            kind = block_kind(block)
            if kind is None:
                raise ValueError(f"plan.stages: {stage}.{name} ({type(block).__name__}) is not a residual block")
            targets.append((f"{stage}.{name}", kind))
    if plan.get("convs"):
        convs = _vgg_convs(model)
        for ordinal in plan["convs"]:
            if not 0 <= ordinal < len(convs):
                raise ValueError(f"plan.convs: ordinal {ordinal} out of range; allowed: 0..{len(convs) - 1}")
            targets.append((f"features.{convs[ordinal]}", "conv"))
    known = {p for p, _ in targets}
    for path in plan["layers"]:
        if path in known:
            continue
        try:
            module = model.get_submodule(path)
        except AttributeError:
            raise ValueError(f"plan.layers: {path!r} is not a module of {type(model).__name__}") from None
        kind = "conv" if isinstance(module, nn.Conv2d) else block_kind(module)
        if kind is None:
            raise ValueError(f"plan.layers: {path!r} ({type(module).__name__}) is neither a residual block "
                             "nor a Conv2d")
        targets.append((path, kind))
    return targets


def _replace_conv_triple(model: nn.Module, path: str, new: nn.Module) -> None:
    parent_path, _, index = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    if not isinstance(parent, nn.Sequential):
        raise ValueError(f"plan: {path!r} must be a Conv2d inside an nn.Sequential (conv, BN, ReLU)")
    i = int(index)
    if not (i + 2 < len(parent) and isinstance(parent[i + 1], nn.BatchNorm2d) and isinstance(parent[i + 2], nn.ReLU)):
        raise ValueError(f"plan: {path!r} is not followed by BatchNorm2d and ReLU")
    parent[i], parent[i + 1], parent[i + 2] = new, nn.Identity(), nn.Identity()


PAPER = "paper"
"""A plan name that stands for the paper's choice on whatever backbone it is applied to."""


def paper_preset(model: nn.Module) -> str:
    """The paper's plan for ``model``, named for the backbone family it is applied to: ``vgg16-middle`` for VGG,
    ``resnet-paper`` for a four-stage (torchvision) ResNet as in the paper's public code, ``cifar-resnet-paper``
    for a three-stage CIFAR ResNet (the same stages 2 and 3)."""
    if hasattr(model, "features") and not hasattr(model, "layer2"):
        return "vgg16-middle"
    return "resnet-paper" if hasattr(model, "layer4") else "cifar-resnet-paper"


def bunitify(model: nn.Module, plan: str | dict[str, Any]) -> nn.Module:
    """A BUnit-Net copy of ``model``: the modules the plan names are replaced by freshly initialised units.

    The input model is not modified (the result is built on a deep copy; kept parts keep their weights).

    Args:
        model: a dense backbone (CIFAR ResNet, torchvision ResNet, or VGG with ``features``).
        plan: a preset name, ``"paper"`` (the preset :func:`paper_preset` picks for this model), a plan dict or a
            JSON string (see the module docstring).

    Returns:
        The converted model, with ``bunit_plan`` set to the resolved plan whose ``layers`` lists the specs
        of every converted layer.
    """
    resolved = resolve_plan(paper_preset(model) if plan == PAPER else plan)
    out = copy.deepcopy(model)
    explicit: dict[str, list[str]] = {}
    for path, kind in plan_targets(out, resolved):
        module = out.get_submodule(path)
        opts = {"impl": resolved["impl"], "backend": resolved["backend"]}
        try:
            if kind == "conv":
                specs = _draw(resolved, path, module.in_channels, module.out_channels)
                new = BUnitConv.from_conv(module, specs, **opts)
                _replace_conv_triple(out, path, new)
            else:
                cin, cout, _ = block_io(module)
                specs = _draw(resolved, path, cin, cout)
                cls = BUnitBasicBlock if kind == "basic" else BUnitBottleneck
                new = cls.from_block(module, specs, **opts)
                parent_path, _, name = path.rpartition(".")
                setattr(out.get_submodule(parent_path) if parent_path else out, name, new)
        except ValueError as err:
            raise ValueError(f"plan: cannot convert {path!r}: {err}") from None
        explicit[path] = compact_specs(new.units.specs)
    resolved["layers"] = explicit
    out.bunit_plan = json.loads(json.dumps(resolved))  # plain JSON types only
    return out
