"""A suite killed at any moment resumes without losing or duplicating a row, and without training again."""
import hashlib
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from harness.core.artefacts import MODELS_DIR, artefact_name
from harness.core.checkpoints import dense_key
from harness.core.config import expand, load_suite
from harness.run.runner import run_suite
from harness.core.store import read_rows

from conftest import write_suite


def _identities(folder) -> dict[str, tuple[int, int, str]]:
    """(inode, mtime_ns, SHA-256) of every complete ``.pt`` in ``folder`` (one whose JSON sidecar exists).

    A file written again, even with the same bytes, gets a new inode and mtime (writes are temp file + rename).
    """
    out = {}
    for pt in sorted(folder.glob("*.pt")):
        if pt.with_suffix(".json").exists():
            st = pt.stat()
            out[pt.name] = (st.st_ino, st.st_mtime_ns, hashlib.sha256(pt.read_bytes()).hexdigest())
    return out


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("seeds, epochs", [pytest.param(3, 1, id="3-seeds"),
                                           pytest.param(6, 2, id="6-seeds", marks=pytest.mark.slow)])
def test_kill_mid_suite_then_resume(tmp_path, seeds, epochs):
    suite = write_suite(tmp_path / "kill.toml", name="kill", seeds=range(seeds), epochs=epochs)
    config = load_suite(str(suite))
    grid = expand(config)
    store = tmp_path / "results" / "kill"
    runs, ckpts, models = store / "runs.jsonl", store / "checkpoints", store / MODELS_DIR
    cmd = [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(tmp_path / "results"),
           "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})  # one thread, as the resumed run below
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for the first finished row, then kill without warning
        if runs.exists() and runs.read_text().strip():
            break
        if proc.poll() is not None:
            raise AssertionError(f"suite ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [r["key"] for r in read_rows(runs)]
    assert 1 <= len(before) < len(grid)  # killed in the middle
    trained = _identities(ckpts)
    assert len(trained) >= len(before)  # every row written so far had its dense checkpoint

    # A writer that died mid-row leaves a torn line; the store must still resume cleanly.
    with open(runs, "a") as fh:
        fh.write('{"key": "torn')
    with pytest.warns(RuntimeWarning, match="torn"):
        again = run_suite(config, results_dir=tmp_path / "results", progress=False)  # what the CLI calls
    assert (again.ok, again.failed, again.skipped) == (len(grid) - len(before), 0, len(before))
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(e.key for e in grid)  # every row exactly once
    assert all(r["status"] == "ok" for r in rows)
    assert keys[: len(before)] == before  # the rows written before the kill are untouched

    # Checkpoints written before the kill are reused, not trained again: the very same files, one per seed.
    resumed = _identities(ckpts)
    assert {name: resumed[name] for name in trained} == trained
    assert sorted(resumed) == sorted(f"{dense_key(e)}.pt" for e in grid)
    metas = {p.stem: json.loads(p.read_text()) for p in ckpts.glob("*.json")}
    by_key = {e.key: e for e in grid}
    for row in rows:  # each row reports the pre-training its checkpoint records, not a time of its own
        meta = metas[dense_key(by_key[row["key"]])]
        assert (row["epochs_pretrain"], row["pretrain_seconds"]) == (epochs, round(meta["train_seconds"], 3))
    # One kept model per ok key, where its row says.
    assert sorted(p.name for p in models.glob("*.pt")) == sorted(f"{artefact_name(k)}.pt" for k in keys)
    assert all(r["model_path"] == f"{MODELS_DIR}/{artefact_name(r['key'])}.pt" for r in rows)
    for row in rows:  # each artefact says which seed and target made it, as its row does
        meta = json.loads((models / f"{artefact_name(row['key'])}.json").read_text())
        assert (meta["seed"], meta["target"]) == (by_key[row["key"]].seed, by_key[row["key"]].target)
    kept = _identities(models)
    assert len(kept) == len(grid)

    with pytest.warns(RuntimeWarning, match="torn"):
        third = run_suite(config, results_dir=tmp_path / "results", progress=False)
    assert (third.ran, third.skipped) == (0, len(grid))
    assert _identities(ckpts) == resumed and _identities(models) == kept  # nothing written again
