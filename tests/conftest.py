import os

import pytest

import harness  # noqa: F401  (torchvision shim before anything imports torchvision or ptflops)


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Keep autotuner and data caches out of the user's home during tests."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    monkeypatch.setenv("BUNITBENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("BUNITBENCH_DATA", str(cache / "data"))


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


TINY_SUITE = """
name = "{name}"
dataset = "digits"
image_size = 8
backbones = ["resnet8"]
shortcut = "B"
seeds = {seeds}

[train]
epochs = {epochs}
batch_size = 128
finetune_epochs = 1
sparse_epochs = 1
warmup_epochs = 0.5

[measure]
latency = {latency}
repeats = 3
warmup = 1
batch_sizes = [1, 8]

{methods}
"""


def write_suite(path, *, name="tiny", seeds=(0,), epochs=1, latency="false", methods='[[methods]]\nname = "dense"'):
    path.write_text(TINY_SUITE.format(name=name, seeds=list(seeds), epochs=epochs, latency=latency, methods=methods))
    return path
