"""Contract tests over every registered method, unit-layer execution backend and runtime: a method, backend or runtime
added later (the README's plugin example included) is tested without a line of its own.

Methods: each applies its ``contract_target()`` to a small ResNet whose BatchNorms are away from fresh values; the
result runs, costs less than dense (non-dense families), gives every parameter a gradient, keeps its weights
through ``save_model``/``load_model`` (outputs and counts equal), and stays the same function after
``prepare_for_inference`` (BUnit's, an autotuning of every backend, in the slow set). Backends: each runs a
hybrid unit layer whose BatchNorms have a non-default ``eps`` and momentum and spread statistics, equal to the
per-unit loop form in eval and in training (outputs, running statistics): a kernel that folds BatchNorm with a
hard-coded ``eps`` fails here. Runtimes (:func:`runtime_contract`): each builds a runner of a tiny model with a unit
layer and such BatchNorms, whose output equals eager's within the runtime's stated tolerance; a runtime whose package
is missing skips, naming it. The runtime contract runs over every registered runtime in ``deployment_checks.py``,
a pytest process of its own (OpenVINO left xdist workers to crash later tests; see ``test_deployment_isolated.py``);
here it runs for a runtime registered by the test itself.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import harness  # noqa: F401  (torchvision shim first)
from baselines import MethodContext, get_method, list_methods
from baselines.counting import count_costs
from bunit.autotune import DEFAULT_BACKENDS, autotune
from bunit.backends import Backend, list_backends, register_backend, unregister_backend
from bunit.layers import BACKENDS, EAGER_BACKENDS, UnitLayer, set_backend, unit_layers
from bunit.spec import CATALOGUE, hybrid_mix
from conftest import spread_bn
from harness.measure.runtimes import (Runtime, Runner, get_runtime, list_runtimes, make_runner, register_runtime,
                                      unregister_runtime)
from harness.core.artefacts import load_model, read_meta, save_model
from harness.core.models import create_backbone
from harness.run.runner import load_plugin
from harness.core.schema import unknown_columns

PLUGIN = Path(__file__).resolve().parents[1] / "examples" / "plugin_criterion.py"
load_plugin(str(PLUGIN))  # the README's plugin example registers l2-filter; the contract must cover it
METHODS = list_methods()
X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8) % 10
SHAPE = (3, 16, 16)


def _no_training(model: nn.Module, epochs: int, regularize=None) -> nn.Module:
    return model  # the contract is about what apply builds, not about training


def _compressed(name: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    dense = spread_bn(create_backbone("resnet8", shortcut="B"), 0).eval()
    method = get_method(name)
    target = method.contract_target()
    method.validate_target(target)
    ctx = MethodContext(example_inputs=X, calib_batches=[(X, Y)], finetune=_no_training, backbone="resnet8",
                        shortcut="B", num_classes=10, seed=0)
    model = method.apply(copy.deepcopy(dense), target, ctx)
    return dense, spread_bn(model, 1).eval()


def test_the_plugin_example_is_among_the_contracts():
    assert "l2-filter" in METHODS and {"dense", "bunit", "global-magnitude", "l1-filter"} <= set(METHODS)


@pytest.mark.parametrize("name", METHODS)
def test_method_contract(name, tmp_path):
    dense, model = _compressed(name)
    method = get_method(name)
    with torch.no_grad():
        y = model(X)
    assert y.shape == (8, 10) and torch.isfinite(y).all()
    costs, dense_costs = count_costs(model, SHAPE), count_costs(dense, SHAPE)
    assert not unknown_columns(costs)
    if method.family != "dense":  # the target must buy something on the axis its family saves
        assert costs["macs_nonzero"] < dense_costs["macs_nonzero"], costs
    # every trainable parameter that survives gets a gradient (on a copy: a training step moves BN statistics)
    trained = copy.deepcopy(model).train()
    nn.functional.cross_entropy(trained(X), Y).backward()
    missing = [n for n, p in trained.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, missing
    # kept as data + state_dict, rebuilt through the method: the same function and the same counts
    key = f"digits/resnet8-B/{name}/contract/oneshot/s0"
    save_model(tmp_path, key, model, meta={"method": name, "backbone": "resnet8", "shortcut": "B", "num_classes": 10,
                                           "in_channels": 3, "image_size": 16, "dataset": "digits",
                                           "config_hash": "0" * 12})
    loaded = load_model(tmp_path, key)
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    assert count_costs(loaded, SHAPE) == costs
    assert read_meta(tmp_path, key)["family"] == method.family


# BUnit's preparation autotunes every backend of every unit layer, torch.compile included: about a minute here
PREPARED = [pytest.param(n, marks=pytest.mark.slow) if n == "bunit" else n for n in METHODS]


@pytest.mark.parametrize("name", PREPARED)
def test_prepared_model_is_the_same_function(name):
    _, model = _compressed(name)
    with torch.no_grad():
        y = model(X)
    info = get_method(name).prepare_for_inference(model, X[:2])
    assert isinstance(info, dict)
    with torch.no_grad():  # within float32 summation order
        assert torch.allclose(model(X), y, rtol=1e-4, atol=1e-4)


def _bn_layer(seed: int, stride: int) -> UnitLayer:
    torch.manual_seed(seed)
    layer = UnitLayer(hybrid_mix(14, 18, CATALOGUE, seed), stride=stride)
    for m in layer.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps, m.momentum = 1e-2, 0.3  # a fold that assumes torch's default eps (1e-5) is off by ~0.5%
    return spread_bn(layer, seed)


def backend_contract(backend: str, stride: int) -> None:
    """``backend`` runs a hybrid unit layer with non-default BatchNorms as the per-unit loop does, eval and training."""
    base = _bn_layer(3, stride)
    reference = base.to_reference() if hasattr(base, "to_reference") else None
    x = torch.randn(4, base.in_channels, 12, 12, generator=torch.Generator().manual_seed(1))
    loop = copy.deepcopy(base)
    loop.backend = "loop"
    layer = copy.deepcopy(base)
    layer.backend = backend
    with torch.no_grad():
        want, got = loop.eval()(x), layer.eval()(x)
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item()), backend
    if reference is not None:
        with torch.no_grad():
            assert (reference.eval()(x) - want).abs().max().item() < 1e-4
    # training: batch statistics, the running statistics updated with this momentum
    loop.train()
    layer.train()
    want, got = loop(x), layer(x)
    assert (got - want).abs().max().item() < 1e-4 * max(1.0, want.abs().max().item()), backend
    for (n, a), b in zip(loop.named_buffers(), layer.buffers()):
        if a.is_floating_point():
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-5), (backend, n)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("backend", list_backends())
def test_backend_contract(backend, stride):
    backend_contract(backend, stride)


class _FunctionalConv(Backend):
    """A backend of the test's own: each group's convolutions through ``F.conv2d`` on the modules' weights."""

    def run(self, layer, x):
        return layer.run_groups(x, lambda t, conv: F.conv2d(t, conv.weight, None, conv.stride, conv.padding,
                                                            conv.dilation, conv.groups))


@pytest.fixture
def test_backend():
    register_backend("test_functional")(_FunctionalConv)
    yield "test_functional"
    unregister_backend("test_functional")


def test_a_registered_backend_is_picked_up_everywhere(test_backend, tmp_path):
    assert test_backend in BACKENDS and test_backend in EAGER_BACKENDS and test_backend in DEFAULT_BACKENDS
    for stride in (1, 2):
        backend_contract(test_backend, stride)
    model = set_backend(nn.Sequential(_bn_layer(0, 1)), test_backend)
    assert [m.backend for _, m in unit_layers(model)] == [test_backend]
    timed = []

    def timer(layer, x, backend, repeats):  # the registered backend is the fastest candidate
        timed.append(backend)
        return 1e-3 if backend == test_backend else 2e-3

    chosen = autotune(model, torch.randn(2, 14, 8, 8), cache_path=tmp_path / "tune.json", timer=timer, repeats=1)
    assert chosen == {"0": test_backend} and timed == list(list_backends(eager=True))
    with pytest.raises(ValueError, match="backend 'test_functional' is already registered"):
        register_backend(test_backend)(_FunctionalConv)


def test_an_unregistered_backend_is_refused_with_the_allowed_names():
    allowed = ", ".join(list_backends())
    with pytest.raises(ValueError, match=f"^backend: 'warp' is not allowed; allowed: {allowed}$"):
        set_backend(nn.Sequential(_bn_layer(0, 1)), "warp")
    assert allowed == "loop, grouped, grouped_cl, blockdiag, bmm, stencil, fused_cpu, unit_train, compiled"


def tiny_unit_model() -> nn.Module:
    """A stem, a fused unit layer and a classifier, every BatchNorm with ``eps`` 1e-2 and spread statistics."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1, bias=False), nn.BatchNorm2d(8), nn.ReLU(),
                          UnitLayer(["2x2-4-2", "4-3-4"]), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 1e-2
    return spread_bn(model, 2).eval()


def runtime_contract(name: str) -> None:
    """``name``'s runner of :func:`tiny_unit_model` gives eager's output within the runtime's tolerance, and the
    runtime names its software; skips naming a missing package."""
    runtime = get_runtime(name)
    reason = runtime.unavailable()
    if reason is not None:
        pytest.skip(reason)
    model, x = tiny_unit_model(), torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(4))
    with torch.inference_mode():
        expected = model(x)
    run, output, _ = runtime.build(model, x, threads=1, device=torch.device("cpu"))
    run()
    got = output()
    assert got.shape == expected.shape and torch.allclose(got.float(), expected, rtol=runtime.rtol,
                                                          atol=runtime.atol), (name, (got - expected).abs().max())
    assert runtime.version() and "not installed" not in runtime.version()


class _ChannelsLastCopy(Runtime):
    """A runtime of the test's own: a channels_last copy of the model, in eager PyTorch."""

    checked_as = "test_cl"

    def build(self, net, x, *, threads, device):
        copy_cl = copy.deepcopy(net).to(memory_format=torch.channels_last)
        x_cl = x.contiguous(memory_format=torch.channels_last)

        def output():
            with torch.inference_mode():
                return copy_cl(x_cl)

        return Runner(lambda: copy_cl(x_cl), output, {"test_cl_copy": True})


def test_a_registered_runtime_is_picked_up_by_the_registry_and_the_contract():
    from harness.measure.runtimes import ONNX_RUNTIMES, RUNTIMES

    register_runtime("test_cl")(_ChannelsLastCopy)
    try:
        assert list_runtimes()[-1] == "test_cl" and "test_cl" in RUNTIMES and "test_cl" not in ONNX_RUNTIMES
        runtime_contract("test_cl")
        _, info = make_runner("test_cl", tiny_unit_model(), torch.randn(1, 3, 8, 8), threads=1,
                              device=torch.device("cpu"))
        assert info["test_cl_copy"] and info["test_cl_max_abs_err"] < 1e-5
        assert info["runtime_version"] == f"torch {torch.__version__}"
    finally:
        unregister_runtime("test_cl")
    assert "test_cl" not in RUNTIMES
    with pytest.raises(ValueError, match=r"^runtime: 'test_cl' not allowed; allowed: eager, compile, onnx, openvino, "
                                         r"openvino\+units$"):
        make_runner("test_cl", tiny_unit_model(), torch.randn(1, 3, 8, 8), threads=1, device=torch.device("cpu"))
