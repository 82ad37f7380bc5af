"""Best deployment: each model at its fastest runtime and format, over dense at its own fastest (injected rows)."""
import math
from pathlib import Path

import pandas as pd
import pytest

from harness.measure.runtimes import list_runtimes
from harness.measure.timing_table import BEST_COLUMNS, best_deployment
from test_contracts import runtime_contract

DENSE, BUNIT = "d/r20/dense/s0", "d/r20/bunit/s0"


@pytest.fixture(autouse=True)
def _release_runtimes():
    """OpenVINO's compiled models and requests are destroyed at the end of the test that made them, not whenever a
    later test's garbage collection happens to reach them."""
    yield
    import gc

    gc.collect()


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
        row(BUNIT, "openvino+units", 1.0, ratio=0.45, lo=0.4, hi=0.5), row(DENSE, "openvino+units", 1.5),
    ])
    table["openvino_unit_nodes"] = [None] * 7 + [0]  # dense ran the plain openvino graph there: no deployment
    best = best_deployment(table).set_index("key")
    assert list(best.reset_index().columns) == list(BEST_COLUMNS)
    d, b = best.loc[DENSE], best.loc[BUNIT]
    assert (d.best_runtime, d.best_p50_ms, d.best_ratio, d.paired) == ("openvino", 2.0, 1.0, True)
    # BUnit wins under openvino+units (1.0 ms); dense there took 1.5 ms, but that was the plain openvino graph: its
    # best deployment is openvino (2.0 ms), and the paired ratio carries over by 1.5 / 2.0
    assert (b.best_runtime, b.best_memory_format, b.dense_runtime, b.best_runtime_version) == (
        "openvino+units", "contiguous", "openvino", "openvino+units 1.0")
    assert b.best_ratio == pytest.approx(0.45 * 1.5 / 2.0) and b.best_ratio_lo == pytest.approx(0.4 * 0.75)
    assert b.best_ratio_hi == pytest.approx(0.5 * 0.75)
    assert (b.dense_p50_ms, b.dense_p50_in_best_ms, b.paired, b.deployments) == (2.0, 1.5, False, 4)
    assert d.deployments == 3


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


# --- BUnit's unit kernel as an OpenVINO custom operation -------------------------------------------------------------

@pytest.fixture(scope="module")
def unit_op():
    """The built extension, from the default cache (built once for all test workers; later sessions load it)."""
    pytest.importorskip("openvino")
    from harness.measure import openvino_ext

    return openvino_ext.extension_path(quiet=True)


@pytest.mark.parametrize("target,shortcut", [("paper", "A"), ("paper", "B"), ("cifar-resnet-hybrid", "A"),
                                             ("cifar-resnet-all", "B"), ("macs:0.9", "A")])
def test_unit_op_in_openvino_equals_eager(unit_op, target, shortcut):
    """Option A (the kernel reads the padded shortcut from the block input) and B (a 1x1-conv residual), stride 1
    and 2, fixed-shape and run-time-channel unit shapes, layers of one group and of several chained groups."""
    import onnx
    import torch

    from bunit.layers import unit_layers
    from harness.measure import openvino_ext
    from harness.measure.runtimes import make_runner
    from test_artefacts import compressed

    model = compressed("bunit", target, shortcut)
    x = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        expected = model(x)
    proto, nodes = openvino_ext.export_with_units(model, x)
    ops = [(n.domain, n.op_type) for n in onnx.load_from_string(proto).graph.node]
    groups = sum(len(layer.groups) for _, layer in unit_layers(model))
    assert nodes == groups == ops.count(("bunit", "UnitGroup")) and groups >= 2
    in_units = {id(m) for _, layer in unit_layers(model) for m in layer.modules()}
    dense_convs = sum(isinstance(m, torch.nn.Conv2d) and id(m) not in in_units for m in model.modules())
    assert ops.count(("", "Conv")) == dense_convs  # the unit layers' convolutions are all inside the nodes
    with torch.no_grad():
        assert torch.equal(model(x), expected)  # the export left the model as it was
    run, info = make_runner("openvino+units", model, x, threads=2, device=torch.device("cpu"))
    got = torch.from_numpy(run()[0])
    assert info["openvino_unit_nodes"] == groups
    assert float((got - expected).abs().max() / expected.abs().max()) <= 1e-4


def test_unit_op_equals_the_fused_cpu_kernel_on_a_residual_block(unit_op):
    """The same source in both frameworks: the OpenVINO node's output equals fused_cpu's within float rounding."""
    import torch

    from bunit.layers import set_backend
    from harness.measure.runtimes import make_runner
    from test_artefacts import compressed

    model = compressed("bunit", "cifar-resnet-all", "A")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    fused = set_backend(compressed("bunit", "cifar-resnet-all", "A"), "fused_cpu").eval()
    with torch.no_grad():
        by_torch_kernel = fused(x)
    run, _ = make_runner("openvino+units", model, x, threads=1, device=torch.device("cpu"))
    got = torch.from_numpy(run()[0])
    assert float((got - by_torch_kernel).abs().max() / by_torch_kernel.abs().max()) <= 1e-5


def test_a_cached_operation_makes_sure_of_the_kernel_library_it_links(unit_op, monkeypatch):
    """The operation's library finds the kernel library by run path: a process that loads a cached build of the
    operation still makes sure the kernel library is there (and builds it again where its folder was cleared);
    without a compiler for it that is one line."""
    from harness.measure import openvino_ext

    monkeypatch.setattr(openvino_ext, "_state", {})
    calls = []
    monkeypatch.setattr(openvino_ext, "kernel_library", lambda: calls.append(1) or Path("/nowhere"))
    assert openvino_ext.extension_path(quiet=True).resolve() == unit_op.resolve() and calls == [1]

    def no_compiler():
        raise RuntimeError("unit kernel: no C++ compiler found (g++, c++ or $CXX)")

    monkeypatch.setattr(openvino_ext, "_state", {})
    monkeypatch.setattr(openvino_ext, "kernel_library", no_compiler)
    with pytest.raises(RuntimeError, match=r"^unit kernel: no C\+\+ compiler found"):
        openvino_ext.extension_path(quiet=True)


def test_no_compiler_is_refused_with_one_line(monkeypatch, tmp_path):
    pytest.importorskip("openvino")
    from harness.measure import openvino_ext

    monkeypatch.setattr(openvino_ext, "_state", {})
    monkeypatch.setattr(openvino_ext, "_source_tag", lambda: "no-compiler-test")
    monkeypatch.setenv("BUNITBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(RuntimeError) as err:
        openvino_ext.extension_path()
    assert str(err.value) == ("openvino+units: no C++ compiler found (g++, c++ or $CXX); the unit operation cannot "
                              "be built here")
    assert openvino_ext.build_info()["error"] == str(err.value) and not openvino_ext.build_info()["available"]


def test_openvino_units_pass_times_bunit_with_its_kernel_and_dense_as_plain_openvino(unit_op, tmp_path):
    from harness.measure.timing_pass import load_timings, time_store
    from test_artefacts import build_store

    store = tmp_path / "quick"
    build_store(store, [("dense", None, 0), ("bunit", "paper", 0)])
    out = time_store(store, runtime="openvino+units", batch_sizes=(2,), rounds=3, warmup=0, settle=0, threads=1,
                     progress=False, repeats=1)
    assert out.written == 2 and not out.errors
    table = load_timings(store).set_index("family")
    assert table.loc["bunit", "openvino_unit_nodes"] == 2 and table.loc["dense", "openvino_unit_nodes"] == 0
    assert (table.openvino_max_abs_err < 1e-4).all() and table.error.isna().all()


# --- the verdict's latency axis at the best deployment ---------------------------------------------------------------

def test_verdict_reads_each_model_at_its_best_deployment_by_default(tmp_path):
    import json

    from harness.analyse.latency_source import load_latency_table, select_condition
    from harness.measure.timing_table import load_timings

    rows = [row(DENSE, "eager", 5.0), row(BUNIT, "eager", 2.5, ratio=0.52, lo=0.5, hi=0.54),
            row(DENSE, "openvino", 2.0), row(BUNIT, "openvino", 1.9, ratio=0.96, lo=0.9, hi=1.0),
            row(BUNIT, "openvino+units", 0.9, ratio=0.45, lo=0.4, hi=0.5), row(DENSE, "openvino+units", 2.0),
            row(DENSE, "eager", 80.0, batch=64), row(BUNIT, "eager", 40.0, ratio=0.5, batch=64)]
    (tmp_path / "timings.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    best = load_latency_table(tmp_path)
    assert best.ratio == {DENSE: 1.0, BUNIT: 0.45} and best.interval[BUNIT] == (0.4, 0.5)
    assert best.deployment == {DENSE: "openvino/contiguous", BUNIT: "openvino+units/contiguous"}
    assert (best.condition["runtime"], best.condition["batch"]) == ("best", 1)
    assert "openvino+units/contiguous for 1" in best.describe()
    eager = load_latency_table(tmp_path, view="eager")
    assert eager.ratio == {DENSE: 1.0, BUNIT: 0.52} and not eager.deployment
    only_eager = load_timings(tmp_path)
    only_eager = only_eager[only_eager.runtime == "eager"]
    # one runtime and layout timed: the best view is the eager view, ratio for ratio
    from harness.analyse.latency_source import select_best

    assert select_best(only_eager).ratio == select_condition(only_eager).ratio
    with pytest.raises(ValueError, match="view: 'fastest' not allowed; allowed: best, eager"):
        load_latency_table(tmp_path, view="fastest")


def test_time_command_times_several_runtimes_and_prints_each_models_best(tmp_path, capsys):
    pytest.importorskip("openvino")
    from harness.cli import main
    from harness.measure.timing_table import load_timings
    from test_artefacts import build_store

    store = tmp_path / "quick"
    build_store(store, [("dense", None, 0), ("l1-filter", 0.5, 0)])
    assert main(["time", str(store), "--runtime", "eager,openvino", "--batch-sizes", "2", "--rounds", "3",
                 "--warmup", "0", "--repeats", "1", "--threads", "1", "--no-progress"]) == 0
    table = load_timings(store)
    assert sorted(table.runtime) == ["eager", "eager", "openvino", "openvino"]
    assert set(table.runtime_version) == {f"torch {__import__('torch').__version__}",
                                          f"openvino {__import__('openvino').get_version()}"}
    printed = capsys.readouterr().out
    assert "Each model at its fastest runtime and format" in printed and (store / "timings.csv").exists()


# --- the runtime contract, over every registered runtime (defined in test_contracts.py) -------------------------------
@pytest.mark.parametrize("name", list_runtimes())
def test_runtime_contract(name):
    """Every registered runtime's output equals eager's on a tiny model with a unit layer and non-default BatchNorms,
    within the runtime's tolerance (a runtime whose package is missing skips, naming it)."""
    runtime_contract(name)
