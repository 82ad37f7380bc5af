"""Plots and report on the synthetic fixture store: files, legibility, and report numbers == metric functions."""
from __future__ import annotations

import os

os.environ["MPLBACKEND"] = "Agg"  # before anything imports matplotlib

import math
import re
import struct
from pathlib import Path

import matplotlib
import matplotlib.text
import pandas as pd
import pytest
from matplotlib.backends.backend_agg import FigureCanvasAgg

import harness  # noqa: F401  (torchvision shim first)
from harness.analyse.metrics import add_relative_metrics, summarize
from harness.analyse.plots import PANEL_W, plot_metric_bars, plot_tradeoff, prepare_summary, write_plots
from harness.analyse.report import DENSE_TARGET, MISSING, write_report
from harness.analyse.verdict import compare_area, compare_points
from harness.analyse.claim import check_claim
from harness.core.store import load_results
from fixtures_store import FIXTURE_FAILED, write_fixture_store

METHODS = ("dense", "bunit", "global-magnitude", "l1-filter", "slimming")


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> Path:
    return write_fixture_store(tmp_path_factory.mktemp("fixture") / "synthetic-fixture")


@pytest.fixture(scope="module")
def summary(store) -> pd.DataFrame:
    return summarize(add_relative_metrics(load_results(store)))


@pytest.fixture(scope="module")
def written(store) -> tuple[tuple[Path, Path], str, str]:
    """The fixture store's report with its figures, written once (10 s of plotting) for the tests that read it:
    ``((report.md, report.html), its Markdown, its HTML)``, the texts read at once (later tests here write the
    store's report again, without figures)."""
    paths = write_report(store)
    return paths, paths[0].read_text(encoding="utf-8"), paths[1].read_text(encoding="utf-8")


def _png_size(path: Path) -> tuple[int, int]:
    head = path.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    return struct.unpack(">II", head[16:24])


def test_write_plots_files(store):
    paths = write_plots(store)
    stems = {"accuracy_vs_macs", "accuracy_vs_params", "accuracy_vs_latency", "metric_acc", "metric_eff"}
    assert {p.name for p in paths} == {f"{s}_cifar10.{ext}" for s in stems for ext in ("png", "svg")}
    assert all(p.parent == store / "plots" for p in paths)
    for p in paths:
        if p.suffix == ".png":
            w, h = _png_size(p)
            assert w >= 2 * PANEL_W * 200 - 2 and h >= 400, (p.name, w, h)  # two panels at 200 dpi
            assert p.stat().st_size > 20_000
            pixels = matplotlib.image.imread(p)[..., :3].reshape(-1, 3)
            assert len({tuple(px) for px in pixels[::97]}) > 50  # not a blank canvas
        else:
            svg = p.read_text()
            assert svg.startswith("<?xml") and "</svg>" in svg
            for method in METHODS[1:]:
                assert method in svg, (p.name, method)
            if p.stem.startswith("accuracy_vs"):
                assert "Top-1 accuracy (%)" in svg and "dense" in svg and "Pareto front" in svg
    assert "MACs, non-zero weights (M)" in (store / "plots" / "accuracy_vs_macs_cifar10.svg").read_text()
    assert "Latency, batch 1, median (ms)" in (store / "plots" / "accuracy_vs_latency_cifar10.svg").read_text()


def test_write_plots_needs_out_dir_for_frames(store):
    with pytest.raises(ValueError, match="out_dir"):
        write_plots(load_results(store))


def _drawn_texts(fig) -> list:
    """Texts the renderer actually draws: tick labels inside the view, labels, titles, legend, annotations."""
    out = []
    for ax in fig.axes:
        if not ax.get_visible():
            continue
        for axis in (ax.xaxis, ax.yaxis):
            lo, hi = sorted(axis.get_view_interval())
            pad = 1e-9 * abs(hi - lo)
            out += [t.label1 for t in axis.get_major_ticks() if lo - pad <= t.get_loc() <= hi + pad]
            out.append(axis.label)
        out += [ax.title, *ax.texts]
    for legend in fig.legends:
        out += legend.get_texts()
    out += [t for t in fig.texts]
    if getattr(fig, "_suptitle", None) is not None:
        out.append(fig._suptitle)
    unique = list({id(t): t for t in out}.values())
    return [t for t in unique if t.get_visible() and t.get_text().strip()]


@pytest.mark.parametrize("backbones,stretch", [(("resnet56", "vgg16"), 1.0), (("vgg16",), 1.0), (("vgg16",), 2000.0)])
def test_figures_legible(summary, backbones, stretch):
    part = summary[summary["backbone"].isin(backbones)].copy()
    if stretch != 1.0:  # one very slow method: log latency axis over 3 decades and a clipped metric bar
        slow = part["method"] == "bunit"
        part.loc[slow, ["cost_latency_mean", "cost_latency_std"]] *= stretch
        part.loc[slow, "eff_latency_mean"] *= stretch
    figs = [plot_tradeoff(part, a) for a in ("macs", "params", "latency")]
    figs += [plot_metric_bars(part, m) for m in ("acc_cost", "eff")]
    for fig in figs:
        FigureCanvasAgg(fig)
        fig.canvas.draw()
        renderer = fig.canvas.get_renderer()
        assert fig.get_size_inches()[0] == pytest.approx(PANEL_W * len(backbones))
        texts = _drawn_texts(fig)
        assert len(texts) >= 15
        assert min(t.get_fontsize() for t in texts) >= 7
        boxes = [(t.get_text(), t.get_window_extent(renderer)) for t in texts]
        fig_box = fig.bbox
        for text, box in boxes:  # nothing cut off at the figure edge
            assert box.x0 >= fig_box.x0 - 1 and box.x1 <= fig_box.x1 + 1, text
            assert box.y0 >= fig_box.y0 - 1 and box.y1 <= fig_box.y1 + 1, text
        for i, (ta, a) in enumerate(boxes):  # and no two texts on top of each other
            for tb, b in boxes[i + 1:]:
                assert not a.overlaps(b), (ta, tb)


def test_unknown_axis_and_metric(summary):
    with pytest.raises(ValueError, match="axis"):
        plot_tradeoff(summary, "flops")
    with pytest.raises(ValueError, match="metric"):
        plot_metric_bars(summary, "f1")


# ------------------------------------------------------------------------------------------------- report
_NUM = re.compile(r"^([+-]?\d+(?:\.(\d+))?)(?: \u00b1 (\d+(?:\.\d+)?))?$")


def _parse(cell: str) -> tuple[float, float | None, int]:
    """``'93.24 ± 0.10'`` -> (93.24, 0.10, 2); ``'n/a'`` -> (nan, None, 0)."""
    if cell == MISSING:
        return math.nan, None, 0
    m = _NUM.match(cell)
    assert m, f"unparseable cell {cell!r}"
    return float(m.group(1)), (float(m.group(3)) if m.group(3) else None), len(m.group(2) or "")


def _tables(md: str) -> dict[str, list[list[dict[str, str]]]]:
    """``### heading`` -> its tables as lists of {header: cell}."""
    out: dict[str, list] = {}
    heading, table, header = None, None, None
    for line in md.splitlines() + [""]:
        if line.startswith("### "):
            heading = line[4:]
            out[heading] = []
        elif line.startswith("|") and heading is not None:
            cells = [c.strip().replace("\\|", "|") for c in line.strip("|").split(" | ")]
            if header is None:
                header, table = cells, []
            elif not set(line) <= set("|-"):
                table.append(dict(zip(header, cells)))
        elif header is not None:
            if heading is not None:
                out[heading].append(table)
            header = table = None
    return out


_SCALE = {"": 1.0, "count": 1.0, "K": 1e3, "M": 1e6, "G": 1e9}


def _expected_columns(header: list[str]) -> dict[str, tuple[str, float]]:
    """Header -> (summary column stem, factor from the summary value to the displayed one)."""
    cols = {"Top-1 (%)": ("top1", 1), "Drop (pts)": ("acc_drop", 1), "Params \u2193 (%)": ("reduction_params", 100),
            "MACs \u2193 (%)": ("reduction_macs", 100), "Latency b1 (ms)": ("cost_latency", 1),
            "Speed-up b1 (x)": ("speedup_b1", 1), "Speed-up bt (x)": ("speedup_bt", 1)}
    for axis, name in (("params", "params"), ("macs", "MACs"), ("latency", "latency")):
        cols[f"ACC {name}"] = (f"acc_cost_{axis}", 1)
        cols[f"EFF {name}"] = (f"eff_{axis}", 1)
    for h in header:
        m = re.match(r"^(Params|MACs) \((\w*)\)$", h)
        if m:
            cols[h] = ("cost_params" if m.group(1) == "Params" else "cost_macs", 1 / _SCALE[m.group(2)])
    return {h: cols[h] for h in header if h in cols}


def _close(shown: float, decimals: int, expected: float) -> bool:
    if math.isnan(expected) or math.isnan(shown):
        return math.isnan(expected) and math.isnan(shown)
    return abs(shown - expected) <= 0.5 * 10 ** -decimals + 1e-9


def test_report_numbers_match_metric_functions(store, summary, written):
    paths, md, _ = written
    assert paths == (store / "report.md", store / "report.html")
    sections = _tables(md)
    assert set(sections) >= {"cifar10 \u00b7 resnet56 (shortcut A) \u00b7 32 px", "cifar10 \u00b7 vgg16 \u00b7 32 px"}
    checked = 0
    for _, setting in summary.groupby(["backbone"]):
        title = next(t for t in sections if not t.startswith("Verdict")
                     and t.split(" \u00b7 ")[1].split(" ")[0] == setting["backbone"].iloc[0])
        main, speed, trade = sections[title][:3]
        assert len(main) == len(speed) == len(trade) == len(setting) == 9
        for table in (main, speed, trade):
            columns = _expected_columns(list(table[0]))
            for cell_row in table:
                target = "" if cell_row["Target"] == DENSE_TARGET else cell_row["Target"]
                ref = setting[(setting["method"] == cell_row["Method"]) & (setting["target_label"] == target)]
                assert len(ref) == 1, cell_row
                ref = ref.iloc[0]
                for header, (stem, factor) in columns.items():
                    mean, std, d = _parse(cell_row[header])
                    assert _close(mean, d, factor * ref[f"{stem}_mean"]), (title, cell_row["Method"], header)
                    exp_std = factor * ref[f"{stem}_std"]
                    if std is None:  # std left out: one seed (NaN) or zero at the shown precision
                        assert math.isnan(exp_std) or round(exp_std, d) == 0 or math.isnan(mean), header
                    else:
                        assert _close(std, d, exp_std), (title, cell_row["Method"], header, "std")
                    checked += 1
                if table is main:
                    assert int(cell_row["Seeds"]) == ref["n_seeds"]
                    assert cell_row["Pareto"] == " ".join(
                        t for t, a in zip("PML", ("params", "macs", "latency")) if ref[f"pareto_{a}"])
    assert checked == 2 * 9 * (9 + 6)


def test_report_content(store, written):
    _, md, page = written
    backbone, method, target, seed = FIXTURE_FAILED
    reason = "ValueError: slimming: target 0.6 removes every channel of features.37"
    assert reason in md and f"cifar10/{backbone}/{method}/{target}/oneshot/{seed}-" in md
    for text in ("0123456789ab", "NVIDIA H100 80GB HBM3 (synthetic)", "torch 2.13.0", "synthetic-fixture",
                 "Rows: 54 (53 ok, 1 failed)", "| slimming | structured | 0.4, 0.6 | oneshot | 200 | 11 | 1 |"):
        assert text in md, text
    pngs = sorted((store / "plots").glob("*.png"))
    assert {p.stem for p in pngs} == {f"{s}_cifar10" for s in (
        "accuracy_vs_macs", "accuracy_vs_params", "accuracy_vs_latency", "metric_acc", "metric_eff", "verdict",
        "curves_macs", "curves_params", "curves_latency")}
    for p in pngs:
        assert f"](plots/{p.name})" in md
    # self-contained: every image is a data URI, nothing is fetched from elsewhere
    assert page.count('src="data:image/png;base64,') == 9
    assert not re.search(r'(src|href)="(?!data:)', page)
    assert "<table>" in page and reason in page and "slimming" in page


def test_report_from_frame(tmp_path, store):
    df = load_results(store)
    with pytest.raises(ValueError, match="out_dir"):
        write_report(df)
    md, html = write_report(df[df["backbone"] == "vgg16"], tmp_path / "out", plots=False)
    text = md.read_text(encoding="utf-8")
    assert "## Figures" not in text and "resnet56" not in text and "vgg16" in text
    assert html.exists()


def test_prepare_summary_accepts_all_inputs(store, summary):
    a = prepare_summary(store)
    b = prepare_summary(load_results(store))
    c = prepare_summary(summary)
    pd.testing.assert_frame_equal(a, b)
    assert c is summary


# ------------------------------------------------------------------------------------------------- verdict
_DIFF = re.compile(r"^([+-]?\d+\.\d\d)(?: \[([+-]?\d+\.\d\d), ([+-]?\d+\.\d\d)\])? (.+) \((\d+)(?: vs (\d+))? seeds(?:, unpaired)?\)$")
_SHORT = {"BUnit \u25b2": "bunit better", "BUnit \u25bc": "bunit worse", "\u2248": "indistinguishable",
          "few seeds": "too few seeds", "< 1 image": "below resolution", "no spread": "zero-width interval"}
_NO_VALUE = {"not reached", "BUnit not reached", "too sparse here", "BUnit too sparse here", "not judged"}


def test_report_leads_with_the_verdict_and_its_numbers(store):
    md = write_report(store, plots=False)[0].read_text(encoding="utf-8")
    assert [line for line in md.splitlines() if line.startswith("## ")][0] == "## Verdict"
    df = load_results(store)
    points, area = compare_points(df), compare_area(df)
    assert set(points["label"]) >= {"bunit worse", "indistinguishable", "not reached", "bunit not reached"}
    sections = _tables(md)
    checked = 0
    for backbone in ("resnet56", "vgg16"):
        title = next(t for t in sections if t.startswith("Verdict") and backbone in t)
        table = sections[title][0]
        assert len(table) == 3 * 3  # axes x non-BUnit methods
        for cell_row in table:
            ref = points[(points["backbone"] == backbone) & (points["axis"] == cell_row["Axis"])
                         & (points["method"] == cell_row["Method"])]
            for header, cell in cell_row.items():
                if not header.endswith("% less"):
                    continue
                r = ref[ref["point"] == header].iloc[0]
                if cell in _NO_VALUE:
                    assert r["label"] == cell.lower(), (backbone, header, cell)
                    continue
                m = _DIFF.match(cell)
                assert m, cell
                assert float(m.group(1)) == pytest.approx(r["diff"], abs=0.005 + 1e-9)
                if m.group(2) is None:  # no interval: too few seeds
                    assert math.isnan(r["lo"]) and r["label"] == "too few seeds"
                else:
                    assert float(m.group(2)) == pytest.approx(r["lo"], abs=0.005 + 1e-9)
                    assert float(m.group(3)) == pytest.approx(r["hi"], abs=0.005 + 1e-9)
                assert _SHORT[m.group(4)] == r["label"]
                seeds = (r["n_pairs"],) if r["rule"] == "paired t" else (r["n_method"], r["n_bunit"])
                assert tuple(int(g) for g in m.groups()[4:] if g) == seeds
                checked += 1
        ra = area[(area["backbone"] == backbone) & (area["method"] != "bunit")]
        assert len(ra) and (ra["range_reduction"] > 0.5).all()
    # the cells where both curves have a value (the rest are checked as "not reached" / "too sparse here"): 16
    # before the reading rule; global-magnitude's two points (0.5 and 0.1 of dense params, 0.51 and 0.12 of its
    # MACs) are 4-5x apart, so the costs between them lie in a gap and are no longer read
    assert checked == 11
    assert (points["label"] == "too sparse here").sum() >= 4
    claim = check_claim(df)
    for _, c in claim[claim["axis"] == "claim"].iterrows():
        assert f"**{c['status'].upper()}**" in md


def test_verdict_text_names_each_family_and_direction(store):
    md = write_report(store, plots=False)[0].read_text(encoding="utf-8")
    verdict = md.split("## Verdict", 1)[1].split("\n## ", 1)[0]
    for text in ("vs unstructured `global-magnitude`", "vs structured `l1-filter`", "vs structured `slimming`",
                 "#### Parameters (non-zero)", "#### MACs (non-zero weights)", "#### Latency (batch 1)",
                 "The paper's claim", "Comparable means BUnit loses at most 1 point"):
        assert text in verdict, text


def test_verdict_figures_written_and_inside_the_canvas(store, tmp_path):
    from harness.analyse.verdict_plots import band, plot_verdict_heatmap, write_verdict_plots
    from harness.analyse.verdict import build_curves

    df = load_results(store)
    paths = write_verdict_plots(df, tmp_path)
    assert {p.name for p in paths} == {f"{s}_cifar10.{e}" for s in ("verdict", "curves_macs", "curves_params",
                                                                   "curves_latency") for e in ("png", "svg")}
    fig = plot_verdict_heatmap(compare_points(df), compare_area(df))
    FigureCanvasAgg(fig)
    fig.canvas.draw()
    renderer = fig.canvas.get_renderer()
    texts = _drawn_texts(fig)
    assert sum(t.get_text().startswith(("+", "-")) for t in texts) >= 16  # one signed delta per reached cell
    for t in texts:
        box = t.get_window_extent(renderer)
        assert box.x0 >= fig.bbox.x0 - 1 and box.x1 <= fig.bbox.x1 + 1, t.get_text()
    # the band is the seed mean and its t-interval at every grid point
    cur = next(c for c in build_curves(df, "macs") if c.setting["backbone"] == "resnet56")
    x, mean, lo, hi = band(cur, "bunit")
    seeds = [v for v in cur.at("bunit", x[len(x) // 2]).values()]
    assert mean[len(x) // 2] == pytest.approx(sum(seeds) / len(seeds))
    assert (lo <= mean + 1e-9).all() and (hi >= mean - 1e-9).all()
