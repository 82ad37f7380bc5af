"""bunit-bench harness: config, data, backbones, training, measurement, store, metrics, plots, report."""
from harness.compat import install_import_hook

install_import_hook()  # torchvision's first import, from anywhere (ptflops too), applies the shim if it must

_LAZY = {"load_model": "harness.core.artefacts", "list_models": "harness.core.artefacts",
         "load_results": "harness.core.store", "load_timings": "harness.measure.timing_pass"}


def __getattr__(name: str):
    """``harness.load_model``, ``list_models``, ``load_results``, ``load_timings``: imported on first use, so that
    ``import harness`` stays light."""
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'harness' has no attribute {name!r}")
