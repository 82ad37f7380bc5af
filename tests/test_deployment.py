"""Best deployment: each model at its fastest runtime and format, over dense at its own fastest (injected rows)."""
import math

import pandas as pd
import pytest

from harness.measure.timing_table import BEST_COLUMNS, best_deployment

DENSE, BUNIT = "d/r20/dense/s0", "d/r20/bunit/s0"


def row(key, runtime, p50, *, ratio=None, lo=None, hi=None, fmt="contiguous", batch=1, error=None, busy=False):
    family = "dense" if "dense" in key else "bunit"
    return {"key": key, "runtime": runtime, "device": "cpu", "device_name": "AMD EPYC", "dtype": "float32",
            "threads": 2, "batch": batch, "memory_format": fmt, "p50_ms": p50, "family": family, "method": family,
            "seed": 0, "dense_key": DENSE, "latency_ratio": 1.0 if family == "dense" else ratio,
            "latency_ratio_lo": lo, "latency_ratio_hi": hi, "error": error, "busy": busy, "unsteady": False,
            "runtime_version": f"{runtime} 1.0", "macs_ratio": 1.0 if family == "dense" else 0.4}


def test_each_model_takes_its_own_fastest_runtime_and_the_ratio_carries_to_dense_at_its_fastest():
    table = pd.DataFrame([
        row(DENSE, "eager", 5.0), row(BUNIT, "eager", 2.5, ratio=0.52, lo=0.5, hi=0.54),
        row(DENSE, "eager", 4.0, fmt="channels_last"), row(BUNIT, "eager", 2.2, ratio=0.56, lo=0.55, hi=0.57,
                                                           fmt="channels_last"),
        row(DENSE, "openvino", 2.0), row(BUNIT, "openvino", 1.9, ratio=0.96, lo=0.9, hi=1.0),
        row(BUNIT, "openvino+units", 1.0, ratio=0.45, lo=0.4, hi=0.5), row(DENSE, "openvino+units", 2.2),
    ])
    best = best_deployment(table).set_index("key")
    assert list(best.reset_index().columns) == list(BEST_COLUMNS)
    d, b = best.loc[DENSE], best.loc[BUNIT]
    assert (d.best_runtime, d.best_p50_ms, d.best_ratio, d.paired) == ("openvino", 2.0, 1.0, True)
    # BUnit wins under openvino+units (1.0 ms); dense there took 2.2 ms but its best is 2.0 ms under openvino
    assert (b.best_runtime, b.best_memory_format, b.dense_runtime, b.best_runtime_version) == (
        "openvino+units", "contiguous", "openvino", "openvino+units 1.0")
    assert b.best_ratio == pytest.approx(0.45 * 2.2 / 2.0) and b.best_ratio_lo == pytest.approx(0.4 * 1.1)
    assert b.best_ratio_hi == pytest.approx(0.5 * 1.1)
    assert (b.dense_p50_ms, b.dense_p50_in_best_ms, b.paired, b.deployments) == (2.0, 2.2, False, 4)


def test_eager_only_view_and_paired_when_both_win_in_the_same_condition():
    table = pd.DataFrame([
        row(DENSE, "eager", 5.0), row(BUNIT, "eager", 2.5, ratio=0.52, lo=0.5, hi=0.54),
        row(DENSE, "eager", 4.0, fmt="channels_last"), row(BUNIT, "eager", 2.2, ratio=0.56, lo=0.55, hi=0.57,
                                                           fmt="channels_last"),
        row(DENSE, "openvino", 2.0), row(BUNIT, "openvino", 1.0, ratio=0.5, lo=0.45, hi=0.55)])
    eager = best_deployment(table, runtimes=("eager",)).set_index("key").loc[BUNIT]
    assert (eager.best_memory_format, eager.best_ratio, eager.best_ratio_lo, eager.paired) == (
        "channels_last", 0.56, 0.55, True)
    every = best_deployment(table).set_index("key").loc[BUNIT]
    assert (every.best_runtime, every.best_ratio, every.best_ratio_hi, every.paired) == ("openvino", 0.5, 0.55, True)


def test_failed_rows_do_not_win_and_batches_are_kept_apart():
    table = pd.DataFrame([
        row(DENSE, "eager", 5.0), row(BUNIT, "eager", 2.5, ratio=0.5),
        row(DENSE, "openvino", None, error="RuntimeError: openvino: output differs from eager"),
        row(BUNIT, "openvino", 0.5, ratio=0.1, error="dense reference d/r20/dense/s0: unusable"),
        row(DENSE, "eager", 80.0, batch=64), row(BUNIT, "eager", 60.0, ratio=0.75, batch=64, busy=True)])
    best = best_deployment(table).set_index(["key", "batch"])
    assert best.loc[(BUNIT, 1)].best_runtime == "eager" and best.loc[(BUNIT, 1)].best_ratio == 0.5
    assert best.loc[(BUNIT, 64)].best_ratio == 0.75 and best.loc[(BUNIT, 64)].busy
    assert not best.loc[(BUNIT, 1)].busy and len(best) == 4


def test_a_model_whose_reference_was_not_timed_there_has_no_ratio():
    table = pd.DataFrame([row(BUNIT, "openvino", 1.0, ratio=0.5), row(DENSE, "eager", 3.0)])
    b = best_deployment(table).set_index("key").loc[BUNIT]
    assert b.dense_runtime == "eager" and math.isnan(b.best_ratio)


# --- OpenVINO as a runtime of the timing pass --------------------------------------------------------------------

@pytest.mark.parametrize("method,target", [("dense", None), ("bunit", "paper"), ("l1-filter", 0.5)])
def test_openvino_output_equals_eager(method, target):
    pytest.importorskip("openvino")
    import numpy as np
    import torch

    from harness.measure.runtimes import make_runner
    from test_artefacts import compressed

    model = compressed(method, target, "B")
    x = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    run, info = make_runner("openvino", model, x, threads=1, device=torch.device("cpu"))
    with torch.no_grad():
        expected = model(x).numpy()
    got = run()[0]  # the infer request's first output
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-4, atol=1e-5)
    assert info["openvino_max_abs_err"] < 1e-4 and info["openvino_precision"] == "f32"
    assert info["runtime_version"].startswith("openvino 2026.4")


def test_openvino_pass_writes_checked_rows_with_versions(tmp_path):
    pytest.importorskip("openvino")
    from harness.measure.timing_pass import load_timings, time_store
    from test_artefacts import build_store

    store = tmp_path / "quick"
    build_store(store, [("dense", None, 0), ("bunit", "paper", 0)])
    out = time_store(store, runtime="openvino", batch_sizes=(2,), rounds=3, warmup=0, settle=0, threads=1,
                     progress=False, repeats=1)
    assert out.written == 2 and not out.errors
    table = load_timings(store)
    assert set(table.runtime) == {"openvino"} and (table.openvino_max_abs_err < 1e-4).all()
    assert table.error.isna().all() and table.runtime_version.str.startswith("openvino 2026.4").all()
    assert (table.latency_ratio > 0).all()
    with pytest.raises(ValueError, match="allowed: contiguous"):
        time_store(store, runtime="openvino", memory_format="channels_last")
