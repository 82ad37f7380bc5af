"""Executors: the job plan, a real local Ray cluster and the local worker pool give the rows the sequential runner
gives, with the same resume rules."""
import hashlib
import json
import subprocess
import sys

import pytest
import torch

from baselines.counting import weight_sparsity
from harness.core.artefacts import load_model, read_meta
from harness.core.schema import unknown_columns
from harness.measure import LATENCY_COLUMNS, measure_size
from harness.core.checkpoints import dense_key
from harness.core.config import expand, load_suite
from harness.run.executors import plan_jobs, run_suite_local
from harness.run.experiment import failed_row
from harness.run.runner import run_suite, select
from harness.core.store import ResultStore

from conftest import torch_threads, write_suite

METHODS = """[[methods]]
name = "dense"

[[methods]]
name = "global-magnitude"
targets = [0.5]

[[methods]]
name = "bunit"
targets = ["paper"]
"""
# Columns that must agree exactly between executors: the same weights give the same numbers.
SAME = ("status", "top1", "top5", "test_loss", "params", "params_nonzero", "macs", "sparsity", "epochs_total")

PLUGIN = '''
import os

from baselines import Method, register_method


@register_method("ray-marker")
class RayMarker(Method):
    """Keeps the trained dense model and leaves a mark in the row: proves the plugin ran in the worker."""

    family = "unstructured"

    def apply(self, model, target, ctx):
        ctx.record.update({"marker": 7, "epochs_sparse": 0, "epochs_finetune": 0, "epochs_finetune_final": 0})
        return model


@register_method("worker-killer")
class WorkerKiller(Method):
    """Kills the process it runs in, as a segfault or the OOM killer would."""

    family = "unstructured"

    def apply(self, model, target, ctx):
        os._exit(3)
'''


def _rows(results_dir, suite="tiny"):
    return {r["key"]: r for r in ResultStore(results_dir / suite).rows()}


def _sha(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = write_suite(tmp_path_factory.mktemp("suite") / "tiny.toml", methods=METHODS)
    return path, load_suite(str(path))


@pytest.fixture(scope="module")
def local_rows(tmp_path_factory, tiny):
    """The sequential runner with one torch thread: what a Ray task (OMP_NUM_THREADS=1) and a pool worker on a
    2-core machine (2 cores // 2 workers) compute with, so the results are bit-identical, not merely close."""
    out = tmp_path_factory.mktemp("local")
    with torch_threads(1):
        outcome = run_suite(tiny[1], results_dir=out, device="cpu", progress=False)
    assert outcome.ok == 3
    return out, _rows(out)


def test_plan_puts_dense_pretraining_first(tmp_path):
    grid = expand(load_suite(str(write_suite(tmp_path / "plan.toml", seeds=(0, 1), methods=METHODS))))
    first, then = plan_jobs(grid, lambda key: False)
    # one checkpoint-only job per seed (the dense row itself is a run that loads the checkpoint, like the others)
    assert [(j.exp.method, j.exp.seed, j.writes_row) for j in first] == [("dense", 0, False), ("dense", 1, False)]
    assert sorted((j.exp.method, j.exp.seed) for j in then) == [("bunit", 0), ("bunit", 1), ("dense", 0), ("dense", 1),
                                                                 ("global-magnitude", 0), ("global-magnitude", 1)]
    for job in then:
        assert job.writes_row and job.dense == (dense_key(job.exp) if job.exp.method != "bunit" else None)
    assert {j.dense for j in first} == {j.dense for j in then if j.dense}  # every dependant has a producer

    pruning_only = select(grid, ["global-magnitude"])
    first, then = plan_jobs(pruning_only, lambda key: False)
    assert [(j.exp.method, j.writes_row) for j in first] == [("global-magnitude", False)] * 2  # checkpoint only
    assert [j.exp for j in then] == pruning_only

    first, then = plan_jobs(grid, lambda key: True)  # checkpoints exist: nothing waits
    assert first == [] and len(then) == len(grid)


def test_row_of_a_dead_worker_is_a_valid_failed_row(tmp_path):
    exp = expand(load_suite(str(write_suite(tmp_path / "dead.toml", methods=METHODS))))[1]
    store = ResultStore(tmp_path / "out")
    store.append(failed_row(exp, "worker process died (exit code 3)", executor="local", image_size=8))  # schema ok
    (row,) = store.rows()
    assert (row["key"], row["status"], row["family"], row["executor"]) == (exp.key, "failed", "unstructured", "local")
    assert store.completed_keys() == set()  # a re-run retries it


def test_ray_is_imported_only_when_chosen(tiny, monkeypatch):
    code = "import sys, harness.run.executors, harness.run.distributed, harness.cli; print('ray' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
    from harness.run.ray_executor import run_suite_ray

    monkeypatch.setitem(sys.modules, "ray", None)  # as if the extra were not installed
    with pytest.raises(ValueError, match=r"Ray is not installed; allowed: .*pip install 'bunit-bench\[ray\]'"):
        run_suite_ray(tiny[1], results_dir="unused")


@pytest.fixture(scope="module")
def ray_cluster():
    ray = pytest.importorskip("ray", reason="the Ray executor needs the optional extra: pip install 'bunit-bench[ray]'")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)  # a new one, never a user's
    yield ray
    ray.shutdown()


@pytest.mark.slow  # a Ray cluster, three runs and a CLI run against it; the local pool stays in CI
def test_ray_cluster_gives_the_local_rows_and_resumes(ray_cluster, tiny, local_rows, tmp_path):
    from harness.run.ray_executor import run_suite_ray

    path, suite = tiny
    local_dir, local = local_rows
    outcome = run_suite_ray(suite, results_dir=tmp_path, device="auto", progress=False)
    assert (outcome.ran, outcome.ok, outcome.failed, outcome.skipped) == (3, 3, 0, 0)
    rows = _rows(tmp_path)
    assert set(rows) == set(local) == {e.key for e in expand(suite)}
    for key, row in rows.items():
        assert row["executor"] == "ray" and local[key]["executor"] == "local"
        assert row["device"] == "cpu"
        assert {c: row[c] for c in SAME} == {c: local[key][c] for c in SAME}, key
    name = dense_key(expand(suite)[0])
    ckpt = f"checkpoints/{name}.pt"
    assert _sha(tmp_path / "tiny" / ckpt) == _sha(local_dir / "tiny" / ckpt)  # the driver wrote the worker's bytes
    for key, row in rows.items():  # kept models travelled back from the workers and load as the local ones do
        assert row["model_path"] == local[key]["model_path"] and (tmp_path / "tiny" / row["model_path"]).is_file()
        x = torch.randn(2, 1, 8, 8)
        torch.testing.assert_close(load_model(tmp_path / "tiny", key)(x), load_model(local_dir / "tiny", key)(x))

    again = run_suite_ray(suite, results_dir=tmp_path, device="auto", progress=False)
    assert (again.ran, again.skipped) == (0, 3)
    assert len(ResultStore(tmp_path / "tiny").rows()) == 3

    # The CLI against the running cluster (--address), with --plugin methods and --only pruning runs: a
    # checkpoint-only pre-training task runs first, in a worker that registered the plugins from their source; a
    # worker that dies becomes a failed row and the other runs go on.
    plugin = tmp_path / "marker_plugin.py"
    plugin.write_text(PLUGIN)
    suite_file = tmp_path / "tiny.toml"
    extra = '\n[[methods]]\nname = "ray-marker"\n\n[[methods]]\nname = "worker-killer"\n'
    suite_file.write_text(path.read_text() + extra)
    address = ray_cluster.get_runtime_context().gcs_address
    cli = [sys.executable, "-m", "harness.cli", "run", str(suite_file), "--executor", "ray", "--address", address,
           "--plugin", str(plugin), "--only", "ray-marker", "--only", "worker-killer", "--results-dir",
           str(tmp_path / "cli"), "--no-progress"]
    done = subprocess.run(cli, capture_output=True, text=True, timeout=240)
    assert done.returncode == 1, done.stdout[-2000:] + done.stderr[-3000:]  # 1: a run failed
    assert "1 ok, 1 failed, 0 already done" in done.stdout
    rows = {r["method"]: r for r in ResultStore(tmp_path / "cli" / "tiny").rows()}
    assert set(rows) == {"ray-marker", "worker-killer"} and all(r["executor"] == "ray" for r in rows.values())
    assert rows["ray-marker"]["status"] == "ok" and rows["ray-marker"]["achieved"]["marker"] == 7
    assert rows["worker-killer"]["status"] == "failed"
    assert rows["worker-killer"]["reason"].startswith("Ray task failed: WorkerCrashedError")
    assert _sha(tmp_path / "cli" / "tiny" / ckpt) == _sha(local_dir / "tiny" / ckpt)  # same dense weights


def test_the_runners_rows_measure_the_models_they_keep(local_rows):
    """The row builder the runner uses: every row's size columns are those of the model it kept (not the dense
    backbone, not the model before pruning was made permanent), its reductions are against the dense row, its
    sparsity is the kept weights', and a suite without latency leaves every latency column empty."""
    out, rows = local_rows
    store = out / "tiny"
    dense = next(r for r in rows.values() if r["method"] == "dense")
    assert {r["method"] for r in rows.values()} == {"dense", "global-magnitude", "bunit"}
    for key, row in rows.items():
        model = load_model(store, key)
        shape = (read_meta(store, key)["in_channels"], row["image_size"], row["image_size"])
        size = measure_size(model, shape)
        assert {c: row[c] for c in size} == size, key
        assert row["macs_reduction"] == pytest.approx(1 - row["macs"] / dense["macs"], abs=1e-12), key
        assert row["params_reduction"] == pytest.approx(1 - row["params"] / dense["params"], abs=1e-12), key
        zeros, total = weight_sparsity(model)
        assert row["sparsity"] == pytest.approx(zeros / total, abs=1e-12), key
        assert all(row[c] is None for c in LATENCY_COLUMNS) and not unknown_columns(row), key
    pruned = next(r for r in rows.values() if r["method"] == "global-magnitude")
    bunit = next(r for r in rows.values() if r["method"] == "bunit")
    assert pruned["params"] == dense["params"] and pruned["params_nonzero"] < dense["params_nonzero"]
    assert pruned["sparsity"] > 0.4 and bunit["macs"] < dense["macs"] and dense["macs_reduction"] == 0


def test_local_pool_gives_the_sequential_rows(tiny, local_rows, tmp_path):
    _, suite = tiny
    _, local = local_rows
    outcome = run_suite_local(suite, results_dir=tmp_path, devices=["cpu", "cpu"], progress=False)
    assert (outcome.ran, outcome.ok, outcome.failed) == (3, 3, 0)
    rows = _rows(tmp_path)
    assert set(rows) == set(local)
    for key, row in rows.items():
        assert {c: row[c] for c in SAME} == {c: local[key][c] for c in SAME}, key
    lines = (tmp_path / "tiny" / "runs.jsonl").read_text().splitlines()
    assert json.loads(lines[0])["method"] in ("dense", "bunit")  # the pruning run waited for its checkpoint
    assert run_suite_local(suite, results_dir=tmp_path, devices=["cpu", "cpu"], progress=False).skipped == 3
