"""bunit-bench harness: config, data, backbones, training, measurement, store, metrics, plots, report."""
from harness.compat import ensure_torchvision

ensure_torchvision()  # before anything imports ptflops or torchvision
