"""The verdict at its edges: nine hand-built stores where the report used to state what the data do not support.

Each store is the smallest that shows one case; each test asserts the label, the interval against scipy, or the
absence of a number. Plus the three mutations the review found no test for: the claim read from the mean instead
of the interval's lower end, a bootstrap that never resamples the last round, and a timing table printing [hi, lo].
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import harness  # noqa: F401  (torchvision shim first)
from harness.analyse.claim import check_claim
from harness.analyse.latency_source import select_condition
from harness.analyse.metrics import add_relative_metrics, partition_rows
from harness.analyse.report import build_report, render_markdown
from harness.analyse.verdict import build_curves, compare_area, compare_points
from harness.analyse.verdict_report import headlines
from harness.measure.timing_pass import paired_ratio
from harness.measure.timing_table import format_timings

CTX = {"latency_device": "cpu", "device_name": "CPU-X", "dtype": "float32", "memory_format": "contiguous",
       "threads": 2, "throughput_batch": 64}
OFFSET = (0.3, -0.2, 0.1, -0.4, 0.0, 0.2)  # shared by every method of a seed
SPREAD = (0.1, -0.1, 0.05, -0.05, 0.0, 0.0)  # mean 0 over the first four seeds


def _row(method, family, reduction, seed, top1, **extra):
    cost = 1000.0 * (1 - reduction)
    row = {"key": f"k/{method}/{reduction}/{seed}", "dataset": "digits", "backbone": "resnet20", "shortcut": "B",
           "image_size": 16, "method": method, "family": family, "target": None if method == "dense" else reduction,
           "schedule": "oneshot", "seed": seed, "status": "ok", "top1": top1, "params": cost, "params_nonzero": cost,
           "macs": cost, "macs_nonzero": cost, "latency_ms_p50_b1": cost / 100, "latency_ms_p50_bt": cost / 10,
           **CTX}
    row.update(extra)
    return row


def _line(reduction: float, slope: float = 1.0, base: float = 90.0) -> float:
    return base + slope * math.log(1 - reduction)


def _base(seeds=(0, 1, 2, 3), bunit=(0.5, 0.75, 0.9, 0.95), slope: float = 1.0) -> list[dict]:
    rows = []
    for s in seeds:
        rows.append(_row("dense", "dense", 0.0, s, 90.0 + OFFSET[s]))
        rows += [_row("bunit", "bunit", r, s, _line(r, slope) + OFFSET[s]) for r in bunit]
    return rows


def _at(points: pd.DataFrame, point: str, method: str, axis: str = "macs") -> pd.Series:
    hit = points[(points["axis"] == axis) & (points["point"] == point) & (points["method"] == method)]
    assert len(hit) == 1, (axis, point, method)
    return hit.iloc[0]


def _half(values) -> float:
    return scipy_stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))


def _report(df: pd.DataFrame, latency=None) -> str:
    from pathlib import Path

    return render_markdown(build_report(df, [], Path("."), latency=latency), Path("."))


# 1 ------------------------------------------------------------------------------------------------------------
def test_a_chord_is_not_read_as_a_curve():
    """A method run only at 95% fewer MACs, equal to BUnit there: no value at 50/75/90% (the line from the dense
    origin to its one point is not data), a verdict only at 95%."""
    rows = _base() + [_row("far", "structured", 0.95, s, _line(0.95) + OFFSET[s] + SPREAD[s]) for s in range(4)]
    points = compare_points(pd.DataFrame(rows), axes=("macs",))
    for point in ("50% less", "75% less", "90% less", "BUnit 0.5", "BUnit 0.75", "BUnit 0.9"):
        r = _at(points, point, "far")
        assert r["label"] == "too sparse here" and math.isnan(r["diff"]) and r["n_method"] == 0, point
    at95 = _at(points, "95% less", "far")
    assert at95["label"] == "indistinguishable"
    assert (at95["diff"], at95["lo"], at95["hi"]) == pytest.approx((0.0, -_half(SPREAD[:4]), _half(SPREAD[:4])))
    sentence = headlines(points, check_claim(pd.DataFrame(rows)))[0]
    assert "no verdict at 50%, 75% and 90%" in sentence and "no difference at 95%" in sentence
    assert math.isnan(compare_area(pd.DataFrame(rows), axes=("macs",)).set_index("method").loc["far", "area"])


def test_points_at_most_a_factor_apart_are_read_between():
    """The rule's other side: 50% and 80% less (costs 0.5 and 0.2, 2.5x apart) are read at 75% less; 50% and 85%
    (3.3x apart) are not."""
    rows = _base() + [_row("near", "structured", r, s, _line(r) + OFFSET[s] + 1.0 + SPREAD[s])
                      for s in range(4) for r in (0.5, 0.8)]
    r = _at(compare_points(pd.DataFrame(rows), axes=("macs",)), "75% less", "near")
    assert r["label"] == "bunit worse" and r["diff"] == pytest.approx(1.0) and r["n_pairs"] == 4
    rows = _base() + [_row("gap", "structured", r, s, _line(r) + OFFSET[s] + 1.0 + SPREAD[s])
                      for s in range(4) for r in (0.5, 0.85)]
    assert _at(compare_points(pd.DataFrame(rows), axes=("macs",)), "75% less", "gap")["label"] == "too sparse here"


# 2 ------------------------------------------------------------------------------------------------------------
def test_a_row_at_dense_cost_does_not_move_the_origin():
    """Flat curves at 90%: a method with a row at target 0 (a prune that removed nothing) at 60% top-1 and a point
    at 60% less equal to BUnit's. Read at 50% less it equals BUnit (the origin is the dense row alone); averaging
    its 60% into the origin read about -11 'BUnit better'."""
    rows = []
    for s in range(4):
        rows.append(_row("dense", "dense", 0.0, s, 90.0 + OFFSET[s]))
        rows += [_row("bunit", "bunit", r, s, 90.0 + OFFSET[s]) for r in (0.5, 0.75)]
        rows.append(_row("zero", "structured", 0.0, s, 60.0))
        rows.append(_row("zero", "structured", 0.6, s, 90.0 + OFFSET[s] + SPREAD[s]))
    df = pd.DataFrame(rows)
    r = _at(compare_points(df, axes=("macs",)), "50% less", "zero")
    w = math.log(0.5) / math.log(0.4)  # where 50% less lies between the origin and the 60% point, in log cost
    assert r["diff"] == pytest.approx(0.0, abs=1e-12) and r["label"] == "indistinguishable"
    assert (r["lo"], r["hi"]) == pytest.approx((-w * _half(SPREAD[:4]), w * _half(SPREAD[:4])))
    cur = build_curves(df, "macs")[0]
    assert cur.dense == {s: 90.0 + OFFSET[s] for s in range(4)}
    assert all(c[0][-1] == 0.0 and c[1][-1] == 90.0 + OFFSET[s] for s, c in cur.curves["zero"].items())  # dense


# 3 ------------------------------------------------------------------------------------------------------------
def test_rows_of_another_configuration_are_left_out_and_named():
    """An 8-epoch run and a later 200-epoch run of one method: the verdict reads the latest configuration only,
    never their average, and the report names the rows it left out."""
    rows = _base()
    for s in range(4):
        for r in (0.5, 0.75):
            old = {"method": "l1", "seed": s, "target": r, "train": {"epochs": 8, "lr": 0.1}}
            new = {"method": "l1", "seed": s, "target": r, "train": {"epochs": 200, "lr": 0.1}}
            rows.append(_row("l1", "structured", r, s, _line(r) + OFFSET[s] - 6.0, key=f"old/{r}/{s}", config=old,
                             finished_at="2026-01-01T00:00:00Z"))
            rows.append(_row("l1", "structured", r, s, _line(r) + OFFSET[s] + 1.0 + SPREAD[s], key=f"new/{r}/{s}",
                             config=new, finished_at="2026-02-01T00:00:00Z"))
    df = pd.DataFrame(rows)
    r = _at(compare_points(df, axes=("macs",)), "50% less", "l1")
    assert r["diff"] == pytest.approx(1.0) and r["label"] == "bunit worse" and r["n_pairs"] == 4
    kept, left = partition_rows(df)
    assert sorted(left["key"]) == sorted(f"old/{r}/{s}" for s in range(4) for r in (0.5, 0.75))
    assert left["left_out_reason"].str.contains(r"train\.epochs 8 \(kept: 200\)").all()
    assert not kept["key"].str.startswith("old/").any()
    md = _report(df)
    assert "Left out of the verdict and the tables: 8 ok row(s)." in md and "`old/0.5/0` :" not in md
    assert "`old/0.5/0`: configuration differs from the latest run of this method: train.epochs 8 (kept: 200)" in md


# 4 ------------------------------------------------------------------------------------------------------------
def _timing_table(keys, ratio, **flags) -> pd.DataFrame:
    return pd.DataFrame([{"key": k, "runtime": "eager", "batch": 1, "device": "cpu", "device_name": "CPU-X",
                          "dtype": "float32", "threads": 2, "memory_format": "contiguous", "latency_ratio": ratio(k),
                          "latency_ratio_lo": ratio(k) * 0.98, "latency_ratio_hi": ratio(k) * 1.02, **flags}
                         for k in keys])


def test_busy_or_unsteady_timings_never_decide_the_latency_axis():
    rows = _base() + [_row("l1", "structured", r, s, _line(r) + OFFSET[s] + 1.0 + SPREAD[s])
                      for s in range(4) for r in (0.5, 0.75, 0.9, 0.95)]
    df = pd.DataFrame(rows)
    bunit_keys = df.loc[df["method"] == "bunit", "key"]
    costs = dict(zip(df["key"], 1 - df["target"].fillna(0).astype(float)))
    latency = select_condition(_timing_table(bunit_keys, costs.get, busy=True, unsteady=True))
    points = compare_points(df, latency=latency, axes=("latency",))
    assert set(points["label"]) == {"not judged"} and points["diff"].isna().all()
    md = _report(df, latency)
    assert "16 timings left out because the pass flagged them busy or unsteady" in md
    assert "**not judged**: no BUnit timing is left to read" in md
    # the same timings unflagged: the axis is judged again
    clean = select_condition(_timing_table(bunit_keys, costs.get, busy=False, unsteady=False))
    assert _at(compare_points(df, latency=clean, axes=("latency",)), "50% less", "l1", "latency")["label"] == \
        "bunit worse"


# 5 ------------------------------------------------------------------------------------------------------------
def test_bunit_points_are_read_per_seed_at_their_own_cost():
    """BUnit's 90% point costs 0.30/0.35/0.40 of dense latency on seeds 0/1/2: read at the mean (0.35), seed 0
    'did not reach' its own point; read per seed, every seed counts and BUnit's value is its own top-1."""
    rows = []
    for s in range(3):
        rows.append(_row("dense", "dense", 0.0, s, 90.0 + OFFSET[s]))
        for r, lat in ((0.5, 0.6), (0.9, 0.30 + 0.05 * s)):
            rows.append(_row("bunit", "bunit", r, s, 85.0 + r + OFFSET[s], key=f"b/{r}/{s}",
                             latency_ms_p50_b1=10.0 * lat))
        for lat in (0.25, 0.5):
            rows.append(_row("m", "structured", 1 - lat, s, 80.0 + OFFSET[s] + SPREAD[s], key=f"m/{lat}/{s}",
                             latency_ms_p50_b1=10.0 * lat))
    points = compare_points(pd.DataFrame(rows), axes=("latency",))
    r = _at(points, "BUnit 0.9", "m", "latency")
    assert r["n_bunit"] == 3 and r["n_pairs"] == 3
    assert r["top1_bunit"] == pytest.approx(85.9 + np.mean(OFFSET[:3]))
    assert r["diff"] == pytest.approx(80.0 - 85.9 + np.mean(SPREAD[:3]))
    assert r["reduction"] == pytest.approx(1 - math.exp(np.mean(np.log([0.30, 0.35, 0.40]))))


# 6 ------------------------------------------------------------------------------------------------------------
def test_zero_width_intervals_and_sub_image_differences_get_no_label():
    n_test = 360  # one image = 0.2778 points
    one = 100 / n_test
    rows = [dict(r, n_test=n_test) for r in _base(seeds=(0, 1))]
    rows += [_row("apart", "structured", r, s, _line(r) + OFFSET[s] + one, n_test=n_test)
             for s in (0, 1) for r in (0.5, 0.75)]
    rows += [_row("same", "structured", r, s, _line(r) + OFFSET[s], n_test=n_test) for s in (0, 1) for r in (0.5, 0.75)]
    points = compare_points(pd.DataFrame(rows), axes=("macs",))
    apart, same = _at(points, "50% less", "apart"), _at(points, "50% less", "same")
    assert apart["diff"] == pytest.approx(one) and apart["hi"] - apart["lo"] < 1e-9
    assert apart["label"] == "zero-width interval" and same["label"] == "zero-width interval"
    # an interval that excludes 0 by less than one image: no direction claimed
    rows = [dict(r, n_test=n_test) for r in _base(seeds=(0, 1, 2))]
    rows += [_row("close", "structured", r, s, _line(r) + OFFSET[s] + (0.10, 0.12, 0.11)[s], n_test=n_test)
             for s in (0, 1, 2) for r in (0.5, 0.75)]
    close = _at(compare_points(pd.DataFrame(rows), axes=("macs",)), "50% less", "close")
    assert close["lo"] > 0 and close["diff"] < one and close["label"] == "below resolution"
    rows = [dict(r, n_test=n_test) for r in _base(seeds=(0, 1, 2))]
    rows += [_row("over", "structured", r, s, _line(r) + OFFSET[s] + 3 * one + (0.0, 0.02, 0.01)[s],
                  n_test=n_test) for s in (0, 1, 2) for r in (0.5, 0.75)]
    assert _at(compare_points(pd.DataFrame(rows), axes=("macs",)), "50% less", "over")["label"] == "bunit worse"


# 7 ------------------------------------------------------------------------------------------------------------
def test_welch_interval_uses_fractional_degrees_of_freedom():
    """BUnit 80.0/80.3/80.6 on seeds 0-2, a method 81.25/82.05/82.85 on seeds 3-5: Welch-Satterthwaite df 2.55
    gives [+0.01, +3.49] ('BUnit worse'); rounding df down to 2 gave [-0.37, +3.87] ('indistinguishable')."""
    bunit, method = (80.0, 80.3, 80.6), (81.25, 82.05, 82.85)
    rows = [_row("dense", "dense", 0.0, s, 90.0) for s in range(6)]
    rows += [_row("bunit", "bunit", 0.5, s, v) for s, v in zip((0, 1, 2), bunit)]
    rows += [_row("m", "structured", 0.5, s, v) for s, v in zip((3, 4, 5), method)]
    r = _at(compare_points(pd.DataFrame(rows), axes=("macs",)), "50% less", "m")
    ref = scipy_stats.ttest_ind(method, bunit, equal_var=False).confidence_interval(0.95)
    assert r["rule"] == "Welch t" and r["df"] == pytest.approx(2.55, abs=0.01)
    assert (r["lo"], r["hi"]) == pytest.approx((ref.low, ref.high))
    assert round(r["lo"], 2) == 0.01 and round(r["hi"], 2) == 3.49 and r["label"] == "bunit worse"


# 8 ------------------------------------------------------------------------------------------------------------
def test_the_claim_is_stated_without_pruning_rows():
    df = pd.DataFrame(_base(slope=0.3))
    claim = check_claim(df).set_index("axis")
    assert claim.loc["claim", "status"] == "undecided"  # no spread at the claim points: zero-width interval
    md = _report(df)
    assert "**The paper's claim**" in md and "No BUnit curve" not in md
    assert "No other method in this setting to set beside BUnit." in md
    assert md.splitlines()[2].startswith("**digits · resnet20 (shortcut B) · 16 px**: the paper's claim is undecided")


# 9 ------------------------------------------------------------------------------------------------------------
def test_an_ok_row_without_top1_is_left_out_and_the_seeds_are_counted():
    rows = _base(seeds=(0, 1, 2)) + [_row("l1", "structured", r, s, _line(r) + OFFSET[s] + 1.0 + SPREAD[s])
                                     for s in (0, 1, 2) for r in (0.5, 0.75)]
    rows[[i for i, r in enumerate(rows) if r["method"] == "l1" and r["seed"] == 2 and r["target"] == 0.5][0]][
        "top1"] = float("nan")
    df = pd.DataFrame(rows)
    assert len(add_relative_metrics(df)) == len(df) - 1
    r = _at(compare_points(df, axes=("macs",)), "50% less", "l1")
    assert r["n_pairs"] == 2 and r["n_method"] == 2 and r["n_bunit"] == 3
    assert r["diff"] == pytest.approx(1.0 + np.mean(SPREAD[:2]))
    md = _report(df)
    assert "`k/l1/0.5/2`: ok row without a finite top-1" in md
    assert "(2 seeds)" in md


# the three mutations ------------------------------------------------------------------------------------------
def test_claim_reads_the_interval_lower_end_not_the_mean():
    """BUnit - dense at 80% fewer MACs: -0.2, -1.2, -0.7 (mean -0.7, above -1; lower end -1.94): undecided."""
    rows = []
    for s, d in zip(range(3), (-0.2, -1.2, -0.7)):
        rows.append(_row("dense", "dense", 0.0, s, 90.0))
        rows += [_row("bunit", "bunit", r, s, 90.0 + d) for r in (0.73, 0.8)]
    claim = check_claim(pd.DataFrame(rows)).set_index("axis")
    assert claim.loc["macs", "diff"] == pytest.approx(-0.7)
    assert claim.loc["macs", "lo"] == pytest.approx(-0.7 - _half([-0.2, -1.2, -0.7]))
    assert claim.loc["macs", "status"] == "undecided" and claim.loc["claim", "status"] == "undecided"


def test_paired_ratio_bootstrap_resamples_every_round():
    """Two rounds with ratios 1 and 3: resamples [3, 3] (a quarter of them) put the upper end at 3; a bootstrap
    that never drew the last round would give an interval of [1, 1]."""
    median, lo, hi = paired_ratio([1.0, 3.0], [1.0, 1.0])
    assert (median, lo, hi) == (2.0, 1.0, 3.0)
    median, lo, hi = paired_ratio([3.0, 1.0], [1.0, 1.0])
    assert (median, lo, hi) == (2.0, 1.0, 3.0)


def test_timing_table_prints_the_interval_low_then_high():
    table = pd.DataFrame([{"key": "k", "runtime": "eager", "dtype": "float32", "batch": 1, "p50_ms": 1.0,
                           "p90_ms": 1.2, "latency_ratio": 0.5, "latency_ratio_lo": 0.45, "latency_ratio_hi": 0.58,
                           "macs_ratio": 0.4, "busy": False}])
    assert "0.500 [0.450, 0.580]" in format_timings(table)
