"""The harness picks the fastest training setting by measurement, records it, and the result does not change.

Candidates never round more than the recipe allows; choosing leaves the model untouched; a run trained with the
``unit_train`` backend in channels_last ends within the stated tolerance of the ``grouped`` NCHW run.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

import harness.run.train_speed as train_speed
from bunit import bunitify
from harness.core.config import TrainConfig
from harness.core.data import load_dataset
from harness.core.models import create_backbone
from harness.run.train import train_model
from harness.run.train_speed import PER_LAYER, TrainSetting, apply_setting, candidates, choose_setting

pytestmark = pytest.mark.usefixtures("one_thread")

PLAN = {"layers": {"layer1.0": ["2x8-8-8"], "layer2.0": ["8x2-1-4"], "layer3.0": ["16x2-1-4"]}}
LAYERS = ("layer1.0.units", "layer2.0.units", "layer3.0.units")  # the fused unit layers of _bunit_model


def _bunit_model(seed: int = 0):
    torch.manual_seed(seed)
    return bunitify(create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B"), PLAN)


def test_candidates_round_no_more_than_the_recipe():
    cpu = torch.device("cpu")
    dense = create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B")
    assert {s.bf16 for s in candidates(dense, bf16=False, device=cpu)} == {False}
    assert {s.bf16 for s in candidates(dense, bf16=True, device=cpu)} == {False, True}
    assert {s.unit_backend for s in candidates(dense, bf16=False, device=cpu)} == {None}
    units = {s.unit_backend for s in candidates(_bunit_model(), bf16=False, device=cpu)}
    assert units == {"grouped", "blockdiag", "unit_train"}  # a compiler is present: the C++ backend is a candidate
    meta = {s.unit_backend for s in candidates(_bunit_model(), bf16=False, device=torch.device("meta"))}
    assert meta == {"grouped", "blockdiag"}  # the C++ kernel runs on CPU only


def test_choose_picks_the_fastest_and_leaves_the_model_alone(monkeypatch):
    model = _bunit_model()
    before = copy.deepcopy(model.state_dict())
    fake = {"fp32/nchw/grouped": 3.0, "fp32/nchw/unit_train": 1.0, "fp32/channels_last/grouped": 2.0,
            "fp32/channels_last/unit_train": 1.5, "bf16/nchw/grouped": 0.9}

    def scripted(model, settings, xb, yb, *, rounds):
        return {s: [fake.get(s.name, 5.0)] * rounds for s in settings}

    def one_backend_everywhere(model, backends, setting, xb, *, rounds):
        return {name: {b: (1.0 if b == "grouped" else 2.0) for b in backends} for name in LAYERS}

    monkeypatch.setattr(train_speed, "time_settings", scripted)
    monkeypatch.setattr(train_speed, "time_layer_backends", one_backend_everywhere)
    xb, yb = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    best, rec = choose_setting(model, xb, yb, bf16=False, channels_last=True, total_steps=10_000)
    assert best == TrainSetting(False, False, "unit_train")
    assert rec["measured"] and rec["setting"] == best.name and "bf16/nchw/grouped" not in rec["step_ms"]
    best, rec = choose_setting(model, xb, yb, bf16=True, channels_last=True, total_steps=10_000)
    assert best.name == "bf16/nchw/grouped" and rec["step_ms"]["bf16/nchw/grouped"] == 900.0
    short, rec = choose_setting(model, xb, yb, bf16=True, channels_last=True, total_steps=10)
    assert short == TrainSetting(True, True, "grouped") and not rec["measured"]  # too short: the recipe's
    for key, value in model.state_dict().items():  # choosing changed neither weights nor BN statistics
        assert torch.equal(value, before[key]), key


def test_real_measurement_keeps_the_model():
    model = _bunit_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    xb, yb = torch.randn(16, 1, 8, 8), torch.arange(16) % 10
    best, rec = choose_setting(model, xb, yb, bf16=False, channels_last=False, total_steps=10_000, rounds=1)
    whole = {s.name for s in candidates(model, bf16=False, device=xb.device)}
    mixed = {f"fp32/{fmt}/per-layer" for fmt in ("nchw", "channels_last")}  # in the format that won, if tried
    assert rec["measured"] and whole <= set(rec["step_ms"]) <= whole | mixed and len(rec["step_ms"]) <= len(whole) + 1
    assert set(rec["layer_ms"]) == set(LAYERS) and all(set(v) == {"grouped", "blockdiag", "unit_train"}
                                                       for v in rec["layer_ms"].values())
    for key, value in model.state_dict().items():
        assert torch.equal(value, before[key]), key
    assert all(layer.backend == "grouped" for layer in model.modules() if hasattr(layer, "group_units"))


def test_layer_timing_calls_each_layer_as_its_block_does():
    """``time_layer_backends`` runs each unit layer with the shortcut its block hands it (the input tensor itself
    for an identity shortcut, the projection's output otherwise) and backpropagates a gradient of the output's shape
    and layout (no stride-0 expanded one), on every backend."""
    from bunit.layers import UnitLayer

    model = _bunit_model()
    xb = torch.randn(8, 1, 8, 8)
    seen = []
    forward = UnitLayer.forward

    def spy(self, x, residual=None, residual_map=(1, 0)):
        out = forward(self, x, residual, residual_map)
        if torch.is_grad_enabled():  # the timed calls (the probe and the gradient's shape run without grad)
            seen.append((self.backend, self.stride, residual is x, None if residual is None else residual.shape))
            out.register_hook(lambda g: seen.append(("grad", min(g.stride()), g.shape == out.shape)))
        return out

    UnitLayer.forward = spy
    try:
        train_speed.time_layer_backends(model, ["grouped", "unit_train"], TrainSetting(False, False, "grouped"), xb,
                                        rounds=1)
    finally:
        UnitLayer.forward = forward
    calls = [c for c in seen if c[0] != "grad"]
    grads = [c for c in seen if c[0] == "grad"]
    assert {c[0] for c in calls} == {"grouped", "unit_train"} and len(grads) == len(calls)
    # resnet8-B: layer1.0 (stride 1) has an identity shortcut, layer2.0 and layer3.0 (stride 2) a projection
    assert all(identity for _, stride, identity, _ in calls if stride == 1)
    assert all(not identity and shape is not None for _, stride, identity, shape in calls if stride == 2)
    assert {stride for _, stride, _, _ in calls} == {1, 2}
    assert all(stride > 0 and same for _, stride, same in grads)


@pytest.mark.parametrize("channels_last", [False, True])
def test_training_step_equal_across_unit_backends(channels_last):
    """One SGD step through ``train_model`` (batch 1024 of the digits: one step per epoch), same seed and memory
    format: ``unit_train`` and ``blockdiag`` each give weights and BN statistics within 1e-4 of ``grouped``'s, relative
    to the step's update (plus the two float32 ulps of storing the result), and the layers' backends come back
    afterwards.

    Over a run the rounding differences of any two float32 implementations grow (here, after three such steps
    some BN bias of the two differs by 4e-3 of its size; one step in channels_last against one in NCHW, both
    ``grouped``, already by 9e-3): equality is a property of each step, which is what this checks.
    """
    data = load_dataset("digits", image_size=8)
    recipe = TrainConfig(epochs=1, batch_size=1024, lr=0.05, warmup_epochs=0)
    start = _bunit_model(1).state_dict()
    runs = {}
    for backend in ("grouped", "unit_train", "blockdiag"):
        model = _bunit_model(1)
        setting = TrainSetting(False, channels_last, backend)
        result = train_model(model, data, recipe, epochs=1, seed=0, setting=setting)
        assert result.setting["setting"] == setting.name and not result.setting["measured"]
        assert all(m.backend == "grouped" for m in model.modules() if hasattr(m, "group_units"))
        runs[backend] = model.state_dict()
    for key, want in runs["grouped"].items():
        for other in ("unit_train", "blockdiag"):
            got = runs[other][key]
            if want.dtype == torch.long:
                assert torch.equal(got, want), (other, key)
                continue
            update = (want - start[key]).abs().max()
            assert update > 0, key  # it trained
            ulps = 2 * torch.finfo(want.dtype).eps * want.abs().max()  # storing the new weight rounds it
            assert (got - want).abs().max() <= 1e-4 * update + ulps, (other, key)


@pytest.mark.parametrize("channels_last", [False, True])
def test_a_per_layer_setting_computes_what_grouped_computes(channels_last):
    """Forward and backward of a model whose unit layers run three different backends equal ``grouped``'s, in float64:
    in float32 a mix ends one SGD step up to 1.5e-3 of the update away (the BN of one-channel hidden layers sums
    gradients with heavy cancellation, and a different summation order shows), as formats do (see above); float64
    takes rounding out of the comparison."""
    x = torch.randn(64, 1, 8, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    y = torch.arange(64) % 10
    grads, outs = {}, {}
    mixed = tuple(zip(LAYERS, ("unit_train", "blockdiag", "grouped")))
    for name, setting in (("grouped", TrainSetting(False, channels_last, "grouped")),
                          ("mixed", TrainSetting(False, channels_last, PER_LAYER, mixed))):
        model = _bunit_model(1).double().train()
        apply_setting(model, setting)
        assert [model.get_submodule(n).backend for n in LAYERS] == [b for _, b in setting.layer_backends or
                                                                    [(n, "grouped") for n in LAYERS]]
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        out = model(x.contiguous(memory_format=fmt))
        torch.nn.functional.cross_entropy(out, y).backward()
        outs[name], grads[name] = out.detach(), {k: p.grad for k, p in model.named_parameters()}
    assert torch.allclose(outs["mixed"], outs["grouped"], rtol=0, atol=1e-12)
    for key, want in grads["grouped"].items():
        assert (grads["mixed"][key] - want).abs().max() <= 1e-9 * want.abs().max(), key


@pytest.mark.parametrize("mixed_ms,kept", [(0.5, True), (1.5, False)])
def test_per_layer_backends_are_the_fastest_of_each_layer_and_kept_only_if_the_step_is_faster(monkeypatch, mixed_ms,
                                                                                                kept):
    layer_ms = {LAYERS[0]: {"grouped": 3.0, "blockdiag": 1.0, "unit_train": 2.0},
                LAYERS[1]: {"grouped": 3.0, "blockdiag": 2.0, "unit_train": 1.0},
                LAYERS[2]: {"grouped": 1.0, "blockdiag": 2.0, "unit_train": 3.0}}
    asked = []

    def scripted_layers(model, backends, setting, xb, *, rounds):
        asked.append((tuple(backends), setting))
        return {name: {b: row[b] for b in backends} for name, row in layer_ms.items()}

    def scripted_steps(model, settings, xb, yb, *, rounds):
        return {s: [mixed_ms if s.unit_backend == PER_LAYER else (1.0 if s.name == "fp32/nchw/unit_train" else 4.0)]
                for s in settings}

    monkeypatch.setattr(train_speed, "time_settings", scripted_steps)
    monkeypatch.setattr(train_speed, "time_layer_backends", scripted_layers)
    xb, yb = torch.randn(8, 1, 8, 8), torch.arange(8) % 10
    best, rec = choose_setting(_bunit_model(), xb, yb, bf16=False, channels_last=False, total_steps=10_000)
    # layers are timed in the precision and format of the fastest whole-model setting, with every unit backend
    assert asked == [(("blockdiag", "grouped", "unit_train"), TrainSetting(False, False, "unit_train"))]
    want = ((LAYERS[0], "blockdiag"), (LAYERS[1], "unit_train"), (LAYERS[2], "grouped"))
    if kept:
        assert best == TrainSetting(False, False, PER_LAYER, want) and rec["setting"] == "fp32/nchw/per-layer"
        assert rec["layer_backends"] == dict(want) and rec["step_ms"]["fp32/nchw/per-layer"] == 500.0
    else:
        assert best == TrainSetting(False, False, "unit_train") and rec["layer_backends"] is None
    assert rec["layer_ms"][LAYERS[1]] == {"grouped": 3000.0, "blockdiag": 2000.0, "unit_train": 1000.0}


def test_a_per_layer_setting_names_every_unit_layer():
    model = _bunit_model()
    with pytest.raises(ValueError, match="layer_backends: name every fused unit layer"):
        apply_setting(model, TrainSetting(False, False, PER_LAYER, ((LAYERS[0], "blockdiag"),)))
    with pytest.raises(ValueError, match="unit_backend: 'per-layer' goes with layer_backends"):
        TrainSetting(False, False, PER_LAYER)
    apply_setting(model, TrainSetting(False, False, PER_LAYER, tuple(zip(LAYERS, ("blockdiag", "unit_train",
                                                                                  "grouped")))))
    assert [model.get_submodule(n).backend for n in LAYERS] == ["blockdiag", "unit_train", "grouped"]


def test_under_bf16_autocast_every_unit_backend_is_as_exact_as_grouped():
    """bf16 autocast (what the recipe's ``bf16`` allows) rounds every convolution it runs, dense and unit alike:
    against float32, gradients of this small model move by up to ~20% of their norm (one-channel BN layers cancel
    heavily). The stated tolerance for a unit backend under autocast is therefore relative to ``grouped`` under the
    same autocast: its output and its unit-conv gradients are no further from float32 than ``grouped``'s are
    (relative L2 distance; a single largest entry moves by rounding luck), with 25% slack for the different rounding
    order (measured over six inputs: blockdiag equal to grouped, unit_train 0.91-1.13 of grouped's distance)."""
    x = torch.randn(32, 1, 8, 8, generator=torch.Generator().manual_seed(0))

    def run(backend: str, bf16: bool, channels_last: bool):
        model = _bunit_model(1).train()
        apply_setting(model, TrainSetting(bf16, channels_last, backend))
        fmt = torch.channels_last if channels_last else torch.contiguous_format
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x.contiguous(memory_format=fmt))
        out.float().square().mean().backward()
        return out.float().detach(), {k: p.grad.float() for k, p in model.named_parameters() if ".conv" in k}

    exact_out, exact = run("grouped", False, False)

    def distance(out, grads):
        worst = max(float((grads[k] - exact[k]).norm() / exact[k].norm()) for k in exact)
        return float((out - exact_out).norm() / exact_out.norm()), worst

    for channels_last in (False, True):
        ref_out, ref_grad = distance(*run("grouped", True, channels_last))
        assert 0 < ref_out < 0.05 and 0 < ref_grad  # autocast did round
        for backend in ("blockdiag", "unit_train"):
            out, grad = distance(*run(backend, True, channels_last))
            assert out <= 1.25 * ref_out and grad <= 1.25 * ref_grad, (backend, channels_last, out, grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_option_b_projection_computes_the_strided_1x1_convolution(channels_last):
    """The option-B shortcut's 1x1 convolution (``SubsampledProjection``), which in training convolves the input
    subsampled by the stride at stride 1, gives the strided convolution's output and gradients (float64), in training
    and in eval mode, NCHW and channels_last."""
    from harness.core.models import SubsampledProjection

    torch.manual_seed(0)
    model = create_backbone("resnet20", num_classes=10, in_channels=1, shortcut="B")
    proj = model.layer2[0].shortcut[0]
    assert type(proj) is SubsampledProjection and proj.stride == (2, 2)
    proj = proj.double()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for training in (True, False):
        proj.train(training)
        x = torch.randn(3, proj.in_channels, 9, 8, dtype=torch.float64).contiguous(memory_format=fmt)
        x.requires_grad_()
        grad = torch.randn(3, proj.out_channels, 5, 4, dtype=torch.float64)
        out = proj(x)
        gx, gw = torch.autograd.grad(out, (x, proj.weight), grad)
        xr = x.detach().clone().requires_grad_()
        wr = proj.weight.detach().clone().requires_grad_()
        ref = F.conv2d(xr, wr, None, 2)
        rx, rw = torch.autograd.grad(ref, (xr, wr), grad)
        torch.testing.assert_close(out, ref, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gx, rx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(gw, rw, rtol=1e-12, atol=1e-12)


def test_training_sgd_is_fused_on_cpu_and_updates_as_the_per_parameter_loop():
    """The harness's SGD (``sgd_optimizer``) is PyTorch's fused one on CPU, and its updates (momentum, Nesterov,
    weight decay on weights only) equal the default per-parameter loop's, bit for bit, over several steps."""
    from harness.run.train import sgd_optimizer

    torch.manual_seed(0)
    model = bunitify(create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B"), PLAN)
    twin = copy.deepcopy(model)
    recipe = TrainConfig(momentum=0.9, nesterov=True, weight_decay=5e-4)
    fused = sgd_optimizer(model, recipe, 0.1)
    assert fused.defaults["fused"]
    loop = torch.optim.SGD([{**g, "params": [dict(twin.named_parameters())[n] for n, p in model.named_parameters()
                                             if any(p is q for q in g["params"])]}
                            for g in fused.param_groups], lr=0.1, momentum=0.9, nesterov=True, fused=False,
                           foreach=False)
    for step in range(3):
        x, y = torch.randn(8, 1, 12, 12), torch.arange(8) % 10
        for mod, opt in ((model, fused), (twin, loop)):
            F.cross_entropy(mod(x), y).backward()
            opt.step()
            opt.zero_grad()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(p, q), name
