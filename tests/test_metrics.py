"""Trade-off metrics on hand-computed frames: ACC/EFF, reductions, speed-ups, std over seeds, Pareto fronts."""
from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
import pytest

import harness  # noqa: F401  (torchvision shim first, as everywhere)
from harness.analyse.metrics import (
    acc_cost,
    add_relative_metrics,
    efficiency,
    pareto_mask,
    summarize,
    display_target,
    target_sort_key,
)

LAT_CTX = {"latency_device": "cuda:0", "device_name": "GPU-X", "dtype": "float32", "memory_format": "channels_last",
           "threads": 8, "throughput_batch": 256}


def _row(method, family, target, seed, top1, params, macs, lat_b1, lat_bt, *, params_nz=None, macs_nz=None,
         status="ok", backbone="resnet56", **extra):
    row = {"key": f"d/{backbone}/{method}/{target}/{seed}", "dataset": "cifar10", "backbone": backbone,
           "shortcut": "A", "image_size": 32, "method": method, "family": family, "target": target,
           "schedule": "oneshot", "seed": seed, "status": status, "top1": top1, "params": params,
           "params_nonzero": params if params_nz is None else params_nz, "macs": macs,
           "macs_nonzero": macs if macs_nz is None else macs_nz, "latency_ms_p50_b1": lat_b1,
           "latency_ms_p50_bt": lat_bt, **LAT_CTX}
    row.update(extra)
    return row


def _hand_frame() -> pd.DataFrame:
    return pd.DataFrame([
        _row("dense", "dense", None, 0, 90.0, 1000, 2000, 10.0, 100.0),
        _row("l1-filter", "structured", 0.5, 0, 88.0, 500, 500, 8.0, 50.0),      # R = .5 / .75 / .2
        _row("bunit", "bunit", "s23", 0, 91.0, 800, 1600, 12.0, 80.0),           # R = .2 / .2 / -.2
        _row("global-magnitude", "unstructured", 0.9, 0, 89.0, 1000, 2000, 10.0, 100.0, params_nz=100, macs_nz=400),
        _row("l1-filter", "structured", 0.5, 7, 88.0, 500, 500, 8.0, 50.0),      # seed 7 has no dense reference
        _row("slimming", "structured", 0.4, 0, 87.0, 400, 1000, 5.0, 40.0, device_name="GPU-Y"),  # other device
        _row("slimming", "structured", 0.6, 0, None, None, None, None, None, status="failed"),
    ])


def _by(df: pd.DataFrame, method: str, seed: int = 0, target=None) -> pd.Series:
    sel = (df["method"] == method) & (df["seed"] == seed)
    if target is not None:
        sel &= df["target"] == target
    assert sel.sum() == 1
    return df[sel].iloc[0]


def test_acc_and_eff_hand_computed():
    m = add_relative_metrics(_hand_frame())
    assert len(m) == 6  # the failed row is excluded
    r = _by(m, "l1-filter")
    assert r["acc_drop"] == pytest.approx(2.0)
    assert (r["reduction_params"], r["reduction_macs"], r["reduction_latency"]) == pytest.approx((0.5, 0.75, 0.2))
    assert r["acc_cost_params"] == pytest.approx(2.0 / 50)   # 2 points over 50 % of params removed
    assert r["acc_cost_macs"] == pytest.approx(2.0 / 75)
    assert r["acc_cost_latency"] == pytest.approx(2.0 / 20)
    assert r["eff_params"] == pytest.approx(0.5 * 88 / 90)
    assert r["eff_macs"] == pytest.approx(0.75 * 88 / 90)
    assert r["eff_latency"] == pytest.approx(0.2 * 88 / 90)
    assert (r["speedup_b1"], r["speedup_bt"], r["compression_ratio"]) == pytest.approx((1.25, 2.0, 2.0))
    assert r["dense_key"] == "d/resnet56/dense/None/0"


def test_negative_acc_and_nan_when_cost_grows():
    r = _by(add_relative_metrics(_hand_frame()), "bunit")
    assert r["acc_drop"] == pytest.approx(-1.0)
    assert r["acc_cost_params"] == pytest.approx(-1.0 / 20)  # accuracy improved: negative ACC
    assert r["reduction_latency"] == pytest.approx(-0.2)
    assert math.isnan(r["acc_cost_latency"])  # R <= 0 -> NaN, never inf
    assert r["eff_latency"] == pytest.approx(-0.2 * 91 / 90)
    assert r["speedup_b1"] == pytest.approx(10 / 12)


def test_dense_reference_values():
    r = _by(add_relative_metrics(_hand_frame()), "dense")
    assert r["acc_drop"] == 0.0
    for axis in ("params", "macs", "latency"):
        assert r[f"reduction_{axis}"] == 0.0
        assert r[f"eff_{axis}"] == 0.0
        assert math.isnan(r[f"acc_cost_{axis}"])
    assert (r["speedup_b1"], r["speedup_bt"], r["compression_ratio"]) == (1.0, 1.0, 1.0)


def test_sparse_aware_costs():
    frame = _hand_frame()
    r = _by(add_relative_metrics(frame), "global-magnitude")
    assert (r["cost_params"], r["reduction_params"], r["reduction_macs"]) == pytest.approx((100, 0.9, 0.8))
    assert r["acc_cost_params"] == pytest.approx(1.0 / 90)
    assert r["compression_ratio"] == pytest.approx(10.0)
    plain = _by(add_relative_metrics(frame, sparse_aware=False), "global-magnitude")
    assert plain["reduction_params"] == 0.0 and math.isnan(plain["acc_cost_params"]) and plain["eff_params"] == 0.0


def test_missing_reference_and_other_latency_device_give_nan():
    m = add_relative_metrics(_hand_frame())
    orphan = _by(m, "l1-filter", seed=7)
    assert pd.isna(orphan["dense_key"])
    for col in ("acc_drop", "reduction_params", "acc_cost_macs", "eff_params", "speedup_b1", "compression_ratio"):
        assert math.isnan(orphan[col]), col
    moved = _by(m, "slimming")
    assert not moved["latency_comparable"]
    assert moved["reduction_params"] == pytest.approx(0.6)  # size metrics still valid
    for col in ("reduction_latency", "acc_cost_latency", "eff_latency", "speedup_b1", "speedup_bt"):
        assert math.isnan(moved[col]), col


def test_vectorised_formulas_never_inf_and_silent():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        a = acc_cost([90, 89, 88, 95], [90, 90, 90, 90], [0.0, -0.5, 0.5, 0.5])
        e = efficiency([90, 88], [0.0, 90], [0.5, 0.0])
    assert np.isnan(a[0]) and np.isnan(a[1]) and a[2] == pytest.approx(0.04) and a[3] == pytest.approx(-0.1)
    assert np.isnan(e[0]) and e[1] == 0.0


def _seeds_frame() -> pd.DataFrame:
    rows = []
    for seed, (acc, lat) in enumerate([(88.0, 8.0), (89.0, 8.0), (90.0, 11.0)]):
        rows.append(_row("dense", "dense", None, seed, 90.0, 1000, 2000, 10.0, 100.0))
        rows.append(_row("l1-filter", "structured", 0.5, seed, acc, 500, 1000, lat, 50.0))
    rows.append(_row("slimming", "structured", 0.4, 0, 86.0, 200, 400, 6.0, 30.0))
    return pd.DataFrame(rows)


def test_summary_mean_and_std_over_seeds():
    s = summarize(add_relative_metrics(_seeds_frame()))
    assert len(s) == 3
    r = s[s["method"] == "l1-filter"].iloc[0]
    assert (r["n_seeds"], r["seeds"]) == (3, [0, 1, 2])
    assert r["top1_mean"] == pytest.approx(89.0) and r["top1_std"] == pytest.approx(1.0)
    assert r["acc_drop_mean"] == pytest.approx(1.0) and r["acc_drop_std"] == pytest.approx(1.0)
    # ACC_params per seed: 2/50, 1/50, 0/50 -> mean .02, sample std .02
    assert r["acc_cost_params_mean"] == pytest.approx(0.02) and r["acc_cost_params_std"] == pytest.approx(0.02)
    # EFF_params per seed: .5 * (88, 89, 90) / 90
    eff = 0.5 * np.array([88, 89, 90]) / 90
    assert r["eff_params_mean"] == pytest.approx(eff.mean()) and r["eff_params_std"] == pytest.approx(eff.std(ddof=1))
    # latency grew on seed 2 (R = -.1): ACC_latency is NaN there, so NaN in the summary; EFF stays defined
    assert math.isnan(r["acc_cost_latency_mean"])
    assert r["eff_latency_mean"] == pytest.approx(np.mean([0.2 * 88 / 90, 0.2 * 89 / 90, -0.1 * 90 / 90]))
    one = s[s["method"] == "slimming"].iloc[0]
    assert one["n_seeds"] == 1 and math.isnan(one["top1_std"]) and one["top1_mean"] == 86.0
    assert list(s["method"]) == ["dense", "l1-filter", "slimming"]  # dense first, then families


def test_pareto_mask_hand_made_set():
    cost = [1.0, 2.0, 2.0, 3.0, 4.0, 0.5, np.nan, 4.0]
    acc = [90.0, 92.0, 91.0, 92.0, 95.0, 80.0, 99.0, 95.0]
    # (2, 91) is beaten by (2, 92); (3, 92) by (2, 92); NaN is never on the front; the duplicate (4, 95) ties
    assert pareto_mask(cost, acc).tolist() == [True, True, False, False, True, True, False, True]
    with pytest.raises(ValueError, match="cost/acc"):
        pareto_mask([1, 2], [1])


def test_pareto_columns_per_seed_and_on_means():
    m = add_relative_metrics(_seeds_frame())
    # seed 0: dense (2000 MACs, 90), l1 (1000, 88), slimming (400, 86): all on the MACs front
    seed0 = m[m["seed"] == 0].set_index("method")
    assert seed0["pareto_macs"].to_dict() == {"dense": True, "l1-filter": True, "slimming": True}
    # latency, seed 2: l1 is slower than dense (11 > 10) and equal in accuracy -> dominated
    assert not _by(m, "l1-filter", seed=2)["pareto_latency"]
    assert _by(m, "l1-filter", seed=0)["pareto_latency"]
    s = summarize(m).set_index("method")
    assert s.loc["l1-filter", "pareto_latency_frac"] == pytest.approx(2 / 3)
    # means: l1 latency 9.0 ms at 89 %, dense 10 ms at 90 %, slimming 6 ms at 86 %: all on the front
    assert s["pareto_latency"].all()


def test_target_labels():
    values = (None, float("nan"), 0.5, 2.0, 3, "preset", {"macs_reduction": 0.5}, '{"macs_reduction": 0.5}',
              {"b": 1.0, "a": [1, 2]}, [0.5, 0.7], "{not json")
    assert [display_target(v) for v in values] == [
        "", "", "0.5", "2", "3", "preset", "macs_reduction=0.5", "macs_reduction=0.5", "a=[1,2],b=1", "[0.5,0.7]",
        "{not json"]


def test_target_sort_order():
    labels = ["macs_reduction=0.75", "paper", "0.9", "macs_reduction=0.1", "0.5", "macs_reduction=0.05"]
    assert sorted(labels, key=target_sort_key) == [
        "0.5", "0.9", "macs_reduction=0.05", "macs_reduction=0.1", "macs_reduction=0.75", "paper"]
