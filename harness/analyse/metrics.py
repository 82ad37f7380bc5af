"""Trade-off metrics: every number the plots and the report show is computed here, from result rows.

Every compressed row is compared with its *dense reference*: the ``ok`` row of family ``dense`` with the same
dataset, backbone, shortcut, image size and seed (``REFERENCE_KEYS``). Formulas (``acc`` is top-1 in percent,
``d`` marks the dense reference; README copies this list from ``METRIC_DEFINITIONS``):

- ``acc_drop = acc_d - acc``: top-1 points lost (negative when compression improved accuracy).
- Cost axes ``c`` in {params, macs, latency}. ``cost_params`` / ``cost_macs`` are the sparse-aware counts
  ``params_nonzero`` / ``macs_nonzero`` (what unstructured pruning saves; equal to ``params`` / ``macs`` for dense,
  structured and BUnit models), falling back to ``params`` / ``macs`` where a row lacks them; pass
  ``sparse_aware=False`` to use the plain counts. ``cost_latency`` is ``latency_ms_p50_b1``.
- ``R_c = 1 - c / c_d`` (``reduction_params``, ``reduction_macs``, ``reduction_latency``): fraction of cost removed.
- ``speedup_b1 = latency_ms_p50_b1_d / latency_ms_p50_b1`` and ``speedup_bt`` likewise on ``latency_ms_p50_bt``.
- ``compression_ratio = cost_params_d / cost_params``.
- ``ACC_c = (acc_d - acc) / (100 * R_c)`` (``acc_cost_c``): top-1 points lost per percent of cost removed; lower
  is better, negative when compression improved accuracy, NaN (never inf) when ``R_c <= 0`` (so NaN for dense).
- ``EFF_c = R_c * acc / acc_d`` (``eff_c``): fraction of cost removed, weighted by the accuracy kept; higher is
  better, 0 for the dense model, negative when the model costs more than dense.

Our own definitions of the "two trade-off metrics" the BUnit-Net paper mentions; its exact formulas are unknown.
Latency metrics are NaN unless the row was timed under the same conditions as its reference (``LATENCY_CONTEXT``:
device, dtype, memory format, threads; ``speedup_bt`` also the same throughput batch). A row without a dense
reference gets NaN for every relative metric and ``dense_key`` null. Rows whose ``status`` is not ``ok`` are
dropped before any metric is computed, and so are the ok rows :func:`partition_rows` leaves out (no finite top-1, a
configuration other than the latest of its curve, an earlier row of the same point); the report lists both.

Metrics are computed per row (one seed) and then averaged: :func:`summarize` gives mean and sample standard
deviation (ddof=1; NaN with one seed) over seeds; a metric that is NaN on any seed is NaN in the summary, so no
mean silently covers a subset of the seeds. Pareto fronts (maximise top-1, minimise cost) are computed per
setting (dataset, backbone, shortcut, image size): per seed on the rows (``pareto_c``) and on the seed means in
the summary (``pareto_c`` there, ``pareto_c_frac`` the fraction of seeds on whose front the configuration lies).
"""
from __future__ import annotations

import json
import math
import re
import warnings
from typing import Any

import numpy as np
import pandas as pd

from baselines import FAMILIES
from harness.core.schema import SETTING_KEYS

__all__ = [
    "COST_AXES",
    "SETTING_KEYS",
    "REFERENCE_KEYS",
    "SUMMARY_KEYS",
    "METRIC_COLUMNS",
    "METRIC_DEFINITIONS",
    "LATENCY_CONTEXT",
    "FAMILY_ORDER",
    "display_target",
    "family_rank",
    "target_sort_key",
    "ok_rows",
    "failed_rows",
    "POINT_FIELDS",
    "curve_configuration",
    "partition_rows",
    "resolution_points",
    "pareto_mask",
    "acc_cost",
    "efficiency",
    "add_relative_metrics",
    "summarize",
    "order_summary",
]

COST_AXES = ("params", "macs", "latency")
REFERENCE_KEYS = SETTING_KEYS + ("seed",)
SUMMARY_KEYS = ("dataset", "backbone", "shortcut", "image_size", "method", "family", "target_label", "schedule")
LATENCY_CONTEXT = ("latency_device", "device_name", "dtype", "memory_format", "threads")
FAMILY_ORDER = FAMILIES  # dense first, then BUnit, unstructured and structured (baselines.FAMILIES)


def family_rank(family: Any) -> int:
    """Position of a family in tables and legends (unknown families last)."""
    return FAMILY_ORDER.index(family) if family in FAMILY_ORDER else len(FAMILY_ORDER)

# per-row columns averaged over seeds by summarize() (those present in the frame)
METRIC_COLUMNS = (
    "top1", "top5", "acc_drop",
    "params", "params_nonzero", "macs", "macs_nonzero", "cost_params", "cost_macs", "cost_latency",
    "latency_ms_p50_b1", "latency_ms_p90_b1", "latency_ms_p50_bt", "latency_ms_p90_bt", "throughput_img_s",
    "reduction_params", "reduction_macs", "reduction_latency", "speedup_b1", "speedup_bt", "compression_ratio",
    "acc_cost_params", "acc_cost_macs", "acc_cost_latency", "eff_params", "eff_macs", "eff_latency",
    "sparsity", "channel_ratio", "peak_mem_mb", "epochs_total", "train_seconds",
)

METRIC_DEFINITIONS: tuple[tuple[str, str, str], ...] = (
    ("acc_drop", "acc_d - acc", "top-1 points lost against the dense reference (negative: accuracy improved)"),
    ("R_c", "1 - c / c_d", "fraction of cost c removed; c in {params (non-zero), MACs (non-zero), latency b1}"),
    ("speedup_b1, speedup_bt", "lat_d / lat", "median-latency ratio at batch 1 and at the throughput batch"),
    ("compression_ratio", "params_d / params", "parameter compression ratio (non-zero counts)"),
    ("ACC_c", "(acc_d - acc) / (100 R_c)", "points lost per percent of cost removed; lower is better; NaN if R_c <= 0"),
    ("EFF_c", "R_c acc / acc_d", "cost removed weighted by accuracy kept; higher is better; 0 for dense"),
)

_NUMBER = re.compile(r"[-+]?\d+(?:\.\d+)?(?:[eE][-+]?\d+)?")
_COST_SOURCES = {  # axis -> (sparse-aware column, plain column)
    "params": ("params_nonzero", "params"),
    "macs": ("macs_nonzero", "macs"),
    "latency": ("latency_ms_p50_b1", "latency_ms_p50_b1"),
}


def _is_missing(value: Any) -> bool:
    if value is None or value is pd.NA:
        return True
    return isinstance(value, float) and math.isnan(value)


def display_target(value: Any) -> str:
    """Canonical text of a target knob, used to group and display it.

    Args:
        value: the ``target`` of a row: a number, a preset name, a JSON string, a dict/list, or null.

    Returns:
        ``""`` for a missing target (the dense reference), ``"0.5"`` / ``"2"`` for numbers, ``"k=v,k2=v2"`` (keys
        sorted) for a dict or a JSON-object string such as ``{"macs_reduction": 0.5}``, compact JSON for lists,
        the string itself otherwise.
    """
    if _is_missing(value):
        return ""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (int, np.integer)):
        return str(int(value))
    if isinstance(value, (float, np.floating)):
        return str(int(value)) if float(value).is_integer() else repr(float(value))
    if isinstance(value, str) and value.lstrip().startswith("{"):
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            return value
        return display_target(parsed) if isinstance(parsed, dict) else value
    if isinstance(value, dict):
        return ",".join(f"{k}={display_target(v) if not isinstance(v, (dict, list)) else _compact(v)}"
                        for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return _compact(value)
    return str(value)


def _compact(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


def target_sort_key(label: str) -> tuple:
    """Sort key of a target label: plain numbers first, numerically; then the rest, inner numbers as numbers."""
    try:
        return (0, float(label), "", ())
    except ValueError:
        numbers = tuple(float(n) for n in _NUMBER.findall(label))
        return (1, 0.0, _NUMBER.sub("#", label), numbers)


def _key_part(value: Any) -> str:
    if _is_missing(value):
        return ""
    if isinstance(value, (float, np.floating)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _join_key(df: pd.DataFrame, columns: tuple[str, ...]) -> pd.Series:
    """One string per row identifying its values in ``columns`` (missing column or null -> empty)."""
    parts = [df[c].map(_key_part) if c in df.columns else pd.Series("", index=df.index) for c in columns]
    if not parts:
        return pd.Series("", index=df.index)
    out = parts[0].astype(str)
    for p in parts[1:]:
        out = out + "\x1f" + p.astype(str)
    return out


def _num(df: pd.DataFrame, column: str) -> pd.Series:
    if column not in df.columns:
        return pd.Series(np.nan, index=df.index, dtype=float)
    return pd.to_numeric(df[column], errors="coerce").astype(float)


def ok_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``status`` is ``ok`` (a frame without a status column is taken as all ok)."""
    if "status" not in df.columns:
        return df.copy()
    return df[df["status"] == "ok"].copy()


def failed_rows(df: pd.DataFrame) -> pd.DataFrame:
    """Rows whose ``status`` is not ``ok``."""
    if "status" not in df.columns:
        return df.iloc[0:0].copy()
    return df[df["status"] != "ok"].copy()


POINT_FIELDS = ("target", "seed")
"""Config fields that vary along one curve; every other field that changes the weights must be equal on it."""
_NOT_WEIGHTS = ("data_dir", "measure", "suite")  # never change the trained weights (Experiment.config_hash)
_CURVE_KEYS = SETTING_KEYS + ("method", "schedule")


def _flat(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: value}


def curve_configuration(config: Any) -> dict[str, Any]:
    """The fields of a row's ``config`` that must be equal along one curve, flattened (``train.epochs``).

    Everything that changes the trained weights except the point's own knob and seed (:data:`POINT_FIELDS`).
    An empty dict for a row without a config object.
    """
    if isinstance(config, str):
        try:
            config = json.loads(config)
        except json.JSONDecodeError:
            return {}
    if not isinstance(config, dict):
        return {}
    return {k: v for k, v in _flat({k: v for k, v in config.items() if k not in _NOT_WEIGHTS + POINT_FIELDS}).items()}


def _config_difference(config: dict, kept: dict, limit: int = 3) -> str:
    fields = sorted(k for k in set(config) | set(kept) if config.get(k) != kept.get(k))
    text = ", ".join(f"{k} {config.get(k)!r} (kept: {kept.get(k)!r})" for k in fields[:limit])
    return text + (f" and {len(fields) - limit} more" if len(fields) > limit else "")


def partition_rows(df: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The ok rows analysis uses, and the ok rows it leaves out with the reason (``left_out_reason``).

    Rules, in order (the report lists what they leave out):

    1. An ok row must have a finite top-1 (the store refuses new ones; a hand-written store may still hold one).
    2. One configuration per curve: the rows of one method (and schedule) in one setting must agree on every
       config field that changes the weights except the target and the seed (:func:`curve_configuration`). Where
       they do not, the configuration of the most recently finished row is kept and the others are left out.
    3. One row per point: where one (setting, method, schedule, target, seed) still has several rows, the most
       recently finished one is kept.

    Args:
        df: result rows (any status).

    Returns:
        ``(kept, left_out)``: both in the original row order.
    """
    ok = ok_rows(df)
    reasons = pd.Series(None, index=ok.index, dtype=object)
    top1 = _num(ok, "top1")
    reasons[~np.isfinite(top1)] = "ok row without a finite top-1"
    if ok.empty:
        return ok, ok.assign(left_out_reason=reasons)
    when = ok["finished_at"].astype(str) if "finished_at" in ok.columns else pd.Series("", index=ok.index)
    order = pd.Series(range(len(ok)), index=ok.index)
    configs = ok["config"].map(curve_configuration) if "config" in ok.columns else pd.Series(
        [{}] * len(ok), index=ok.index)
    ident = configs.map(lambda c: json.dumps(c, sort_keys=True, default=str))
    valid = reasons.isna()
    curve = _join_key(ok, _CURVE_KEYS)
    for _, idx in ok[valid].groupby(curve[valid], sort=False).groups.items():
        latest = max(idx, key=lambda i: (when[i], order[i]))
        for i in idx:
            if ident[i] != ident[latest]:
                reasons[i] = ("configuration differs from the latest run of this method: "
                              + _config_difference(configs[i], configs[latest]))
    valid = reasons.isna()
    point = _join_key(ok.assign(_t=ok["target"].map(display_target) if "target" in ok.columns else ""),
                      _CURVE_KEYS + ("_t", "seed"))
    for _, idx in ok[valid].groupby(point[valid], sort=False).groups.items():
        latest = max(idx, key=lambda i: (when[i], order[i]))
        for i in idx:
            if i != latest:
                reasons[i] = "an earlier row of the same point (method, target, seed): the latest is used"
    left = reasons.notna()
    return ok[~left].copy(), ok[left].assign(left_out_reason=reasons[left])


def resolution_points(df: pd.DataFrame) -> float:
    """One test image in top-1 points (``100 / n_test``) for rows of one setting; 0 when no row records ``n_test``.

    The largest over the rows (the smallest test set), so that no difference finer than any row can resolve is
    labelled.
    """
    n = _num(df, "n_test")
    n = n[n > 0]
    return float(100.0 / n.min()) if len(n) else 0.0


def pareto_mask(cost: Any, acc: Any) -> np.ndarray:
    """Which points lie on the accuracy-cost Pareto front (minimise cost, maximise accuracy).

    A point is on the front when no other point has cost <= and accuracy >= with at least one strict;
    identical points are all on the front. Points with a NaN coordinate are never on it.

    Args:
        cost: 1-D array-like of costs.
        acc: 1-D array-like of accuracies, same length.

    Returns:
        Boolean array, True on the front.
    """
    c = np.asarray(cost, dtype=float)
    a = np.asarray(acc, dtype=float)
    if c.shape != a.shape:
        raise ValueError(f"cost/acc: lengths differ ({c.shape} vs {a.shape})")
    valid = np.isfinite(c) & np.isfinite(a)
    on = valid.copy()
    idx = np.flatnonzero(valid)
    for i in idx:
        others = idx[idx != i]
        dominated = (c[others] <= c[i]) & (a[others] >= a[i]) & ((c[others] < c[i]) | (a[others] > a[i]))
        on[i] = not dominated.any()
    return on


def acc_cost(acc: Any, acc_dense: Any, reduction: Any) -> np.ndarray:
    """``ACC_c = (acc_dense - acc) / (100 * R_c)``; NaN where ``R_c <= 0`` or an input is NaN.

    Args:
        acc: top-1 of the compressed models, percent.
        acc_dense: top-1 of their dense references, percent.
        reduction: ``R_c``, the fraction of cost removed.

    Returns:
        Points of top-1 lost per percent of cost removed (float array).
    """
    acc, acc_dense, r = (np.asarray(x, dtype=float) for x in (acc, acc_dense, reduction))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = (acc_dense - acc) / (100.0 * r)
    return np.where(r > 0, out, np.nan)


def efficiency(acc: Any, acc_dense: Any, reduction: Any) -> np.ndarray:
    """``EFF_c = R_c * acc / acc_dense``; NaN where ``acc_dense <= 0`` or an input is NaN.

    Args:
        acc: top-1 of the compressed models, percent.
        acc_dense: top-1 of their dense references, percent.
        reduction: ``R_c``, the fraction of cost removed.

    Returns:
        Accuracy-weighted cost reduction (float array); 0 for the dense model itself.
    """
    acc, acc_dense, r = (np.asarray(x, dtype=float) for x in (acc, acc_dense, reduction))
    with np.errstate(divide="ignore", invalid="ignore"):
        out = r * acc / acc_dense
    return np.where(acc_dense > 0, out, np.nan)


def _reduction(cost: pd.Series, cost_dense: pd.Series) -> pd.Series:
    ok = (cost > 0) & (cost_dense > 0)
    return (1.0 - cost / cost_dense).where(ok)


def _is_dense(df: pd.DataFrame) -> pd.Series:
    if "family" in df.columns:
        return df["family"] == "dense"
    if "method" in df.columns:
        return df["method"] == "dense"
    return pd.Series(False, index=df.index)


def _same(a: pd.Series, b: pd.Series) -> pd.Series:
    """Element-wise equality where two nulls count as equal."""
    both_missing = a.map(_is_missing) & b.map(_is_missing)
    return both_missing | (a.map(_key_part) == b.map(_key_part))


def _dense_reference(out: pd.DataFrame) -> tuple[pd.Series, Any]:
    """Whether each row has a dense reference, and ``ref(column)``: that reference's value per row (NaN without)."""
    ref_key = _join_key(out, REFERENCE_KEYS)
    dense = out[_is_dense(out)].assign(_ref=ref_key[_is_dense(out)])
    dup = dense["_ref"].duplicated(keep="last")
    if dup.any():
        warnings.warn(f"{int(dup.sum())} duplicate dense reference row(s); the last written is used",
                      RuntimeWarning, stacklevel=3)
    dense = dense[~dup].set_index("_ref")

    def ref(column: str) -> pd.Series:
        if column not in dense.columns:
            return pd.Series(np.nan, index=out.index, dtype=object)
        return pd.Series(ref_key.map(dense[column]).to_numpy(), index=out.index)

    return ref_key.isin(dense.index), ref


def _latency_comparable(out: pd.DataFrame, has_ref: pd.Series, ref) -> tuple[pd.Series, pd.Series]:
    """Rows timed under their reference's conditions (``LATENCY_CONTEXT``), and at the same throughput batch too."""
    comparable = has_ref.copy()
    for column in LATENCY_CONTEXT:
        if column in out.columns:
            comparable &= _same(out[column], ref(column))
    same_bt = _same(out["throughput_batch"], ref("throughput_batch")) if "throughput_batch" in out.columns else True
    return comparable, comparable & same_bt


def _add_cost_metrics(out: pd.DataFrame, ref, comparable: pd.Series, comparable_bt: pd.Series) -> None:
    """``reduction_*``, ``acc_cost_*``, ``eff_*``, ``compression_ratio`` and ``speedup_*`` columns, in place."""
    acc, acc_d = out["top1"], out["top1_dense"]
    for axis in COST_AXES:
        c_d = pd.to_numeric(ref(f"cost_{axis}"), errors="coerce").astype(float)
        r = _reduction(out[f"cost_{axis}"], c_d)
        if axis == "latency":
            r = r.where(comparable)
        out[f"reduction_{axis}"] = r
        out[f"acc_cost_{axis}"] = acc_cost(acc, acc_d, r)
        out[f"eff_{axis}"] = efficiency(acc, acc_d, r)
    with np.errstate(divide="ignore", invalid="ignore"):
        p_d = pd.to_numeric(ref("cost_params"), errors="coerce").astype(float)
        out["compression_ratio"] = (p_d / out["cost_params"]).where(out["cost_params"] > 0)
        for tag, ok_context in (("b1", comparable), ("bt", comparable_bt)):
            lat = _num(out, f"latency_ms_p50_{tag}")
            lat_d = pd.to_numeric(ref(f"latency_ms_p50_{tag}"), errors="coerce").astype(float)
            out[f"speedup_{tag}"] = (lat_d / lat).where((lat > 0) & ok_context)


def _add_pareto_flags(out: pd.DataFrame) -> None:
    """Per-seed ``pareto_{axis}`` columns (front within each setting and seed), in place."""
    setting_seed = _join_key(out, REFERENCE_KEYS)
    for axis in COST_AXES:
        mask = pd.Series(False, index=out.index)
        for _, idx in out.groupby(setting_seed, sort=False).groups.items():
            mask.loc[idx] = pareto_mask(out.loc[idx, f"cost_{axis}"], out.loc[idx, "top1"])
        out[f"pareto_{axis}"] = mask


def add_relative_metrics(df: pd.DataFrame, *, sparse_aware: bool = True) -> pd.DataFrame:
    """Per-row metrics against the dense reference of the same setting and seed.

    Args:
        df: result rows (``harness.core.store.load_results``); rows whose status is not ``ok`` are dropped.
        sparse_aware: measure the params/MACs axes by non-zero counts (default) or by plain counts.

    Returns:
        A copy of the ok rows that :func:`partition_rows` keeps, with added columns: ``target_label``,
        ``dense_key``, ``top1_dense``, ``cost_params``, ``cost_macs``, ``cost_latency``, ``acc_drop``,
        ``reduction_{params,macs,latency}``, ``speedup_b1``, ``speedup_bt``, ``compression_ratio``,
        ``acc_cost_{params,macs,latency}``, ``eff_{params,macs,latency}``, ``latency_comparable`` and per-seed
        ``pareto_{params,macs,latency}``.
    """
    out = partition_rows(df)[0].reset_index(drop=True)
    out["target_label"] = out["target"].map(display_target) if "target" in out.columns else ""
    for axis, (sparse_col, plain_col) in _COST_SOURCES.items():
        plain = _num(out, plain_col)
        out[f"cost_{axis}"] = _num(out, sparse_col).fillna(plain) if sparse_aware else plain
    out["top1"] = _num(out, "top1")
    has_ref, ref = _dense_reference(out)
    out["dense_key"] = ref("key").where(has_ref, None) if "key" in out.columns else None
    out["top1_dense"] = pd.to_numeric(ref("top1"), errors="coerce").astype(float)
    out["acc_drop"] = out["top1_dense"] - out["top1"]
    comparable, comparable_bt = _latency_comparable(out, has_ref, ref)
    out["latency_comparable"] = comparable
    _add_cost_metrics(out, ref, comparable, comparable_bt)
    _add_pareto_flags(out)
    return out


def summarize(df: pd.DataFrame) -> pd.DataFrame:
    """Mean and sample standard deviation over seeds of every metric, one row per configuration.

    Args:
        df: rows from :func:`add_relative_metrics` (raw rows are passed through it first).

    Returns:
        One row per ``SUMMARY_KEYS`` group with ``n_seeds``, ``n_rows``, ``seeds`` (sorted list), ``{m}_mean`` and
        ``{m}_std`` for each metric of ``METRIC_COLUMNS`` present, ``pareto_{c}`` (front of the seed means within
        the setting) and ``pareto_{c}_frac`` (fraction of seeds on whose front it lies). NaN on any seed makes
        the mean NaN; the std of a single seed is NaN.
    """
    if "acc_cost_params" not in df.columns:
        df = add_relative_metrics(df)
    df = df.copy()
    for key in SUMMARY_KEYS:
        if key not in df.columns:
            df[key] = None
    keys = list(SUMMARY_KEYS)
    group_id = _join_key(df, SUMMARY_KEYS)
    metrics = [m for m in METRIC_COLUMNS if m in df.columns]
    records = []
    for _, idx in df.groupby(group_id, sort=False).groups.items():
        part = df.loc[idx]
        rec: dict[str, Any] = {k: part[k].iloc[0] for k in keys}
        seeds = sorted(part["seed"].dropna().tolist()) if "seed" in part.columns else []
        rec["n_rows"] = len(part)
        rec["n_seeds"] = len(set(seeds)) if seeds else len(part)
        rec["seeds"] = seeds
        if rec["n_seeds"] != rec["n_rows"]:
            warnings.warn(f"configuration {dict((k, rec[k]) for k in keys)} has {rec['n_rows']} rows for "
                          f"{rec['n_seeds']} seed(s)", RuntimeWarning, stacklevel=2)
        for m in metrics:
            values = pd.to_numeric(part[m], errors="coerce").astype(float)
            rec[f"{m}_mean"] = values.mean(skipna=False) if len(values) else np.nan
            rec[f"{m}_std"] = values.std(ddof=1, skipna=False) if len(values) > 1 else np.nan
        for axis in COST_AXES:
            column = f"pareto_{axis}"
            rec[f"{column}_frac"] = float(part[column].astype(float).mean()) if column in part.columns else np.nan
        records.append(rec)
    summary = pd.DataFrame.from_records(records)
    if summary.empty:
        return summary
    setting = _join_key(summary, SETTING_KEYS)
    for axis in COST_AXES:
        mask = pd.Series(False, index=summary.index)
        if f"cost_{axis}_mean" in summary.columns:
            for _, idx in summary.groupby(setting, sort=False).groups.items():
                mask.loc[idx] = pareto_mask(summary.loc[idx, f"cost_{axis}_mean"], summary.loc[idx, "top1_mean"])
        summary[f"pareto_{axis}"] = mask
    return order_summary(summary)


def order_summary(summary: pd.DataFrame) -> pd.DataFrame:
    """Sort a summary like a pruning-paper table: setting, then dense first, families, method, target."""
    if summary.empty:
        return summary

    order = sorted(summary.index, key=lambda i: (
        _key_part(summary.at[i, "dataset"]), _key_part(summary.at[i, "backbone"]),
        _key_part(summary.at[i, "shortcut"]), target_sort_key(_key_part(summary.at[i, "image_size"])),
        family_rank(summary.at[i, "family"]), _key_part(summary.at[i, "method"]),
        _key_part(summary.at[i, "schedule"]), target_sort_key(_key_part(summary.at[i, "target_label"]))))
    return summary.loc[order].reset_index(drop=True)
