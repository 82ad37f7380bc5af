"""The suite report: ``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG).

Sections: the verdict first (:mod:`harness.analyse.verdict_report`: where BUnit is better, worse or
indistinguishable from each pruning method at equal cost, the paper's claim checked, the verdict table and figure),
then environment (devices, versions, git revisions, all read from the rows), the suite, the metric definitions, the
tables of each setting (dataset, backbone, shortcut, image size) in the layout of pruning papers with, where the
timing pass ran, which runtime and format won for each model (its best deployment) beside its eager-only ratio, the figures of
:mod:`harness.analyse.plots`, and the failed runs with their reasons. Every number in a table is a value of
:func:`harness.analyse.metrics.summarize` or of :mod:`harness.analyse.verdict` on the rows of the store, rounded for
display; nothing is computed here.
"""
from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analyse.report_blocks import (
    DENSE_TARGET,
    MISSING,
    Block,
    count_unit,
    fmt_mean_std,
    fmt_value,
    render_html,
    render_markdown,
    setting_title,
    target_text,
)
from harness.analyse.latency_source import VIEWS, LatencyTable, apply_pass_ratios, load_deployments, load_latency_table
from harness.analyse.metrics import (
    COST_AXES,
    METRIC_DEFINITIONS,
    SETTING_KEYS,
    add_relative_metrics,
    display_target,
    failed_rows,
    family_rank,
    partition_rows,
    summarize,
    target_sort_key,
)
from harness.analyse.plots import write_plots
from harness.analyse.verdict_plots import write_verdict_plots
from harness.analyse.verdict_report import headline_blocks, verdict_blocks
from harness.core.store import load_results

__all__ = ["Block", "build_report", "render_markdown", "render_html", "write_report", "fmt_value", "fmt_mean_std",
           "setting_title", "MISSING", "DENSE_TARGET"]


# --------------------------------------------------------------------------------------------------- sections
def _unique(df: pd.DataFrame, column: str) -> list[Any]:
    if column not in df.columns:
        return []
    seen: dict[str, Any] = {}
    for v in df[column]:
        if v is None or (isinstance(v, float) and math.isnan(v)):
            continue
        key = json.dumps(v, sort_keys=True, default=str)
        seen.setdefault(key, v)
    return list(seen.values())


def _latency_note(timed: pd.DataFrame) -> str:
    """Where the tables' batch-1 speed-up comes from."""
    counts = timed["latency_source"].value_counts() if "latency_source" in timed.columns else pd.Series(dtype=int)
    if not counts.get("pass", 0) and not counts.get("excluded", 0):
        return ""
    return (f"Speed-up b1 and the latency metrics: 1 / the timing pass's paired ratio to dense for "
            f"{int(counts.get('pass', 0))} rows, n/a for {int(counts.get('excluded', 0))} rows the pass flagged busy "
            f"or unsteady, the row's own isolated timing for {int(counts.get('isolated', 0))} rows (dense rows "
            "included). Latency b1 (ms) is always the row's own isolated timing.")


def _environment(df: pd.DataFrame, latency: LatencyTable | None = None) -> list[Block]:
    n_ok = int((df["status"] == "ok").sum()) if "status" in df.columns else len(df)
    items = [f"Rows: {len(df)} ({n_ok} ok, {len(df) - n_ok} failed); suite(s): "
             f"{', '.join(map(str, _unique(df, 'suite'))) or MISSING}"]
    revs = []
    for rev in _unique(df, "git_rev"):
        dirty = "git_dirty" in df.columns and bool(df.loc[df["git_rev"] == rev, "git_dirty"].fillna(False).any())
        revs.append(f"`{str(rev)[:12]}`" + (" (uncommitted changes)" if dirty else ""))
    items.append(f"Git revision(s): {', '.join(revs) or MISSING}")
    items.append(f"Training device(s): {', '.join(map(str, _unique(df, 'device'))) or MISSING}; "
                 f"host(s): {', '.join(map(str, _unique(df, 'hostname'))) or MISSING}; "
                 f"executor(s): {', '.join(map(str, _unique(df, 'executor'))) or MISSING}")
    for versions in _unique(df, "versions"):
        if isinstance(versions, dict):
            known = [f"{k} {v}" for k, v in sorted(versions.items()) if v is not None]
            missing = [k for k, v in sorted(versions.items()) if v is None]
            absent = f" (not recorded: {', '.join(missing)})" if missing else ""
            items.append("Versions: " + ", ".join(known) + absent)
    if "started_at" in df.columns and df["started_at"].notna().any():
        end = df["finished_at"].dropna().max() if "finished_at" in df.columns else MISSING
        items.append(f"Runs from {df['started_at'].dropna().min()} to {end}")
    if latency is not None:
        items.append(f"Timing pass: {latency.describe()}")
    blocks = [Block("h2", "Environment"), Block("ul", items=items)]
    cols = ["latency_device", "device_name", "dtype", "memory_format", "threads", "throughput_batch"]
    present = [c for c in cols if c in df.columns]
    if present:
        ok = df[df["status"] == "ok"] if "status" in df.columns else df
        lat = ok[present].astype(object).where(ok[present].notna(), None)
        groups = lat.astype(str).value_counts(sort=False)
        rows = [list(key) + [str(n)] for key, n in groups.items()] if len(present) > 1 else \
            [[str(key), str(n)] for key, n in groups.items()]
        header = ["Latency device", "Device name", "dtype", "Memory format", "Threads", "Throughput batch"]
        blocks += [Block("p", "Latency measurement conditions (rows per condition; a row's latency metrics are "
                              "compared only with a dense reference measured under the same conditions):"),
                   Block("table", header=[header[cols.index(c)] for c in present] + ["Rows"], rows=rows)]
    return blocks


def _suite(df: pd.DataFrame) -> list[Block]:
    items = []
    for col, name in (("dataset", "Datasets"), ("image_size", "Image sizes (px)"), ("backbone", "Backbones"),
                      ("seed", "Seeds")):
        vals = _unique(df, col)
        if vals:
            items.append(f"{name}: {', '.join(str(v) for v in sorted(vals, key=lambda v: target_sort_key(str(v))))}")
    rows = []
    if "method" in df.columns:
        for method, part in df.groupby("method", sort=False):
            family = str(part["family"].iloc[0]) if "family" in part.columns else ""
            targets = sorted({target_text(t) for t in part["target_label"]}, key=target_sort_key)
            epochs = ", ".join(str(int(e)) for e in sorted(set(part["epochs_total"].dropna()))) \
                if "epochs_total" in part.columns else MISSING
            n_ok = int((part["status"] == "ok").sum())
            rows.append((family_rank(family), str(method),
                         [str(method), family, ", ".join(targets),
                          ", ".join(sorted(map(str, _unique(part, "schedule")))) or MISSING,
                          epochs or MISSING, str(n_ok), str(len(part) - n_ok)]))
    rows.sort(key=lambda r: (r[0], r[1]))
    return [Block("h2", "Suite"), Block("ul", items=items),
            Block("table", header=["Method", "Family", "Targets", "Schedule", "Epochs (total)", "Runs ok",
                                   "Failed"], rows=[r[2] for r in rows])]


def _definitions() -> list[Block]:
    rows = [[f"`{name}`", f"`{formula}`", meaning] for name, formula, meaning in METRIC_DEFINITIONS]
    notes = [
        "acc is top-1 (%); the subscript d marks the dense reference: the dense row of the same dataset, backbone, "
        "shortcut, image size and seed. A row without one gets n/a for every relative metric.",
        "Params and MACs are the sparse-aware counts (non-zero weights), so unstructured pruning is credited with "
        "the weights it zeroes; latency is the measured median at batch 1 (speed-up bt: at the throughput batch).",
        "ACC and EFF are this project's definitions; the BUnit-Net paper's exact formulas are not known. ACC grows "
        "without bound as R_c approaches 0 (e.g. the latency of unstructured pruning), so read it with R_c.",
        "Metrics are computed per seed, then averaged: mean \u00b1 sample std (ddof 1) over seeds; a metric that is "
        "n/a on any seed is n/a. Pareto columns: P, M, L = on the accuracy front of the seed means against "
        "params, MACs or latency within the table.",
    ]
    return [Block("h2", "Metrics"), Block("table", header=["Metric", "Formula", "Meaning"], rows=rows),
            Block("ul", items=notes)]


def _setting_text(value: Any) -> str:
    """A setting value as text for matching rows across frames: missing -> empty, 16.0 -> 16."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def _deployment_name(runtime: Any, memory_format: Any) -> str:
    if not isinstance(runtime, str):
        return MISSING
    return runtime if memory_format in ("contiguous", None) else f"{runtime} ({memory_format})"


def _ratio_cell(ratio: Any, paired: Any) -> str:
    """``0.405``, or ``0.405 \u2020`` when the ratio was carried over from another session than dense's best."""
    text = fmt_value(ratio, 3)
    return text if text == MISSING or (pd.notna(paired) and bool(paired)) else f"{text} \u2020"


def _deployment_blocks(deployments: pd.DataFrame) -> list[Block]:
    """Per model of one setting: which runtime/format won at each batch, its ratio to dense there, the eager ratio."""
    batches = sorted(int(b) for b in deployments["batch"].dropna().unique())
    ident = deployments.drop_duplicates("key").copy()
    ident["_order"] = [(family_rank(str(f)), str(m), target_sort_key(str(t)), _setting_text(s))
                       for f, m, t, s in zip(ident["family"], ident["method"], ident["target_label"], ident["seed"])]
    by = {(r["key"], int(r["batch"])): r for _, r in deployments.iterrows()}
    rows = []
    for _, r in sorted(ident.iterrows(), key=lambda kr: kr[1]["_order"]):
        cells = [str(r["method"]), target_text(r["target_label"]), _setting_text(r["seed"])]
        for b in batches:
            d = by.get((r["key"], b))
            if d is None:
                cells += ["", "", ""]
                continue
            cells += [_deployment_name(d["best_runtime"], d["best_memory_format"]),
                      _ratio_cell(d["best_ratio"], d["paired"]), _ratio_cell(d["eager_ratio"], d["eager_paired"])]
        rows.append(cells)
    header = ["Method", "Target", "Seed"]
    for b in batches:
        header += [f"Best b{b}", f"Ratio b{b}", f"Eager ratio b{b}"]
    first = deployments.iloc[0]
    text = ("Timing pass, " + ", ".join(
        f"{c} {first[c]}" for c in ("device", "device_name", "dtype", "threads")) + ". *Best* is the runtime (and "
        "memory format, when not contiguous) in which the model ran fastest among those timed; *Ratio* its median "
        "time there over its dense reference's at dense's own fastest; *Eager ratio* the same model against the same "
        "reference with both in eager PyTorch, each at its fastest memory format (the eager-only view). \u2020: the "
        "two won in different runtimes or formats, so the model's paired ratio is carried over from its own best "
        "session to dense's best by the ratio of dense's two medians (two sessions compared).")
    return [Block("h4", "Best deployment per model"), Block("p", text), Block("table", header=header, rows=rows)]


def _tables(summary: pd.DataFrame, latency_note: str, deployments: pd.DataFrame | None = None) -> list[Block]:
    blocks = [Block("h2", "Results")] + ([Block("p", latency_note)] if latency_note else [])
    keys = [k for k in SETTING_KEYS if k in summary.columns]
    for _, part in summary.groupby(keys, sort=False, dropna=False):
        mine = None
        if deployments is not None and len(deployments):
            mask = pd.Series(True, index=deployments.index)
            for k in keys:
                mask &= deployments[k].map(_setting_text) == _setting_text(part.iloc[0][k])
            mine = deployments[mask] if mask.any() else None
        p_div, p_unit = count_unit(part["cost_params_mean"])
        m_div, m_unit = count_unit(part["cost_macs_mean"])
        main, speed, trade = [], [], []
        for _, r in part.iterrows():
            front = " ".join(tag for tag, axis in zip("PML", COST_AXES) if bool(r[f"pareto_{axis}"]))
            ident = [str(r["method"]), target_text(r["target_label"])]
            main.append(ident[:1] + [str(r["family"])] + ident[1:] + [
                str(r["schedule"]), str(int(r["n_seeds"])),
                fmt_mean_std(r["top1_mean"], r["top1_std"], 2),
                fmt_mean_std(r["acc_drop_mean"], r["acc_drop_std"], 2),
                fmt_mean_std(r["cost_params_mean"] / p_div, r["cost_params_std"] / p_div),
                fmt_mean_std(100 * r["reduction_params_mean"], 100 * r["reduction_params_std"], 1),
                fmt_mean_std(r["cost_macs_mean"] / m_div, r["cost_macs_std"] / m_div),
                fmt_mean_std(100 * r["reduction_macs_mean"], 100 * r["reduction_macs_std"], 1),
                front,
            ])
            speed.append(ident + [fmt_mean_std(r["cost_latency_mean"], r["cost_latency_std"]),
                                  fmt_mean_std(r["speedup_b1_mean"], r["speedup_b1_std"], 2),
                                  fmt_mean_std(r["speedup_bt_mean"], r["speedup_bt_std"], 2)])
            trade.append(ident + [fmt_mean_std(r[f"acc_cost_{a}_mean"], r[f"acc_cost_{a}_std"], 4)
                                  for a in COST_AXES]
                         + [fmt_mean_std(r[f"eff_{a}_mean"], r[f"eff_{a}_std"], 3) for a in COST_AXES])
        blocks += [  # three narrow tables rather than one that runs off the page
            Block("h3", setting_title(part.iloc[0])),
            Block("table", header=["Method", "Family", "Target", "Schedule", "Seeds", "Top-1 (%)", "Drop (pts)",
                                   f"Params ({p_unit or 'count'})", "Params \u2193 (%)",
                                   f"MACs ({m_unit or 'count'})", "MACs \u2193 (%)", "Pareto"], rows=main),
            Block("table", header=["Method", "Target", "Latency b1 (ms)", "Speed-up b1 (x)", "Speed-up bt (x)"],
                  rows=speed),
            Block("table", header=["Method", "Target", "ACC params", "ACC MACs", "ACC latency", "EFF params",
                                   "EFF MACs", "EFF latency"], rows=trade),
        ] + (_deployment_blocks(mine) if mine is not None else [])
    return blocks


def _failures(df: pd.DataFrame, metrics: pd.DataFrame) -> list[Block]:
    blocks = [Block("h2", "Failed runs")]
    failed = failed_rows(df)
    if failed.empty:
        blocks.append(Block("p", "None."))
    else:
        rows = []
        for _, r in failed.iterrows():
            rows.append([f"`{r.get('key', '')}`", str(r.get("method", "")), target_text(r.get("target_label")),
                         str(r.get("seed", "")), str(r.get("status", "")), str(r.get("reason") or MISSING)])
        blocks.append(Block("table", header=["Key", "Method", "Target", "Seed", "Status", "Reason"], rows=rows))
    if "dense_key" in metrics.columns:
        dense = metrics["family"] == "dense" if "family" in metrics.columns else False
        orphans = metrics[metrics["dense_key"].isna() & ~dense]
        if len(orphans):
            blocks += [Block("h3", "Rows without a dense reference (relative metrics n/a)"),
                       Block("ul", items=[f"`{k}`" for k in orphans.get("key", pd.Series(dtype=str))])]
    return blocks


def _figures(plots: list[Path], out_dir: Path) -> list[Block]:
    pngs = [p for p in plots if p.suffix == ".png"]
    if not pngs:
        return []
    captions = {"accuracy_vs_macs": "Top-1 against MACs (non-zero weights)",
                "accuracy_vs_params": "Top-1 against parameters (non-zero)",
                "accuracy_vs_latency": "Top-1 against measured batch-1 latency",
                "metric_acc": "ACC trade-off metric per method and target",
                "metric_eff": "EFF trade-off metric per method and target"}
    blocks = [Block("h2", "Figures"),
              Block("p", "Markers are seed means with one-std error bars; each method's line starts at the dense "
                         "model; the grey staircase is the Pareto front. SVG versions sit next to the PNGs.")]
    for p in pngs:
        stem = next((k for k in captions if p.stem.startswith(k)), p.stem)
        dataset = p.stem[len(stem) + 1:] if stem != p.stem else ""
        blocks.append(Block("img", text=f"{captions.get(stem, stem)} ({dataset})", path=p))
    return blocks


def _with_settings(deployments: pd.DataFrame | None, metrics: pd.DataFrame) -> pd.DataFrame | None:
    """The deployment view joined to the rows' setting, method, family, seed and target (by key); rows without one
    in the store are dropped."""
    if deployments is None or deployments.empty or "key" not in metrics.columns:
        return None
    cols = [c for c in (*SETTING_KEYS, "method", "family", "seed", "target_label") if c in metrics.columns]
    rows = metrics.drop_duplicates("key", keep="last")[["key", *cols]]
    out = deployments.merge(rows, on="key", how="inner")
    return out if len(out) else None


def build_report(df: pd.DataFrame, plots: list[Path] | None = None, out_dir: Path | None = None, *,
                 latency: LatencyTable | None = None, deployments: pd.DataFrame | None = None) -> list[Block]:
    """The report as blocks, from raw rows.

    Args:
        df: result rows (all statuses).
        plots: figure files to include (PNG ones are shown; ``verdict_*`` and ``curves_*`` ones in the verdict).
        out_dir: where the report will be written (image paths are made relative to it).
        latency: the timing pass's ratios to dense, preferred on the latency axis of the verdict.
        deployments: :func:`harness.analyse.latency_source.deployment_view` of the store's timings: a table per
            setting of each model's winning runtime and format, with its eager-only ratio.

    Returns:
        The blocks, in order.
    """
    df = df.copy()
    df["target_label"] = df["target"].map(display_target) if "target" in df.columns else ""
    metrics = add_relative_metrics(df)
    left_out = partition_rows(df)[1]
    timed = apply_pass_ratios(metrics, latency) if len(metrics) else metrics
    summary = summarize(timed) if len(timed) else pd.DataFrame()
    blocks = [Block("h1", "bunit-bench report")]
    blocks += headline_blocks(metrics, latency=latency) if len(metrics) else [Block("p", "No ok rows.")]
    blocks.append(Block("p", "Generated by `bunitbench report` from the rows of the result store; each table cell is "
                             "`harness.analyse.metrics.summarize(add_relative_metrics(load_results(dir)))`, rounded, "
                             "with batch-1 latency from the timing pass where it timed the row."))
    verdict_figs = [p for p in plots or [] if p.stem.startswith(("verdict_", "curves_"))]
    blocks += verdict_blocks(metrics, verdict_figs, latency=latency, left_out=left_out) if len(metrics) else []
    blocks += _environment(df, latency) + _suite(df) + _definitions()
    blocks += _tables(summary, _latency_note(timed), _with_settings(deployments, metrics)) if len(summary) else [Block("h2", "Results"),
                                                                            Block("p", "No ok rows.")]
    blocks += _figures([p for p in plots or [] if p not in verdict_figs], out_dir or Path("."))
    blocks += _failures(df, metrics)
    return blocks



def write_report(results: Any, out_dir: str | os.PathLike | None = None, *, plots: bool = True,
                 latency_view: str = "best") -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for a suite (and its figures under ``plots/``).

    Args:
        results: the suite directory (``RESULTS_DIR``), or a DataFrame of its rows.
        out_dir: where to write; defaults to ``RESULTS_DIR``; required when ``results`` is a DataFrame.
        plots: also (re)draw the figures with :func:`harness.analyse.plots.write_plots` and include them.
        latency_view: which timing-pass view the verdict's latency axis reads (``best``: each model at its best
            deployment, the default; ``eager``: eager PyTorch alone; :mod:`harness.analyse.latency_source`). The
            per-model deployment tables show both either way.

    Returns:
        ``(report.md, report.html)`` paths.
    """
    if isinstance(results, pd.DataFrame):
        if out_dir is None:
            raise ValueError("out_dir: required when results is a DataFrame")
        df = results
    else:
        df = load_results(results)
        out_dir = Path(results) if out_dir is None else out_dir
    if latency_view not in VIEWS:
        raise ValueError(f"latency_view: {latency_view!r} not allowed; allowed: {', '.join(VIEWS)}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    store = None if isinstance(results, pd.DataFrame) else results
    latency = load_latency_table(store, view=latency_view)
    deployments = load_deployments(store)
    figures: list[Path] = []
    if plots and len(df):
        figures = write_verdict_plots(df, out_dir / "plots", latency=latency) + write_plots(df, out_dir / "plots")
    blocks = build_report(df, figures, out_dir, latency=latency, deployments=deployments)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(blocks, out_dir), encoding="utf-8")
    page.write_text(render_html(blocks), encoding="utf-8")
    return md, page
