"""The report names each model's best deployment (runtime and format) beside its eager-only ratio, from timings
written here for three models of the synthetic fixture store; the verdict can read either view."""
from __future__ import annotations

import json
import os

os.environ["MPLBACKEND"] = "Agg"  # before anything imports matplotlib

import pandas as pd
import pytest

import harness  # noqa: F401  (torchvision shim first)
from harness.analyse.latency_source import DEPLOYMENT_VIEW_COLUMNS, load_deployments
from harness.analyse.report import write_report
from harness.core.store import load_results
from fixtures_store import write_fixture_store


def _keys(store) -> dict[str, str]:
    rows = load_results(store)
    rows = rows[(rows["backbone"] == "resnet56") & (rows["seed"] == 0)]
    pick = {"dense": None, "bunit": "stage2-3", "l1-filter": 0.3}
    return {m: rows[(rows["method"] == m) & ((rows["target"] == t) if t is not None else rows["target"].isna())]
            ["key"].iloc[0] for m, t in pick.items()}


def _timing(key, dense_key, family, runtime, p50, batch, *, ratio=None, fmt="contiguous", nodes=None):
    return {"key": key, "runtime": runtime, "device": "cpu", "device_name": "AMD EPYC", "dtype": "float32",
            "threads": 1, "batch": batch, "memory_format": fmt, "p50_ms": p50, "p90_ms": p50 * 1.1,
            "family": family, "method": family, "seed": 0, "dense_key": dense_key,
            "latency_ratio": 1.0 if family == "dense" else ratio,
            "latency_ratio_lo": 1.0 if family == "dense" else ratio - 0.01,
            "latency_ratio_hi": 1.0 if family == "dense" else ratio + 0.01, "error": None, "busy": False,
            "unsteady": False, "runtime_version": f"{runtime} 1.0", "openvino_unit_nodes": nodes}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    store = write_fixture_store(tmp_path_factory.mktemp("deploy") / "suite")
    k = _keys(store)
    d, b, p = k["dense"], k["bunit"], k["l1-filter"]
    rows = [
        # batch 1: dense fastest under openvino; BUnit under openvino+units (dense there ran the plain openvino
        # graph: no deployment of its own); L1-filter under onnx, so its ratio is carried over to dense's openvino
        _timing(d, d, "dense", "eager", 5.0, 1), _timing(d, d, "dense", "onnx", 2.2, 1),
        _timing(d, d, "dense", "openvino", 2.0, 1), _timing(d, d, "dense", "openvino+units", 1.8, 1, nodes=0),
        _timing(b, d, "bunit", "eager", 2.5, 1, ratio=0.5), _timing(b, d, "bunit", "onnx", 2.4, 1, ratio=1.1),
        _timing(b, d, "bunit", "openvino", 1.9, 1, ratio=0.95),
        _timing(b, d, "bunit", "openvino+units", 0.9, 1, ratio=0.45, nodes=4),
        _timing(p, d, "structured", "eager", 3.0, 1, ratio=0.6), _timing(p, d, "structured", "onnx", 1.5, 1, ratio=0.68),
        _timing(p, d, "structured", "openvino", 1.6, 1, ratio=0.8),
        # batch 8: eager channels_last wins for BUnit, openvino for dense and L1-filter
        _timing(d, d, "dense", "eager", 40.0, 8), _timing(d, d, "dense", "eager", 35.0, 8, fmt="channels_last"),
        _timing(d, d, "dense", "openvino", 30.0, 8),
        _timing(b, d, "bunit", "eager", 14.0, 8, ratio=0.35), _timing(b, d, "bunit", "eager", 10.5, 8, ratio=0.3,
                                                                       fmt="channels_last"),
        _timing(b, d, "bunit", "openvino", 25.0, 8, ratio=0.83),
        _timing(p, d, "structured", "eager", 20.0, 8, ratio=0.5), _timing(p, d, "structured", "openvino", 12.0, 8,
                                                                          ratio=0.4),
    ]
    (store / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return store


def _deployment_table(md: str) -> list[dict[str, str]]:
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("| Method | Target | Seed | Best b1 |"))
    header = [c.strip() for c in lines[start].strip("|").split(" | ")]
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append(dict(zip(header, (c.strip() for c in line.strip("|").split(" | ")))))
    return rows


def test_deployment_view_gives_each_models_winner_beside_its_eager_ratio(store):
    view = load_deployments(store)
    assert list(view.columns) == list(DEPLOYMENT_VIEW_COLUMNS) and len(view) == 6
    k = _keys(store)
    got = {(m, int(r.batch)): (r.best_runtime, r.best_memory_format, round(r.best_ratio, 4), bool(r.paired),
                               round(r.eager_ratio, 4))
           for m, key in k.items() for _, r in view[view["key"] == key].iterrows()}
    assert got == {
        ("dense", 1): ("openvino", "contiguous", 1.0, True, 1.0),
        ("bunit", 1): ("openvino+units", "contiguous", round(0.45 * 1.8 / 2.0, 4), False, 0.5),
        ("l1-filter", 1): ("onnx", "contiguous", round(0.68 * 2.2 / 2.0, 4), False, 0.6),
        ("dense", 8): ("openvino", "contiguous", 1.0, True, 1.0),
        # eager-only: BUnit's fastest eager layout (channels_last) over dense's (channels_last), paired
        ("bunit", 8): ("eager", "channels_last", round(0.3 * 35.0 / 30.0, 4), False, 0.3),
        ("l1-filter", 8): ("openvino", "contiguous", 0.4, True, round(0.5 * 40.0 / 35.0, 4)),
    }


def test_report_names_each_models_best_deployment_and_its_eager_ratio(store):
    md = write_report(store, plots=False)[0].read_text(encoding="utf-8")
    assert "#### Best deployment per model" in md
    assert "Timing pass, device cpu, device_name AMD EPYC, dtype float32, threads 1." in md
    table = _deployment_table(md)
    assert [(r["Method"], r["Best b1"], r["Ratio b1"], r["Eager ratio b1"], r["Best b8"], r["Ratio b8"],
             r["Eager ratio b8"]) for r in table] == [
        ("dense", "openvino", "1.000", "1.000", "openvino", "1.000", "1.000"),
        ("bunit", "openvino+units", "0.405 \u2020", "0.500", "eager (channels_last)", "0.350 \u2020", "0.300"),
        ("l1-filter", "onnx", "0.748 \u2020", "0.600", "openvino", "0.400", "0.571 \u2020"),
    ]
    assert [(r["Target"], r["Seed"]) for r in table] == [("\u2014", "0"), ("stage2-3", "0"), ("0.3", "0")]
    # the verdict reads the best view by default and names the winners there
    assert "openvino+units/contiguous for 1" in md and "runtime best" in md


def test_report_verdict_reads_the_eager_view_on_request(store, tmp_path):
    md = write_report(store, tmp_path / "eager", plots=False, latency_view="eager")[0].read_text(encoding="utf-8")
    assert "runtime eager" in md and "runtime best" not in md
    assert len(_deployment_table(md)) == 3  # the per-model table shows both views either way
    with pytest.raises(ValueError, match="latency_view: 'fastest' not allowed; allowed: best, eager"):
        write_report(store, tmp_path / "bad", plots=False, latency_view="fastest")


def test_report_command_takes_the_view(store, capsys):
    from harness.cli import main

    assert main(["report", str(store), "--latency-view", "fastest"]) == 2
    assert capsys.readouterr().err.strip() == ("bunitbench: error: --latency-view: 'fastest' not allowed; "
                                               "allowed: best, eager")
    assert main(["report", str(store), "--latency-view", "eager", "--no-plots"]) == 0
    md = (store / "report.md").read_text(encoding="utf-8")
    assert "runtime eager" in md and "runtime best" not in md
    assert "](plots/" not in md  # --no-plots: no figure linked


def test_no_timings_no_deployment_table(tmp_path):
    store = write_fixture_store(tmp_path / "suite")
    assert load_deployments(store) is None
    md = write_report(store, plots=False)[0].read_text(encoding="utf-8")
    assert "Best deployment per model" not in md
    assert isinstance(load_results(store), pd.DataFrame)
