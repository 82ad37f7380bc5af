"""The verdict on hand-built stores whose answer is known: labels, intervals, the no-extrapolation rule, the area,
the paper's claim, and the choice of latency source."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats

import harness  # noqa: F401  (torchvision shim first)
from harness.analyse.claim import check_claim, claim_status
from harness.analyse.latency_source import select_condition
from harness.analyse.stats import diff_interval, mean_interval, t_quantile
from harness.analyse.verdict import build_curves, compare_area, compare_points, value_at

SEEDS = (0, 1, 2, 3)
SEED_OFFSET = (0.3, -0.2, 0.1, -0.4)  # shared by every method of a seed (same dense weights, same data order)
CTX = {"latency_device": "cpu", "device_name": "CPU-X", "dtype": "float32", "memory_format": "contiguous",
       "threads": 2, "throughput_batch": 64}


def _row(method, family, reduction, seed, top1, **extra):
    cost = 1000.0 * (1 - reduction)
    row = {"key": f"k/{method}/{reduction}/{seed}", "dataset": "digits", "backbone": "resnet20", "shortcut": "B",
           "image_size": 16, "method": method, "family": family, "target": None if method == "dense" else reduction,
           "schedule": "oneshot", "seed": seed, "status": "ok", "top1": top1, "params": cost,
           "params_nonzero": cost, "macs": cost, "macs_nonzero": cost, "latency_ms_p50_b1": cost / 100,
           "latency_ms_p50_bt": cost / 10, **CTX}
    row.update(extra)
    return row


def _line(reduction: float, slope: float, base: float = 95.0) -> float:
    """Top-1 linear in x = log(1 - R): interpolation along log cost is then exact anywhere between points."""
    return base + slope * math.log(1 - reduction)


SPREAD = (0.1, -0.1, 0.05, -0.05)  # per-seed noise of mean 0: intervals of known, non-zero width


def _store(extra_noise=(0.3, -0.3, 0.2, -0.2), bunit_slope: float = 1.0, dense_noise=(0.0,) * 4) -> pd.DataFrame:
    rows = []
    for s, off in zip(SEEDS, SEED_OFFSET):
        rows.append(_row("dense", "dense", 0.0, s, 95.0 + off + dense_noise[s]))
        for r in (0.5, 0.75, 0.9):  # BUnit reaches 90% only
            rows.append(_row("bunit", "bunit", r, s, _line(r, bunit_slope) + off))
        for r in (0.3, 0.6, 0.8, 0.9, 0.95):  # A: BUnit + 2 points everywhere (other targets, same line), spread
            rows.append(_row("winner", "structured", r, s, _line(r, bunit_slope) + off + 2.0 + SPREAD[s]))
        for r in (0.5, 0.75, 0.9, 0.95):  # B: BUnit's line plus seed noise of mean 0
            rows.append(_row("twin", "unstructured", r, s, _line(r, bunit_slope) + off + extra_noise[s]))
        for r in (0.3, 0.5):  # C: never goes past 50%
            rows.append(_row("shy", "structured", r, s, _line(r, bunit_slope) + off - 1.0 + SPREAD[s]))
    return pd.DataFrame(rows)


def _half(values) -> float:
    """Half-width of the 95% t-interval of the mean of ``values`` (scipy's t quantile)."""
    return scipy_stats.t.ppf(0.975, len(values) - 1) * np.std(values, ddof=1) / math.sqrt(len(values))


def _at(points: pd.DataFrame, axis: str, point: str, method: str) -> pd.Series:
    hit = points[(points["axis"] == axis) & (points["point"] == point) & (points["method"] == method)]
    assert len(hit) == 1, (axis, point, method)
    return hit.iloc[0]


def test_t_quantiles_and_intervals():
    assert t_quantile(1) == pytest.approx(12.7062, abs=1e-4) and t_quantile(3) == pytest.approx(3.1824, abs=1e-4)
    assert t_quantile(2.55) == pytest.approx(scipy_stats.t.ppf(0.975, 2.55)) and t_quantile(2.55) < t_quantile(2)
    assert t_quantile(60) == pytest.approx(2.0003, abs=1e-4) and math.isnan(t_quantile(0))
    d = diff_interval({0: 1.3, 1: 0.7, 2: 1.2, 3: 0.8}, {0: 1.0, 1: 1.0, 2: 1.0, 3: 1.0})
    half = scipy_stats.t.ppf(0.975, 3) * np.std([0.3, -0.3, 0.2, -0.2], ddof=1) / 2
    assert (d.mean, d.lo, d.hi, d.n, d.rule) == pytest.approx((0.0, -half, half, 4, "paired t"))
    welch = diff_interval({0: 1.0, 1: 2.0}, {5: 0.0, 6: 0.0, 7: 0.0})  # no common seed: unpaired
    assert welch.rule == "Welch t" and welch.mean == pytest.approx(1.5)
    assert welch.hi - welch.mean == pytest.approx(scipy_stats.t.ppf(0.975, 1) * math.sqrt(0.5 / 2))  # df = 1
    assert diff_interval({0: 1.0}, {0: 0.5}).rule == "too few seeds"
    assert mean_interval([1.0, float("nan")]).n == 1


def test_dominating_method_is_labelled_with_its_margin():
    points = compare_points(_store())
    for axis in ("params", "macs", "latency"):
        for point in ("50% less", "75% less", "90% less", "BUnit 0.75"):
            r = _at(points, axis, point, "winner")
            assert (r["diff"], r["lo"], r["hi"]) == pytest.approx((2.0, 2.0 - _half(SPREAD), 2.0 + _half(SPREAD)))
            assert r["label"] == "bunit worse" and r["n_pairs"] == 4 and r["rule"] == "paired t"


def test_equal_methods_are_indistinguishable_with_the_hand_interval():
    points = compare_points(_store())
    half = _half([0.3, -0.3, 0.2, -0.2])
    for point in ("50% less", "75% less", "90% less"):
        r = _at(points, "macs", point, "twin")
        assert (r["diff"], r["lo"], r["hi"]) == pytest.approx((0.0, -half, half))
        assert r["label"] == "indistinguishable"
    clear = compare_points(_store(extra_noise=(-0.9, -1.1, -1.0, -1.0)))
    assert _at(clear, "macs", "75% less", "twin")["label"] == "bunit better"


def test_no_extrapolation():
    points = compare_points(_store())
    shy = _at(points, "macs", "50% less", "shy")
    assert shy["diff"] == pytest.approx(-1.0) and shy["label"] == "bunit better"
    for point in ("75% less", "90% less", "95% less"):
        r = _at(points, "macs", point, "shy")
        assert r["label"] == "not reached" and math.isnan(r["diff"]) and math.isnan(r["top1_method"])
    beyond = _at(points, "macs", "95% less", "twin")  # BUnit stops at 90%
    assert beyond["label"] == "bunit not reached" and math.isnan(beyond["top1_bunit"])
    assert beyond["top1_method"] == pytest.approx(_line(0.95, 1.0) + np.mean(SEED_OFFSET) + 0.0)
    curve = build_curves(_store(), "macs")[0].curves["shy"][0]
    assert value_at(curve, math.log(0.5)) == pytest.approx(_line(0.5, 1.0) + 0.3 - 1.0 + SPREAD[0])
    assert math.isnan(value_at(curve, math.log(0.49))) and math.isnan(value_at(curve, 0.01))


def test_area_over_the_common_range():
    area = compare_area(_store())
    macs = area[area["axis"] == "macs"].set_index("method")
    # curves reaching >= 50%: bunit (90%), winner (95%), twin (95%), shy (50%): the common range ends at 50%
    assert macs["range_reduction"].iloc[0] == pytest.approx(0.5)
    x0 = math.log(0.5)
    assert macs.loc["bunit", "area"] == pytest.approx(95.0 + x0 / 2 + np.mean(SEED_OFFSET))  # mean of a line
    # the winner's curve leaves the dense origin (where it equals BUnit) and is 2 points up from R = 30% on:
    # the gap grows linearly over [log 0.7, 0], then stays 2 over [log 0.5, log 0.7]
    gap = (abs(math.log(0.7)) * 2 / 2 + 2 * math.log(0.7 / 0.5)) / abs(x0)
    assert macs.loc["winner", "diff"] == pytest.approx(gap) and macs.loc["winner", "label"] == "bunit worse"
    assert macs.loc["twin", "label"] == "indistinguishable"
    # latency: the same costs, so the same verdict; a method that never gets faster has no area there
    slow = _store()
    slow.loc[slow["method"] == "twin", "latency_ms_p50_b1"] = 10.0
    lat = compare_area(slow)
    lat = lat[lat["axis"] == "latency"].set_index("method")
    assert math.isnan(lat.loc["twin", "area"]) and lat.loc["twin", "label"] == "not reached"


@pytest.mark.parametrize("slope,expected", [(0.3, "true"), (3.0, "false")])
def test_claim_true_and_false(slope, expected):
    claim = check_claim(_store(bunit_slope=slope, dense_noise=SPREAD)).set_index("axis")
    # at 80% fewer MACs: x = log 0.2, BUnit - dense = slope * log 0.2 - the dense noise, paired by seed
    assert claim.loc["macs", "diff"] == pytest.approx(slope * math.log(0.2))
    assert claim.loc["macs", "hi"] - claim.loc["macs", "diff"] == pytest.approx(_half(SPREAD))
    assert claim.loc["macs", "status"] == expected and claim.loc["params", "status"] == expected
    assert claim.loc["claim", "status"] == expected


def test_claim_undecided_and_not_reached():
    assert claim_status(-1.5, 0.2, reached=True) == "undecided"
    assert claim_status(-0.5, 0.2, reached=False) == "undecided"
    assert claim_status(float("nan"), float("nan"), reached=True) == "undecided"
    short = _store(bunit_slope=0.3, dense_noise=SPREAD)
    short = short[~((short["method"] == "bunit") & (short["target"] == 0.9))]  # BUnit now stops at 75%
    claim = check_claim(short).set_index("axis")
    assert not claim.loc["macs", "reached"] and claim.loc["macs", "status"] == "undecided"
    assert claim.loc["params", "status"] == "true"  # 73% fewer parameters is still inside BUnit's curve
    assert claim.loc["claim", "status"] == "undecided"


@pytest.mark.parametrize("landed,snapped", [(0.7291, True), (0.7340, True), (0.7240, False)])
def test_claim_reads_each_seeds_run_that_landed_near_the_claim_point(landed, snapped):
    """Every seed has a BUnit run aimed at 73% fewer parameters that landed at ``landed`` and one at 94%, over 4x
    apart in cost: read strictly, no seed has a value at exactly 73%. A point within 0.5 points of reduction is read
    as the claim point (each seed its own), and the row says where it was read; 0.6 points off it is not."""
    rows = []
    for s, off in zip(SEEDS, SEED_OFFSET):
        rows.append(_row("dense", "dense", 0.0, s, 95.0 + off + SPREAD[s]))
        rows.append(_row("bunit", "bunit", landed, s, 94.0 + off))
        rows.append(_row("bunit", "bunit", 0.94, s, 90.0 + off))
    claim = check_claim(pd.DataFrame(rows)).set_index("axis")
    params = claim.loc["params"]
    if snapped:
        assert params["reached"] and params["n_pairs"] == 4 and params["diff"] == pytest.approx(-1.0)
        assert params["reduction_read"] == pytest.approx(landed)
        assert params["hi"] - params["diff"] == pytest.approx(_half(SPREAD))
    else:
        assert not params["reached"] and params["why"] == "too sparse here" and params["status"] == "undecided"
        assert math.isnan(params["reduction_read"])


def test_latency_prefers_the_timing_pass():
    store = _store()
    table = pd.DataFrame([
        {"key": k, "runtime": "eager", "batch": 1, "device": "cpu", "device_name": "CPU-X", "dtype": "float32",
         "threads": 2, "memory_format": "contiguous", "latency_ratio": 0.5, "latency_ratio_lo": 0.45,
         "latency_ratio_hi": 0.55, "busy": k.endswith("/0"), "unsteady": k.endswith("/1")}
        for k in store.loc[store["method"] == "bunit", "key"]
    ] + [{"key": "x", "runtime": "compiled", "batch": 1, "latency_ratio": 0.1}])
    latency = select_condition(table)
    assert latency.condition["runtime"] == "eager" and len(latency.ratio) == 12 and len(latency.busy) == 3
    assert len(latency.unsteady) == 3 and "3 timed while the machine changed state" in latency.describe()
    curves = build_curves(store, "latency", latency=latency)[0]
    # seeds 0 and 1 of BUnit were timed busy or unsteady: left out of the latency curves, never read
    assert curves.sources == {"pass": 6, "isolated": 44, "excluded": 6} and curves.excluded["bunit"] == 6
    assert sorted(curves.curves["bunit"]) == [2, 3]
    # every BUnit row now sits at half the dense latency: BUnit's curve spans x in [log 0.5, 0] only
    assert curves.reach("bunit") == pytest.approx(math.log(0.5))
    points = compare_points(store, latency=latency, axes=("latency",))
    assert _at(points, "latency", "75% less", "winner")["label"] == "bunit not reached"
