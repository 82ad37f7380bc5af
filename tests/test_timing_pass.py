"""The timing pass: paired ratios on injected timings, shuffled interleaving, resumption, runtimes checked vs eager."""
import importlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

import harness.measure.timing_pass as tp
from bunit.timing import cpu_snapshot, interleaved_times, others_cpus
from harness.measure.runtimes import make_runner
from harness.measure.timing_pass import is_busy, load_timings, paired_ratio, time_store
from harness.core.artefacts import load_model
from harness.core.store import read_rows

from test_artefacts import build_store, compressed, run_key

ENTRIES = [("dense", None, 0), ("bunit", "paper", 0), ("global-magnitude", 0.7, 0), ("l1-filter", 0.5, 0),
           ("global-magnitude", 0.7, 1)]  # seed 1 has no dense: its reference is the dense model of seed 0
FAST = dict(rounds=3, warmup=0, settle=0, threads=1, progress=False, repeats=1)


@pytest.fixture(autouse=True)
def _two_eager_backends(monkeypatch):
    """BUnit's autotuner picks between two eager backends here: trying the C++ one builds it first (minutes, once per
    test session, as the caches are isolated); which backend wins is bunit's tests' business, not the pass's."""
    monkeypatch.setattr(importlib.import_module("bunit.autotune"), "DEFAULT_BACKENDS", ("grouped", "blockdiag"))


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = tmp_path_factory.mktemp("store") / "quick"
    build_store(directory, ENTRIES)
    return directory


def copy_of(store, tmp_path):
    shutil.copytree(store, tmp_path / "copy", ignore=shutil.ignore_patterns("timings.jsonl"))
    return tmp_path / "copy"


def test_paired_ratio_is_the_median_of_per_round_ratios():
    dense = [1.0, 2.0, 3.0, 4.0, 5.0]
    model = [3.0, 2.0, 9.0, 4.0, 5.0]  # per round: 3, 1, 3, 1, 1 -> median 1; the ratio of medians would be 4/3
    ratio, lo, hi = paired_ratio(model, dense)
    assert ratio == 1.0 and lo == 1.0 and hi == 3.0
    assert paired_ratio([2.0] * 7, [1.0] * 7) == (2.0, 2.0, 2.0)
    assert paired_ratio(model, dense) == paired_ratio(model, dense)  # fixed bootstrap seed
    with pytest.raises(ValueError, match="one timing per round"):
        paired_ratio([1.0, 2.0], [1.0])


def test_busy_rule():
    assert is_busy(0.3, cpus=2, threads=2) is True  # others took more than the 0 CPUs left free (+0.25)
    assert is_busy(0.2, cpus=2, threads=2) is False
    assert is_busy(1.2, cpus=2, threads=1) is False and is_busy(1.3, cpus=2, threads=1) is True
    assert is_busy(0.3, cpus=8, threads=16) is True  # more threads than CPUs leave none free
    assert is_busy(None, cpus=2, threads=1) is None


def test_other_work_is_measured_from_cpu_time_not_the_load_average():
    a = {"wall": 10.0, "busy": 100.0, "own": 5.0}
    b = {"wall": 12.0, "busy": 104.0, "own": 7.0}  # 4 CPU-s busy in 2 s, 2 of them this process's
    assert others_cpus(a, b) == 1.0
    assert others_cpus(a, {**b, "busy": 102.0}) == 0.0  # all the busy time was this process
    assert others_cpus(a, None) is None and others_cpus(b, a) is None
    snap = cpu_snapshot()
    if snap is not None:  # Linux: real counters. Other processes may run meanwhile (a second pytest worker), so
        spin = time.process_time() + 0.2  # check the counters themselves: this process's work is in the machine's
        while time.process_time() < spin:  # busy time (which others_cpus subtracts it from), to a 10 ms tick
            pass
        end = cpu_snapshot()
        own = end["own"] - snap["own"]
        assert own >= 0.2 and end["busy"] - snap["busy"] >= own - 0.03


def test_injected_timings_give_paired_ratios_and_the_right_dense(store, tmp_path):
    copy = copy_of(store, tmp_path)
    calls = []
    dense0 = run_key("dense", None, "B", 0)

    def timer(fns, **kw):
        calls.append((sorted(fns), kw))
        base = np.array([1.0, 2.0, 3.0, 4.0, 5.0])
        out = {k: list(base * (1 + i)) for i, k in enumerate(sorted(fns))}
        out[dense0] = list(base)
        out[sorted(k for k in fns if "l1-filter" in k)[0]] = [3.0, 2.0, 9.0, 4.0, 5.0]
        return out

    outcome = time_store(copy, batch_sizes=(1, 4), timer=timer, **{**FAST, "rounds": 5})
    assert outcome.written == 2 * len(ENTRIES) and not outcome.errors
    assert len(calls) == 2 and all(kw["order"] == "shuffle" and kw["rounds"] == 5 for _, kw in calls)
    assert calls[0][0] == sorted(run_key(m, t, "B", s) for m, t, s in ENTRIES)  # every model and its dense at once
    table = load_timings(copy).set_index(["key", "batch"])
    l1 = table.loc[(run_key("l1-filter", 0.5, "B", 0), 1)]
    assert l1.latency_ratio == 1.0 and l1.latency_ratio_hi == 3.0 and l1.p50_ms == 4000.0
    other = table.loc[(run_key("global-magnitude", 0.7, "B", 1), 4)]
    assert other.dense_key == dense0 and not other.dense_same_seed
    assert table.loc[(dense0, 1)].latency_ratio == 1.0
    assert 0 < other.macs_ratio < 1
    for column in tp.TIMING_COLUMNS:
        assert column in table.reset_index().columns


def test_repeats_reload_the_models_and_pool_their_rounds(store, tmp_path, monkeypatch):
    copy = copy_of(store, tmp_path)
    calls, loads = [], []
    runner = tp._runner
    monkeypatch.setattr(tp, "_runner", lambda *a, **kw: (loads.append(a[2]), runner(*a, **kw))[1])

    def timer(fns, **kw):
        calls.append(kw["seed"])
        return {k: [1.0 + i] * kw["rounds"] for i, k in enumerate(sorted(fns))}

    time_store(copy, batch_sizes=(1,), timer=timer, **{**FAST, "rounds": 4, "repeats": 3})
    assert calls == [0, 1, 2]  # a new shuffled order each repeat
    assert sorted(loads) == sorted(3 * [run_key(m, t, "B", s) for m, t, s in ENTRIES])  # every model loaded afresh
    table = load_timings(copy)
    assert set(table["rounds"]) == {12} and set(table["repeats"]) == {3}  # 3 x 4 rounds pooled per model


def test_a_reference_whose_repeats_disagree_flags_the_session_unsteady(store, tmp_path):
    copy = copy_of(store, tmp_path)
    dense0 = run_key("dense", None, "B", 0)
    level = iter([1.0, 1.0, 1.0, 2.0])  # repeat medians of the reference: batch 1: 1.0, 1.0; batch 2: 1.0, 2.0

    def timer(fns, **kw):
        ref = next(level)
        return {k: [ref if k == dense0 else 0.5] * kw["rounds"] for k in fns}

    with pytest.warns(RuntimeWarning, match="unsteady"):
        out = time_store(copy, batch_sizes=(1, 2), only="l1-filter", timer=timer, **{**FAST, "repeats": 2})
    assert out.unsteady_sessions == 1
    rows = {r["batch"]: r for r in read_rows(copy / "timings.jsonl")}
    assert rows[1]["dense_repeat_spread"] == 0.0 and rows[1]["unsteady"] is False
    assert rows[2]["dense_repeat_spread"] == 1.0 and rows[2]["unsteady"] is True
    assert rows[2]["repeat_p50_ms"] == [500.0, 500.0]


def test_the_conditions_of_a_setting_take_turns_across_repeats(store, tmp_path):
    copy = copy_of(store, tmp_path)
    batches = []

    def timer(fns, **kw):
        batches.append(next(iter(fns.values()))())  # each runner returns its model's output: its batch size
        return {k: [1.0] * kw["rounds"] for k in fns}

    time_store(copy, batch_sizes=(1, 2), timer=timer, **{**FAST, "repeats": 2})
    assert [out.shape[0] for out in batches] == [1, 2, 1, 2]  # not 1, 1, 2, 2: each batch's repeats span the pass


def test_interleaving_gives_every_model_one_turn_per_round_in_shuffled_order(store, tmp_path):
    copy = copy_of(store, tmp_path)
    log = []

    def recording_timer(fns, **kw):
        assert kw["order"] == "shuffle"
        wrapped = {k: (lambda k=k, f=f: (log.append(k), f())) for k, f in fns.items()}
        return interleaved_times(wrapped, **kw)

    time_store(copy, batch_sizes=(1,), timer=recording_timer, **{**FAST, "rounds": 12})
    n = len(ENTRIES)
    rounds = [log[i:i + n] for i in range(0, len(log), n)]
    assert len(rounds) == 12 and all(sorted(r) == sorted(rounds[0]) for r in rounds)
    assert len({tuple(r) for r in rounds}) > 1  # shuffled, not one fixed order


def test_copied_store_is_timed_from_artefacts_alone_and_resumes(store, tmp_path):
    copy = copy_of(store, tmp_path)
    first = time_store(copy, batch_sizes=(1, 2), **FAST)
    assert first.written == 2 * len(ENTRIES) and first.skipped == 0 and not first.errors
    table = load_timings(copy)
    assert (table.p50_ms > 0).all() and (table.p90_ms >= table.p50_ms).all()
    assert (table.latency_ratio_lo <= table.latency_ratio).all()
    assert (table.latency_ratio <= table.latency_ratio_hi).all()
    assert set(table.runtime) == {"eager"} and set(table.threads) == {1} and set(table.dtype) == {"float32"}
    bunit = table[table.key.str.contains("/bunit/")].iloc[0]
    assert bunit.prepared["bunit_backend"]  # BUnit picked its execution backends before timing
    again = time_store(copy, batch_sizes=(1, 2), **FAST)
    assert again.written == 0 and again.skipped == 2 * len(ENTRIES)
    more = time_store(copy, batch_sizes=(1, 3), only="l1-filter", **FAST)  # a new batch, one model: dense not written
    assert more.written == 1 and len(load_timings(copy)) == 2 * len(ENTRIES) + 1


def test_busy_machine_is_flagged(store, tmp_path, monkeypatch):
    copy = copy_of(store, tmp_path)
    monkeypatch.setattr(tp, "machine_load", lambda: {"load1": 9.0, "cpus": 2})
    calls = iter(range(1000))  # every snapshot 1 s after the last, with 3 more busy CPU-seconds, none of them ours
    monkeypatch.setattr(tp, "cpu_snapshot", lambda: (lambda i: {"wall": i, "busy": 3.0 * i, "own": 0.0})(next(calls)))
    with pytest.warns(RuntimeWarning, match="busy"):
        out = time_store(copy, batch_sizes=(1,), only="dense", **FAST)
    assert out.busy_sessions == 1
    rows = list(read_rows(copy / "timings.jsonl"))
    assert [r["busy"] for r in rows] == [True] and rows[0]["load1_start"] == 9.0 and rows[0]["others_cpus"] > 2


@pytest.mark.parametrize("method,target", [("dense", None), ("bunit", "paper"), ("global-magnitude", 0.7),
                                           ("l1-filter", 0.5)])
def test_onnx_export_equals_eager(method, target):
    model = compressed(method, target, "B")
    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    run, info = make_runner("onnx", model, x, threads=1, device=torch.device("cpu"))
    with torch.no_grad():
        expected = model(x).numpy()
    got = run()[0]
    assert got.shape == expected.shape and np.allclose(got, expected, rtol=1e-3, atol=1e-4)
    assert info["onnx_max_abs_err"] < 1e-4 and info["onnx_opset"] == 17


def test_onnx_pass_writes_checked_rows(store, tmp_path):
    copy = copy_of(store, tmp_path)
    out = time_store(copy, runtime="onnx", batch_sizes=(2,), **FAST)
    assert out.written == len(ENTRIES) and not out.errors
    table = load_timings(copy)
    assert set(table.runtime) == {"onnx"} and (table.onnx_max_abs_err < 1e-4).all() and table.error.isna().all()


def test_bad_options_name_the_allowed_values(store):
    for kwargs, match in [({"runtime": "tvm"}, r"runtime: 'tvm' not allowed; allowed: eager, compile, onnx, openvino, "
                                               r"openvino\+units"),
                          ({"batch_sizes": (0,)}, "batch_sizes"),
                          ({"runtime": "onnx", "memory_format": "channels_last"}, "allowed: contiguous"),
                          ({"rounds": 1}, "rounds >= 3")]:
        with pytest.raises(ValueError, match=match):
            time_store(store, **kwargs)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "time", str(store), "--runtime", "tvm"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        "bunitbench: error: --runtime: 'tvm' not allowed; allowed: eager, compile, onnx, openvino, openvino+units"]


def sigkill_when(proc: subprocess.Popen, ready, limit_s: float = 240.0) -> int:
    """SIGKILL the process group of ``proc`` as soon as ``ready()`` holds; fail when it ends or stalls first."""
    t_end = time.time() + limit_s
    while not ready():
        assert proc.poll() is None, f"the pass ended before it could be killed: {proc.stderr.read().decode()}"
        assert time.time() < t_end, "nothing was written in time"
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)
    return proc.wait()


def test_kill_at_any_moment_then_resume_times_each_pair_exactly_once(store, tmp_path):
    copy = copy_of(store, tmp_path)
    timings = copy / "timings.jsonl"
    cmd = [sys.executable, "-m", "harness.cli", "time", str(copy), "--batch-sizes", "1,2,3,4", "--rounds", "10",
           "--warmup", "1", "--threads", "1", "--no-progress", "--only", "dense", "--only", "magnitude",
           "--only", "l1-filter"]  # no BUnit model: its autotuner would build the C++ backend in the subprocess first
    timed = [e for e in ENTRIES if e[0] != "bunit"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    sigkill_when(proc, lambda: timings.exists() and timings.read_text().count("\n") >= 1)
    before = [json.loads(line)["key"] for line in timings.read_text().splitlines() if line.endswith("}")]
    assert 1 <= len(before) < 4 * len(timed)
    with open(timings, "a") as fh:
        fh.write('{"key": "torn')  # a writer that died mid-row
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = list(read_rows(timings))
    pairs = [(r["key"], r["batch"]) for r in rows]
    assert sorted(pairs) == sorted((run_key(m, t, "B", s), b) for m, t, s in timed for b in (1, 2, 3, 4))
    assert [r["key"] for r in rows[:len(before)]] == before  # rows written before the kill are kept


@pytest.mark.slow
def test_compile_pass_matches_eager_outputs(store, tmp_path):
    copy = copy_of(store, tmp_path)
    out = time_store(copy, runtime="compile", batch_sizes=(1,), **FAST)
    assert out.written == len(ENTRIES) and not out.errors
    table = load_timings(copy)
    assert (table.compile_max_abs_err < 1e-4).all() and (table.compile_s > 0).all()


def test_loaded_models_are_what_was_timed(store):
    for m, t, s in ENTRIES:
        key = run_key(m, t, "B", s)
        with torch.no_grad():
            assert torch.equal(load_model(store, key)(torch.ones(1, 3, 16, 16)),
                               compressed(m, t, "B", s)(torch.ones(1, 3, 16, 16)))


def test_a_reference_that_fails_in_a_later_repeat_leaves_rows_without_a_ratio(store, tmp_path, monkeypatch):
    copy = copy_of(store, tmp_path)
    dense0, runner, loads = run_key("dense", None, "B", 0), tp._runner, []

    def flaky(store_dir, row, key, cond, dev):
        loads.append(key)
        if key == dense0 and loads.count(dense0) == 2:
            raise RuntimeError("export failed this time")
        return runner(store_dir, row, key, cond, dev)

    monkeypatch.setattr(tp, "_runner", flaky)
    out = time_store(copy, batch_sizes=(1,), only="l1-filter", **{**FAST, "repeats": 2})
    row = next(iter(read_rows(copy / "timings.jsonl")))
    assert out.written == 1 and "dense reference" in row["error"] and "latency_ratio" not in row
    assert row["rounds"] == 6 and len(row["repeat_p50_ms"]) == 2  # the model itself was timed in both repeats
