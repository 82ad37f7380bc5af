"""The verdict: every method as a curve of top-1 against log cost, compared with BUnit at equal cost, with intervals.

Curves. Per setting (dataset, backbone, shortcut, image size), cost axis (params, MACs: the sparse-aware non-zero
counts of :mod:`harness.analyse.metrics`; latency) and seed, a method's curve is top-1 against
``x = log(cost / cost_dense)`` = ``log(1 - R_c)`` over its targets, with the dense model of the same seed as the
shared origin (``x = 0``, reduction 0), joined piecewise-linearly. A method is its name plus its schedule when that
is not ``oneshot``; all of a method's targets (presets, plans, ratios, cost targets) lie on one curve.

Reading a curve at a cost is interpolation between that seed's points, **never extrapolation**: a seed whose curve
does not span the cost has no value there, and a method none of whose seeds reached it is "not reached".

Comparisons (:func:`compare_points`), per setting and axis, at the costs where BUnit stands (the seed mean of ``x``
of each BUnit target) and at the fixed reductions :data:`REDUCTIONS`: each method's top-1 minus BUnit's, with the
95% interval of :mod:`harness.analyse.stats` (paired by seed) and its label: ``bunit better`` (interval below 0),
``bunit worse`` (above 0), ``indistinguishable`` (straddles 0 at this number of seeds), ``too few seeds``,
``not reached`` / ``bunit not reached``.

Area (:func:`compare_area`): per seed, the mean top-1 over ``x`` from the common end ``x_c`` to 0 (the area under
the curve divided by the width), where ``x_c`` is the least compressed "deepest point every seed reached" among the
curves that reach at least :data:`AREA_MIN_REDUCTION`; a curve that does not span ``[x_c, 0]`` has no area (e.g.
unstructured sparsity on the latency axis). Reported with its interval and its paired difference to BUnit.

Latency: with a timing table (:mod:`harness.analyse.latency_source`), a timed row's ``x`` is the log of its paired
ratio to dense; other rows use their own latency columns (timed in isolation, against the dense row's own timing).
"""
from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from harness.analyse.latency_source import LatencyTable
from harness.analyse.metrics import COST_AXES, SETTING_KEYS, add_relative_metrics
from harness.analyse.stats import Interval, diff_interval, label, mean_interval

__all__ = ["REDUCTIONS", "AREA_MIN_REDUCTION", "BUNIT", "curve_name", "Curves", "build_curves", "value_at",
           "compare_points", "compare_area"]

REDUCTIONS = (0.5, 0.75, 0.9, 0.95)
AREA_MIN_REDUCTION = 0.5
BUNIT = "bunit"
_EPS = 1e-9

SeedCurve = tuple[np.ndarray, np.ndarray]  # x sorted ascending, top-1


def curve_name(method: Any, schedule: Any) -> str:
    """A curve's name: the method, plus ``(schedule)`` unless the schedule is ``oneshot`` or missing."""
    if isinstance(schedule, str) and schedule and schedule != "oneshot":
        return f"{method} ({schedule})"
    return str(method)


def value_at(curve: SeedCurve, x: float) -> float:
    """Top-1 of one seed's curve at ``x`` by linear interpolation; NaN outside the curve (no extrapolation)."""
    xs, ys = curve
    if not np.isfinite(x) or len(xs) == 0 or x < xs[0] - _EPS or x > xs[-1] + _EPS:
        return math.nan
    return float(np.interp(x, xs, ys))


def _seed_curve(points: list[tuple[float, float]]) -> SeedCurve:
    """Sorted, finite points; equal ``x`` averaged."""
    pts = [(x, y) for x, y in points if np.isfinite(x) and np.isfinite(y)]
    if not pts:
        return np.array([]), np.array([])
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    ux, inverse = np.unique(np.round(xs, 12), return_inverse=True)
    uy = np.bincount(inverse, weights=ys) / np.bincount(inverse)
    return ux, uy


class Curves:
    """The curves of one setting on one axis.

    Attributes:
        setting: ``{dataset, backbone, shortcut, image_size}``.
        axis: the cost axis.
        curves: ``{curve name: {seed: (x, top-1)}}`` (the dense origin included in every seed's curve).
        family: ``{curve name: family}``.
        dense: ``{seed: dense top-1}``.
        bunit_points: ``[(target label, mean x over seeds)]`` of the BUnit curve.
        sources: ``{"pass": rows timed by the timing pass, "isolated": rows timed alone}`` (latency axis).
    """

    def __init__(self, setting: dict[str, Any], axis: str):
        self.setting, self.axis = setting, axis
        self.curves: dict[str, dict[int, SeedCurve]] = {}
        self.family: dict[str, str] = {}
        self.dense: dict[int, float] = {}
        self.bunit_points: list[tuple[str, float]] = []
        self.sources = {"pass": 0, "isolated": 0}

    def at(self, name: str, x: float) -> dict[int, float]:
        """``{seed: top-1}`` of a curve at ``x`` (NaN where the seed's curve does not span ``x``)."""
        return {s: value_at(c, x) for s, c in self.curves.get(name, {}).items()}

    def reach(self, name: str) -> float:
        """The deepest ``x`` every seed of the curve reached (0 when a seed has only the origin)."""
        mins = [c[0].min() for c in self.curves.get(name, {}).values() if len(c[0])]
        return float(max(mins)) if mins else 0.0


def _row_x(metrics: pd.DataFrame, axis: str, latency: LatencyTable | None) -> tuple[pd.Series, pd.Series]:
    """``x = log(cost / cost_dense)`` per row and where the latency came from (``pass`` / ``isolated``)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(1.0 - pd.to_numeric(metrics[f"reduction_{axis}"], errors="coerce").astype(float))
    source = pd.Series("isolated" if axis == "latency" else "", index=metrics.index)
    if axis == "latency" and latency is not None and "key" in metrics.columns:
        ratio = metrics["key"].map(latency.ratio)
        timed = ratio.notna()
        with np.errstate(divide="ignore", invalid="ignore"):
            x = x.where(~timed, np.log(ratio.astype(float)))
        source = source.where(~timed, "pass")
    return x.where(np.isfinite(x)), source


def build_curves(metrics: pd.DataFrame, axis: str, *, latency: LatencyTable | None = None) -> list[Curves]:
    """The curves of every setting on ``axis`` from :func:`add_relative_metrics` rows (raw rows are passed through).

    Args:
        metrics: per-row metrics (ok rows).
        axis: ``params``, ``macs`` or ``latency``.
        latency: a timing table to read latency ratios from (latency axis only).

    Returns:
        One :class:`Curves` per setting, in the order the settings first appear.
    """
    if axis not in COST_AXES:
        raise ValueError(f"axis: {axis!r} not allowed; allowed: {', '.join(COST_AXES)}")
    if "reduction_params" not in metrics.columns:
        metrics = add_relative_metrics(metrics)
    if metrics.empty:
        return []
    df = metrics.copy()
    df["_x"], df["_source"] = _row_x(df, axis, latency)
    df["_curve"] = [curve_name(m, s) for m, s in zip(df["method"], df.get("schedule", pd.Series(None, df.index)))]
    keys = [k for k in SETTING_KEYS if k in df.columns]
    out = []
    for values, part in df.groupby(keys, sort=False, dropna=False):
        cur = Curves(dict(zip(keys, values if isinstance(values, tuple) else (values,))), axis)
        dense = part[part["family"] == "dense"]
        cur.dense = {int(s): float(t) for s, t in zip(dense["seed"], dense["top1"]) if np.isfinite(t)}
        for name, rows in part[part["family"] != "dense"].groupby("_curve", sort=False):
            cur.family[name] = str(rows["family"].iloc[0])
            cur.curves[name] = {}
            for seed, seed_rows in rows.groupby("seed", sort=True):
                if int(seed) not in cur.dense:
                    continue  # no dense reference: no relative cost, no origin
                pts = [(0.0, cur.dense[int(seed)])] + list(zip(seed_rows["_x"], seed_rows["top1"].astype(float)))
                cur.curves[name][int(seed)] = _seed_curve(pts)
            if name == BUNIT:
                for tl, trows in rows.groupby("target_label", sort=False):
                    xs = trows["_x"].to_numpy(dtype=float)
                    if np.isfinite(xs).any():
                        cur.bunit_points.append((str(tl), float(np.nanmean(xs))))
                cur.bunit_points.sort(key=lambda p: -p[1])
        if axis == "latency":
            counts = part["_source"].value_counts()
            cur.sources = {"pass": int(counts.get("pass", 0)), "isolated": int(counts.get("isolated", 0))}
        out.append(cur)
    return out


def _query_points(cur: Curves) -> list[tuple[str, str, float]]:
    """``(kind, label, x)``: BUnit's own costs, then the fixed reductions."""
    pts = [("bunit", f"BUnit {tl}", x) for tl, x in cur.bunit_points]
    return pts + [("reduction", f"{round(100 * r):g}% less", math.log(1 - r)) for r in REDUCTIONS]


def _result(cur: Curves, name: str, iv: Interval, m_vals: dict, b_vals: dict) -> dict[str, Any]:
    m_ok = any(np.isfinite(v) for v in m_vals.values())
    b_ok = any(np.isfinite(v) for v in b_vals.values())
    m_iv, b_iv = mean_interval(m_vals.values()), mean_interval(b_vals.values())
    return {**cur.setting, "axis": cur.axis, "method": name, "family": cur.family[name],
            "n_method": m_iv.n, "n_bunit": b_iv.n, "top1_method": m_iv.mean, "top1_bunit": b_iv.mean,
            "diff": iv.mean, "lo": iv.lo, "hi": iv.hi, "n_pairs": iv.n, "rule": iv.rule,
            "label": label(iv, method_reached=m_ok, bunit_reached=b_ok)}


def compare_points(metrics: pd.DataFrame, *, latency: LatencyTable | None = None,
                   axes: tuple[str, ...] = COST_AXES) -> pd.DataFrame:
    """Every method against BUnit at BUnit's costs and at :data:`REDUCTIONS`, per setting and axis.

    Returns:
        One row per (setting, axis, point, method): ``point_kind`` (``bunit``/``reduction``), ``point``,
        ``reduction`` (1 - exp(x)), ``top1_method``/``top1_bunit`` (seed means where reached), ``diff`` (method -
        BUnit, points), ``lo``/``hi`` (95% interval), ``n_pairs``, ``rule``, ``label``. Empty without a BUnit curve.
    """
    rows = []
    for axis in axes:
        for cur in build_curves(metrics, axis, latency=latency):
            if BUNIT not in cur.curves:
                continue
            for kind, point, x in _query_points(cur):
                b_vals = cur.at(BUNIT, x)
                for name in cur.curves:
                    if name == BUNIT:
                        continue
                    m_vals = cur.at(name, x)
                    rec = _result(cur, name, diff_interval(m_vals, b_vals), m_vals, b_vals)
                    rows.append({**rec, "point_kind": kind, "point": point, "reduction": 1 - math.exp(x)})
    return pd.DataFrame(rows)


def _area(curve: SeedCurve, x0: float) -> float:
    """Mean top-1 of one seed's curve over ``[x0, 0]``; NaN when the curve does not span it."""
    xs, ys = curve
    if len(xs) == 0 or xs[0] > x0 + _EPS or xs[-1] < -_EPS:
        return math.nan
    grid = np.unique(np.r_[x0, xs[(xs > x0) & (xs < 0)], 0.0])
    vals = np.interp(grid, xs, ys)
    return float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)) / -x0)


def compare_area(metrics: pd.DataFrame, *, latency: LatencyTable | None = None,
                 axes: tuple[str, ...] = COST_AXES) -> pd.DataFrame:
    """Mean top-1 over the common range of log cost per method, with intervals and the difference to BUnit.

    Returns:
        One row per (setting, axis, method): ``range_reduction`` (the common range runs from 0 to this reduction),
        ``area``/``area_lo``/``area_hi`` (mean top-1 over the range and its interval), ``diff``/``lo``/``hi``
        (method - BUnit, paired), ``n_pairs``, ``rule``, ``label``. Methods that do not span the range: NaN.
    """
    rows = []
    for axis in axes:
        for cur in build_curves(metrics, axis, latency=latency):
            deep = [cur.reach(n) for n in cur.curves if cur.reach(n) <= math.log(1 - AREA_MIN_REDUCTION) + _EPS]
            if not deep or BUNIT not in cur.curves:
                continue
            x0 = max(deep)
            areas = {n: {s: _area(c, x0) for s, c in seeds.items()} for n, seeds in cur.curves.items()}
            for name, vals in areas.items():
                own = mean_interval(vals.values())
                if name == BUNIT:
                    iv = Interval(math.nan, math.nan, math.nan, 0, "reference")
                    verdict = "reference"
                else:
                    iv = diff_interval(vals, areas[BUNIT])
                    verdict = label(iv, method_reached=own.n > 0, bunit_reached=any(
                        np.isfinite(v) for v in areas[BUNIT].values()))
                rows.append({**cur.setting, "axis": axis, "method": name, "family": cur.family[name],
                             "range_reduction": 1 - math.exp(x0), "area": own.mean, "area_lo": own.lo,
                             "area_hi": own.hi, "n_seeds": own.n, "diff": iv.mean, "lo": iv.lo, "hi": iv.hi,
                             "n_pairs": iv.n, "rule": iv.rule, "label": verdict})
    return pd.DataFrame(rows)
