"""Shared test setup: isolated caches, the ``gpu`` skip, and the helpers several test files use.

Helpers are imported by name (``from conftest import spread_bn``); fixtures are requested as usual
(``pytestmark = pytest.mark.usefixtures("one_thread")``).
"""
import contextlib
import os

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import harness  # noqa: F401  (torchvision shim before anything imports torchvision or ptflops)
from bunit.fused_cpu import cache_dir


def _share_the_cores() -> None:
    """Under pytest-xdist each worker, and every process a test starts, takes its share of the cores, so that two
    workers do not run two OpenMP threads each on two cores. Tests that time or compare thread counts set their
    own."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
    if workers > 1:
        share = max(1, (os.cpu_count() or 1) // workers)
        torch.set_num_threads(share)
        os.environ["OMP_NUM_THREADS"] = str(share)


_share_the_cores()


@pytest.fixture(scope="session", autouse=True)
def _fused_cpu_extension():
    """Build or load the ``fused_cpu`` and ``unit_train`` C++ extensions once per session from the default cache
    (before the per-test cache isolation below), so that no test session compiles them again (half a minute or
    more each on 2 cores, one compiler process each). Under xdist each worker builds one, ``gw1`` ``unit_train``, so
    on a fresh machine the two compile side by side; the other one loads at the first test that uses it (from the
    same folder: it waits for the other worker's build if that is still running), so a worker whose build ends
    first starts its tests instead of waiting."""
    from bunit import fused_cpu, unit_train

    builds = [fused_cpu.is_available, unit_train.is_available]
    worker = os.environ.get("PYTEST_XDIST_WORKER")
    if worker == "gw1":
        builds.reverse()
    for build in builds[:1] if worker else builds:
        build()


EXTENSIONS = cache_dir() / "ext"
"""Where the compiled extensions (``fused_cpu``, ``unit_train``, the OpenVINO unit op) live: the default cache,
read before any test moves it, so that every test and every process a test starts (torchrun ranks, the
deployment checks' own pytest, which inherit the moved cache folder) loads them instead of compiling again."""


@pytest.fixture(autouse=True)
def _isolated_caches(tmp_path_factory, monkeypatch):
    """Keep autotuner and data caches out of the user's home during tests; the extensions' folder is shared."""
    cache = tmp_path_factory.getbasetemp() / "cache"
    if not (cache / "ext").exists():
        EXTENSIONS.mkdir(parents=True, exist_ok=True)
        cache.mkdir(parents=True, exist_ok=True)
        (cache / "ext").symlink_to(EXTENSIONS.resolve(), target_is_directory=True)
    monkeypatch.setenv("BUNITBENCH_CACHE_DIR", str(cache))
    monkeypatch.setenv("BUNITBENCH_DATA", str(cache / "data"))


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@contextlib.contextmanager
def torch_threads(n: int):
    """Run the block with ``n`` torch threads, then restore the previous count."""
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run faster on one thread, and a busy 2-core machine makes torch's thread pool spin."""
    with torch_threads(1):
        yield


def spread_bn(model: nn.Module, seed: int) -> nn.Module:
    """Move every BatchNorm's affine parameters and running statistics away from their fresh values, in place.

    Fresh BN scales are all 1 (no criterion can rank them) and fresh statistics (0, 1) hide a wrong load or a
    wrong fold; trained networks have neither. Scales and variances are drawn from [0.5, 1.5), shifts and means
    from [-0.5, 0.5), with a generator seeded by ``seed``.

    Returns:
        ``model`` itself.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return model


def digits_batches(n: int, batch: int = 64) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` real 8x8 one-channel digit images of scikit-learn, standardised, in batches of ``batch``."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.images[:n], dtype=torch.float32).unsqueeze(1)  # (n, 1, 8, 8)
    x = (x - x.mean()) / x.std()
    y = torch.tensor(data.target[:n], dtype=torch.long)
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, n, batch)]


def make_finetune(method, batches, *, lr: float = 0.05, use_hook: bool = True):
    """A plain SGD fine-tune callback (momentum, weight decay) over ``batches``, as the harness hands it to a method.

    Args:
        method: the method whose ``after_optimizer_step`` runs after every step (when ``use_hook``).
        batches: ``(inputs, labels)`` pairs; one epoch is one pass over them.
        lr: the learning rate.
        use_hook: call ``method.after_optimizer_step``; False shows what the hook prevents.

    Returns:
        ``(finetune, calls)``: the callback ``finetune(model, epochs, regularize=None)`` and the list it appends
        ``(epochs, regularized)`` to on every call.
    """
    calls = []

    def finetune(model, epochs, regularize=None):
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
        model.train()
        for _ in range(epochs):
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                if regularize is not None:
                    loss = regularize(model, loss)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                if use_hook:
                    method.after_optimizer_step(model)
        calls.append((epochs, regularize is not None))
        return model

    return finetune, calls


def apply_iterative(name: str, target, batches, *, shortcut: str, steps: int, finetune_epochs: int, **ctx_fields):
    """Apply method ``name`` to a fresh one-channel ResNet-8 (seed 0) with the iterative schedule.

    Args:
        name: a registered method.
        target: its target.
        batches: digit batches (:func:`digits_batches`) for the example inputs and the fine-tune callback.
        shortcut: "A" or "B".
        steps: prune steps of the schedule.
        finetune_epochs: the fine-tune budget the method splits between its steps and the harness.
        **ctx_fields: further :class:`baselines.MethodContext` fields (``calib_batches``, ``sparse_epochs``).

    Returns:
        ``(model, ctx, calls)``: the compressed model, its method context (with the record) and the fine-tune calls.
    """
    from baselines import MethodContext, get_method
    from harness.core.models import create_backbone

    torch.manual_seed(0)
    model = create_backbone("resnet8", in_channels=1, shortcut=shortcut)
    method = get_method(name)
    finetune, calls = make_finetune(method, batches)
    ctx = MethodContext(example_inputs=batches[0][0], finetune=finetune, schedule="iterative", steps=steps,
                        finetune_epochs=finetune_epochs, **ctx_fields)
    return method.apply(model, target, ctx), ctx, calls


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
    """Write a tiny digits suite (8x8 images, ResNet-8 B) to ``path`` and return ``path``."""
    path.write_text(TINY_SUITE.format(name=name, seeds=list(seeds), epochs=epochs, latency=latency, methods=methods))
    return path
