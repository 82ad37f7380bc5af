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
        import sys
        import harness
        print(int("torchvision" in sys.modules))  # import harness leaves torchvision unloaded
        import ptflops  # its own `import torchvision.ops` is the process's first torchvision import: the hook's
        from harness.compat import ensure_torchvision, shim_applied
        tv = ensure_torchvision()
        print(int(shim_applied()), int(tv.__loader__ is tv.__spec__.loader), type(tv.__loader__).__name__)
        m = tv.models.resnet18(weights=None, num_classes=7)
        import torch
        print(tuple(m.eval()(torch.zeros(1, 3, 32, 32)).shape))
        print(sum(p.numel() for p in m.parameters()))
        t = tv.transforms.Compose([tv.transforms.Resize((8, 8)), tv.transforms.PILToTensor()])
        from PIL import Image
        print(tuple(t(Image.new("RGB", (20, 10))).shape))
    """)
    assert shimmed.returncode == 0, shimmed.stderr
    loaded, applied, shape, params, tshape = shimmed.stdout.split("\n")[:5]
    assert loaded == "0"
    assert applied == ("1" if plain.returncode != 0 else "0") + " 1 SourceFileLoader"  # torchvision keeps its loader
    if plain.returncode != 0:
        assert "torchvision::nms" in plain.stderr
    assert shape == "(1, 7)"
    assert int(params) == 11_180_103  # torchvision ResNet-18 with a 7-class head
    assert tshape == "(3, 8, 8)"


class _FailingLoader:
    def __init__(self, message: str):
        self.message, self.calls = message, 0

    def create_module(self, spec):
        return None

    def exec_module(self, module):
        self.calls += 1
        if self.calls == 1:
            raise RuntimeError(self.message)


@pytest.mark.parametrize("message, retried", [("something else entirely", False),
                                              ("operator torchvision::nms does not exist", True)])
def test_the_loader_retries_only_for_the_missing_schema(message, retried, monkeypatch):
    import importlib.machinery
    import types

    from harness import compat

    declared = []
    monkeypatch.setattr(compat, "_declare_schemas", lambda: declared.append(1))
    monkeypatch.setitem(sys.modules, "torchvision.partial", types.ModuleType("torchvision.partial"))
    inner = _FailingLoader(message)
    module = types.ModuleType("torchvision")
    module.__spec__ = importlib.machinery.ModuleSpec("torchvision", compat._ShimmingLoader(inner))
    if not retried:
        with pytest.raises(RuntimeError, match=message):  # a foreign error must propagate
            compat._ShimmingLoader(inner).exec_module(module)
    else:
        compat._ShimmingLoader(inner).exec_module(module)
    assert inner.calls == (2 if retried else 1) and declared == ([1] if retried else [])
    assert ("torchvision.partial" in sys.modules) != retried  # a retry starts without the partial submodules
    assert module.__loader__ is inner and module.__spec__.loader is inner
