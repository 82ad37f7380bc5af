"""What a run finds left to do: keys already ok are skipped; rows of another code revision are kept with a
warning, or run again on request; changing only measurement settings keeps every key (nothing re-trains)."""
from __future__ import annotations

import pytest

from conftest import write_suite
from harness.core.config import apply_overrides, expand, load_suite
from harness.core.provenance import provenance
from harness.run.runner import open_suite
from harness.core.store import ResultStore


def _suite(tmp_path):
    return load_suite(str(write_suite(tmp_path / "s.toml", seeds=(0, 1, 2))))


def _ok(exp, rev):
    return {"key": exp.key, "status": "ok", "top1": 90.0, "git_rev": rev}


def test_ok_keys_are_skipped_and_other_revisions_kept_with_a_warning(tmp_path):
    suite = _suite(tmp_path)
    grid = expand(suite)
    store_dir = tmp_path / "results" / suite.name
    store = ResultStore(store_dir)
    store.append(_ok(grid[0], provenance()["git_rev"]))  # this revision
    store.append(_ok(grid[1], "0" * 40))  # another revision
    store.append({"key": grid[2].key, "status": "failed", "git_rev": provenance()["git_rev"]})
    with pytest.warns(RuntimeWarning, match="1 ok rows .* another code revision; kept"):
        plan = open_suite(suite, tmp_path / "results", None)
    assert [e.key for e in plan.todo] == [grid[2].key] and plan.outcome.skipped == 2
    plan = open_suite(suite, tmp_path / "results", None, rerun_other_revisions=True)
    assert [e.key for e in plan.todo] == [grid[1].key, grid[2].key] and plan.outcome.skipped == 1


def test_measurement_settings_do_not_change_the_keys(tmp_path):
    suite = _suite(tmp_path)
    changed = apply_overrides(suite, ["measure.repeats=50", "measure.batch_sizes=[1]", "measure.latency=false",
                                      "measure.memory_format=channels_last"])
    assert [e.key for e in expand(changed)] == [e.key for e in expand(suite)]
    retrained = apply_overrides(suite, ["train.epochs=2"])
    assert not {e.key for e in expand(retrained)} & {e.key for e in expand(suite)}
