"""Contract tests over every registered method and every unit-layer execution backend: a method or backend added
later (the README's plugin example included) is tested here without a line of its own.

Methods: each applies its ``contract_target()`` to a small ResNet whose BatchNorms are away from fresh values; the
result runs, costs less than dense (non-dense families), gives every parameter a gradient, keeps its weights
through ``save_model``/``load_model`` (outputs and counts equal), and stays the same function after
``prepare_for_inference`` (BUnit's, an autotuning of every backend, in the slow set). Backends: each runs a
hybrid unit layer whose BatchNorms have a non-default ``eps`` and momentum and spread statistics, equal to the
per-unit loop form in eval and in training (outputs, running statistics): a kernel that folds BatchNorm with a
hard-coded ``eps`` fails here.
"""
from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
import torch.nn as nn

import harness  # noqa: F401  (torchvision shim first)
from baselines import MethodContext, get_method, list_methods
from baselines.counting import count_costs
from bunit.layers import BACKENDS, UnitLayer
from bunit.spec import CATALOGUE, hybrid_mix
from conftest import spread_bn
from harness.run.artefacts import load_model, read_meta, save_model
from harness.run.models import create_backbone
from harness.run.runner import load_plugin
from harness.run.schema import unknown_columns

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


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("backend", BACKENDS)
def test_backend_contract(backend, stride):
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
