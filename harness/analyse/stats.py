"""Intervals over seeds: the t-interval of a mean and of a difference between two methods, and the label rule.

A difference between a method and BUnit is taken **paired by seed** where both have at least two seeds in common:
the per-seed differences ``d_s = y_method(s) - y_bunit(s)`` give ``mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n)``
(pairing removes the seed's shared part: the same dense weights, data order and split). With fewer than two
common seeds but at least two seeds on each side, the two sets are compared unpaired (Welch's interval, its
degrees of freedom rounded down). With fewer, there is a difference but no interval. The label then says whether
the interval excludes zero. t quantiles: the two-sided 95% table for 1-30 degrees of freedom, the Cornish-Fisher
expansion beyond (error under 1e-3).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np

__all__ = ["LEVEL", "LABELS", "t_quantile", "Interval", "mean_interval", "diff_interval", "label"]

LEVEL = 0.95
LABELS = ("bunit better", "bunit worse", "indistinguishable", "too few seeds", "not reached", "bunit not reached")
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160, 2.145, 2.131,
         2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056, 2.052, 2.048, 2.045, 2.042)
_Z975 = 1.959964


def t_quantile(df: float) -> float:
    """The 97.5% quantile of Student's t with ``df`` degrees of freedom (``df`` rounded down; NaN below 1)."""
    if not df >= 1:
        return math.nan
    k = int(math.floor(df))
    if k <= len(_T975):
        return _T975[k - 1]
    z = _Z975
    return z + (z ** 3 + z) / (4 * k) + (5 * z ** 5 + 16 * z ** 3 + 3 * z) / (96 * k ** 2)


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval; ``n`` values behind it; ``rule`` says how the interval was formed."""

    mean: float
    lo: float
    hi: float
    n: int
    rule: str


def mean_interval(values) -> Interval:
    """Mean of the finite ``values`` and its t-interval (NaN bounds with fewer than two)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    if len(v) == 1:
        return Interval(float(v[0]), math.nan, math.nan, 1, "one seed")
    half = t_quantile(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), len(v), "t")


def diff_interval(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """``a - b`` over seeds (``{seed: value}``, NaN = no value), paired where possible (rule in the module doc)."""
    a = {s: v for s, v in a.items() if np.isfinite(v)}
    b = {s: v for s, v in b.items() if np.isfinite(v)}
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        got = mean_interval([a[s] - b[s] for s in common])
        return Interval(got.mean, got.lo, got.hi, got.n, "paired t")
    if not a or not b:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    va, vb = np.array(list(a.values())), np.array(list(b.values()))
    mean = float(va.mean() - vb.mean())
    if len(va) < 2 or len(vb) < 2:
        return Interval(mean, math.nan, math.nan, min(len(va), len(vb)), "too few seeds")
    qa, qb = va.var(ddof=1) / len(va), vb.var(ddof=1) / len(vb)
    se = math.sqrt(qa + qb)
    if se == 0:
        return Interval(mean, mean, mean, min(len(va), len(vb)), "Welch t")
    df = (qa + qb) ** 2 / (qa ** 2 / (len(va) - 1) + qb ** 2 / (len(vb) - 1))
    half = t_quantile(df) * se
    return Interval(mean, mean - half, mean + half, min(len(va), len(vb)), "Welch t")


def label(diff: Interval, *, method_reached: bool, bunit_reached: bool) -> str:
    """The verdict of ``method - BUnit``: a positive interval means the method keeps more accuracy."""
    if not method_reached:
        return "not reached"
    if not bunit_reached:
        return "bunit not reached"
    if not (np.isfinite(diff.lo) and np.isfinite(diff.hi)):
        return "too few seeds"
    if diff.lo > 0:
        return "bunit worse"
    if diff.hi < 0:
        return "bunit better"
    return "indistinguishable"
