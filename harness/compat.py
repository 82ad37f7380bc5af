"""Import torchvision on a CPU-only torch when the installed torchvision is a CUDA build.

torchvision 0.28.0 from PyPI is built against CUDA. Next to the CPU wheel of torch 2.13.0
its import fails with ``operator torchvision::nms does not exist``, because the compiled
extension that registers that op schema cannot load. Declaring the ``torchvision::nms`` and
``torchvision::qnms`` schemas (no kernels) before the import is enough for models, datasets
and transforms; calling ``torchvision.ops.nms`` still fails, which the project never does.

The shim is applied only when the plain import fails. ``import harness`` does not import
torchvision (1.3 s of a process's start: torchvision pulls in ``torch._dynamo``); it calls
``install_import_hook()``, and the first ``import torchvision`` of the process, wherever it
comes from (ptflops imports ``torchvision.ops`` at import time), runs through the hook, which
retries with the schemas declared when the plain import fails. ``ensure_torchvision()``
installs the hook and imports torchvision.
"""
from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import types

__all__ = ["ensure_torchvision", "install_import_hook", "shim_applied"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive: dropping it unregisters the schemas


def shim_applied() -> bool:
    """True when this process needed the op-schema shim to import torchvision."""
    return _library is not None


def _declare_schemas() -> None:
    global _library
    import torch

    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)


class _ShimmingLoader(importlib.abc.Loader):
    """Runs torchvision's own loader; when that fails for the missing op schema, drops the partly imported
    submodules, declares the schemas and runs it again on the same module object."""

    def __init__(self, loader: importlib.abc.Loader):
        self._loader = loader

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        module.__loader__ = module.__spec__.loader = self._loader  # the module keeps its own loader
        try:
            self._loader.exec_module(module)
        except RuntimeError as err:
            if "torchvision::nms" not in str(err):  # only the missing op schema is ours to mend
                raise
            for name in [m for m in sys.modules if m.startswith("torchvision.")]:
                del sys.modules[name]
            _declare_schemas()
            self._loader.exec_module(module)


class _TorchvisionHook(importlib.abc.MetaPathFinder):
    """First on ``sys.meta_path`` until torchvision's first import: hands it the shimming loader, then leaves."""

    def find_spec(self, name, path=None, target=None):
        if name != "torchvision":
            return None
        _remove_hook()
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is not None and spec.loader is not None:
            spec.loader = _ShimmingLoader(spec.loader)
        return spec


def _remove_hook() -> None:
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, _TorchvisionHook)]


def install_import_hook() -> None:
    """Make this process's first ``import torchvision`` apply the shim if the plain import fails; imports
    nothing. A no-op once torchvision is imported (or the hook is already in place)."""
    if "torchvision" in sys.modules or any(isinstance(f, _TorchvisionHook) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _TorchvisionHook())


def ensure_torchvision() -> types.ModuleType:
    """Import and return torchvision, defining the missing op schemas only if the plain import fails."""
    install_import_hook()
    return importlib.import_module("torchvision")
