"""The timing pass's table: ``timings.jsonl`` read into a DataFrame, and printed.

One row per (model key, condition) as :mod:`harness.measure.timing_pass` writes them; a pair written twice (a
re-run after a kill between a row's write and the next) counts once, the latest row winning.
"""
from __future__ import annotations

import os
from pathlib import Path

from harness.run.store import read_rows

__all__ = ["TIMINGS_FILE", "CONDITION_COLUMNS", "TIMING_COLUMNS", "conditions_key", "load_timings", "format_timings"]

TIMINGS_FILE = "timings.jsonl"
CONDITION_COLUMNS = ("runtime", "device", "device_name", "dtype", "threads", "batch", "memory_format")
TIMING_COLUMNS = ("key", *CONDITION_COLUMNS, "p50_ms", "p90_ms", "latency_ratio", "latency_ratio_lo",
                  "latency_ratio_hi", "dense_key", "busy", "unsteady", "load1_start", "load1_end", "rounds",
                  "timed_at")
"""Columns :func:`load_timings` always has (analysis reads them by name)."""


def conditions_key(row: dict) -> tuple:
    """What identifies a row of the table: its model key and its condition."""
    return (row.get("key"), *(row.get(c) for c in CONDITION_COLUMNS))


def load_timings(store_dir: str | os.PathLike):
    """The timing table of a store as a pandas DataFrame, one row per (model key, condition); None when absent.

    Args:
        store_dir: the suite directory holding ``timings.jsonl``.

    Returns:
        A DataFrame with at least the columns of ``TIMING_COLUMNS`` (the latest row of a duplicated pair), or None.
    """
    import pandas as pd

    path = Path(store_dir) / TIMINGS_FILE
    if not path.exists():
        return None
    rows = list({conditions_key(r): r for r in read_rows(path)}.values())
    frame = pd.DataFrame(rows)
    for col in TIMING_COLUMNS:
        if col not in frame.columns:
            frame[col] = None
    return frame


def _num(value, fmt: str = ".3f") -> str:
    return format(value, fmt) if value is not None and value == value else "-"  # NaN != NaN


def format_timings(table, *, runtime: str | None = None) -> str:
    """A plain-text table of a timing table: per model and batch, p50, p90, ratio to dense [95% CI], MACs ratio.

    Args:
        table: what :func:`load_timings` returned.
        runtime: keep only this runtime's rows (None: all).
    """
    rows = table if runtime is None else table[table["runtime"] == runtime]
    head = f"{'key':<64} {'runtime':>7} {'dtype':>8} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} " \
           f"{'ratio to dense [95% CI]':>24} {'MACs ratio':>10}  busy"
    lines = [head, "-" * len(head)]
    for _, r in rows.sort_values(["runtime", "dtype", "batch", "key"]).iterrows():
        ratio = "-" if _num(r["latency_ratio"]) == "-" else \
            f"{r['latency_ratio']:.3f} [{r['latency_ratio_lo']:.3f}, {r['latency_ratio_hi']:.3f}]"
        lines.append(f"{str(r['key'])[:64]:<64} {r['runtime']:>7} {r['dtype']:>8} {int(r['batch']):>5} "
                     f"{_num(r['p50_ms']):>8} {_num(r['p90_ms']):>8} {ratio:>24} "
                     f"{_num(r.get('macs_ratio')):>10}  {'yes' if r['busy'] is True else 'no'}"
                     + (f"  ({r['error']})" if isinstance(r.get("error"), str) else ""))
    return "\n".join(lines)
