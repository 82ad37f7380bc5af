"""Import torchvision on a CPU-only torch when the installed torchvision is a CUDA build.

torchvision 0.28.0 from PyPI is built against CUDA. Next to the CPU wheel of torch 2.13.0
its import fails with ``operator torchvision::nms does not exist``, because the compiled
extension that registers that op schema cannot load. Declaring the ``torchvision::nms`` and
``torchvision::qnms`` schemas (no kernels) before the import is enough for models, datasets
and transforms; calling ``torchvision.ops.nms`` still fails, which the project never does.

ptflops imports ``torchvision.ops`` at import time, so ``ensure_torchvision()`` must run
before ptflops or torchvision is first imported; ``harness/__init__.py`` calls it first.
The shim is applied only when the plain import fails.
"""
from __future__ import annotations

import importlib
import sys
import types

__all__ = ["ensure_torchvision", "shim_applied"]

_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_library = None  # keeps the torch.library.Library alive: dropping it unregisters the schemas


def shim_applied() -> bool:
    """True when this process needed the op-schema shim to import torchvision."""
    return _library is not None


def _drop_partial_imports() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision() -> types.ModuleType:
    """Import and return torchvision, defining the missing op schemas only if the plain import fails."""
    global _library
    try:
        return importlib.import_module("torchvision")
    except RuntimeError as err:
        if "torchvision::nms" not in str(err):
            raise
    import torch

    _drop_partial_imports()
    _library = torch.library.Library("torchvision", "DEF")
    for schema in _SCHEMAS:
        _library.define(schema)
    return importlib.import_module("torchvision")
