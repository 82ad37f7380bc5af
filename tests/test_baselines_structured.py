"""Structured baselines: targets reached and measured, smaller dense models that train, option-A shortcuts."""
import copy
import functools
import json

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torch_pruning as tp
from torch.utils.flop_counter import FlopCounterMode

from baselines import MethodContext, get_method, list_methods
from baselines.counting import count_macs, layer_widths
from baselines.serialize import architecture_of, rebuild
from baselines.shortcut import ChannelMapPruner, ChannelMapShortcut, convert_pad_shortcuts
from baselines.structured import parse_structured_target
from harness.core.models import create_backbone

from conftest import spread_bn

STRUCTURED = list_methods(family="structured")
LOCAL = [n for n in STRUCTURED if not get_method(n).global_pruning]
X = torch.randn(4, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(4) % 10


pytestmark = pytest.mark.usefixtures("one_thread")


def flop_counter_macs(model: nn.Module, x: torch.Tensor) -> int:
    """Reference count: torch's own FLOP counter (conv and matmul FLOPs = 2 x MACs), independent of baselines."""
    with FlopCounterMode(display=False) as counter:
        model.eval()(x[:1])
    return counter.get_total_flops() // 2


@functools.lru_cache(maxsize=None)
def pruned(name: str, target, shortcut: str):
    """(dense copy, pruned model, record) for one method, target and shortcut variant; pruned once per session."""
    torch.manual_seed(0)
    dense = spread_bn(create_backbone("resnet20", shortcut=shortcut), 0)
    model = copy.deepcopy(dense)
    ctx = MethodContext(example_inputs=X, calib_batches=[(X, Y)], seed=0)
    model = get_method(name).apply(model, target, ctx)
    return dense, model, ctx.record


def conv_channels(model: nn.Module) -> int:
    return sum(m.out_channels for m in model.modules() if isinstance(m, nn.Conv2d))


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_channel_ratio_target_is_achieved(name, shortcut):
    dense, model, record = pruned(name, 0.5, shortcut)
    achieved = 1 - conv_channels(model) / conv_channels(dense)
    assert record["channel_ratio"] == pytest.approx(achieved)
    assert 0.5 <= achieved <= 0.52
    assert record["achieved"]["target_reached"] is True
    assert record["achieved"]["widths"] == layer_widths(model)  # measured widths, not the knob
    if name in LOCAL:  # every layer loses exactly half its channels
        assert all(w == record["achieved"]["widths_dense"][n] // 2 for n, w in layer_widths(model).items() if n != "fc")


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_macs_target_is_reached_within_five_points(name, shortcut):
    dense, model, record = pruned(name, "macs:0.5", shortcut)
    reduction = 1 - flop_counter_macs(model, X) / flop_counter_macs(dense, X)
    assert record["macs_reduction"] == pytest.approx(reduction)
    assert 0.5 <= reduction <= 0.55
    assert record["achieved"]["macs"] == count_macs(model, X)


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_pruned_model_is_a_smaller_dense_model_that_trains(name, shortcut):
    dense, model, _ = pruned(name, 0.5, shortcut)
    n_dense = sum(p.numel() for p in dense.parameters())
    n_pruned = sum(p.numel() for p in model.parameters())
    assert n_pruned < 0.5 * n_dense
    for m in model.modules():  # shapes agree with the layers' own attributes (dense tensors, no masks)
        if isinstance(m, nn.Conv2d):
            assert m.weight.shape == (m.out_channels, m.in_channels // m.groups, *m.kernel_size)
    model.train()
    model.zero_grad(set_to_none=True)
    out = model(X)
    assert out.shape == (4, 10) and torch.isfinite(out).all()
    F.cross_entropy(out, Y).backward()
    for pname, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), pname
        assert p.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("shortcut", ["A", "B"])
@pytest.mark.parametrize("name", STRUCTURED)
def test_save_and_load_round_trip(name, shortcut, tmp_path):
    _, model, _ = pruned(name, "macs:0.5", shortcut)
    torch.save(model.state_dict(), tmp_path / "weights.pt")
    (tmp_path / "arch.json").write_text(json.dumps(get_method(name).architecture(model)))
    fresh = rebuild(create_backbone("resnet20", shortcut=shortcut),
                    json.loads((tmp_path / "arch.json").read_text()))
    fresh.load_state_dict(torch.load(tmp_path / "weights.pt", weights_only=True), strict=True)
    model.eval(), fresh.eval()
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))
    assert architecture_of(fresh) == architecture_of(model)


def test_option_a_trap_without_the_fix():
    """What the fix prevents: torch-pruning prunes a zero-padding shortcut model that then cannot run."""
    model = create_backbone("resnet20", shortcut="A")
    pruner = tp.pruner.BasePruner(model, X, tp.importance.MagnitudeImportance(p=1), pruning_ratio=0.5,
                                  ignored_layers=[model.fc])
    pruner.step()
    with pytest.raises(RuntimeError, match="must match the size"):
        model(X)


def test_channel_map_shortcut_equals_the_pad_shortcut():
    torch.manual_seed(0)
    model = create_backbone("resnet20", shortcut="A").eval()
    with torch.no_grad():
        before = model(X)
        assert convert_pad_shortcuts(model) == 2
        assert torch.equal(model(X), before)
    shortcut = model.layer2[0].shortcut
    assert isinstance(shortcut, ChannelMapShortcut)
    assert shortcut.src.tolist() == list(range(16)) and shortcut.dst.tolist() == list(range(8, 24))


def test_pruning_through_the_option_a_shortcut_is_exact():
    """Remove a stage-1 stream channel and a zero-padded stage-2 channel that carry nothing: outputs stay equal."""
    torch.manual_seed(0)
    model = spread_bn(create_backbone("resnet20", shortcut="A"), 0).eval()
    convert_pad_shortcuts(model)
    c, j = 3, 1  # stage-1 channel 3 lands on stage-2 channel 11; stage-2 channel 1 is padding
    with torch.no_grad():
        for bn, ch in [(model.bn1, c)] + [(b.bn2, c) for b in model.layer1] + [(b.bn2, j) for b in model.layer2]:
            bn.weight[ch] = 0.0
            bn.bias[ch] = 0.0
        before = model(X)
    graph = tp.DependencyGraph().build_dependency(model, X, customized_pruners={ChannelMapShortcut: ChannelMapPruner()})
    graph.get_pruning_group(model.conv1, tp.prune_conv_out_channels, [c]).prune()
    graph.get_pruning_group(model.layer2[0].conv2, tp.prune_conv_out_channels, [j]).prune()
    shortcut = model.layer2[0].shortcut
    assert (shortcut.in_channels, shortcut.out_channels) == (15, 31)
    assert shortcut.src.tolist() == list(range(15))  # stage-1 channels 0..14 after renumbering
    assert shortcut.dst.tolist() == [d - 1 for d in range(8, 24) if d != 8 + c]  # one padded slot fewer in front
    with torch.no_grad():
        assert torch.allclose(model.eval()(X), before, atol=1e-5)


def test_grouped_convolution_widths_are_measured():
    """torch-pruning removes grouped-conv channels in multiples of the group count: the record shows what happened."""

    class Grouped(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv1, self.bn1 = nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16)
            self.conv2, self.bn2 = nn.Conv2d(16, 16, 3, padding=1, groups=4, bias=False), nn.BatchNorm2d(16)
            self.conv3, self.bn3 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
            self.fc = nn.Linear(32, 10)

        def forward(self, x):
            x = F.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
            x = F.relu(self.bn2(self.conv2(x)))
            x = F.relu(self.bn3(self.conv3(x)))  # (B, 32, H, W)
            return self.fc(x.mean((2, 3)))

    ctx = MethodContext(example_inputs=X)
    model = get_method("l1-filter").apply(Grouped(), 0.05, ctx)
    widths = ctx.record["achieved"]["widths"]
    assert widths == {"conv1": 12, "conv2": 12, "conv3": 31, "fc": 10}  # 16 -> 12: a whole channel per group
    assert model.conv2.groups == 4 and model(X).shape == (4, 10)
    assert ctx.record["channel_ratio"] == pytest.approx(1 - (12 + 12 + 31) / 64)  # overshoot shown, not hidden


def test_hidden_channel_op_is_refused():
    class Repeat(nn.Module):
        def forward(self, x):
            return torch.cat([x, x], 1)

    model = nn.Sequential(nn.Conv2d(3, 8, 3), Repeat(), nn.Conv2d(16, 4, 3), nn.Flatten(), nn.LazyLinear(10))
    model(X)
    with pytest.raises(ValueError, match=r"model: 1 \(Repeat, 8->16 channels\) changes channels"):
        get_method("l1-filter").apply(model, 0.5, MethodContext(example_inputs=X))


@pytest.mark.parametrize("target, expected", [
    (0.3, ("channel_ratio", 0.3)), ("0.3", ("channel_ratio", 0.3)), ("ratio:0.3", ("channel_ratio", 0.3)),
    ("macs:0.5", ("macs_reduction", 0.5)), ({"macs_reduction": 0.5}, ("macs_reduction", 0.5)),
    ({"channel_ratio": 0.25}, ("channel_ratio", 0.25)),
])
def test_target_forms(target, expected):
    parsed = parse_structured_target(target)
    assert (parsed.kind, parsed.value) == expected


@pytest.mark.parametrize("target", [0, 1.0, 1.5, "flops:0.5", {"macs": 0.5, "ratio": 0.2}, None, True, "macs:x"])
def test_bad_structured_target_names_the_field(target):
    with pytest.raises(ValueError, match=r"^target: .* allowed: a channel ratio in \(0, 1\)"):
        get_method("fpgm").validate_target(target)


def test_taylor_needs_calibration_batches():
    with pytest.raises(ValueError, match="ctx.calib_batches: empty"):
        get_method("taylor").apply(create_backbone("resnet8"), 0.5, MethodContext(example_inputs=X[:, :, :8, :8]))


@pytest.mark.parametrize("backbone", ["vgg16", "resnet18"])
def test_other_backbones_prune_and_round_trip(backbone, tmp_path):
    torch.manual_seed(0)
    model = spread_bn(create_backbone(backbone), 0)
    ctx = MethodContext(example_inputs=X)
    model = get_method("l1-filter").apply(model, "macs:0.5", ctx).eval()
    dense = create_backbone(backbone)
    assert 0.5 <= 1 - flop_counter_macs(model, X) / flop_counter_macs(dense, X) <= 0.55
    torch.save(model.state_dict(), tmp_path / "w.pt")
    fresh = rebuild(dense, json.loads(json.dumps(architecture_of(model)))).eval()
    fresh.load_state_dict(torch.load(tmp_path / "w.pt", weights_only=True), strict=True)
    with torch.no_grad():
        assert torch.equal(model(X), fresh(X))


def test_rebuild_rejects_a_mismatched_architecture():
    _, model, _ = pruned("l1-filter", 0.5, "B")
    arch = architecture_of(model)
    with pytest.raises(ValueError, match="architecture.format: 'other/1' not allowed"):
        rebuild(create_backbone("resnet20", shortcut="B"), {**arch, "format": "other/1"})
    with pytest.raises(ValueError, match="architecture.layers: 'layer4.0.conv1' is not a module of CifarResNet"):
        rebuild(create_backbone("resnet20", shortcut="B"),
                {**arch, "layers": {**arch["layers"], "layer4.0.conv1": arch["layers"]["conv1"]}})
    with pytest.raises(ValueError, match=r"architecture.layers\['bn1'\].type: 'Conv2d' does not fit BatchNorm2d"):
        rebuild(create_backbone("resnet20", shortcut="B"),
                {**arch, "layers": {**arch["layers"], "bn1": arch["layers"]["conv1"]}})
    with pytest.raises(ValueError, match="architecture.layers: no entry for 'conv1'"):
        rebuild(create_backbone("resnet20", shortcut="B"),
                {**arch, "layers": {k: v for k, v in arch["layers"].items() if k != "conv1"}})


@pytest.mark.parametrize("name", ["l1-filter", "fpgm"])
def test_oneshot_scores_once_and_equals_one_prune_at_the_found_ratio(name):
    """``oneshot`` means one scoring pass: the result is exactly one torch-pruning step at the recorded ratio."""
    dense, model, record = pruned(name, "macs:0.5", "B")
    achieved = record["achieved"]
    assert achieved["scoring_steps"] == 1 and achieved["ratio_search_trials"] >= 2
    assert record["macs_reduction"] >= 0.5
    again = copy.deepcopy(dense)
    method = get_method(name)
    ctx = MethodContext(example_inputs=X, calib_batches=[(X, Y)], seed=0)
    with torch.enable_grad():
        method._pruner(again, ctx, again.fc, ratio=achieved["pruner_ratio"]).step()  # one scoring, one prune
    assert layer_widths(again) == layer_widths(model)
    torch.testing.assert_close(again.eval()(X), model.eval()(X))


def test_progressive_rescores_and_lands_closer_than_its_steps():
    _, model, record = pruned("l1-filter", "macs:0.5", "B")
    ctx = MethodContext(example_inputs=X, calib_batches=[(X, Y)], seed=0, schedule="progressive")
    dense = spread_bn(create_backbone("resnet20", shortcut="B"), 0)
    progressive = get_method("l1-filter").apply(dense, "macs:0.5", ctx)
    assert ctx.record["achieved"]["scoring_steps"] > 1 and ctx.record["achieved"]["ratio_search_trials"] == 0
    assert 0.5 <= ctx.record["macs_reduction"] <= 0.55
    assert count_macs(progressive, X) < count_macs(create_backbone("resnet20", shortcut="B"), X)


def test_schedules_are_the_methods_answer():
    assert "progressive" not in get_method("global-magnitude").schedules  # the suite refuses it (test_config_errors)
    assert get_method("l1-filter").schedules == ("oneshot", "iterative", "progressive")
    with pytest.raises(ValueError, match="schedule: .sometimes. not allowed for l1-filter"):
        get_method("l1-filter").apply(create_backbone("resnet8", shortcut="B"), 0.5,
                                      MethodContext(example_inputs=X, schedule="sometimes"))
