"""The torchvision import shim: applied exactly when the plain import fails, and then enough for our use."""
import subprocess
import sys
import textwrap

import pytest


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


def test_shim_applied_only_when_plain_import_fails():
    plain = _run("import torchvision")
    shimmed = _run("""
        from harness.compat import ensure_torchvision, shim_applied
        tv = ensure_torchvision()
        import ptflops  # imports torchvision.ops at import time
        print(int(shim_applied()))
        m = tv.models.resnet18(weights=None, num_classes=7)
        import torch
        print(tuple(m.eval()(torch.zeros(1, 3, 32, 32)).shape))
        print(sum(p.numel() for p in m.parameters()))
        t = tv.transforms.Compose([tv.transforms.Resize((8, 8)), tv.transforms.PILToTensor()])
        from PIL import Image
        print(tuple(t(Image.new("RGB", (20, 10))).shape))
    """)
    assert shimmed.returncode == 0, shimmed.stderr
    applied, shape, params, tshape = shimmed.stdout.split("\n")[:4]
    assert applied == ("1" if plain.returncode != 0 else "0")
    if plain.returncode != 0:
        assert "torchvision::nms" in plain.stderr
    assert shape == "(1, 7)"
    assert int(params) == 11_180_103  # torchvision ResNet-18 with a 7-class head
    assert tshape == "(3, 8, 8)"


def test_other_import_errors_are_not_swallowed(monkeypatch):
    import importlib

    from harness import compat

    def boom(name):
        raise RuntimeError("something else entirely")

    monkeypatch.setattr(importlib, "import_module", boom)
    with pytest.raises(RuntimeError, match="something else entirely"):  # a foreign error must propagate
        compat.ensure_torchvision()
