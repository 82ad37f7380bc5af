"""Figures of the verdict: a heat map of method - BUnit at fixed cost reductions, and curves with 95% bands.

Every plotted number comes from :mod:`harness.analyse.verdict` (the same interpolation and intervals as the report's
tables). Built on ``matplotlib.figure.Figure`` like :mod:`harness.analyse.plots`, and saved next to its figures.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.colors
import numpy as np
import pandas as pd
from matplotlib.figure import Figure

from harness.analyse.latency_source import LatencyTable
from harness.analyse.metrics import COST_AXES, add_relative_metrics
from harness.analyse.plots import (PANEL_W, RC, file_slug, legend_ncol, method_styles, panel_figure, save_figure,
                                   setting_label)
from harness.analyse.stats import mean_interval
from harness.analyse.verdict import BUNIT, Curves, build_curves, compare_area, compare_points
from harness.analyse.verdict_report import AXIS_NAMES

__all__ = ["plot_verdict_heatmap", "plot_curve_bands", "band", "write_verdict_plots"]

_SYMBOL = {"bunit better": "\u25b2", "bunit worse": "\u25bc", "indistinguishable": "\u2248", "too few seeds": "?",
           "below resolution": "<1 img", "zero-width interval": "no spread"}
_NO_VALUE = {"not reached": "n/r", "bunit not reached": "n/r", "too sparse here": "gap", "bunit too sparse here": "gap",
             "not judged": "n/j"}
CLIP = 5.0  # colour scale: |delta| beyond this many points is shown at full colour


def band(cur: Curves, name: str, n: int = 60) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Seed mean and 95% t-band of one curve on a grid of ``x`` spanning where any seed has a value.

    Returns:
        ``(x, mean, lo, hi)``; ``lo``/``hi`` are NaN where fewer than two seeds reach.
    """
    seeds = [c for c in cur.curves[name].values() if len(c[0])]
    if not seeds:
        return (np.array([]),) * 4
    lo_x = min(c[0][0] for c in seeds)
    hi_x = max(c[0][-1] for c in seeds)
    knots = np.concatenate([c[0] for c in seeds])
    grid = np.unique(np.r_[np.linspace(lo_x, hi_x, n), knots])
    stats = [mean_interval(cur.at(name, x).values()) for x in grid]
    return (grid, np.array([s.mean for s in stats]), np.array([s.lo for s in stats]), np.array([s.hi for s in stats]))


def plot_curve_bands(metrics: pd.DataFrame, axis: str, *, latency: LatencyTable | None = None,
                     styles: dict[str, tuple[str, str, str]] | None = None) -> Figure:
    """Top-1 against cost relative to dense (log axis) per setting: each curve's seed mean and 95% band."""
    curves = [c for c in build_curves(metrics, axis, latency=latency) if c.curves]
    styles = styles or method_styles(metrics)
    with matplotlib.rc_context(RC):
        fig, axes, cols = panel_figure(len(curves), panel_h=2.7)
        handles = {}
        for ax, cur in zip(axes, curves):
            means = []
            for name in sorted(cur.curves, key=lambda n: (n != BUNIT, n)):
                x, mean, lo, hi = band(cur, name)
                if not len(x):
                    continue
                means.append(mean)
                colour, _, ls = styles.get(name.split(" (")[0], ("0.4", "o", "-"))
                handles[name] = ax.plot(np.exp(x), mean, ls, color=colour, lw=1.1, label=name)[0]
                ok = np.isfinite(lo) & np.isfinite(hi)
                ax.fill_between(np.exp(x), lo, hi, where=ok, color=colour, alpha=0.18, lw=0)
            dense = list(cur.dense.values())
            if dense:
                ax.plot([1.0], [float(np.mean(dense))], "*", color="#222222", ms=9, mec="white", mew=0.5)
            if means:  # the means set the view; a band wider than it (few seeds) is cut at its edge
                values = np.concatenate(means)
                ax.set_ylim(max(0.0, np.nanmin(values) - 2.0), min(100.5, np.nanmax(values) + 1.0))
            ax.set_xscale("log")
            ax.set_xlabel(f"{AXIS_NAMES[axis]}, relative to dense")
            ax.set_ylabel("Top-1 accuracy (%)")
            ax.set_title(setting_label(cur.setting))
            ax.grid(True, lw=0.4, alpha=0.4)
        hs = list(handles.values())
        if hs:
            fig.legend(handles=hs, loc="outside lower center", ncol=legend_ncol(hs, PANEL_W * cols), frameon=False)
    return fig


def plot_verdict_heatmap(points: pd.DataFrame, area: pd.DataFrame) -> Figure:
    """Method - BUnit per fixed reduction (columns) and method (rows); one panel per (axis, setting)."""
    fixed = points[points["point_kind"] == "reduction"]
    panels = list(fixed.groupby(["axis", "backbone"], sort=False)) if len(fixed) else []
    panels.sort(key=lambda p: COST_AXES.index(p[0][0]))
    cols = max(1, fixed["backbone"].nunique()) if len(fixed) else 1
    norm = matplotlib.colors.TwoSlopeNorm(vmin=-CLIP, vcenter=0.0, vmax=CLIP)
    cmap = matplotlib.colormaps["RdBu"]
    with matplotlib.rc_context(RC):
        n_methods = max((p[1]["method"].nunique() for p in panels), default=1)
        fig, axes, _ = panel_figure(len(panels), panel_h=0.45 * n_methods + 0.9, panel_w=PANEL_W * 1.3, cols=cols)
        image = None
        for ax, ((axis, backbone), part) in zip(axes, panels):
            methods = list(dict.fromkeys(part["method"]))
            labels = list(dict.fromkeys(part["point"])) + ["area"]
            grid = np.full((len(methods), len(labels)), np.nan)
            for i, m in enumerate(methods):
                for j, p in enumerate(labels):
                    hit = (area[(area["axis"] == axis) & (area["backbone"] == backbone) & (area["method"] == m)]
                           if p == "area" else part[(part["method"] == m) & (part["point"] == p)])
                    if hit.empty:
                        continue
                    h = hit.iloc[0]
                    grid[i, j] = h["diff"]
                    text = (f"{h['diff']:+.1f}\n{_SYMBOL.get(h['label'], '')}" if np.isfinite(h["diff"])
                            else _NO_VALUE.get(h["label"], ""))
                    ax.text(j, i, text, ha="center", va="center", fontsize=7,
                            color="white" if np.isfinite(h["diff"]) and abs(h["diff"]) > 0.6 * CLIP else "black")
            ax.set_facecolor("0.88")
            image = ax.imshow(grid, cmap=cmap, norm=norm, aspect="auto")
            ax.set_xticks(range(len(labels)), [lab.replace(" less", "") for lab in labels])
            ax.set_yticks(range(len(methods)), methods)
            ax.set_title(f"{AXIS_NAMES[axis]} \u00b7 {backbone}")
            ax.tick_params(length=0)
        if image is not None:
            fig.colorbar(image, ax=list(axes[:len(panels)]), shrink=0.8,
                         label="\u0394 = method \u2212 BUnit (top-1 points)")
        fig.suptitle("\u25b2 BUnit better, \u25bc BUnit worse, \u2248 indistinguishable (95%);\n"
                     "n/r not reached, gap: too "
                     "sparse here, n/j: not judged (busy timings)")
    return fig


def write_verdict_plots(results: Any, out_dir: str | os.PathLike, *, latency: LatencyTable | None = None,
                        formats: tuple[str, ...] = ("png", "svg"), dpi: int = 200) -> list[Path]:
    """Per dataset: ``verdict_<dataset>`` and ``curves_{macs,params,latency}_<dataset>``; PNG and SVG each.

    Args:
        results: raw rows or :func:`add_relative_metrics` rows.
        out_dir: where to write.
        latency: the timing pass's ratios (latency axis).
        formats: file formats.
        dpi: resolution of raster formats.

    Returns:
        The written files (none when the rows hold no BUnit curve).
    """
    metrics = results if "reduction_params" in results.columns else add_relative_metrics(results)
    if metrics.empty:
        return []
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    styles = method_styles(metrics)
    written: list[Path] = []
    for dataset, part in metrics.groupby("dataset", sort=True, dropna=False):
        points = compare_points(part, latency=latency)
        if points.empty:
            continue
        slug = file_slug(dataset)
        written += save_figure(plot_verdict_heatmap(points, compare_area(part, latency=latency)), out_dir,
                         f"verdict_{slug}", formats, dpi)
        for axis in COST_AXES:
            if any(c.curves for c in build_curves(part, axis, latency=latency)):
                written += save_figure(plot_curve_bands(part, axis, latency=latency, styles=styles), out_dir,
                                 f"curves_{axis}_{slug}", formats, dpi)
    return written
