"""A suite killed at any moment resumes without losing or duplicating a row."""
import json
import os
import signal
import subprocess
import sys
import time

from harness.run.store import read_rows

from conftest import write_suite


def _keys(suite, results):
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--dry-run", "--results-dir",
                          str(results)], capture_output=True, text=True, check=True)
    return out.stdout.split()


def test_kill_mid_suite_then_resume(tmp_path):
    suite = write_suite(tmp_path / "kill.toml", name="kill", seeds=(0, 1, 2, 3, 4, 5), epochs=2)
    results = tmp_path / "results"
    runs = results / "kill" / "runs.jsonl"
    cmd = [sys.executable, "-m", "harness.cli", "run", str(suite), "--results-dir", str(results), "--no-progress"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 240
    while time.time() < deadline:  # wait for at least two finished rows, then kill without warning
        if runs.exists() and len(runs.read_text().splitlines()) >= 2:
            break
        if proc.poll() is not None:
            raise AssertionError(f"suite ended before it could be killed: {proc.stderr.read().decode()}")
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = [r["key"] for r in read_rows(runs)]
    grid = _keys(suite, results)
    assert 2 <= len(before) < len(grid)  # killed in the middle

    # A writer that died mid-row leaves a torn line; the store must still resume cleanly.
    with open(runs, "a") as fh:
        fh.write('{"key": "torn')
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr
    rows = [json.loads(line) for line in runs.read_text().splitlines() if line.startswith("{") and line.endswith("}")]
    keys = [r["key"] for r in rows]
    assert sorted(keys) == sorted(grid)  # every row exactly once
    assert all(r["status"] == "ok" for r in rows)
    assert keys[: len(before)] == before  # the rows written before the kill are untouched
    # dense checkpoints written before the kill are reused, not retrained: one file per seed
    assert len(list((results / "kill" / "checkpoints").glob("*.pt"))) == len(grid)

    third = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert "0 ok, 0 failed, 6 already done" in third.stdout
