"""The verdict: every method as a curve of top-1 against log cost, compared with BUnit at equal cost, with intervals.

Rows. The verdict reads the rows :func:`harness.analyse.metrics.partition_rows` keeps: ok rows with a finite top-1,
one configuration per curve (the latest), one row per point. The report lists what was left out and why.

Curves. Per setting (dataset, backbone, shortcut, image size), cost axis (params, MACs: the sparse-aware non-zero
counts of :mod:`harness.analyse.metrics`; latency) and seed, a method's curve is top-1 against
``x = log(cost / cost_dense)`` = ``log(1 - R_c)`` over its targets. The **origin** ``x = 0`` is the dense row of
the same seed, and only the dense row: a method's own row at dense cost (a target of 0, a prune that removed
nothing) is never averaged into it, and is not read (at dense cost the curve is the origin; the row still shows in
the report's tables). A method is its name plus its schedule when that is not ``oneshot``; all of a method's
targets lie on one curve.

**The reading rule.** A curve has a value at ``x`` only where its own measured points bracket ``x`` closely: at a
measured point, or between two neighbouring points (the origin counts as one) at most a factor :data:`MAX_GAP` apart
in cost, joined linearly in log cost. Elsewhere it has no value: outside its points it is "not reached" (never
extrapolated), inside a wider gap it is "too sparse here" (a chord across a gap is not a measurement: a method run
only at 95% fewer MACs says nothing about 50%). A factor of 3 admits the usual grids (50/75/90/95% less, sparsity
0.5/0.8/0.9/0.95/0.98) with the few percent by which achieved costs miss their targets (BUnit's 75% and 90% plans
land 2.53x apart on ResNet-20), and refuses the line from the origin to anything deeper than 67% less.

Comparisons (:func:`compare_points`), per setting and axis, at the costs where BUnit stands and at the fixed
reductions :data:`REDUCTIONS`: each method's top-1 minus BUnit's, with the 95% interval of
:mod:`harness.analyse.stats` (paired by seed) and its label. At a BUnit point every seed is read at that seed's
own BUnit cost (BUnit's seeds differ in cost on the latency axis); a method's seed that BUnit lacks is read at the
mean of BUnit's costs. Labels: ``bunit better`` (interval below 0), ``bunit worse`` (above 0), ``indistinguishable``
(straddles 0), ``below resolution`` (the difference is under one test image), ``zero-width interval``, ``too few
seeds``, ``too sparse here`` / ``bunit too sparse here``, ``not reached`` / ``bunit not reached``, and ``not
judged`` (latency: every timing that would have given a value was busy or unsteady).

Area (:func:`compare_area`): per seed, the mean top-1 over ``x`` from the common end ``x_c`` to 0 (the area under
the curve divided by the width), where ``x_c`` is the least compressed "deepest point every seed reached" among the
curves that reach at least :data:`AREA_MIN_REDUCTION`; a curve that does not span ``[x_c, 0]``, or has a gap wider
than the reading rule allows inside it, has no area.

Latency: with a timing table (:mod:`harness.analyse.latency_source`), a timed row's ``x`` is the log of its paired
ratio to dense, and a row whose timing the pass flagged busy or unsteady is left out of the latency curves
(counted in ``Curves.excluded``); rows the pass did not time use their own latency columns (timed in isolation,
against the dense row's own timing).
"""
from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import pandas as pd

from harness.analyse.latency_source import LatencyTable
from harness.analyse.metrics import COST_AXES, SETTING_KEYS, add_relative_metrics, resolution_points
from harness.analyse.stats import Interval, diff_interval, label, mean_interval

__all__ = ["REDUCTIONS", "AREA_MIN_REDUCTION", "MAX_GAP", "BUNIT", "curve_name", "Curves", "build_curves",
           "read_at", "value_at", "compare_points", "compare_area"]

REDUCTIONS = (0.5, 0.75, 0.9, 0.95)
AREA_MIN_REDUCTION = 0.5
MAX_GAP = 3.0
"""Largest cost factor between the two measured points a value may be interpolated between."""
BUNIT = "bunit"
_EPS = 1e-9
_GAP = math.log(MAX_GAP) + 1e-9

SeedCurve = tuple[np.ndarray, np.ndarray]  # x sorted ascending, top-1
At = float | Mapping[int, float]  # one cost for every seed, or one per seed


def curve_name(method: Any, schedule: Any) -> str:
    """A curve's name: the method, plus ``(schedule)`` unless the schedule is ``oneshot`` or missing."""
    if isinstance(schedule, str) and schedule and schedule != "oneshot":
        return f"{method} ({schedule})"
    return str(method)


def read_at(curve: SeedCurve, x: float) -> tuple[float, str]:
    """One seed's curve read at ``x`` under the reading rule: ``(top-1, "")``, or NaN and why there is none.

    Returns:
        ``(value, reason)``; ``reason`` is ``""``, ``"not reached"`` or ``"too sparse here"``.
    """
    xs, ys = curve
    if not np.isfinite(x) or len(xs) == 0 or x < xs[0] - _EPS or x > xs[-1] + _EPS:
        return math.nan, "not reached"
    hit = np.flatnonzero(np.abs(xs - x) <= _EPS)
    if len(hit):
        return float(ys[hit[0]]), ""
    j = int(np.searchsorted(xs, x))
    if xs[j] - xs[j - 1] > _GAP:
        return math.nan, "too sparse here"
    return float(np.interp(x, xs, ys)), ""


def value_at(curve: SeedCurve, x: float) -> float:
    """Top-1 of one seed's curve at ``x`` under the reading rule; NaN where it has no value."""
    return read_at(curve, x)[0]


def _seed_curve(points: list[tuple[float, float]]) -> SeedCurve:
    """Sorted, finite points; equal ``x`` averaged (two targets of one method that landed at one cost)."""
    pts = [(x, y) for x, y in points if np.isfinite(x) and np.isfinite(y)]
    if not pts:
        return np.array([]), np.array([])
    xs = np.array([p[0] for p in pts])
    ys = np.array([p[1] for p in pts])
    ux, inverse = np.unique(np.round(xs, 9), return_inverse=True)
    uy = np.bincount(inverse, weights=ys) / np.bincount(inverse)
    return ux, uy


def _mean_x(x: At) -> float:
    if isinstance(x, Mapping):
        vals = [v for v in x.values() if np.isfinite(v)]
        return float(np.mean(vals)) if vals else math.nan
    return float(x)


class Curves:
    """The curves of one setting on one axis.

    Attributes:
        setting: ``{dataset, backbone, shortcut, image_size}``.
        axis: the cost axis.
        curves: ``{curve name: {seed: (x, top-1)}}``, the dense origin first in every seed's curve; a seed with no
            point of its own away from dense cost has no curve.
        family: ``{curve name: family}``.
        dense: ``{seed: dense top-1}``.
        bunit_points: ``[(target label, {seed: x})]`` of the BUnit curve, least compressed first.
        sources: ``{"pass": rows timed by the timing pass, "isolated": rows timed alone}`` (latency axis).
        excluded: ``{curve name: rows left out}``: timings the pass flagged busy or unsteady (latency axis).
        with_excluded: the curves as they would be with those timings read (only to say "not judged" where
            they, and nothing else, would have given a value).
        resolution: one test image in top-1 points (0 when the rows do not record ``n_test``).
    """

    def __init__(self, setting: dict[str, Any], axis: str):
        self.setting, self.axis = setting, axis
        self.curves: dict[str, dict[int, SeedCurve]] = {}
        self.family: dict[str, str] = {}
        self.dense: dict[int, float] = {}
        self.bunit_points: list[tuple[str, dict[int, float]]] = []
        self.sources = {"pass": 0, "isolated": 0}
        self.excluded: dict[str, int] = {}
        self.with_excluded: dict[str, dict[int, SeedCurve]] = {}
        self.resolution = 0.0

    def read(self, name: str, x: At) -> tuple[dict[int, float], dict[int, str]]:
        """``({seed: top-1}, {seed: reason})`` of a curve at ``x`` (one cost, or one per seed; a seed missing
        from a per-seed ``x`` is read at the mean of its costs)."""
        values, reasons = {}, {}
        mean = _mean_x(x)
        for s, c in self.curves.get(name, {}).items():
            xs = x.get(s, mean) if isinstance(x, Mapping) else x
            values[s], reasons[s] = read_at(c, xs)
        return values, reasons

    def at(self, name: str, x: At) -> dict[int, float]:
        """``{seed: top-1}`` of a curve at ``x`` (NaN where the seed's curve has no value there)."""
        return self.read(name, x)[0]

    def reach(self, name: str) -> float:
        """The deepest ``x`` every seed of the curve reached (0 when a seed has only the origin)."""
        mins = [c[0].min() for c in self.curves.get(name, {}).values() if len(c[0])]
        return float(max(mins)) if mins else 0.0

    def missing(self, name: str, x: At, values: dict[int, float], reasons: dict[int, str]) -> str:
        """Why a curve has no value at ``x`` (``""`` when at least one seed has one): ``not judged`` where only
        timings left out as busy or unsteady would have given one, else ``too sparse here`` or ``not reached``."""
        if any(np.isfinite(v) for v in values.values()):
            return ""
        if name in self.with_excluded:
            mean = _mean_x(x)
            shadow = [read_at(c, x.get(s, mean) if isinstance(x, Mapping) else x)[0]
                      for s, c in self.with_excluded[name].items()]
            if any(np.isfinite(v) for v in shadow):
                return "not judged"
        return "too sparse here" if "too sparse here" in reasons.values() else "not reached"


def _row_x(metrics: pd.DataFrame, axis: str, latency: LatencyTable | None) -> tuple[pd.Series, pd.Series, pd.Series]:
    """``x = log(cost / cost_dense)`` per row, where the latency came from (``pass`` / ``isolated`` / ``excluded``:
    timed by the pass but flagged busy or unsteady, so not read), and ``x`` with the excluded timings kept."""
    with np.errstate(divide="ignore", invalid="ignore"):
        x = np.log(1.0 - pd.to_numeric(metrics[f"reduction_{axis}"], errors="coerce").astype(float))
    source = pd.Series("isolated" if axis == "latency" else "", index=metrics.index)
    if axis == "latency" and latency is not None and "key" in metrics.columns:
        ratio = metrics["key"].map(latency.ratio)
        timed = ratio.notna()
        with np.errstate(divide="ignore", invalid="ignore"):
            x = x.where(~timed, np.log(ratio.astype(float)))
        source = source.where(~timed, "pass")
        flagged = metrics["key"].isin(latency.busy | latency.unsteady) & timed
        source = source.where(~flagged, "excluded")
    x = x.where(np.isfinite(x))
    return x.where(source != "excluded"), source, x


def _seed_curves(cur: Curves, rows: pd.DataFrame, column: str) -> dict[int, SeedCurve]:
    out = {}
    for seed, seed_rows in rows.groupby("seed", sort=True):
        if int(seed) not in cur.dense:
            continue  # no dense reference: no relative cost, no origin
        # at dense cost the curve is the origin: a row of this method there (target 0) is not read
        own = [(x, y) for x, y in zip(seed_rows[column], seed_rows["top1"].astype(float))
               if np.isfinite(x) and abs(x) > _EPS]
        if not own:
            continue  # no point of its own on this axis (latency not comparable, or every timing left out)
        out[int(seed)] = _seed_curve([(0.0, cur.dense[int(seed)])] + own)
    return out


def _method_curves(cur: Curves, rows: pd.DataFrame, name: str) -> None:
    cur.family[name] = str(rows["family"].iloc[0])
    cur.curves[name] = _seed_curves(cur, rows, "_x")
    cur.excluded[name] = int((rows["_source"] == "excluded").sum())
    if cur.excluded[name]:
        cur.with_excluded[name] = _seed_curves(cur, rows, "_x_all")
    if name == BUNIT:
        for tl, trows in rows.groupby("target_label", sort=False):
            xs = {int(s): float(x) for s, x in zip(trows["seed"], trows["_x"])
                  if np.isfinite(x) and int(s) in cur.dense}
            if xs:
                cur.bunit_points.append((str(tl), xs))
        cur.bunit_points.sort(key=lambda p: -_mean_x(p[1]))


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
    df["_x"], df["_source"], df["_x_all"] = _row_x(df, axis, latency)
    df["_curve"] = [curve_name(m, s) for m, s in zip(df["method"], df.get("schedule", pd.Series(None, df.index)))]
    keys = [k for k in SETTING_KEYS if k in df.columns]
    out = []
    for values, part in df.groupby(keys, sort=False, dropna=False):
        cur = Curves(dict(zip(keys, values if isinstance(values, tuple) else (values,))), axis)
        cur.resolution = resolution_points(part)
        dense = part[part["family"] == "dense"]
        cur.dense = {int(s): float(t) for s, t in zip(dense["seed"], dense["top1"]) if np.isfinite(t)}
        for name, rows in part[part["family"] != "dense"].groupby("_curve", sort=False):
            _method_curves(cur, rows, name)
        if axis == "latency":
            counts = part.loc[part["family"] != "dense", "_source"].value_counts()
            cur.sources = {k: int(counts.get(k, 0)) for k in ("pass", "isolated", "excluded")}
        out.append(cur)
    return out


def _query_points(cur: Curves) -> list[tuple[str, str, At]]:
    """``(kind, label, x)``: BUnit's own costs (per seed), then the fixed reductions."""
    pts: list[tuple[str, str, At]] = [("bunit", f"BUnit {tl}", xs) for tl, xs in cur.bunit_points]
    return pts + [("reduction", f"{round(100 * r):g}% less", math.log(1 - r)) for r in REDUCTIONS]


def _label(cur: Curves, name: str, x: At, iv: Interval, read_m: tuple[dict, dict], read_b: tuple[dict, dict]) -> str:
    m_missing, b_missing = cur.missing(name, x, *read_m), cur.missing(BUNIT, x, *read_b)
    if m_missing:
        return m_missing
    if b_missing:
        return b_missing if b_missing == "not judged" else f"bunit {b_missing}"
    return label(iv, method_reached=True, bunit_reached=True, resolution=cur.resolution)


def _result(cur: Curves, name: str, x: At, read_m: tuple[dict, dict], read_b: tuple[dict, dict]) -> dict[str, Any]:
    m_vals, b_vals = read_m[0], read_b[0]
    iv = diff_interval(m_vals, b_vals)
    m_iv, b_iv = mean_interval(m_vals.values()), mean_interval(b_vals.values())
    return {**cur.setting, "axis": cur.axis, "method": name, "family": cur.family[name],
            "n_method": m_iv.n, "n_bunit": b_iv.n, "top1_method": m_iv.mean, "top1_bunit": b_iv.mean,
            "diff": iv.mean, "lo": iv.lo, "hi": iv.hi, "n_pairs": iv.n, "rule": iv.rule, "df": iv.df,
            "resolution": cur.resolution, "label": _label(cur, name, x, iv, read_m, read_b)}


def compare_points(metrics: pd.DataFrame, *, latency: LatencyTable | None = None,
                   axes: tuple[str, ...] = COST_AXES) -> pd.DataFrame:
    """Every method against BUnit at BUnit's costs and at :data:`REDUCTIONS`, per setting and axis.

    Returns:
        One row per (setting, axis, point, method): ``point_kind`` (``bunit``/``reduction``), ``point``,
        ``reduction`` (1 - exp(x), x averaged over BUnit's seeds at a BUnit point), ``top1_method``/``top1_bunit``
        (seed means where there is a value), ``n_method``/``n_bunit`` (seeds with a value), ``diff`` (method -
        BUnit, points), ``lo``/``hi`` (95% interval), ``n_pairs``, ``rule``, ``df``, ``resolution``, ``label``.
        Empty without a BUnit curve and another method.
    """
    rows = []
    for axis in axes:
        for cur in build_curves(metrics, axis, latency=latency):
            if BUNIT not in cur.curves:
                continue
            for kind, point, x in _query_points(cur):
                read_b = cur.read(BUNIT, x)
                for name in cur.curves:
                    if name == BUNIT:
                        continue
                    rec = _result(cur, name, x, cur.read(name, x), read_b)
                    rows.append({**rec, "point_kind": kind, "point": point, "reduction": 1 - math.exp(_mean_x(x))})
    return pd.DataFrame(rows)


def _area(curve: SeedCurve, x0: float) -> float:
    """Mean top-1 of one seed's curve over ``[x0, 0]``; NaN when the curve does not span it or has a gap inside
    it wider than the reading rule allows."""
    xs, ys = curve
    if len(xs) == 0 or xs[0] > x0 + _EPS or xs[-1] < -_EPS:
        return math.nan
    overlapping = (xs[:-1] < -_EPS) & (xs[1:] > x0 + _EPS)  # segments that cross into (x0, 0)
    if np.any(np.diff(xs)[overlapping] > _GAP):
        return math.nan
    grid = np.unique(np.r_[x0, xs[(xs > x0) & (xs < 0)], 0.0])
    vals = np.interp(grid, xs, ys)
    return float(np.sum((vals[1:] + vals[:-1]) / 2 * np.diff(grid)) / -x0)


def compare_area(metrics: pd.DataFrame, *, latency: LatencyTable | None = None,
                 axes: tuple[str, ...] = COST_AXES) -> pd.DataFrame:
    """Mean top-1 over the common range of log cost per method, with intervals and the difference to BUnit.

    Returns:
        One row per (setting, axis, method): ``range_reduction`` (the common range runs from 0 to this reduction),
        ``area``/``area_lo``/``area_hi`` (mean top-1 over the range and its interval), ``n_seeds``, ``diff``/``lo``/
        ``hi`` (method - BUnit, paired), ``n_pairs``, ``rule``, ``label``. Methods without an area: NaN.
    """
    rows = []
    for axis in axes:
        for cur in build_curves(metrics, axis, latency=latency):
            deep = [cur.reach(n) for n in cur.curves if cur.reach(n) <= math.log(1 - AREA_MIN_REDUCTION) + _EPS]
            if not deep or BUNIT not in cur.curves:
                continue
            x0 = max(deep)
            areas = {n: {s: _area(c, x0) for s, c in seeds.items()} for n, seeds in cur.curves.items()}
            b_ok = any(np.isfinite(v) for v in areas[BUNIT].values())
            for name, vals in areas.items():
                own = mean_interval(vals.values())
                if name == BUNIT:
                    iv = Interval(math.nan, math.nan, math.nan, 0, "reference")
                    verdict = "reference"
                else:
                    iv = diff_interval(vals, areas[BUNIT])
                    verdict = label(iv, method_reached=own.n > 0, bunit_reached=b_ok, resolution=cur.resolution)
                rows.append({**cur.setting, "axis": axis, "method": name, "family": cur.family[name],
                             "range_reduction": 1 - math.exp(x0), "area": own.mean, "area_lo": own.lo,
                             "area_hi": own.hi, "n_seeds": own.n, "diff": iv.mean, "lo": iv.lo, "hi": iv.hi,
                             "n_pairs": iv.n, "rule": iv.rule, "label": verdict})
    return pd.DataFrame(rows)
