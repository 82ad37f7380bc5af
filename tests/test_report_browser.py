"""The HTML report as a browser shows it: headless Chromium (Debian's ``chromium``) renders the report of a store and
a script in the page reports what a reader would see: no literal Markdown markers, nothing wider than the window.

Slow (Chromium takes seconds to start) and needs ``apt-get install chromium``; run with ``-m slow``.
"""
from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest

import harness  # noqa: F401  (torchvision shim first)
from harness.analyse.report import write_report
from fixtures_store import write_fixture_store

pytestmark = pytest.mark.slow

REFERENCE = Path(__file__).resolve().parents[1] / "results" / "reference" / "quick"
_FLAGS = ("--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
          "--disable-background-networking", "--disable-component-update", "--disable-sync")
# Runs after layout: how far the page scrolls sideways, which elements stick out, and the literal '**' a reader sees.
_PROBE = """<script>
const root = document.documentElement, width = root.clientWidth;
const wide = [...document.querySelectorAll('body *')].filter(e => e.getBoundingClientRect().right > width + 1)
  .map(e => e.tagName + ': ' + (e.textContent || '').slice(0, 60));
document.body.setAttribute('data-probe', JSON.stringify({overflow: root.scrollWidth - width, wide: wide.slice(0, 5),
  stars: (document.body.innerText.match(/\\*\\*/g) || []).length, tables: document.querySelectorAll('table').length,
  strong: document.querySelectorAll('strong').length, images: document.querySelectorAll('img').length}));
</script></body>"""


def _chromium() -> str:
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("needs Debian's chromium (apt-get install chromium)")
    return exe


def _probe(html: Path, tmp_path: Path, width: int = 1280) -> dict:
    page = tmp_path / "probe.html"
    page.write_text(html.read_text(encoding="utf-8").replace("</body>", _PROBE), encoding="utf-8")
    out = subprocess.run([_chromium(), *_FLAGS, f"--user-data-dir={tmp_path / 'profile'}",
                          f"--window-size={width},900", "--dump-dom", page.as_uri()],
                         capture_output=True, text=True, timeout=180)
    found = re.search(r"data-probe=\"([^\"]*)\"", out.stdout)
    assert found, out.stderr[-2000:]
    return json.loads(found.group(1).replace("&quot;", '"').replace("&amp;", "&"))


def _screenshot(html: Path, tmp_path: Path) -> Path:
    shot = tmp_path / "report.png"
    subprocess.run([_chromium(), *_FLAGS, f"--user-data-dir={tmp_path / 'profile-shot'}", "--window-size=1280,2400",
                    f"--screenshot={shot}", html.as_uri()], capture_output=True, timeout=180, check=True)
    return shot


@pytest.mark.parametrize("source", ["reference", "fixture"])
def test_report_renders_without_markers_or_sideways_scroll(source, tmp_path):
    if source == "reference":
        store = tmp_path / "quick"
        shutil.copytree(REFERENCE, store)
    else:
        store = write_fixture_store(tmp_path / "fixture")
    _, html = write_report(store)
    seen = _probe(html, tmp_path)
    assert seen["stars"] == 0, "literal ** in the rendered text"
    assert seen["overflow"] <= 0 and seen["wide"] == [], seen["wide"]
    assert seen["tables"] >= 4 and seen["strong"] >= 4 and seen["images"] >= 3  # tables, bold, figures rendered
    narrow = _probe(html, tmp_path, width=1024)  # a laptop window: tables wrap, nothing runs off the page
    assert narrow["overflow"] <= 0 and narrow["wide"] == [], narrow["wide"]
    assert _screenshot(html, tmp_path).stat().st_size > 10_000
