"""The report's first section: the verdict, in words, in a table and in figures; and the paper's claim checked.

Every number is a value of :func:`harness.analyse.verdict.compare_points`, :func:`~harness.analyse.verdict.compare_area`
or :func:`harness.analyse.claim.check_claim`, rounded for display.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd

from harness.analyse.blocks import MISSING, Block, fmt_value, setting_title
from harness.analyse.claim import CLAIM_POINTS, COMPARABLE_POINTS, check_claim
from harness.analyse.latency_source import LatencyTable
from harness.analyse.metrics import COST_AXES, SETTING_KEYS, family_rank, target_sort_key
from harness.analyse.verdict import AREA_MIN_REDUCTION, REDUCTIONS, build_curves, compare_area, compare_points

__all__ = ["verdict_blocks", "diff_text", "SHORT_LABELS", "AXIS_NAMES"]

AXIS_NAMES = {"params": "Parameters (non-zero)", "macs": "MACs (non-zero weights)", "latency": "Latency (batch 1)"}
SHORT_LABELS = {"bunit better": "BUnit \u25b2", "bunit worse": "BUnit \u25bc", "indistinguishable": "\u2248",
                "too few seeds": "few seeds", "not reached": "not reached", "bunit not reached": "BUnit not reached"}
_ORDER = ("bunit better", "bunit worse", "indistinguishable", "too few seeds", "not reached", "bunit not reached")


def diff_text(diff: Any, lo: Any, hi: Any) -> str:
    """``+0.42 [-0.10, +0.95]``; the interval is left out when it is undefined; ``n/a`` without a difference."""
    d = fmt_value(diff, 2, sign=True)
    if d == MISSING:
        return MISSING
    bounds = fmt_value(lo, 2, sign=True), fmt_value(hi, 2, sign=True)
    return d if MISSING in bounds else f"{d} [{bounds[0]}, {bounds[1]}]"


def _norm(value: Any) -> str:
    """A setting value as text: missing (None, NaN) -> empty, 32.0 -> 32."""
    if value is None or (isinstance(value, float) and value != value):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


def _setting_rows(frame: pd.DataFrame, setting: dict) -> pd.DataFrame:
    if frame.empty:
        return frame
    mask = pd.Series(True, index=frame.index)
    for k, v in setting.items():
        mask &= frame[k].map(_norm) == _norm(v)
    return frame[mask]



def _method_sentence(rows: pd.DataFrame, area: pd.DataFrame) -> str:
    """``BUnit ▲ at 75% less (-1.23 [...]); ≈ at 50% less (...); mean top-1 over 0-75% less: ...``; points that one
    of the two curves did not reach are left out (the table shows them)."""
    parts = []
    for lab in _ORDER[:4]:
        hits = rows[rows["label"] == lab]
        if hits.empty:
            continue
        points = ", ".join(f"{p} ({diff_text(d, lo, hi)})"
                           for p, d, lo, hi in zip(hits["point"], hits["diff"], hits["lo"], hits["hi"]))
        parts.append(f"{SHORT_LABELS[lab]} at {points}")
    if len(area) and area.iloc[0]["label"] in SHORT_LABELS:
        a = area.iloc[0]
        parts.append(f"mean top-1 over 0\u2013{100 * a['range_reduction']:.0f}% less "
                     f"{diff_text(a['diff'], a['lo'], a['hi'])} {SHORT_LABELS[a['label']]}")
    return "; ".join(parts)


def _axis_blocks(axis: str, points: pd.DataFrame, area: pd.DataFrame, note: str) -> list[Block]:
    items, apart = [], []
    for method, rows in points.groupby("method", sort=False):
        sentence = _method_sentence(rows, area[area["method"] == method])
        if sentence:
            items.append((family_rank(str(rows["family"].iloc[0])), str(rows["family"].iloc[0]),
                          f"vs {rows['family'].iloc[0]} `{method}`: {sentence}"))
        else:
            apart.append(f"`{method}`")
    text = f"**{AXIS_NAMES[axis]}**{note}."
    own = points[points["point_kind"] == "bunit"].drop_duplicates("point")
    if len(own) and (own["reduction"] < 0).all():
        text += f" BUnit costs more than dense at every one of its targets on this axis ({', '.join(own['point'])})."
    if apart:
        text += f" No cost in common with BUnit's curve: {', '.join(apart)}."
    return [Block("p", text)] + ([Block("ul", items=[i[2] for i in sorted(items, key=lambda i: i[:2])])]
                                 if items else [])


def _latency_note(metrics: pd.DataFrame, setting: dict, latency: LatencyTable | None) -> str:
    cur = next((c for c in build_curves(_setting_rows(metrics, setting), "latency", latency=latency)), None)
    if cur is None:
        return ""
    src = cur.sources
    if src["pass"]:
        return (f" (paired ratio to dense from the timing pass for {src['pass']} rows: {latency.describe()}; "
                f"{src['isolated']} rows timed in isolation)")
    return f" (all {src['isolated']} rows timed in isolation while training, each against its dense row's timing)"


def _claim_blocks(claim: pd.DataFrame) -> list[Block]:
    if claim.empty:
        return []
    overall = claim[claim["axis"] == "claim"]["status"]
    status = overall.iloc[0] if len(overall) else "undecided"
    items = []
    for _, r in claim[claim["axis"] != "claim"].iterrows():
        what = f"{100 * r['reduction']:.0f}% fewer {'MACs (FLOPs)' if r['axis'] == 'macs' else 'parameters'}"
        if not r["reached"]:
            items.append(f"at {what}: BUnit's curve does not reach it (no extrapolation) \u2014 **{r['status']}**")
            continue
        items.append(f"at {what}: BUnit {fmt_value(r['top1_bunit'], 2)}%, dense {fmt_value(r['top1_dense'], 2)}%, "
                     f"BUnit \u2212 dense {diff_text(r['diff'], r['lo'], r['hi'])} points over {int(r['n_pairs'])} "
                     f"paired seeds \u2014 **{r['status']}**")
    points = " and ".join(f"{100 * v:.0f}% fewer {'MACs' if a == 'macs' else 'parameters'}" for a, v in CLAIM_POINTS)
    return [Block("p", f"**The paper's claim** \u2014 comparable accuracy at {points}: **{status.upper()}**. "
                       f"Comparable means BUnit loses at most {COMPARABLE_POINTS:g} point of top-1 against dense at "
                       f"95% confidence (true: the interval of BUnit \u2212 dense lies above \u2212"
                       f"{COMPARABLE_POINTS:g}; false: it lies below; undecided: it straddles \u2212"
                       f"{COMPARABLE_POINTS:g}, too few seeds, or not reached)."),
            Block("ul", items=items)]


def _table(points: pd.DataFrame, area: pd.DataFrame) -> Block:
    fixed = [p for p in points["point"].drop_duplicates() if p.endswith("% less")]
    at_bunit = sorted((p for p in points["point"].drop_duplicates() if not p.endswith("% less")),
                      key=lambda p: target_sort_key(p.removeprefix("BUnit ")))
    rows = []
    for (axis, method), part in points.groupby(["axis", "method"], sort=False):
        cells = []
        for p in fixed + at_bunit:
            hit = part[part["point"] == p]
            if hit.empty:
                cells.append("")
                continue
            h = hit.iloc[0]
            text = SHORT_LABELS[h["label"]]
            cells.append(text if h["label"] in ("not reached", "bunit not reached") else
                         f"{diff_text(h['diff'], h['lo'], h['hi'])} {text}")
        a = area[(area["axis"] == axis) & (area["method"] == method)]
        cells.append(f"{diff_text(a.iloc[0]['diff'], a.iloc[0]['lo'], a.iloc[0]['hi'])} "
                     f"{SHORT_LABELS.get(a.iloc[0]['label'], '')}".strip() if len(a) else "")
        rows.append([axis, method, str(part["family"].iloc[0])] + cells)
    return Block("table", header=["Axis", "Method", "Family"] + fixed + [f"at {p}" for p in at_bunit]
                 + ["Mean top-1 over range"], rows=rows)


def verdict_blocks(metrics: pd.DataFrame, figures: list[Path] | None = None, *,
                   latency: LatencyTable | None = None) -> list[Block]:
    """The verdict section: per setting, per axis, where BUnit is better, worse or indistinguishable; the claim.

    Args:
        metrics: :func:`harness.analyse.metrics.add_relative_metrics` rows.
        figures: the ``verdict_*`` and ``curves_*`` PNG files to show.
        latency: the timing pass's ratios (preferred on the latency axis).

    Returns:
        The blocks, starting with an ``h2`` "Verdict".
    """
    points = compare_points(metrics, latency=latency)
    area = compare_area(metrics, latency=latency)
    claim = check_claim(metrics, latency=latency)
    seeds = sorted(set(metrics["seed"].dropna().astype(int))) if "seed" in metrics.columns else []
    reductions = ", ".join(f"{100 * r:g}%" for r in REDUCTIONS)
    blocks = [Block("h2", "Verdict"), Block("p", (
        "At equal cost, which method keeps the most top-1, and how sure are we? Each method is a curve of top-1 "
        "against log cost over its targets, one per seed, starting at the dense model (the shared origin); it is "
        "read only by interpolation between the method's own points, so a method that did not reach a cost has no "
        f"value there. Methods are compared with BUnit at BUnit's own costs and at {reductions} less cost: "
        "\u0394 = method \u2212 BUnit in top-1 points, with a 95% t-interval over the seeds both have (paired by "
        f"seed; {len(seeds)} seed(s) in this store). **BUnit better** (\u25b2): the interval lies below 0; **BUnit "
        "worse** (\u25bc): above 0; **indistinguishable** (\u2248): it contains 0 at this number of seeds. "
        "The mean top-1 over the common range (0 to the least compressed deepest point reached by every curve "
        f"that reaches {100 * AREA_MIN_REDUCTION:g}%, on a log-cost scale) sums each curve up in one number."))]
    if points.empty:
        return blocks + [Block("p", "No BUnit curve in this store: nothing to compare with.")]
    keys = [k for k in SETTING_KEYS if k in points.columns]
    for _, first in points.drop_duplicates(subset=keys).iterrows():
        setting = {k: first[k] for k in keys}
        sp, sa = _setting_rows(points, setting), _setting_rows(area, setting)
        blocks.append(Block("h3", f"Verdict: {setting_title(setting)}"))
        blocks += _claim_blocks(_setting_rows(claim, setting))
        for axis in COST_AXES:
            ap = sp[sp["axis"] == axis]
            if not ap.empty:
                note = _latency_note(metrics, setting, latency) if axis == "latency" else ""
                blocks += _axis_blocks(axis, ap, sa[sa["axis"] == axis], note)
        blocks += [_table(sp, sa), Block("p", "Cells: \u0394 = method \u2212 BUnit in top-1 points [95% interval]; "
                                             "\u25b2 BUnit better, \u25bc BUnit worse, \u2248 indistinguishable; "
                                             "\"not reached\": the method's curve does not span that cost.")]
    for p in [f for f in figures or [] if f.suffix == ".png"]:
        caption = ("Verdict: \u0394 = method \u2212 BUnit at fixed cost reductions (colour), with the label"
                   if p.stem.startswith("verdict_") else
                   "Top-1 against cost relative to dense (log scale): seed mean and 95% band of each curve")
        blocks.append(Block("img", text=f"{caption} ({p.stem})", path=p))
    return blocks
