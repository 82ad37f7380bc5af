"""benchmarks/bench_train_step.py's sliced epochs: the models' epochs take turns, one running at a time, every
``slice_steps`` steps, all on the calling thread, and each model is charged the time of its own turns only."""
import importlib.util
import sys
import threading
import time
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "bench_train_step.py"


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_train_step", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        del sys.modules[spec.name]


def _jobs(steps: dict[str, int], step_s: dict[str, float], log: list, running: set, overlaps: list):
    """Jobs that take ``steps[n]`` steps of ``step_s[n]`` seconds each (sleeping), calling after_step after each as
    the harness loop does; every step logged, and any moment two jobs ran at once recorded."""
    guard = threading.Lock()

    def make(n):
        def job(after_step):
            for _ in range(steps[n]):
                with guard:
                    if running:
                        overlaps.append((n, set(running)))
                    running.add(n)
                time.sleep(step_s[n])
                with guard:
                    running.discard(n)
                log.append((n, threading.get_ident()))
                after_step(None)
        return job

    return {n: make(n) for n in steps}


def test_epochs_take_turns_in_slices_and_are_charged_their_own_turns(bench):
    steps = {"dense": 10, "a": 7, "b": 3}
    step_s = {"dense": 0.02, "a": 0.03, "b": 0.04}  # the others' turns: 0.33 s of dense's wait, 0.32 of a's, 0.41 of b's
    log, running, overlaps = [], set(), []
    t0 = time.perf_counter()
    spent = bench.sliced_epochs(_jobs(steps, step_s, log, running, overlaps), slice_steps=3)
    wall = time.perf_counter() - t0
    assert overlaps == []  # one job at a time
    assert {tid for _, tid in log} == {threading.get_ident()}  # all on this thread: one OpenMP pool
    # turns of 3 steps in order; b's third step ends a turn, so its next turn only returns; finished jobs leave
    assert "".join(n[0] for n, _ in log) == "ddd" "aaa" "bbb" "ddd" "aaa" "ddd" "a" "d"
    for n in steps:  # each job's time is its own steps' (the sleeps), not the others' turns
        own = steps[n] * step_s[n]
        assert own <= spent[n] < own + 0.1, n
    assert sum(spent.values()) <= wall


def test_a_failing_epoch_stops_the_rotation_and_is_raised(bench):
    def ok(after_step):
        for _ in range(5):
            after_step(None)

    def bad(after_step):
        after_step(None)
        raise ValueError("diverged")

    with pytest.raises(RuntimeError, match="the epoch of bad failed") as info:
        bench.sliced_epochs({"ok": ok, "bad": bad}, slice_steps=1)
    assert isinstance(info.value.__cause__, ValueError)
