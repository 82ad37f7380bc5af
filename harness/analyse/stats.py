"""Intervals over seeds: the t-interval of a mean and of a difference between two methods, and the label rule.

A difference between a method and BUnit is taken **paired by seed** where both have at least two seeds in common:
the per-seed differences ``d_s = y_method(s) - y_bunit(s)`` give ``mean(d) ± t(0.975, n-1) · sd(d) / sqrt(n)``
(pairing removes the seed's shared part: the same dense weights, data order and split). With fewer than two
common seeds but at least two seeds on each side, the two sets are compared unpaired: Welch's interval with the
Welch–Satterthwaite degrees of freedom, fractional as they come. With fewer, there is a difference but no
interval. t quantiles come from :func:`scipy.stats.t.ppf` (any real ``df``).

The label then says whether the interval excludes zero, with two exceptions where the data cannot say so:

- ``zero-width interval``: the interval has no width (every paired difference equal, e.g. two seeds one test image
  apart on both sides, or identical curves). A t-interval of zero width states a certainty that a handful of seeds
  cannot give; nothing is labelled from it.
- ``below resolution``: the interval excludes zero but the difference is smaller than the test set can resolve (one
  image is ``100 / N_test`` points): no direction is claimed from less than one image.

An interval that contains zero is ``indistinguishable`` whatever its width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

import numpy as np
from scipy import stats as _st

__all__ = ["LEVEL", "LABELS", "ZERO_WIDTH", "t_quantile", "Interval", "mean_interval", "diff_interval", "label"]

LEVEL = 0.95
LABELS = ("bunit better", "bunit worse", "indistinguishable", "below resolution", "zero-width interval",
          "too few seeds", "too sparse here", "not judged", "not reached", "bunit not reached")
ZERO_WIDTH = 1e-9
"""An interval narrower than this (in top-1 points) has zero width: float residue of equal differences."""


def t_quantile(df: float) -> float:
    """The two-sided 95% quantile (0.975) of Student's t with ``df`` degrees of freedom (any real ``df > 0``)."""
    if not df > 0 or not math.isfinite(df):
        return math.nan
    return float(_st.t.ppf(0.5 + LEVEL / 2, df))


@dataclass(frozen=True)
class Interval:
    """A mean with its 95% interval; ``n`` values behind it; ``rule`` says how the interval was formed."""

    mean: float
    lo: float
    hi: float
    n: int
    rule: str
    df: float = math.nan


def mean_interval(values) -> Interval:
    """Mean of the finite ``values`` and its t-interval (NaN bounds with fewer than two)."""
    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    if len(v) == 0:
        return Interval(math.nan, math.nan, math.nan, 0, "none")
    if len(v) == 1:
        return Interval(float(v[0]), math.nan, math.nan, 1, "one seed")
    half = t_quantile(len(v) - 1) * v.std(ddof=1) / math.sqrt(len(v))
    return Interval(float(v.mean()), float(v.mean() - half), float(v.mean() + half), len(v), "t", len(v) - 1.0)


def diff_interval(a: Mapping[int, float], b: Mapping[int, float]) -> Interval:
    """``a - b`` over seeds (``{seed: value}``, NaN = no value), paired where possible (rule in the module doc)."""
    a = {s: v for s, v in a.items() if np.isfinite(v)}
    b = {s: v for s, v in b.items() if np.isfinite(v)}
    common = sorted(set(a) & set(b))
    if len(common) >= 2:
        got = mean_interval([a[s] - b[s] for s in common])
        return Interval(got.mean, got.lo, got.hi, got.n, "paired t", got.df)
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
    return Interval(mean, mean - half, mean + half, min(len(va), len(vb)), "Welch t", df)


def label(diff: Interval, *, method_reached: bool, bunit_reached: bool, resolution: float = 0.0) -> str:
    """The verdict of ``method - BUnit``: a positive interval means the method keeps more accuracy.

    Args:
        diff: the interval of ``method - BUnit`` in top-1 points.
        method_reached: the method has a value at this cost.
        bunit_reached: BUnit has a value at this cost.
        resolution: one test image in top-1 points (``100 / N_test``); 0 when unknown.
    """
    if not method_reached:
        return "not reached"
    if not bunit_reached:
        return "bunit not reached"
    if not (np.isfinite(diff.lo) and np.isfinite(diff.hi)):
        return "too few seeds"
    if diff.hi - diff.lo < ZERO_WIDTH:
        return "zero-width interval"
    if diff.lo <= 0 <= diff.hi:
        return "indistinguishable"
    if abs(diff.mean) < resolution:
        return "below resolution"
    return "bunit worse" if diff.lo > 0 else "bunit better"
