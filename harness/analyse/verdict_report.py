"""The report's first section: the headline, the verdict in words, in tables and in figures; the paper's claim.

Every number is a value of :func:`harness.analyse.verdict.compare_points`, :func:`~harness.analyse.verdict.compare_area`
or :func:`harness.analyse.claim.check_claim`, rounded for display.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pandas as pd

from harness.analyse.report_blocks import MISSING, Block, fmt_value, setting_title
from harness.analyse.claim import CLAIM_POINTS, COMPARABLE_POINTS, check_claim
from harness.analyse.latency_source import LatencyTable
from harness.analyse.metrics import COST_AXES, SETTING_KEYS, family_rank, target_sort_key
from harness.analyse.verdict import (AREA_MIN_REDUCTION, BUNIT, MAX_GAP, REDUCTIONS, build_curves, compare_area,
                                     compare_points)

__all__ = ["verdict_blocks", "headline_blocks", "headlines", "diff_text", "seeds_text", "SHORT_LABELS",
           "AXIS_NAMES", "READING_RULES"]

AXIS_NAMES = {"params": "Parameters (non-zero)", "macs": "MACs (non-zero weights)", "latency": "Latency (batch 1)"}
SHORT_LABELS = {"bunit better": "BUnit \u25b2", "bunit worse": "BUnit \u25bc", "indistinguishable": "\u2248",
                "below resolution": "< 1 image", "zero-width interval": "no spread", "too few seeds": "few seeds",
                "too sparse here": "too sparse here", "bunit too sparse here": "BUnit too sparse here",
                "not judged": "not judged", "not reached": "not reached", "bunit not reached": "BUnit not reached"}
_JUDGED = ("bunit better", "bunit worse", "indistinguishable")
_NUMBERED = _JUDGED + ("below resolution", "zero-width interval", "too few seeds")
READING_RULES = (
    f"**Reading rule**: a curve has a value at a cost only at one of its own points or between two neighbouring "
    f"points at most {MAX_GAP:g}\u00d7 apart in cost (the dense origin counts as one), joined linearly in log cost; "
    "beyond its points it is *not reached* (no extrapolation), inside a wider gap it is *too sparse here*.",
    "**Origin**: the dense row of each seed, and only it; a method's own row at dense cost (target 0) is never "
    "averaged into it and is not read.",
    "**One configuration per curve**: rows of a method whose weight-changing settings differ from its latest run "
    "are left out (listed below), as are earlier rows of the same point.",
    "**Resolution**: no direction is claimed from a difference smaller than one test image (100 / N test points), "
    "nor from an interval of zero width (every seed the same difference).",
    "**Latency**: timings the timing pass flagged busy or unsteady are left out; a cost that only they would have "
    "reached is *not judged*.",
)


def diff_text(diff: Any, lo: Any, hi: Any) -> str:
    """``+0.42 [-0.10, +0.95]``; the interval is left out when it is undefined; ``n/a`` without a difference."""
    d = fmt_value(diff, 2, sign=True)
    if d == MISSING:
        return MISSING
    bounds = fmt_value(lo, 2, sign=True), fmt_value(hi, 2, sign=True)
    return d if MISSING in bounds else f"{d} [{bounds[0]}, {bounds[1]}]"


def seeds_text(row: pd.Series | dict) -> str:
    """How many seeds a comparison used: ``3 seeds`` (paired) or ``2 vs 3 seeds, unpaired``."""
    if row.get("rule") == "paired t":
        return f"{int(row['n_pairs'])} seeds"
    n_m, n_b = int(row.get("n_method", 0) or 0), int(row.get("n_bunit", 0) or 0)
    return f"{n_m} vs {n_b} seeds, unpaired" if n_m and n_b else ""


def _cell(row: pd.Series) -> str:
    lab = row["label"]
    if lab not in _NUMBERED:
        return SHORT_LABELS.get(lab, lab)
    return f"{diff_text(row['diff'], row['lo'], row['hi'])} {SHORT_LABELS[lab]} ({seeds_text(row)})"


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


def _settings(*frames: pd.DataFrame) -> list[dict]:
    seen: dict[tuple, dict] = {}
    for frame in frames:
        if frame.empty:
            continue
        keys = [k for k in SETTING_KEYS if k in frame.columns]
        for _, r in frame.drop_duplicates(subset=keys).iterrows():
            seen.setdefault(tuple(_norm(r[k]) for k in keys), {k: r[k] for k in keys})
    return list(seen.values())


# --------------------------------------------------------------------------------------------------- headline
def _joined(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def _claim_phrase(claim: pd.DataFrame) -> str:
    overall = claim[claim["axis"] == "claim"]["status"]
    if overall.empty:
        return ""
    points = claim[claim["axis"] != "claim"]
    n = int(points["n_pairs"].max()) if "n_pairs" in points.columns and points["n_pairs"].notna().any() else 0
    return f"the paper's claim is {overall.iloc[0]} ({n} paired seeds)" if n else \
        f"the paper's claim is {overall.iloc[0]} (no claim point has paired seeds)"


def headlines(points: pd.DataFrame, claim: pd.DataFrame) -> list[str]:
    """One sentence per setting: where BUnit keeps more top-1 than each method at equal MACs, and the claim.

    Read from the fixed reductions on the MACs axis; costs where a comparison has no verdict (not reached, too
    sparse, too few seeds, below resolution) are named as such.
    """
    out = []
    for setting in _settings(points, claim):
        parts = []
        sp = _setting_rows(points, setting)
        macs = sp[(sp["axis"] == "macs") & (sp["point_kind"] == "reduction")] if len(sp) else sp
        for method, rows in (macs.groupby("method", sort=False) if len(macs) else []):
            by = {lab: [f"{100 * r:.0f}%" for r in part["reduction"]]
                  for lab, part in rows.groupby("label", sort=False)}
            bits = []
            if "bunit better" in by:
                bits.append(f"BUnit keeps more top-1 than `{method}` at {_joined(by['bunit better'])} fewer MACs")
            if "bunit worse" in by:
                bits.append(f"`{method}` keeps more top-1 than BUnit at {_joined(by['bunit worse'])} fewer MACs")
            if "indistinguishable" in by:
                head = "" if bits else f"BUnit and `{method}`: "
                bits.append(f"{head}no difference at {_joined(by['indistinguishable'])}")
            for lab, ps in by.items():
                if lab not in _JUDGED:
                    head = "" if bits else f"BUnit and `{method}`: "
                    bits.append(f"{head}no verdict at {_joined(ps)} ({SHORT_LABELS.get(lab, lab)})")
            parts.append(", ".join(bits))
        claim_text = _claim_phrase(_setting_rows(claim, setting)) if len(claim) else ""
        if claim_text:
            parts.append(claim_text)
        if parts:
            out.append(f"**{setting_title(setting)}**: " + "; ".join(parts) + ".")
    return out


def headline_blocks(metrics: pd.DataFrame, *, latency: LatencyTable | None = None) -> list[Block]:
    """The report's opening: one sentence per setting (:func:`headlines`)."""
    sentences = headlines(compare_points(metrics, latency=latency, axes=("macs",)), check_claim(metrics,
                                                                                                 latency=latency))
    return [Block("p", s) for s in sentences] or [Block("p", "No setting has both a dense and a BUnit curve: "
                                                             "nothing to judge.")]


# --------------------------------------------------------------------------------------------------- sections
def _method_sentence(rows: pd.DataFrame, area: pd.DataFrame) -> str:
    """``BUnit ▲ at 75% less (-1.23 [...], 3 seeds); ≈ at ...; mean top-1 over 0-75% less: ...``; costs without a
    verdict are left to the table."""
    parts = []
    for lab in _NUMBERED:
        hits = rows[rows["label"] == lab]
        if hits.empty:
            continue
        points = ", ".join(f"{r['point']} ({diff_text(r['diff'], r['lo'], r['hi'])}, {seeds_text(r)})"
                           for _, r in hits.iterrows())
        parts.append(f"{SHORT_LABELS[lab]} at {points}")
    if len(area) and area.iloc[0]["label"] in _NUMBERED:
        a = area.iloc[0]
        parts.append(f"mean top-1 over 0\u2013{100 * a['range_reduction']:.0f}% less "
                     f"{diff_text(a['diff'], a['lo'], a['hi'])} {SHORT_LABELS[a['label']]}")
    return "; ".join(parts)


def _axis_blocks(axis: str, points: pd.DataFrame, area: pd.DataFrame, note: str) -> list[Block]:
    items, apart = [], []
    for method, rows in points.groupby("method", sort=False):
        sentence = _method_sentence(rows, area[area["method"] == method])
        family = str(rows["family"].iloc[0])
        if sentence:
            items.append((family_rank(family), family, f"vs {family} `{method}`: {sentence}"))
        else:
            apart.append(f"`{method}`")
    text = f"Latency{note}." if note else ""
    own = points[points["point_kind"] == "bunit"].drop_duplicates("point")
    if len(own) and (own["reduction"] < 0).all():
        text += f" BUnit costs more than dense at every one of its targets on this axis ({', '.join(own['point'])})."
    if apart:
        text += f" No cost where both curves have a value: {', '.join(apart)}."
    return [Block("h4", AXIS_NAMES[axis])] + ([Block("p", text.strip())] if text else []) + (
        [Block("ul", items=[i[2] for i in sorted(items, key=lambda i: i[:2])])] if items else [])


def _latency_note(metrics: pd.DataFrame, setting: dict, latency: LatencyTable | None) -> str:
    cur = next((c for c in build_curves(_setting_rows(metrics, setting), "latency", latency=latency)), None)
    if cur is None:
        return ""
    src = cur.sources
    excluded = src.get("excluded", 0)
    left = (f"; {excluded} timings left out because the pass flagged them busy or unsteady" if excluded else "")
    if excluded and not cur.curves.get(BUNIT):
        left += " \u2014 **not judged**: no BUnit timing is left to read"
    if src["pass"] or excluded:
        return (f": paired ratio to dense from the timing pass for {src['pass']} rows ({latency.describe()}); "
                f"{src['isolated']} rows timed in isolation{left}")
    return f": all {src['isolated']} rows timed in isolation while training, each against its dense row's timing"


def _claim_blocks(claim: pd.DataFrame) -> list[Block]:
    if claim.empty:
        return []
    overall = claim[claim["axis"] == "claim"]["status"]
    status = overall.iloc[0] if len(overall) else "undecided"
    items = []
    for _, r in claim[claim["axis"] != "claim"].iterrows():
        what = f"{100 * r['reduction']:.0f}% fewer {'MACs (FLOPs)' if r['axis'] == 'macs' else 'parameters'}"
        if not r["reached"]:
            why = ("its points around this cost are too far apart to read it (reading rule)"
                   if r.get("why") == "too sparse here" else "BUnit's curve does not reach it (no extrapolation)")
            items.append(f"at {what}: {why} \u2014 **{r['status']}**")
            continue
        read = r.get("reduction_read")
        if read is not None and math.isfinite(read) and f"{100 * read:.2f}" != f"{100 * r['reduction']:.2f}":
            what += f" (read at {100 * read:.2f}%, where BUnit's runs for this point landed)"
        items.append(f"at {what}: BUnit {fmt_value(r['top1_bunit'], 2)}% ({int(r['n_bunit'])} seeds), dense "
                     f"{fmt_value(r['top1_dense'], 2)}% ({int(r['n_dense'])} seeds), BUnit \u2212 dense "
                     f"{diff_text(r['diff'], r['lo'], r['hi'])} points over {int(r['n_pairs'])} paired seeds "
                     f"\u2014 **{r['status']}**")
    points = " and ".join(f"{100 * v:.0f}% fewer {'MACs' if a == 'macs' else 'parameters'}" for a, v in CLAIM_POINTS)
    return [Block("p", f"**The paper's claim** \u2014 comparable accuracy at {points}: **{status.upper()}**. "
                       f"Comparable means BUnit loses at most {COMPARABLE_POINTS:g} point of top-1 against dense at "
                       f"95% confidence (true: the interval of BUnit \u2212 dense lies above \u2212"
                       f"{COMPARABLE_POINTS:g}; false: it lies below; undecided: it straddles \u2212"
                       f"{COMPARABLE_POINTS:g}, has zero width, too few seeds, or no value there)."),
            Block("ul", items=items)]


def _tables(points: pd.DataFrame, area: pd.DataFrame) -> list[Block]:
    """Two narrow tables per setting: at the fixed reductions (with the area), and at BUnit's own costs."""
    fixed = [p for p in points["point"].drop_duplicates() if p.endswith("% less")]
    at_bunit = sorted((p for p in points["point"].drop_duplicates() if not p.endswith("% less")),
                      key=lambda p: target_sort_key(p.removeprefix("BUnit ")))
    first, second = [], []
    for (axis, method), part in points.groupby(["axis", "method"], sort=False):
        cells = {p: _cell(part[part["point"] == p].iloc[0]) if (part["point"] == p).any() else "" for p in
                 fixed + at_bunit}
        a = area[(area["axis"] == axis) & (area["method"] == method)]
        mean = ""
        if len(a):
            a = a.iloc[0]
            mean = (f"{diff_text(a['diff'], a['lo'], a['hi'])} {SHORT_LABELS[a['label']]}"
                    if a["label"] in _NUMBERED else SHORT_LABELS.get(a["label"], str(a["label"])))
        ident = [axis, method, str(part["family"].iloc[0])]
        first.append(ident + [cells[p] for p in fixed] + [mean])
        second.append(ident + [cells[p] for p in at_bunit])
    blocks = [Block("table", header=["Axis", "Method", "Family"] + fixed + ["Mean top-1 over range"], rows=first)]
    if at_bunit:
        blocks.append(Block("table", header=["Axis", "Method", "Family"] + [f"at {p}" for p in at_bunit],
                            rows=second))
    return blocks


def _left_out_block(left_out: pd.DataFrame | None) -> list[Block]:
    if left_out is None or left_out.empty:
        return []
    items = [f"`{r.get('key', '')}`: {r['left_out_reason']}" for _, r in left_out.iterrows()]
    return [Block("p", f"Left out of the verdict and the tables: {len(items)} ok row(s)."), Block("ul", items=items)]


def verdict_blocks(metrics: pd.DataFrame, figures: list[Path] | None = None, *, latency: LatencyTable | None = None,
                   left_out: pd.DataFrame | None = None) -> list[Block]:
    """The verdict section: per setting, the claim, then per axis where BUnit is better, worse or indistinguishable.

    Args:
        metrics: :func:`harness.analyse.metrics.add_relative_metrics` rows.
        figures: the ``verdict_*`` and ``curves_*`` PNG files to show.
        latency: the timing pass's ratios (preferred on the latency axis).
        left_out: the ok rows :func:`harness.analyse.metrics.partition_rows` left out, with their reasons.

    Returns:
        The blocks, starting with an ``h2`` "Verdict".
    """
    points = compare_points(metrics, latency=latency)
    area = compare_area(metrics, latency=latency)
    claim = check_claim(metrics, latency=latency)
    reductions = ", ".join(f"{100 * r:g}%" for r in REDUCTIONS)
    blocks = [Block("h2", "Verdict"), Block("p", (
        "At equal cost, which method keeps the most top-1, and how sure are we? Each method is a curve of top-1 "
        "against log cost over its targets, one per seed, starting at the dense model (the shared origin). "
        f"Methods are compared with BUnit at BUnit's own costs (each seed at its own) and at {reductions} less "
        "cost: \u0394 = method \u2212 BUnit in top-1 points, with a 95% t-interval over the seeds both have (paired "
        "by seed; Welch's interval where they share fewer than two), and the number of seeds used. "
        "**BUnit better** (\u25b2): the interval lies below 0; **BUnit worse** (\u25bc): above 0; "
        "**indistinguishable** (\u2248): it contains 0. The mean top-1 over the common range (0 to the least "
        f"compressed deepest point reached by every curve that reaches {100 * AREA_MIN_REDUCTION:g}%, on a log-cost "
        "scale) sums each curve up in one number.")), Block("ul", items=list(READING_RULES))]
    blocks += _left_out_block(left_out)
    settings = _settings(points, claim)
    if not settings:
        return blocks + [Block("p", "No setting has both a dense and a BUnit curve: nothing to judge.")]
    for setting in settings:
        sp, sa = _setting_rows(points, setting), _setting_rows(area, setting)
        blocks.append(Block("h3", f"Verdict: {setting_title(setting)}"))
        blocks += _claim_blocks(_setting_rows(claim, setting))
        if sp.empty:
            blocks.append(Block("p", "No other method in this setting to set beside BUnit."))
            continue
        for axis in COST_AXES:
            ap = sp[sp["axis"] == axis]
            if not ap.empty:
                note = _latency_note(metrics, setting, latency) if axis == "latency" else ""
                blocks += _axis_blocks(axis, ap, sa[sa["axis"] == axis], note)
        blocks += _tables(sp, sa) + [Block("p", (
            "Cells: \u0394 = method \u2212 BUnit in top-1 points [95% interval], the label and the seeds used; "
            "\u25b2 BUnit better, \u25bc BUnit worse, \u2248 indistinguishable; *< 1 image*: below the test set's "
            "resolution; *no spread*: zero-width interval; *too sparse here* / *not reached*: the method's curve "
            "has no value at that cost (reading rule); *not judged*: only busy or unsteady timings would give one."))]
    for p in [f for f in figures or [] if f.suffix == ".png"]:
        caption = ("Verdict: \u0394 = method \u2212 BUnit at fixed cost reductions (colour), with the label"
                   if p.stem.startswith("verdict_") else
                   "Top-1 against cost relative to dense (log scale): seed mean and 95% band of each curve")
        blocks.append(Block("img", text=f"{caption} ({p.stem})", path=p))
    return blocks
