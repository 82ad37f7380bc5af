"""The timing pass's table: ``timings.jsonl`` read into a DataFrame, printed, and read at each model's best deployment.

One row per (model key, condition) as :mod:`harness.measure.timing_pass` writes them; a pair written twice (a
re-run after a kill between a row's write and the next) counts once, the latest row winning.

**Best deployment** (:func:`best_deployment`). A user ships a model through whichever runtime runs it fastest, so a
model's latency cost is read at its own best execution: for a (model key, device, device name, dtype, threads,
batch) the row of the fastest (``runtime``, ``memory_format``) among those timed (lowest ``p50_ms``; rows with an
error or no time do not count, nor an ``openvino+units`` row of a model without unit layers, which ran the
``openvino`` graph), and for its dense reference the same, independently (dense may win in another
runtime). The ratio to dense is then

    ``best_ratio = latency_ratio[R] * dense_p50[R] / dense_p50[R*]``

with ``R`` the model's best condition and ``R*`` the reference's: the paired ratio of the model's best session
(model and dense timed interleaved, ratio per round) carried over to dense's best. When both are best in the same
condition (``paired``) it is that paired ratio exactly, interval included; otherwise the factor
``dense_p50[R] / dense_p50[R*]`` compares two sessions (unpaired) and the interval (``best_ratio_lo``/``_hi``, the
paired interval scaled by the same factor) does not include its uncertainty.
"""
from __future__ import annotations

import os
from pathlib import Path

from harness.core.store import read_rows

__all__ = ["TIMINGS_FILE", "CONDITION_COLUMNS", "TIMING_COLUMNS", "DEPLOYMENT_COLUMNS", "BEST_COLUMNS",
           "conditions_key", "load_timings", "format_timings", "best_deployment", "format_best"]

TIMINGS_FILE = "timings.jsonl"
CONDITION_COLUMNS = ("runtime", "device", "device_name", "dtype", "threads", "batch", "memory_format")
TIMING_COLUMNS = ("key", *CONDITION_COLUMNS, "p50_ms", "p90_ms", "latency_ratio", "latency_ratio_lo",
                  "latency_ratio_hi", "dense_key", "busy", "unsteady", "load1_start", "load1_end", "rounds",
                  "timed_at")
"""Columns :func:`load_timings` always has (analysis reads them by name)."""
DEPLOYMENT_COLUMNS = ("runtime", "memory_format")
"""What a best deployment chooses among; the rest of the condition (device, dtype, threads, batch) stays fixed."""
BEST_COLUMNS = ("key", "device", "device_name", "dtype", "threads", "batch", "method", "family", "seed", "dense_key",
                "best_runtime", "best_memory_format", "best_runtime_version", "best_p50_ms", "dense_runtime",
                "dense_memory_format", "dense_p50_ms", "dense_p50_in_best_ms", "best_ratio", "best_ratio_lo",
                "best_ratio_hi", "paired", "deployments", "busy", "unsteady", "macs_ratio")
"""Columns of :func:`best_deployment`, one row per (key, device, device_name, dtype, threads, batch).

``best_runtime``/``best_memory_format``: the model's fastest deployment; ``best_runtime_version`` its software
(``runtime_version``); ``best_p50_ms`` its median. ``dense_runtime``/``dense_memory_format``/``dense_p50_ms``: the
dense reference's own fastest; ``dense_p50_in_best_ms``: the reference's median in the model's best session.
``best_ratio`` [``_lo``, ``_hi``]: the model at its best over dense at its best (module docstring); ``paired``:
both best in the same condition; ``deployments``: how many (runtime, memory format) were timed for the model;
``busy``/``unsteady``: either of the two sessions was flagged.
"""


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
    head = f"{'key':<64} {'runtime':>14} {'dtype':>8} {'batch':>5} {'p50 ms':>8} {'p90 ms':>8} " \
           f"{'ratio to dense [95% CI]':>24} {'MACs ratio':>10}  busy"
    lines = [head, "-" * len(head)]
    for _, r in rows.sort_values(["runtime", "dtype", "batch", "key"]).iterrows():
        ratio = "-" if _num(r["latency_ratio"]) == "-" else \
            f"{r['latency_ratio']:.3f} [{r['latency_ratio_lo']:.3f}, {r['latency_ratio_hi']:.3f}]"
        lines.append(f"{str(r['key'])[:64]:<64} {r['runtime']:>14} {r['dtype']:>8} {int(r['batch']):>5} "
                     f"{_num(r['p50_ms']):>8} {_num(r['p90_ms']):>8} {ratio:>24} "
                     f"{_num(r.get('macs_ratio')):>10}  {'yes' if r['busy'] is True else 'no'}"
                     + (f"  ({r['error']})" if isinstance(r.get("error"), str) else ""))
    return "\n".join(lines)


def _flag(value) -> bool:
    return value is not None and value == value and bool(value)  # None, NaN (!= itself) and False are unflagged


def _usable(table):
    import pandas as pd

    t = table.copy()
    t["p50_ms"] = pd.to_numeric(t["p50_ms"], errors="coerce")
    ok = t["p50_ms"] > 0
    if "error" in t.columns:
        ok &= t["error"].isna() | (t["error"].astype(str) == "None")
    return t[ok]


def best_deployment(table, *, runtimes=None):
    """Each model at its fastest (runtime, memory format) against its dense reference at its own fastest.

    Args:
        table: what :func:`load_timings` returned.
        runtimes: consider only these runtimes (None: every runtime in the table); ``("eager",)`` gives the
            eager-only view.

    Returns:
        A DataFrame with the columns of ``BEST_COLUMNS``, one row per (key, device, device_name, dtype, threads,
        batch) whose model has a usable time; dense references get ``best_ratio`` 1. A model whose reference has
        no usable time (or no paired ratio in the model's best session) gets NaN ratios.
    """
    import pandas as pd

    rows = _usable(table)
    if runtimes is not None:
        rows = rows[rows["runtime"].isin(list(runtimes))]
    fixed = [c for c in CONDITION_COLUMNS if c not in DEPLOYMENT_COLUMNS]
    # a model without unit layers runs the very graph of "openvino" under "openvino+units": that row is no deployment
    # of its own (it stays for the ratio of a BUnit model whose best session it was)
    nodes = pd.to_numeric(rows.get("openvino_unit_nodes", pd.Series(index=rows.index, dtype=float)), errors="coerce")
    own = ~((rows["runtime"] == "openvino+units") & (nodes == 0))
    # the fastest row per (key, fixed condition); ties go to the first in (runtime, memory_format) order
    ordered = rows[own].sort_values(["p50_ms", "runtime", "memory_format"], kind="stable")
    best = ordered.groupby(["key", *fixed], sort=False, dropna=False).head(1)
    counts = rows[own].groupby(["key", *fixed], dropna=False).size()
    by_cond = {(r["key"], *(r[c] for c in CONDITION_COLUMNS)): r for _, r in rows.iterrows()}
    best_of = {(r["key"], *(r[c] for c in fixed)): r for _, r in best.iterrows()}
    out = []
    for _, r in best.iterrows():
        fixed_vals = tuple(r[c] for c in fixed)
        ref_key = r["key"] if r.get("family") == "dense" else r.get("dense_key")
        ref_best = best_of.get((ref_key, *fixed_vals))
        ref_here = by_cond.get((ref_key, *(r[c] for c in CONDITION_COLUMNS)))
        ratio = lo = hi = float("nan")
        if ref_key == r["key"]:
            ratio = lo = hi = 1.0
        elif ref_best is not None and ref_here is not None and pd.notna(r.get("latency_ratio")):
            factor = float(ref_here["p50_ms"]) / float(ref_best["p50_ms"])
            ratio = float(r["latency_ratio"]) * factor
            lo, hi = (float(r[c]) * factor if pd.notna(r.get(c)) else float("nan")
                      for c in ("latency_ratio_lo", "latency_ratio_hi"))
        flags = {c: _flag(r.get(c)) or (ref_best is not None and _flag(ref_best.get(c))) for c in ("busy", "unsteady")}
        out.append({"key": r["key"], **{c: r[c] for c in fixed}, "method": r.get("method"),
                    "family": r.get("family"), "seed": r.get("seed"), "dense_key": ref_key,
                    "best_runtime": r["runtime"], "best_memory_format": r["memory_format"],
                    "best_runtime_version": r.get("runtime_version"), "best_p50_ms": float(r["p50_ms"]),
                    "dense_runtime": None if ref_best is None else ref_best["runtime"],
                    "dense_memory_format": None if ref_best is None else ref_best["memory_format"],
                    "dense_p50_ms": float("nan") if ref_best is None else float(ref_best["p50_ms"]),
                    "dense_p50_in_best_ms": float("nan") if ref_here is None else float(ref_here["p50_ms"]),
                    "best_ratio": ratio, "best_ratio_lo": lo, "best_ratio_hi": hi,
                    "paired": ref_best is not None and all(ref_best[c] == r[c] for c in DEPLOYMENT_COLUMNS),
                    "deployments": int(counts.loc[(r["key"], *fixed_vals)]), **flags,
                    "macs_ratio": r.get("macs_ratio")})
    return pd.DataFrame(out, columns=list(BEST_COLUMNS))


def format_best(best) -> str:
    """A plain-text table of :func:`best_deployment`: per model and batch, the winning runtime and the ratio."""
    head = f"{'key':<64} {'batch':>5} {'best (runtime/format)':>30} {'p50 ms':>8} {'dense best':>30} " \
           f"{'dense ms':>8} {'ratio':>6} {'MACs ratio':>10}"
    lines = [head, "-" * len(head)]
    for _, r in best.sort_values(["dtype", "batch", "key"]).iterrows():
        mine = f"{r['best_runtime']}/{r['best_memory_format']}"
        ref = f"{r['dense_runtime']}/{r['dense_memory_format']}" if r["dense_runtime"] else "-"
        lines.append(f"{str(r['key'])[:64]:<64} {int(r['batch']):>5} {mine:>30} {_num(r['best_p50_ms']):>8} "
                     f"{ref:>30} {_num(r['dense_p50_ms']):>8} {_num(r['best_ratio']):>6} "
                     f"{_num(r.get('macs_ratio')):>10}" + ("" if r["paired"] else "  (unpaired)"))
    return "\n".join(lines)
