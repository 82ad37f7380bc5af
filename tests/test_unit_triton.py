"""The CUDA training path of unit layers (:mod:`bunit.unit_triton`), checked on CPU by Triton's interpreter.

No GPU has run these kernels. ``TRITON_INTERPRET=1`` runs them on CPU tensors (float32 only), but it must be set
before ``triton`` is imported, so the checks run in a process of their own (``tests/triton_interpreter_cases.py``):
the kernels' forward, input and weight gradients against float64 ``F.conv2d`` and its autograd (groups, strides 1
and 2, channels_last, planes and batches spanning several programs), and a whole unit layer (2-1-4 units) at stride 2 in
training mode against ``grouped`` (outputs, gradients, BN running statistics).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn

from bunit import unit_triton
from bunit.layers import UnitLayer
from harness.run.train_speed import candidates

HERE = Path(__file__).resolve().parent


def test_kernels_and_unit_layers_in_the_interpreter():
    """One process for every case (the interpreter takes seconds per case; a fixture would run once per xdist
    worker). Kernels: float32 sums within 1e-6 of float64 (a wrong tap, parity or block edge is off by O(1)), the
    output and input gradient in the input's memory format. Layers: every conv ran in the kernels (supports), and
    outputs, input and parameter gradients and running statistics within 1e-4 of ``grouped``."""
    if not unit_triton.is_available() and os.environ.get("CI") != "true":  # on CI (Linux x86-64) a missing triton fails
        pytest.skip("triton is not installed (the test extra installs it on Linux x86-64)")
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(HERE.parent))
    proc = subprocess.run([sys.executable, str(HERE / "triton_interpreter_cases.py")], env=env, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    for case in ("groups3_s2", "channels_last_s1", "two_blocks"):
        r = got[case]
        assert r["y"] < 1e-6 and r["gx"] < 1e-6 and r["gw"] < 1e-6, (case, r)
        assert r["layout_kept"], (case, r)
    for case in ("units_s2",):
        r = got[case]
        assert r["supports"], (case, r)
        assert max(r["y"], r["gx"], r["params"], r["running"]) < 1e-4, (case, r)


def test_without_the_interpreter_cpu_tensors_run_the_module():
    """Outside the interpreter the kernels need CUDA tensors: on CPU, conv() is the module itself."""
    if unit_triton.interpreting():
        pytest.skip("this process runs Triton's interpreter")
    conv = nn.Conv2d(4, 4, 3, padding=1, groups=2, bias=False)
    x = torch.randn(2, 4, 5, 5)
    assert not unit_triton.supports(x, conv)
    assert torch.equal(unit_triton.conv(x, conv), conv(x))


def test_cuda_training_candidates_include_the_kernels_when_triton_is_installed():
    model = nn.Sequential(UnitLayer(["2x2-1-2"]))
    names = {s.unit_backend for s in candidates(model, bf16=False, device=torch.device("cuda"))}
    assert ("unit_train" in names) == unit_triton.is_available()
    assert {"grouped", "blockdiag"} <= names
