"""The result store: one JSON row per run, appended, never rewritten in place.

``results/<suite>/runs.jsonl`` holds every attempt. Each row is written with a single ``write`` on a
file opened with ``O_APPEND`` and then fsync'd, so a killed process leaves at most one torn last line;
readers skip a torn line and the next append starts on a fresh line. A key whose latest row is ``ok``
is complete and is skipped when the suite runs again, which is what makes a killed suite resumable.
"""
from __future__ import annotations

import json
import math
import os
import warnings
from pathlib import Path
from typing import Iterator

from harness.core.schema import check_ok_row, unknown_columns

__all__ = ["ResultStore", "append_row", "load_results", "read_rows", "RUNS_FILE"]

RUNS_FILE = "runs.jsonl"


def _json_default(value):
    if hasattr(value, "item"):  # numpy / torch scalars
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"row value of type {type(value).__name__} is not JSON-serialisable")


def _clean(value):
    """Replace non-finite floats by None: JSON has no NaN/inf."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def _runs_path(path: str | os.PathLike) -> Path:
    path = Path(path)
    return path / RUNS_FILE if path.is_dir() or path.suffix != ".jsonl" else path


def read_rows(path: str | os.PathLike) -> Iterator[dict]:
    """Every well-formed row of a store, in the order written; a torn line is skipped with a warning."""
    runs = _runs_path(path)
    if not runs.exists():
        return
    with open(runs, encoding="utf-8") as fh:
        for lineno, line in enumerate(fh, 1):
            line = line.strip()
            if not line:
                continue
            try:
                yield json.loads(line)
            except json.JSONDecodeError:
                warnings.warn(f"{runs}:{lineno}: skipping a torn row", RuntimeWarning, stacklevel=2)


def append_row(path: str | os.PathLike, row: dict) -> None:
    """Append one JSON row to the JSONL file ``path`` atomically: a single write, O_APPEND, fsync.

    Non-finite floats become null. When a previous writer died mid-line, the row starts on a fresh line.
    :class:`ResultStore` uses it for runs; other append-only tables (the timing pass) use it directly.
    """
    path = Path(path)
    line = json.dumps(_clean(row), default=_json_default, sort_keys=True, allow_nan=False) + "\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if os.fstat(fd).st_size and os.pread(fd, 1, os.fstat(fd).st_size - 1) != b"\n":
            line = "\n" + line  # a previous writer died mid-line
        os.write(fd, line.encode("utf-8"))
        os.fsync(fd)
    finally:
        os.close(fd)


class ResultStore:
    """Append-only JSONL store of run rows for one suite directory."""

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / RUNS_FILE

    def append(self, row: dict) -> None:
        """Append one row atomically (single write, O_APPEND, fsync)."""
        unknown = unknown_columns(row)
        if unknown:
            raise ValueError(f"row: unknown column(s) {', '.join(unknown)}; document them in harness/core/schema.py")
        if "key" not in row or "status" not in row:
            raise ValueError("row: needs 'key' and 'status'")
        check_ok_row(row)
        append_row(self.path, row)

    def rows(self) -> list[dict]:
        return list(read_rows(self.path))

    def latest(self) -> dict[str, dict]:
        """The latest row per key."""
        out: dict[str, dict] = {}
        for row in read_rows(self.path):
            out[row["key"]] = row
        return out

    def completed_keys(self) -> set[str]:
        """Keys whose latest row is ``ok``: these runs are skipped on re-run."""
        return {k for k, r in self.latest().items() if r.get("status") == "ok"}


def load_results(path: str | os.PathLike, *, latest_only: bool = True):
    """Rows of a store (a suite directory, a ``runs.jsonl``, or a results root) as a pandas DataFrame.

    Args:
        path: ``results/<suite>``, its ``runs.jsonl``, or a directory of suite directories.
        latest_only: keep only the latest row per key (an ``ok`` re-run supersedes a failure).

    Returns:
        One row per run with the columns of ``harness.core.schema.ROW_COLUMNS`` that occur.
    """
    import pandas as pd

    path = Path(path)
    files = [_runs_path(path)]
    if path.is_dir() and not (path / RUNS_FILE).exists():
        files = sorted(path.glob(f"*/{RUNS_FILE}"))
    rows: list[dict] = []
    for f in files:
        rows.extend(read_rows(f))
    if latest_only:
        rows = list({(r.get("suite"), r["key"]): r for r in rows}.values())
    return pd.DataFrame(rows)
