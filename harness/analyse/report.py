"""The suite report: ``report.md`` and a self-contained ``report.html`` (figures embedded as base64 PNG).

Sections: environment (devices, versions, git revisions, all read from the rows), the suite, the metric
definitions, one table pair per setting (dataset, backbone, shortcut, image size) in the layout of pruning papers,
the figures of :mod:`harness.analyse.plots`, and the failed runs with their reasons. Every number in a table is a value of
:func:`harness.analyse.metrics.summarize` on the rows of the store, rounded for display; nothing is computed here.
"""
from __future__ import annotations

import base64
import html
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analyse.metrics import (
    COST_AXES,
    FAMILY_ORDER,
    METRIC_DEFINITIONS,
    SETTING_KEYS,
    add_relative_metrics,
    failed_rows,
    summarize,
    target_label,
    target_sort_key,
)

__all__ = ["Block", "build_report", "render_markdown", "render_html", "write_report", "fmt_value", "fmt_mean_std",
           "setting_title", "MISSING"]

MISSING = "n/a"
DENSE_TARGET = "\u2014"  # an em dash stands for the dense reference's absent target


@dataclass
class Block:
    """One piece of the report: ``kind`` is h1/h2/h3, p, ul, table or img."""

    kind: str
    text: str = ""
    items: list[str] = field(default_factory=list)
    header: list[str] = field(default_factory=list)
    rows: list[list[str]] = field(default_factory=list)
    path: Path | None = None  # img: the PNG file


# --------------------------------------------------------------------------------------------------- formatting
def _finite(x: Any) -> bool:
    try:
        return math.isfinite(float(x))
    except (TypeError, ValueError):
        return False


def fmt_value(value: Any, decimals: int | None = None, *, sig: int = 4, sign: bool = False) -> str:
    """A number as fixed-point text (never exponent notation); ``n/a`` for NaN/None.

    Args:
        value: the number.
        decimals: digits after the point; None picks enough for ``sig`` significant digits (at most 6).
        sig: significant digits when ``decimals`` is None.
        sign: always show the sign.

    Returns:
        The text.
    """
    if not _finite(value):
        return MISSING
    v = float(value)
    if decimals is None:
        decimals = 0 if v == 0 else max(0, min(6, sig - 1 - math.floor(math.log10(abs(v)))))
    text = f"{v:+.{decimals}f}" if sign else f"{v:.{decimals}f}"
    return text.replace("-0." + "0" * decimals, "0." + "0" * decimals) if decimals and float(text) == 0 else text


def fmt_mean_std(mean: Any, std: Any, decimals: int | None = None, *, sig: int = 4, sign: bool = False) -> str:
    """``mean ± std`` with the same decimals; the std is left out when NaN (one seed) or zero at that precision."""
    m = fmt_value(mean, decimals, sig=sig, sign=sign)
    if m == MISSING or not _finite(std):
        return m
    d = len(m.split(".")[1]) if "." in m else 0
    s = f"{float(std):.{d}f}"
    return m if float(s) == 0 else f"{m} \u00b1 {s}"


def _count_unit(values: pd.Series) -> tuple[float, str]:
    top = pd.to_numeric(values, errors="coerce").max()
    if not _finite(top):
        return 1.0, ""
    for div, unit in ((1e9, "G"), (1e6, "M"), (1e3, "K")):
        if top >= div:
            return div, unit
    return 1.0, ""


def setting_title(row: pd.Series | dict) -> str:
    """Heading of a setting's tables: ``dataset · backbone (shortcut X) · N px``."""
    parts = [str(row["dataset"]), str(row["backbone"])]
    shortcut = row.get("shortcut")
    if isinstance(shortcut, str) and shortcut:
        parts[-1] += f" (shortcut {shortcut})"
    if _finite(row.get("image_size")):
        parts.append(f"{int(float(row['image_size']))} px")
    return " \u00b7 ".join(parts)


def _target_text(label: Any) -> str:
    return DENSE_TARGET if label in ("", None) else str(label)


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


def _environment(df: pd.DataFrame) -> list[Block]:
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
            targets = sorted({_target_text(t) for t in part["target_label"]}, key=target_sort_key)
            epochs = ", ".join(str(int(e)) for e in sorted(set(part["epochs_total"].dropna()))) \
                if "epochs_total" in part.columns else MISSING
            n_ok = int((part["status"] == "ok").sum())
            rows.append((FAMILY_ORDER.index(family) if family in FAMILY_ORDER else 9, str(method),
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


def _tables(summary: pd.DataFrame) -> list[Block]:
    blocks = [Block("h2", "Results")]
    keys = [k for k in SETTING_KEYS if k in summary.columns]
    for _, part in summary.groupby(keys, sort=False, dropna=False):
        p_div, p_unit = _count_unit(part["cost_params_mean"])
        m_div, m_unit = _count_unit(part["cost_macs_mean"])
        main, trade = [], []
        for _, r in part.iterrows():
            front = " ".join(tag for tag, axis in zip("PML", COST_AXES) if bool(r[f"pareto_{axis}"]))
            ident = [str(r["method"]), _target_text(r["target_label"])]
            main.append(ident[:1] + [str(r["family"])] + ident[1:] + [
                str(r["schedule"]), str(int(r["n_seeds"])),
                fmt_mean_std(r["top1_mean"], r["top1_std"], 2),
                fmt_mean_std(r["acc_drop_mean"], r["acc_drop_std"], 2),
                fmt_mean_std(r["cost_params_mean"] / p_div, r["cost_params_std"] / p_div),
                fmt_mean_std(100 * r["reduction_params_mean"], 100 * r["reduction_params_std"], 1),
                fmt_mean_std(r["cost_macs_mean"] / m_div, r["cost_macs_std"] / m_div),
                fmt_mean_std(100 * r["reduction_macs_mean"], 100 * r["reduction_macs_std"], 1),
                fmt_mean_std(r["cost_latency_mean"], r["cost_latency_std"]),
                fmt_mean_std(r["speedup_b1_mean"], r["speedup_b1_std"], 2),
                fmt_mean_std(r["speedup_bt_mean"], r["speedup_bt_std"], 2),
                front,
            ])
            trade.append(ident + [fmt_mean_std(r[f"acc_cost_{a}_mean"], r[f"acc_cost_{a}_std"], 4)
                                  for a in COST_AXES]
                         + [fmt_mean_std(r[f"eff_{a}_mean"], r[f"eff_{a}_std"], 3) for a in COST_AXES])
        blocks += [
            Block("h3", setting_title(part.iloc[0])),
            Block("table", header=["Method", "Family", "Target", "Schedule", "Seeds", "Top-1 (%)", "Drop (pts)",
                                   f"Params ({p_unit or 'count'})", "Params \u2193 (%)",
                                   f"MACs ({m_unit or 'count'})", "MACs \u2193 (%)", "Latency b1 (ms)",
                                   "Speed-up b1 (x)", "Speed-up bt (x)", "Pareto"], rows=main),
            Block("table", header=["Method", "Target", "ACC params", "ACC MACs", "ACC latency", "EFF params",
                                   "EFF MACs", "EFF latency"], rows=trade),
        ]
    return blocks


def _failures(df: pd.DataFrame, metrics: pd.DataFrame) -> list[Block]:
    blocks = [Block("h2", "Failed runs")]
    failed = failed_rows(df)
    if failed.empty:
        blocks.append(Block("p", "None."))
    else:
        rows = []
        for _, r in failed.iterrows():
            rows.append([f"`{r.get('key', '')}`", str(r.get("method", "")), _target_text(r.get("target_label")),
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


def build_report(df: pd.DataFrame, plots: list[Path] | None = None, out_dir: Path | None = None) -> list[Block]:
    """The report as blocks, from raw rows.

    Args:
        df: result rows (all statuses).
        plots: figure files to include (PNG ones are shown).
        out_dir: where the report will be written (image paths are made relative to it).

    Returns:
        The blocks, in order.
    """
    df = df.copy()
    df["target_label"] = df["target"].map(target_label) if "target" in df.columns else ""
    metrics = add_relative_metrics(df)
    summary = summarize(metrics) if len(metrics) else pd.DataFrame()
    blocks = [Block("h1", "bunit-bench report"),
              Block("p", "Generated by `bunitbench report` from the rows of the result store; each table cell is "
                         "`harness.analyse.metrics.summarize(add_relative_metrics(load_results(dir)))`, rounded.")]
    blocks += _environment(df) + _suite(df) + _definitions()
    blocks += _tables(summary) if len(summary) else [Block("h2", "Results"), Block("p", "No ok rows.")]
    blocks += _figures(plots or [], out_dir or Path("."))
    blocks += _failures(df, metrics)
    return blocks


# --------------------------------------------------------------------------------------------------- rendering
def _md_cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: list[Block], out_dir: Path) -> str:
    """Markdown text of the blocks; images are linked relative to ``out_dir``."""
    lines: list[str] = []
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            lines += ["#" * int(b.kind[1]) + " " + b.text, ""]
        elif b.kind == "p":
            lines += [b.text, ""]
        elif b.kind == "ul":
            lines += [f"- {item}" for item in b.items] + [""]
        elif b.kind == "table":
            lines.append("| " + " | ".join(_md_cell(h) for h in b.header) + " |")
            lines.append("|" + "|".join("---" for _ in b.header) + "|")
            lines += ["| " + " | ".join(_md_cell(c) for c in row) + " |" for row in b.rows]
            lines.append("")
        elif b.kind == "img" and b.path is not None:
            rel = os.path.relpath(b.path, out_dir).replace(os.sep, "/")
            lines += [f"![{b.text}]({rel})", "", f"*{b.text}*", ""]
    return "\n".join(lines)


def _inline_html(text: str) -> str:
    """Escape, then turn `code` spans into <code>."""
    parts = html.escape(text).split("`")
    return "".join(f"<code>{p}</code>" if i % 2 else p for i, p in enumerate(parts))


_CSS = """body{font-family:system-ui,-apple-system,'Segoe UI',sans-serif;max-width:1200px;margin:2em auto;padding:0 1em;
color:#222;line-height:1.45}table{border-collapse:collapse;margin:.6em 0 1.4em;font-size:.85em}
th,td{border:1px solid #ccc;padding:.25em .5em;text-align:right;white-space:nowrap}
th{background:#f3f3f3}td:first-child,th:first-child{text-align:left}code{font-size:.9em;background:#f6f6f6}
figure{margin:1em 0}img{max-width:100%;height:auto}figcaption{font-style:italic;font-size:.9em}"""


def render_html(blocks: list[Block]) -> str:
    """Self-contained HTML of the blocks: inline CSS, PNG figures embedded as base64 data URIs."""
    out = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', "<title>bunit-bench report</title>",
           f"<style>{_CSS}</style></head><body>"]
    for b in blocks:
        if b.kind in ("h1", "h2", "h3"):
            out.append(f"<{b.kind}>{_inline_html(b.text)}</{b.kind}>")
        elif b.kind == "p":
            out.append(f"<p>{_inline_html(b.text)}</p>")
        elif b.kind == "ul":
            out.append("<ul>" + "".join(f"<li>{_inline_html(i)}</li>" for i in b.items) + "</ul>")
        elif b.kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f"<td>{_inline_html(c)}</td>" for c in row) + "</tr>" for row in b.rows)
            out.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif b.kind == "img" and b.path is not None:
            data = base64.b64encode(Path(b.path).read_bytes()).decode("ascii")
            out.append(f'<figure><img alt="{html.escape(b.text)}" src="data:image/png;base64,{data}">'
                       f"<figcaption>{html.escape(b.text)}</figcaption></figure>")
    out.append("</body></html>")
    return "\n".join(out)


def write_report(results: Any, out_dir: str | os.PathLike | None = None, *, plots: bool = True) -> tuple[Path, Path]:
    """Write ``report.md`` and ``report.html`` for a suite (and its figures under ``plots/``).

    Args:
        results: the suite directory (``RESULTS_DIR``), or a DataFrame of its rows.
        out_dir: where to write; defaults to ``RESULTS_DIR``; required when ``results`` is a DataFrame.
        plots: also (re)draw the figures with :func:`harness.analyse.plots.write_plots` and include them.

    Returns:
        ``(report.md, report.html)`` paths.
    """
    if isinstance(results, pd.DataFrame):
        if out_dir is None:
            raise ValueError("out_dir: required when results is a DataFrame")
        df = results
    else:
        from harness.run.store import load_results

        df = load_results(results)
        out_dir = Path(results) if out_dir is None else out_dir
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    if plots and len(df):
        from harness.analyse.plots import write_plots

        figures = write_plots(df, out_dir / "plots")
    blocks = build_report(df, figures, out_dir)
    md, page = out_dir / "report.md", out_dir / "report.html"
    md.write_text(render_markdown(blocks, out_dir), encoding="utf-8")
    page.write_text(render_html(blocks), encoding="utf-8")
    return md, page
