"""Dense vs BUnit form of a backbone, side by side: parameters and MACs per stage.

``bunitbench inspect BACKBONE --plan PRESET`` prints :func:`format_inspection` of :func:`inspect_backbone`.
Counts come from the one counter, :func:`baselines.counting.layer_macs` (its convention: conv and linear MACs
plus bias adds, equal to ptflops' aten backend). The BUnit form is counted as :func:`bunit.bunitify` builds it.
"""
from __future__ import annotations

import io
from typing import Any

import torch.nn as nn

from baselines.counting import layer_macs
from bunit.convert import bunitify
from bunit.layers import unit_layers
from bunit.spec import compact_specs
from harness.core.models import create_backbone

__all__ = ["inspect_backbone", "format_inspection", "sections"]


def sections(model: nn.Module) -> list[tuple[str, tuple[str, ...]]]:
    """Row labels and the module-name prefixes each covers: one row per top-level child, except that a
    ``features`` Sequential (VGG) is split into its stages at the MaxPool2d layers (``"features.7-13"``)."""
    out: list[tuple[str, tuple[str, ...]]] = []
    for name, child in model.named_children():
        if name == "features" and isinstance(child, nn.Sequential):
            start = 0
            for i, m in enumerate(child):
                if isinstance(m, nn.MaxPool2d) or i == len(child) - 1:
                    out.append((f"features.{start}-{i}", tuple(f"features.{j}" for j in range(start, i + 1))))
                    start = i + 1
        else:
            out.append((name, (name,)))
    return out


def _within(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _param_counts(model: nn.Module) -> dict[str, int]:
    return {n: p.numel() for n, p in model.named_parameters()}


def inspect_backbone(backbone: str | nn.Module, plan: str | dict[str, Any] | None = "paper", *, image_size: int = 32,
                     num_classes: int = 10, in_channels: int = 3, shortcut: str | None = None) -> list[dict[str, Any]]:
    """Params and MACs of a backbone dense and in its BUnit form, per stage / top-level child and in total.

    Args:
        backbone: a backbone name (built with ``create_backbone``) or a dense model.
        plan: a BUnit plan (preset name, ``"paper"`` for the paper's choice on this backbone, dict or JSON
            string); None means ``"paper"``.
        image_size: square input size for MACs.
        num_classes: classes, when ``backbone`` is a name.
        in_channels: input channels.
        shortcut: CIFAR-ResNet shortcut variant, when ``backbone`` is a name.

    Returns:
        Rows ``{"module", "dense_params", "bunit_params", "dense_macs", "bunit_macs", "params_saved",
        "macs_saved", "unit_layers", "units"}``; the last row is ``"total"`` (all parameters, all MACs);
        children with neither (ReLU, pooling) get no row. ``*_saved`` is the fraction removed
        (1 - bunit/dense; 0.0 when dense is 0); ``unit_layers`` counts the unit layers in the section and
        ``units`` summarises their unit rows (e.g. ``"9x[32x2-4-2]"``).
    """
    if isinstance(backbone, str):
        dense = create_backbone(backbone, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)
    else:
        dense = backbone
    converted = bunitify(dense, plan or "paper")
    shape = (in_channels, image_size, image_size)
    d_macs, b_macs = ({n: m for n, (m, _) in layer_macs(net, shape).items()} for net in (dense, converted))
    d_params, b_params = _param_counts(dense), _param_counts(converted)
    layers = unit_layers(converted)
    rows = []
    for label, prefixes in sections(converted):
        units = [",".join(compact_specs(m.specs)) for n, m in layers if _within(n, prefixes)]
        counts = [sum(v for k, v in d.items() if _within(k, prefixes)) for d in (d_params, b_params, d_macs, b_macs)]
        if any(counts):  # children without params or MACs (ReLU, pooling) get no row
            rows.append(_row(label, *counts, units))
    rows.append(_row("total", sum(d_params.values()), sum(b_params.values()), sum(d_macs.values()),
                     sum(b_macs.values()), [",".join(compact_specs(m.specs)) for _, m in layers]))
    return rows


def _row(label: str, dp: int, bp: int, dm: int, bm: int, units: list[str]) -> dict[str, Any]:
    distinct = list(dict.fromkeys(units))
    summary = "; ".join(f"{units.count(u)}x[{u}]" if units.count(u) > 1 else f"[{u}]" for u in distinct)
    return {"module": label, "dense_params": dp, "bunit_params": bp, "dense_macs": dm, "bunit_macs": bm,
            "params_saved": 1.0 - bp / dp if dp else 0.0, "macs_saved": 1.0 - bm / dm if dm else 0.0,
            "unit_layers": len(units), "units": summary}


def format_inspection(rows: list[dict[str, Any]], *, title: str | None = None, width: int = 120) -> str:
    """A plain-text table of :func:`inspect_backbone` rows (rich, no colour codes)."""
    from rich.console import Console
    from rich.table import Table

    table = Table(title=title, show_lines=False)
    for col, justify in (("module", "left"), ("params dense", "right"), ("params BUnit", "right"),
                         ("saved", "right"), ("MACs dense", "right"), ("MACs BUnit", "right"), ("saved", "right"),
                         ("units", "left")):
        table.add_column(col, justify=justify, overflow="fold")
    for i, r in enumerate(rows):
        if r["module"] == "total" and i:
            table.add_section()
        table.add_row(r["module"], f"{r['dense_params']:,}", f"{r['bunit_params']:,}", f"{r['params_saved']:.1%}",
                      f"{r['dense_macs']:,}", f"{r['bunit_macs']:,}", f"{r['macs_saved']:.1%}",
                      r["units"] if r["module"] != "total" else f"{r['unit_layers']} unit layers")
    buffer = io.StringIO()
    Console(file=buffer, width=width, color_system=None, force_terminal=False).print(table)
    return buffer.getvalue()
