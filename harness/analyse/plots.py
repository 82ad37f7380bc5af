"""Comparison plots: accuracy against MACs, parameters and measured latency, and the two trade-off metrics.

Every plotted number comes from :func:`harness.analyse.metrics.summarize` (mean and std over seeds). Figures are
built on ``matplotlib.figure.Figure`` directly (no pyplot, so no global backend or interactive state) and saved as PNG
and SVG (text kept as text) under ``RESULTS_DIR/plots/``. Sizes follow a paper column: about 3.5 in per panel,
fonts of 7-8 pt. The verdict's curves with 95% bands and its heat map are drawn by
:mod:`harness.analyse.verdict_plots`, which :func:`harness.analyse.report.write_report` calls next to these.
"""
from __future__ import annotations

import math
import os
import re
import textwrap
from pathlib import Path
from typing import Any

import matplotlib
import matplotlib.ticker
import numpy as np
import pandas as pd
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from harness.analyse.metrics import (COST_AXES, SETTING_KEYS, add_relative_metrics, family_rank, summarize,
                                     target_sort_key)
from harness.core.store import load_results

__all__ = ["FAMILY_COLORS", "RC", "PANEL_W", "method_styles", "setting_label", "plot_tradeoff", "plot_metric_bars",
           "write_plots", "prepare_summary", "save_figure", "file_slug", "legend_ncol", "panel_figure"]

FAMILY_COLORS = {"dense": "#222222", "bunit": "#d62728", "unstructured": "#1f77b4", "structured": "#2ca02c"}
_EXTRA_COLORS = ("#9467bd", "#ff7f0e", "#8c564b", "#e377c2", "#17becf", "#bcbd22")
_LINESTYLES = ("-", "--", ":", "-.")
_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "<", ">", "h", "p", "d")
PANEL_W = 3.5  # inches
LOG_RATIO = 20.0  # a cost axis turns logarithmic when max / min exceeds this
RC = {
    "font.size": 8, "axes.titlesize": 8, "axes.labelsize": 8, "xtick.labelsize": 7, "ytick.labelsize": 7,
    "legend.fontsize": 7, "figure.titlesize": 9, "axes.linewidth": 0.6, "lines.linewidth": 1.0,
    "svg.fonttype": "none", "svg.hashsalt": "bunit-bench", "font.family": "DejaVu Sans",
}
_AXIS = {  # axis -> (summary column stem, label, unit kind)
    "params": ("cost_params", "Parameters, non-zero", "count"),
    "macs": ("cost_macs", "MACs, non-zero weights", "count"),
    "latency": ("cost_latency", "Latency, batch 1, median", "ms"),
}
_METRIC_LABEL = {
    "acc_cost": ("ACC", "pts / %", "ACC$_c$ = top-1 points lost per % of cost c removed (lower is better)"),
    "eff": ("EFF", "fraction", "EFF$_c$ = fraction of cost c removed \u00d7 accuracy kept (higher is better)"),
}


def prepare_summary(results: Any) -> pd.DataFrame:
    """Summary of a results directory, a raw row frame, a metrics frame or an existing summary.

    Args:
        results: path of a suite directory, or a DataFrame of rows or of :func:`summarize` output.

    Returns:
        The :func:`harness.analyse.metrics.summarize` frame.
    """
    if isinstance(results, pd.DataFrame):
        df = results
    else:
        df = load_results(results)
    if "top1_mean" in df.columns:
        return df
    if df.empty:
        return pd.DataFrame()
    return summarize(add_relative_metrics(df))



def method_styles(summary: pd.DataFrame) -> dict[str, tuple[str, str, str]]:
    """A (colour, marker, line style) per method: colour by family; marker, and line style within a family, by method.

    Args:
        summary: a :func:`summarize` frame.

    Returns:
        ``{method: (colour, marker, linestyle)}``; dense gets black and a star.
    """
    pairs = summary[["method", "family"]].drop_duplicates()
    pairs = sorted(((str(m), str(f)) for m, f in pairs.itertuples(index=False)),
                   key=lambda p: (family_rank(p[1]), p[0]))
    extra = iter(_EXTRA_COLORS * 4)
    colours: dict[str, str] = dict(FAMILY_COLORS)
    styles: dict[str, tuple[str, str, str]] = {}
    markers = iter(_MARKERS * 4)
    in_family: dict[str, int] = {}
    for method, family in pairs:
        if family not in colours:
            colours[family] = next(extra)
        k = in_family[family] = in_family.get(family, -1) + 1
        marker = "*" if family == "dense" else next(markers)
        styles[method] = (colours[family], marker, _LINESTYLES[k % len(_LINESTYLES)])
    return styles


def setting_label(row: pd.Series | dict, *, with_size: bool = False) -> str:
    """Panel title of a setting: backbone, shortcut variant, and image size when a dataset has several."""
    label = str(row["backbone"])
    shortcut = row.get("shortcut")
    if isinstance(shortcut, str) and shortcut:
        label += f" (shortcut {shortcut})"
    size = row.get("image_size")
    if with_size and size is not None and not (isinstance(size, float) and math.isnan(size)):
        label += f", {int(size)} px"
    return label


def _settings(summary: pd.DataFrame) -> list[tuple[tuple, pd.DataFrame]]:
    keys = [k for k in SETTING_KEYS if k in summary.columns and k != "dataset"]
    out = []
    for key, part in summary.groupby(keys, sort=True, dropna=False):
        out.append((key if isinstance(key, tuple) else (key,), part))
    return out


def _count_scale(values: np.ndarray) -> tuple[float, str]:
    top = np.nanmax(values) if np.isfinite(values).any() else 1.0
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if top >= div:
            return div, unit
    return 1.0, ""


def file_slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", str(text)).strip("_") or "dataset"


def panel_figure(n: int, *, panel_h: float, extra_h: float = 0.6, panel_w: float = PANEL_W, cols: int | None = None,
                 max_cols: int = 3) -> tuple[Figure, np.ndarray, int]:
    """A constrained-layout figure of ``n`` panels in a grid (at most ``max_cols`` a row), the unused ones hidden.

    Must be called inside ``matplotlib.rc_context(RC)``.

    Args:
        n: panels wanted (at least one is made).
        panel_h: height of one panel row, inches.
        extra_h: height added for titles and the legend, inches.
        panel_w: width of one panel, inches.
        cols: columns (default: ``min(n, max_cols)``).
        max_cols: the most columns when ``cols`` is None.

    Returns:
        ``(figure, axes flattened, columns)``; ``axes[:n]`` are the panels to draw in.
    """
    cols = cols or max(1, min(n, max_cols))
    rows = max(1, math.ceil(n / cols))
    fig = Figure(figsize=(panel_w * cols, panel_h * rows + extra_h), layout="constrained")
    axes = np.atleast_1d(fig.subplots(rows, cols, squeeze=False)).ravel()
    for ax in axes[n:]:
        ax.set_visible(False)
    return fig, axes, cols


def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def _draw_method(ax, mpart: pd.DataFrame, stem: str, div: float, origin: tuple[float, float] | None,
                 style: tuple[str, str, str], family: str) -> bool:
    """One method's seed means with one-std error bars, joined to the dense origin; False when it has no point."""
    colour, marker, ls = style
    mpart = mpart[np.isfinite(mpart[f"{stem}_mean"].to_numpy(dtype=float))].sort_values(f"{stem}_mean",
                                                                                          ascending=False)
    if mpart.empty:
        return False
    x = mpart[f"{stem}_mean"].to_numpy(dtype=float) / div
    y = mpart["top1_mean"].to_numpy(dtype=float)
    xerr = np.nan_to_num(mpart[f"{stem}_std"].to_numpy(dtype=float) / div)
    yerr = np.nan_to_num(mpart["top1_std"].to_numpy(dtype=float))
    if family == "dense":
        ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=10, color=colour, mec="white", mew=0.5,
                    ecolor=colour, elinewidth=0.7, capsize=1.5, zorder=5)
        return True
    lx, ly = (np.r_[origin[0], x], np.r_[origin[1], y]) if origin else (x, y)
    ax.plot(lx, ly, ls, color=colour, lw=0.9, alpha=0.6, zorder=2)
    ax.errorbar(x, y, xerr=xerr, yerr=yerr, fmt=marker, ms=4.5, color=colour, mec="white", mew=0.4, ecolor=colour,
                elinewidth=0.7, capsize=1.5, zorder=4)
    return True


def _log_x_when_wide(ax, values: np.ndarray) -> None:
    """A log x axis with readable ticks when the costs span more than ``LOG_RATIO``."""
    positive = values[np.isfinite(values) & (values > 0)]
    if not len(positive) or positive.max() / positive.min() <= LOG_RATIO:
        return
    ax.set_xscale("log")
    decades = math.log10(positive.max() / positive.min())
    subs = (1.0, 2.0, 5.0) if decades < 1.5 else (1.0, 3.0) if decades < 2.5 else (1.0,)
    ax.xaxis.set_major_locator(matplotlib.ticker.LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def _tradeoff_panel(ax, part: pd.DataFrame, axis: str, styles: dict, title: str) -> dict[str, str]:
    """One setting's panel of :func:`plot_tradeoff`; returns ``{method: family}`` of what it drew."""
    stem, name, kind = _AXIS[axis]
    x_all = part[f"{stem}_mean"].to_numpy(dtype=float)
    div, unit = _count_scale(x_all) if kind == "count" else (1.0, "ms")
    dense = part[part["family"] == "dense"]
    origin = None
    if len(dense) and _finite(dense[f"{stem}_mean"].iloc[0]):
        origin = (dense[f"{stem}_mean"].iloc[0] / div, dense["top1_mean"].iloc[0])
    used = {}
    for method, mpart in part.groupby("method", sort=False):
        family = str(mpart["family"].iloc[0])
        if _draw_method(ax, mpart, stem, div, origin, styles[str(method)], family):
            used[str(method)] = family
    front = part[part[f"pareto_{axis}"].astype(bool)].sort_values(f"{stem}_mean")
    if len(front):
        ax.step(front[f"{stem}_mean"].to_numpy(dtype=float) / div, front["top1_mean"].to_numpy(dtype=float),
                where="post", color="0.55", lw=2.4, alpha=0.35, zorder=1, solid_capstyle="round")
    _log_x_when_wide(ax, x_all)
    ax.set_xlabel(f"{name} ({unit if kind == 'ms' or unit else 'count'})")
    ax.set_ylabel("Top-1 accuracy (%)")
    ax.set_title(title)
    ax.grid(True, lw=0.4, alpha=0.4)
    ax.tick_params(width=0.6, length=2.5)
    return used


def plot_tradeoff(summary: pd.DataFrame, axis: str, *, styles: dict[str, tuple[str, str, str]] | None = None) -> Figure:
    """Top-1 against one cost axis, one panel per backbone of a single dataset.

    Each method is a line of its targets that starts at the dense model (the shared origin); markers are seed means
    with error bars of one std in both directions; the grey staircase is the Pareto front of the seed means.

    Args:
        summary: :func:`summarize` rows of one dataset.
        axis: ``"params"``, ``"macs"`` or ``"latency"``.
        styles: ``method_styles`` output shared across figures (computed from ``summary`` when None).

    Returns:
        The figure (not saved).
    """
    if axis not in _AXIS:
        raise ValueError(f"axis: {axis!r} not allowed; allowed: {', '.join(_AXIS)}")
    styles = styles or method_styles(summary)
    settings = _settings(summary)
    multi_size = summary["image_size"].nunique(dropna=False) > 1 if "image_size" in summary.columns else False
    with matplotlib.rc_context(RC):
        fig, axes, cols = panel_figure(len(settings), panel_h=2.6, extra_h=0.55)
        used: dict[str, str] = {}
        for ax, (_, part) in zip(axes, settings):
            used.update(_tradeoff_panel(ax, part, axis, styles, setting_label(part.iloc[0], with_size=multi_size)))
        handles = _legend_handles(used, styles)
        handles.append(Line2D([], [], color="0.55", lw=2.4, alpha=0.35, label="Pareto front"))
        ncol = legend_ncol(handles, PANEL_W * cols)
        fig.legend(handles=handles, loc="outside lower center", ncol=ncol, frameon=False, handletextpad=0.4,
                   columnspacing=1.2)
        rows = math.ceil(len(settings) / cols) if settings else 1
        fig.set_size_inches(PANEL_W * cols, 2.6 * rows + 0.3 + 0.17 * math.ceil(len(handles) / ncol))
    return fig


def _legend_handles(used: dict[str, str], styles: dict[str, tuple[str, str, str]]) -> list:
    handles = []
    for method, family in sorted(used.items(), key=lambda kv: (family_rank(kv[1]), kv[0])):
        colour, marker, ls = styles[method]
        label = method if family in (method, "dense") else f"{method} ({family})"
        handles.append(Line2D([], [], color=colour, marker=marker, ms=8 if marker == "*" else 4.5,
                              ls=ls, lw=0 if family == "dense" else 0.9, mec="white", mew=0.4, label=label))
    return handles


def legend_ncol(handles: list, width_in: float) -> int:
    """Legend columns that fit ``width_in``: every column is as wide as the longest entry (7 pt text)."""
    longest = max((len(re.sub(r"\$[^$]*\$", "xx", h.get_label())) for h in handles), default=1)
    entry_in = 0.05 * longest + 0.5  # ~0.05 in per character at 7 pt, plus handle and spacing
    return max(1, min(len(handles), int(width_in // entry_in)))


def _clip_limit(values: np.ndarray) -> float | None:
    """An axis half-width that keeps one extreme bar from flattening the rest; None when no clipping is needed."""
    mags = np.sort(np.abs(values[np.isfinite(values)]))[::-1]
    if len(mags) >= 3 and mags[0] > 3 * mags[1] and mags[1] > 0:
        return 1.6 * mags[1]
    return None


def _bar_positions(body: pd.DataFrame) -> tuple[list, dict[tuple[str, str], float], float]:
    """Categories (family, method, target) in table order, their y positions (a gap between methods), total height."""
    cats = body[["family", "method", "target_label"]].drop_duplicates()
    cats = sorted(cats.itertuples(index=False), key=lambda c: (family_rank(c.family), c.method,
                                                                target_sort_key(c.target_label)))
    ypos, y, prev = {}, 0.0, None
    for c in cats:
        if prev is not None and c.method != prev:
            y += 0.5
        ypos[(c.method, c.target_label)] = y
        y += 1.0
        prev = c.method
    return cats, ypos, y


def _bars_panel(ax, part: pd.DataFrame, column: str, ypos: dict, styles: dict) -> bool:
    """Bars of one metric column with one-std error bars, clipped so one extreme bar does not flatten the rest;
    returns whether any value was n/a."""
    vals = part[f"{column}_mean"].to_numpy(dtype=float)
    lim = _clip_limit(vals)
    any_na = False
    for (_, row), v in zip(part.iterrows(), vals):
        yy = ypos[(row["method"], row["target_label"])]
        if not np.isfinite(v):
            any_na = True
            ax.text(0, yy, " n/a", va="center", ha="left", fontsize=7, color="0.45")
            continue
        err = row[f"{column}_std"]
        shown = v if lim is None else float(np.clip(v, -lim, lim))
        ax.barh(yy, shown, height=0.8, color=styles[str(row["method"])][0], alpha=0.85, lw=0)
        if _finite(err) and shown == v:
            ax.errorbar(v, yy, xerr=err, fmt="none", ecolor="0.2", elinewidth=0.6, capsize=1.5)
        if shown != v:
            ax.text(shown, yy, f" {v:.3g} \u2192" if v > 0 else f"\u2190 {v:.3g} ",
                    va="center", ha="right" if v > 0 else "left", fontsize=7, color="white")
    if lim is not None:
        errs = np.nan_to_num(part[f"{column}_std"].to_numpy(dtype=float))
        low = float(np.nanmin(np.r_[0.0, (vals - errs)[np.abs(vals) <= lim]]))
        ax.set_xlim(1.1 * low if low < 0 else -0.03 * lim, lim)
    ax.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(nbins=5))
    ax.axvline(0, color="0.3", lw=0.6)
    ax.grid(True, axis="x", lw=0.4, alpha=0.4)
    ax.tick_params(width=0.6, length=2.5)
    return any_na


def plot_metric_bars(summary: pd.DataFrame, metric: str, *,
                     styles: dict[str, tuple[str, str, str]] | None = None) -> Figure:
    """One trade-off metric as horizontal bars per method and target; rows = cost axes, columns = backbones.

    Args:
        summary: :func:`summarize` rows of one dataset.
        metric: ``"acc_cost"`` (ACC_c) or ``"eff"`` (EFF_c).
        styles: ``method_styles`` output (computed from ``summary`` when None).

    Returns:
        The figure (not saved). Bars are seed means with one-std error bars; a NaN mean is marked ``n/a``; a bar
        beyond the clipped axis ends in an arrow with its value.
    """
    if metric not in _METRIC_LABEL:
        raise ValueError(f"metric: {metric!r} not allowed; allowed: {', '.join(_METRIC_LABEL)}")
    styles = styles or method_styles(summary)
    body = summary[summary["family"] != "dense"]
    cats, ypos, height = _bar_positions(body)
    settings = _settings(body)
    multi_size = summary["image_size"].nunique(dropna=False) > 1 if "image_size" in summary.columns else False
    ncols = max(1, len(settings))
    short, unit, meaning = _METRIC_LABEL[metric]
    with matplotlib.rc_context(RC):
        fig = Figure(figsize=(PANEL_W * ncols, (0.45 + 0.16 * max(height, 1)) * len(COST_AXES) + 0.5),
                     layout="constrained")
        axes = fig.subplots(len(COST_AXES), ncols, squeeze=False, sharey=True)
        any_na = False
        for r, axis in enumerate(COST_AXES):
            for c, (_, part) in enumerate(settings):
                ax = axes[r, c]
                any_na |= _bars_panel(ax, part, f"{metric}_{axis}", ypos, styles)
                ax.set_yticks([ypos[(k.method, k.target_label)] for k in cats],
                              [f"{k.method} {k.target_label}" for k in cats])
                ax.set_xlabel(f"{short}$_{{\\mathrm{{{axis}}}}}$ ({unit})")
                if r == 0:
                    ax.set_title(setting_label(part.iloc[0], with_size=multi_size))
        axes[0, 0].invert_yaxis()  # shared: first category on top in every panel
        present = sorted({str(f) for f in body["family"]}, key=family_rank)
        handles = [Patch(color=styles[str(body[body["family"] == f]["method"].iloc[0])][0], alpha=0.85, label=f)
                   for f in present]
        why = "R$_c \\leq$ 0 or no dense reference" if metric == "acc_cost" else "no dense reference"
        fig.legend(handles=handles, loc="outside lower center", ncol=legend_ncol(handles, PANEL_W * ncols),
                   frameon=False)
        width = int(PANEL_W * ncols * 13)
        title = textwrap.fill(meaning, width=width)
        fig.suptitle(title + "\n" + textwrap.fill(f"n/a: {why}", width=width) if any_na else title, linespacing=1.4)
    return fig


def save_figure(fig: Figure, out_dir: Path, stem: str, formats: tuple[str, ...], dpi: int) -> list[Path]:
    paths = []
    with matplotlib.rc_context(RC):
        for fmt in formats:
            path = out_dir / f"{stem}.{fmt}"
            meta = {"Date": None} if fmt == "svg" else {"Software": None}
            fig.savefig(path, dpi=dpi, metadata=meta)
            paths.append(path)
    return paths


def write_plots(results: Any, out_dir: str | os.PathLike | None = None, *, formats: tuple[str, ...] = ("png", "svg"),
                dpi: int = 200) -> list[Path]:
    """Write every comparison figure of a suite.

    Per dataset: ``accuracy_vs_{macs,params,latency}_<dataset>`` and ``metric_{acc,eff}_<dataset>``, each as PNG
    and SVG.

    Args:
        results: suite directory (``RESULTS_DIR``), or a DataFrame of rows / metrics / summary.
        out_dir: where to write; defaults to ``RESULTS_DIR/plots``; required when ``results`` is a DataFrame.
        formats: file formats, any matplotlib supports.
        dpi: resolution of raster formats.

    Returns:
        The written files, in order.
    """
    if out_dir is None:
        if isinstance(results, pd.DataFrame):
            raise ValueError("out_dir: required when results is a DataFrame")
        out_dir = Path(results) / "plots"
    out_dir = Path(out_dir)
    summary = prepare_summary(results)
    if summary.empty:
        return []
    out_dir.mkdir(parents=True, exist_ok=True)
    styles = method_styles(summary)
    written: list[Path] = []
    for dataset, part in summary.groupby("dataset", sort=True, dropna=False):
        slug = file_slug(dataset)
        for axis in ("macs", "params", "latency"):
            if not np.isfinite(part[f"{_AXIS[axis][0]}_mean"].to_numpy(dtype=float)).any():
                continue
            written += save_figure(plot_tradeoff(part, axis, styles=styles), out_dir, f"accuracy_vs_{axis}_{slug}",
                             formats, dpi)
        if (part["family"] != "dense").any():
            for metric, tag in (("acc_cost", "acc"), ("eff", "eff")):
                written += save_figure(plot_metric_bars(part, metric, styles=styles), out_dir, f"metric_{tag}_{slug}",
                                 formats, dpi)
    return written
