"""The README's worked plugin example, run exactly as the README shows it, through a real suite."""
import os
import re
import subprocess
import sys
from pathlib import Path

from harness.core.store import load_results

from conftest import write_suite

ROOT = Path(__file__).resolve().parent.parent
EXAMPLE = ROOT / "examples" / "plugin_criterion.py"


def test_readme_shows_the_example_verbatim():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    assert EXAMPLE.read_text() in blocks
    assert len(EXAMPLE.read_text().splitlines()) < 40


def test_plugin_runs_through_a_real_suite(tmp_path):
    methods = '[[methods]]\nname = "dense"\n\n[[methods]]\nname = "l2-filter"\ntargets = [0.5, "macs:0.5"]\n'
    suite = write_suite(tmp_path / "plugin.toml", name="plugin", epochs=1, methods=methods)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--plugin", str(EXAMPLE),
                          "--results-dir", str(tmp_path / "results"), "--no-progress"],
                         capture_output=True, text=True, timeout=600,
                         env={**os.environ, "OMP_NUM_THREADS": "1"})  # two threads spin on a busy machine
    assert out.returncode == 0, out.stderr
    df = load_results(tmp_path / "results" / "plugin").set_index("target", drop=False)
    rows = df[df["method"] == "l2-filter"]
    assert len(rows) == 2 and (rows["status"] == "ok").all()
    assert set(rows["family"]) == {"structured"}
    by_target = {str(t): r for t, r in rows.iterrows()}
    assert abs(by_target["0.5"]["channel_ratio"] - 0.5) < 0.03  # every layer halved (rounding on 8x8 widths)
    assert by_target["macs:0.5"]["macs_reduction"] >= 0.5 - 0.05
    dense = df[df["method"] == "dense"].iloc[0]
    assert (rows["params"] < dense["params"]).all()
    assert (rows["epochs_finetune"] == 1).all() and (rows["epochs_pretrain"] == 1).all()


def test_without_the_plugin_the_method_is_unknown(tmp_path):
    methods = '[[methods]]\nname = "l2-filter"\ntargets = [0.5]\n'
    suite = write_suite(tmp_path / "p.toml", name="p", methods=methods)
    out = subprocess.run([sys.executable, "-m", "harness.cli", "run", str(suite), "--dry-run"],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 2
    assert "l2-filter" in out.stderr and "allowed" in out.stderr and "l1-filter" in out.stderr


def test_readme_suite_example_is_a_valid_suite():
    import tomllib

    from harness.core.config import expand, parse_suite

    block = re.search(r"```toml\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S).group(1)
    suite = parse_suite(tomllib.loads(block))
    assert suite.dataset == "cifar10" and suite.train.bf16_cpu and suite.train.channels_last
    # backbones x (3 seeds x (dense, bunit, l1) + global-magnitude's own 2 seeds x its 2 targets)
    assert len(expand(suite)) == 2 * (3 * (1 + 2 + 2) + 2 * 2)
