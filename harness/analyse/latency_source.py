"""Where the verdict's latency comes from: the timing pass's paired ratios to dense when a store has them.

The timing pass (:mod:`harness.measure.timing_pass`, ``<store>/timings.jsonl``) times every model of a setting
interleaved with its dense reference and stores the median per-round ratio to dense with a 95% interval. Those
ratios are what users should compare, so the verdict prefers them. Two views (``load_latency_table(view=...)``):

- ``best`` (the default): each model at its best deployment. A user ships a model through whichever runtime runs
  it fastest, so for each model the fastest (runtime, memory format) among those timed is taken, over its dense
  reference at dense's own fastest (:func:`harness.measure.timing_table.best_deployment`, which says how the ratio
  is carried over when the two win in different runtimes); ``LatencyTable.deployment`` says which won for each
  row. At batch 1 when present (else the smallest batch), and among the (device, dtype, threads) with most rows.
  A store timed in one runtime and layout gives exactly the ``eager`` view's ratios.
- ``eager``: one condition, the ``eager`` runtime when present (else the runtime with most rows), at batch 1 when
  present (else the smallest batch), and among those the (device, dtype, threads, memory format) with most rows.

Whichever view the verdict reads, :func:`load_deployments` gives both side by side for every model and batch the pass
timed: its best deployment (which runtime and format won, and the ratio there) and its eager-only ratio. The report
shows it as a table per setting.

A row not in the view keeps its own latency columns (timed in isolation while training; compared with the dense
row's own timing). When the file is missing, every row is "isolated".
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import pandas as pd

from harness.analyse.metrics import acc_cost, efficiency
from harness.measure.timing_table import best_deployment, load_timings

__all__ = ["LatencyTable", "VIEWS", "DEPLOYMENT_VIEW_COLUMNS", "load_latency_table", "select_condition", "select_best",
           "deployment_view", "load_deployments", "apply_pass_ratios"]

_CONDITION = ("runtime", "device", "device_name", "dtype", "threads", "batch", "memory_format")
VIEWS = ("best", "eager")
"""``load_latency_table`` views: each model at its fastest deployment (default), or the eager runtime alone."""
_FIXED = ("device", "device_name", "dtype", "threads")
DEPLOYMENT_VIEW_COLUMNS = ("key", *_FIXED, "batch", "best_runtime", "best_memory_format", "best_p50_ms", "best_ratio",
                           "best_ratio_lo", "best_ratio_hi", "paired", "deployments", "dense_runtime",
                           "dense_memory_format", "eager_memory_format", "eager_p50_ms", "eager_ratio", "eager_ratio_lo",
                           "eager_ratio_hi", "eager_paired", "busy", "unsteady")
"""Columns of :func:`deployment_view`: ``best_*``, ``paired``, ``deployments``, ``dense_*``, ``busy`` and ``unsteady``
as in :data:`harness.measure.timing_table.BEST_COLUMNS`; ``eager_*`` the same model in the eager-only view (eager's
fastest memory format over dense's fastest eager one; NaN where eager was not timed)."""


@dataclass
class LatencyTable:
    """Paired latency ratios to dense for one timing condition.

    Attributes:
        ratio: ``{row key: latency_ratio}`` (model time / dense time, median over interleaved rounds).
        interval: ``{row key: (lo, hi)}`` of that ratio.
        busy: keys whose session the pass flagged busy.
        unsteady: keys whose session the pass flagged unsteady (the dense reference's repeats disagreed).
        condition: ``{runtime, device, device_name, dtype, threads, batch, memory_format}`` of the ratios
            (``runtime`` and ``memory_format`` ``best`` in the best-deployment view).
        deployment: best-deployment view only: ``{row key: "runtime/memory_format"}``, the fastest for that row.
    """

    ratio: dict[str, float] = field(default_factory=dict)
    interval: dict[str, tuple[float, float]] = field(default_factory=dict)
    busy: set[str] = field(default_factory=set)
    unsteady: set[str] = field(default_factory=set)
    condition: dict[str, Any] = field(default_factory=dict)
    deployment: dict[str, str] = field(default_factory=dict)

    def describe(self) -> str:
        """One line for the report: the condition and how many ratios (and busy ones) it holds."""
        cond = ", ".join(f"{k} {v}" for k, v in self.condition.items() if v is not None and v == v)
        if self.deployment:
            won = pd.Series(list(self.deployment.values())).value_counts()
            cond += ("; each model at its fastest runtime/format over dense at its own: "
                     + ", ".join(f"{d} for {n}" for d, n in won.items()))
        busy = f"; {len(self.busy)} timed while the machine was busy" if self.busy else ""
        unsteady = (f"; {len(self.unsteady)} timed while the machine changed state (the dense reference's repeats "
                    "differed by more than 15%)" if self.unsteady else "")
        return f"{len(self.ratio)} rows timed by the timing pass ({cond}){busy}{unsteady}"


def select_condition(table: pd.DataFrame) -> LatencyTable | None:
    """The :class:`LatencyTable` of the preferred condition of a timing table (rule in the module docstring)."""
    if table is None or table.empty or "latency_ratio" not in table.columns:
        return None
    t = table[pd.to_numeric(table["latency_ratio"], errors="coerce") > 0].copy()
    if t.empty:
        return None
    for col in _CONDITION:
        if col not in t.columns:
            t[col] = None
    runtimes = t["runtime"].value_counts()
    runtime = "eager" if "eager" in runtimes.index else runtimes.index[0]
    t = t[t["runtime"] == runtime]
    batches = pd.to_numeric(t["batch"], errors="coerce")
    t = t[batches == (1 if (batches == 1).any() else batches.min())]
    rest = [c for c in _CONDITION if c not in ("runtime", "batch")]
    groups = t.groupby([t[c].astype(str) for c in rest], sort=False)
    best = max(groups.groups, key=lambda k: len(groups.groups[k]))
    t = t.loc[groups.groups[best]]
    first = t.iloc[0]
    busy, unsteady = (t[c].fillna(False).astype(bool) if c in t.columns else pd.Series(False, index=t.index)
                      for c in ("busy", "unsteady"))
    lo = pd.to_numeric(t.get("latency_ratio_lo"), errors="coerce")
    hi = pd.to_numeric(t.get("latency_ratio_hi"), errors="coerce")
    return LatencyTable(
        ratio=dict(zip(t["key"], pd.to_numeric(t["latency_ratio"]).astype(float))),
        interval={k: (float(a), float(b)) for k, a, b in zip(t["key"], lo, hi)},
        busy=set(t.loc[busy, "key"]),
        unsteady=set(t.loc[unsteady, "key"]),
        condition={c: first[c] for c in _CONDITION},
    )


def select_best(table: pd.DataFrame) -> LatencyTable | None:
    """The best-deployment :class:`LatencyTable` of a timing table (rule in the module docstring)."""
    if table is None or table.empty or "p50_ms" not in table.columns:
        return None
    t = best_deployment(table)
    t = t[pd.to_numeric(t["best_ratio"], errors="coerce") > 0]
    if t.empty:
        return None
    batches = pd.to_numeric(t["batch"], errors="coerce")
    t = t[batches == (1 if (batches == 1).any() else batches.min())]
    t = _largest_group(t)
    first = t.iloc[0]
    return LatencyTable(
        ratio=dict(zip(t["key"], t["best_ratio"].astype(float))),
        interval={k: (float(a), float(b)) for k, a, b in zip(t["key"], t["best_ratio_lo"], t["best_ratio_hi"])},
        busy=set(t.loc[t["busy"].astype(bool), "key"]),
        unsteady=set(t.loc[t["unsteady"].astype(bool), "key"]),
        condition={"runtime": "best", **{c: first[c] for c in (*_FIXED, "batch")}, "memory_format": "best"},
        deployment={k: f"{r}/{f}" for k, r, f in zip(t["key"], t["best_runtime"], t["best_memory_format"])},
    )


def _largest_group(frame: pd.DataFrame) -> pd.DataFrame:
    """The rows of the (device, device_name, dtype, threads) with most rows."""
    groups = frame.groupby([frame[c].astype(str) for c in _FIXED], sort=False)
    return frame.loc[groups.groups[max(groups.groups, key=lambda k: len(groups.groups[k]))]]


def deployment_view(table: pd.DataFrame) -> pd.DataFrame | None:
    """Each timed model at its best deployment beside its eager-only view, per batch.

    Args:
        table: a timing table (:func:`harness.measure.timing_table.load_timings`).

    Returns:
        A DataFrame with the columns of :data:`DEPLOYMENT_VIEW_COLUMNS`, one row per (key, batch) of the (device,
        device_name, dtype, threads) with most rows, sorted by batch and key; None when no row has a usable time.
    """
    if table is None or table.empty or "p50_ms" not in table.columns:
        return None
    best = best_deployment(table)
    if best.empty:
        return None
    best = _largest_group(best)
    eager = best_deployment(table, runtimes=("eager",))
    eager = eager.rename(columns={"best_memory_format": "eager_memory_format", "best_p50_ms": "eager_p50_ms",
                                  "best_ratio": "eager_ratio", "best_ratio_lo": "eager_ratio_lo",
                                  "best_ratio_hi": "eager_ratio_hi", "paired": "eager_paired"})
    on = ["key", *_FIXED, "batch"]
    eager_cols = ["eager_memory_format", "eager_p50_ms", "eager_ratio", "eager_ratio_lo", "eager_ratio_hi",
                  "eager_paired"]
    out = best.merge(eager[on + eager_cols], on=on, how="left")
    return out[list(DEPLOYMENT_VIEW_COLUMNS)].sort_values(["batch", "key"], kind="stable").reset_index(drop=True)


def load_deployments(store_dir: str | os.PathLike | None) -> pd.DataFrame | None:
    """:func:`deployment_view` of ``<store_dir>/timings.jsonl``; None without a store or the file."""
    table = _stored_timings(store_dir)
    return None if table is None else deployment_view(table)


def _stored_timings(store_dir: str | os.PathLike | None) -> pd.DataFrame | None:
    """``<store_dir>/timings.jsonl`` as a table; None without a store, the file, or a readable one."""
    if store_dir is None:
        return None
    try:
        return load_timings(store_dir)
    except (FileNotFoundError, OSError, ValueError):
        return None


def load_latency_table(store_dir: str | os.PathLike | None, view: str = "best") -> LatencyTable | None:
    """The ``view`` (``best`` or ``eager``, module docstring) of ``<store_dir>/timings.jsonl``; None without a store or
    the file."""
    if view not in VIEWS:
        raise ValueError(f"view: {view!r} not allowed; allowed: {', '.join(VIEWS)}")
    table = _stored_timings(store_dir)
    if table is None:
        return None
    return select_best(table) if view == "best" else select_condition(table)


def apply_pass_ratios(metrics: pd.DataFrame, latency: LatencyTable | None) -> pd.DataFrame:
    """The per-row metrics with batch-1 latency taken from the timing pass where it timed the row.

    A row the pass timed and did not flag gets ``speedup_b1 = 1 / latency_ratio`` and ``reduction_latency =
    1 - latency_ratio`` (with ``acc_cost_latency`` and ``eff_latency`` recomputed from it); a row it flagged busy or
    unsteady gets NaN there, never its noisy isolated timing; other rows keep their own timing. ``latency_source``
    says which (``pass``, ``excluded``, ``isolated``).
    """
    out = metrics.copy()
    out["latency_source"] = "isolated"
    if latency is None or out.empty or "key" not in out.columns:
        return out
    ratio = pd.to_numeric(out["key"].map(latency.ratio), errors="coerce").astype(float)
    flagged = out["key"].isin(latency.busy | latency.unsteady) & ratio.notna()
    timed = ratio.notna() & ~flagged
    out.loc[timed, "latency_source"] = "pass"
    out.loc[flagged, "latency_source"] = "excluded"
    reduction = (1.0 - ratio).where(timed)
    out["speedup_b1"] = (1.0 / ratio).where(timed, out["speedup_b1"].where(~flagged))
    out["reduction_latency"] = reduction.where(timed, out["reduction_latency"].where(~flagged))
    out["acc_cost_latency"] = acc_cost(out["top1"], out["top1_dense"], out["reduction_latency"])
    out["eff_latency"] = efficiency(out["top1"], out["top1_dense"], out["reduction_latency"])
    return out
