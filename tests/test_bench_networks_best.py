"""benchmarks/bench_networks.py ``--formats best``: every model at its fastest memory format against dense at dense's."""
import csv
import importlib.util
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_networks.py"

# seconds per timed call, per (model, format) timing key: dense is faster in channels_last, BUnit in NCHW
TIMES = {
    "dense@contiguous": [0.010, 0.012, 0.011],
    "dense@channels_last": [0.004, 0.006, 0.005],
    "bunit:cifar-resnet-all@contiguous": [0.002, 0.004, 0.003],
    "bunit:cifar-resnet-all@channels_last": [0.007, 0.008, 0.009],
}


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_networks", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


@pytest.fixture(scope="module")
def group(bench):
    return bench.build_group("resnet56", presets=["cifar-resnet-all"], pruning=False)


def test_best_rows_pick_each_models_fastest_format(bench, group, monkeypatch, tmp_path):
    calls = []

    def fake_interleaved_times(fns, *, rounds, warmup, device):
        calls.append(sorted(fns))
        return {key: TIMES[key] for key in fns}

    monkeypatch.setattr(bench, "interleaved_times", fake_interleaved_times)
    rows = bench.run_config(group, "resnet56", batch=1, dtype=torch.float32, formats=["contiguous", "channels_last"],
                            mode="eager", device=torch.device("cpu"), repeats=3, warmup=0, plan="grouped",
                            cache=tmp_path / "autotune.json", tune_repeats=1, tune_backends=["grouped"])
    assert calls == [sorted(TIMES)]  # all four (model, format) pairs in one interleaved round-robin
    by = {(r["model"], r["memory_format"]): r for r in rows}
    assert list(by) == [("dense", "contiguous"), ("bunit:cifar-resnet-all", "contiguous"),
                        ("dense", "channels_last"), ("bunit:cifar-resnet-all", "channels_last"),
                        ("dense", "best"), ("bunit:cifar-resnet-all", "best")]
    # per format: the ratio to dense in the same format, as without best
    assert by["bunit:cifar-resnet-all", "contiguous"]["latency_ratio"] == pytest.approx(3 / 11)
    assert by["bunit:cifar-resnet-all", "channels_last"]["latency_ratio"] == pytest.approx(8 / 5)
    dense, unit = by["dense", "best"], by["bunit:cifar-resnet-all", "best"]
    assert (dense["best_format"], dense["ref_format"], dense["latency_ratio"]) == ("channels_last", "channels_last", 1)
    assert dense["p50_ms"] == pytest.approx(5.0)
    assert (unit["best_format"], unit["ref_format"]) == ("contiguous", "channels_last")
    assert unit["p50_ms"] == pytest.approx(3.0)
    assert unit["ref_p50_ms"] == pytest.approx(5.0)
    assert unit["latency_ratio"] == pytest.approx(3 / 5)
    assert unit["latency_ratio_p90"] == pytest.approx(3.8 / 5.8)  # p90 of [2, 4, 3] ms over p90 of [4, 6, 5] ms
    assert unit["throughput_img_s"] == pytest.approx(1 / 3e-3)


def test_best_rows_ties_go_to_the_first_format(bench):
    rows = [{"model": "dense", "reference": "dense", "memory_format": f, "p50_ms": 2.0, "p90_ms": 3.0}
            for f in ("contiguous", "channels_last")]
    (best,) = bench.best_rows(rows)
    assert (best["memory_format"], best["best_format"], best["latency_ratio"]) == ("best", "contiguous", 1.0)


def test_formats_best_smoke(bench, tmp_path):
    out = tmp_path / "networks.csv"
    assert bench.main(["--quick", "--backbones", "resnet56", "--presets", "cifar-resnet-all", "--modes", "eager",
                       "--no-pruning", "--batches", "1", "--formats", "best", "--repeats", "3", "--warmup", "0",
                       "--tune-backends", "grouped", "--tune-repeats", "1", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out)))
    assert [(r["model"], r["memory_format"]) for r in rows] == [
        ("dense", "contiguous"), ("bunit:cifar-resnet-all", "contiguous"), ("dense", "channels_last"),
        ("bunit:cifar-resnet-all", "channels_last"), ("dense", "best"), ("bunit:cifar-resnet-all", "best")]
    per_format = {(r["model"], r["memory_format"]): float(r["p50_ms"]) for r in rows}
    for r in rows[4:]:
        assert float(r["p50_ms"]) == min(per_format[r["model"], f] for f in ("contiguous", "channels_last"))
        assert float(r["ref_p50_ms"]) == min(per_format["dense", f] for f in ("contiguous", "channels_last"))
        assert float(r["latency_ratio"]) == pytest.approx(float(r["p50_ms"]) / float(r["ref_p50_ms"]))


def test_formats_rejects_unknown(bench):
    with pytest.raises(ValueError, match="formats: .*allowed: contiguous, channels_last, best"):
        bench.main(["--formats", "nhwc", "--backbones", "resnet56"])
