"""Architectures are data: a pruned network as per-layer widths, rebuilt on a fresh dense backbone.

``architecture_of(model)`` lists every Conv2d, BatchNorm, Linear (and every option-A
:class:`~baselines.shortcut.ChannelMapShortcut`) by module name with its widths — plain JSON types only.
``rebuild(model, architecture)`` resizes a freshly built dense backbone of the same name to those widths, so that
the pruned ``state_dict`` loads with ``strict=True``. Modules are never pickled.

Example::

    arch = architecture_of(pruned)                      # json.dump(arch, f)
    torch.save(pruned.state_dict(), "w.pt")
    model = rebuild(create_backbone("resnet56", shortcut="A"), arch)
    model.load_state_dict(torch.load("w.pt", weights_only=True))
"""
from __future__ import annotations

from typing import Any

import torch.nn as nn

from baselines.shortcut import ChannelMapShortcut

__all__ = ["ARCHITECTURE_FORMAT", "architecture_of", "rebuild"]

ARCHITECTURE_FORMAT = "bunitbench.widths/1"


def architecture_of(model: nn.Module) -> dict[str, Any]:
    """Per-layer widths of ``model``, JSON-able.

    Args:
        model: a (pruned) network.

    Returns:
        ``{"format": ARCHITECTURE_FORMAT, "layers": {name: spec}}``; a spec is ``{"type": "Conv2d", "in_channels",
        "out_channels", "groups"}``, ``{"type": "BatchNorm", "num_features"}``, ``{"type": "Linear", "in_features",
        "out_features"}`` or ``{"type": "ChannelMapShortcut", "in_channels", "out_channels", "stride", "src", "dst"}``.
    """
    layers: dict[str, dict[str, Any]] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            layers[name] = {"type": "Conv2d", "in_channels": m.in_channels, "out_channels": m.out_channels,
                            "groups": m.groups}
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            layers[name] = {"type": "BatchNorm", "num_features": m.num_features}
        elif isinstance(m, nn.Linear):
            layers[name] = {"type": "Linear", "in_features": m.in_features, "out_features": m.out_features}
        elif isinstance(m, ChannelMapShortcut):
            layers[name] = {"type": "ChannelMapShortcut", "in_channels": m.in_channels,
                            "out_channels": m.out_channels, "stride": m.stride,
                            "src": m.src.tolist(), "dst": m.dst.tolist()}
    return {"format": ARCHITECTURE_FORMAT, "layers": layers}


def rebuild(model: nn.Module, architecture: dict[str, Any]) -> nn.Module:
    """Resize the layers of a freshly built dense ``model`` to ``architecture``, in place.

    Args:
        model: the dense backbone the architecture was pruned from (same builder and options).
        architecture: what :func:`architecture_of` returned for the pruned network.

    Returns:
        ``model`` with new (freshly initialised) layers of the recorded widths; load the pruned weights next.

    Raises:
        ValueError: the format is unknown, or a layer is missing or of another type than recorded.
    """
    if architecture.get("format") != ARCHITECTURE_FORMAT:
        raise ValueError(f"architecture.format: {architecture.get('format')!r} not allowed; "
                         f"allowed: {ARCHITECTURE_FORMAT!r}")
    specs = architecture["layers"]
    dense = architecture_of(model)["layers"]
    missing = sorted(set(dense) - set(specs) - {n for n, s in dense.items() if s["type"] == "ChannelMapShortcut"})
    if missing:
        raise ValueError(f"architecture.layers: no entry for {missing[0]!r}; allowed: one entry per layer of the model")
    for name, spec in specs.items():
        try:
            current = model.get_submodule(name)
        except AttributeError:
            raise ValueError(f"architecture.layers: {name!r} is not a module of {type(model).__name__}") from None
        new = _resized(name, current, spec)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
    return model


def _resized(name: str, m: nn.Module, spec: dict[str, Any]) -> nn.Module:
    kind = spec.get("type")
    if kind == "Conv2d" and isinstance(m, nn.Conv2d):
        new = type(m)(spec["in_channels"], spec["out_channels"], m.kernel_size, stride=m.stride, padding=m.padding,
                      dilation=m.dilation, groups=spec["groups"], bias=m.bias is not None, padding_mode=m.padding_mode)
        return new.to(device=m.weight.device, dtype=m.weight.dtype)
    if kind == "BatchNorm" and isinstance(m, nn.modules.batchnorm._BatchNorm):
        new = type(m)(spec["num_features"], eps=m.eps, momentum=m.momentum, affine=m.affine,
                      track_running_stats=m.track_running_stats)
        ref = m.weight if m.affine else m.running_mean
        return new.to(device=ref.device, dtype=ref.dtype) if ref is not None else new
    if kind == "Linear" and isinstance(m, nn.Linear):
        new = nn.Linear(spec["in_features"], spec["out_features"], bias=m.bias is not None)
        return new.to(device=m.weight.device, dtype=m.weight.dtype)
    if kind == "ChannelMapShortcut" and next(m.parameters(), None) is None:
        return ChannelMapShortcut(spec["in_channels"], spec["out_channels"], spec["stride"], spec["src"], spec["dst"])
    raise ValueError(f"architecture.layers[{name!r}].type: {kind!r} does not fit {type(m).__name__}; "
                     "allowed: Conv2d, BatchNorm, Linear, ChannelMapShortcut on a layer of that kind")
