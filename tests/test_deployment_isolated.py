"""The deployment tests (OpenVINO, BUnit's unit op inside it, the best-deployment view) run in a pytest process of
their own: ``tests/deployment_checks.py``, started here in a fresh interpreter.

Collected into an xdist worker beside the rest of the suite, they left the worker in a state in which a later test
crashed it ("node down: Not properly terminated", at tests/test_timing_pass.py::test_bad_options_name_the_allowed_values,
in both full runs of ``-n 2`` that included them; none in the full run without them). Alone, or in one process with
the timing-pass and contract tests, they pass. The cause (OpenVINO's TBB threads or its extension library, beside
torch's OpenMP, in a long-lived worker) is not found; until it is, they run isolated, and this test fails with their
output when any of them fails. ``python -m pytest tests/deployment_checks.py`` runs them directly.
"""
from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = Path(__file__).with_name("deployment_checks.py")


def test_deployment_checks_pass_in_their_own_process():
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          str(CHECKS)], capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    summary = out.stdout.strip().splitlines()[-1]
    passed = re.search(r"(\d+) passed", summary)
    assert passed and int(passed.group(1)) >= 18, summary  # the 18 checks not marked slow
    if importlib.util.find_spec("openvino") is not None:  # with the extra installed nothing may skip
        assert "skipped" not in summary, summary
