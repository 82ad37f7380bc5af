"""The one counter (baselines.counting): exact counts against the literature, closed forms, ptflops' aten
backend and torch's FLOP counter; the sparse-aware MAC count."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
from ptflops import get_model_complexity_info
from torch.nn.utils import prune
from torch.utils.flop_counter import FlopCounterMode

import harness  # noqa: F401 - the torchvision shim before ptflops
from baselines.counting import count_costs, count_macs, count_params, count_params_nonzero
from harness.core.models import VGG16_CFG, create_backbone


def _flop_counter_macs(model: nn.Module, shape: tuple[int, ...]) -> float:
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    return counter.get_total_flops() / 2


def _bias_adds(model: nn.Module, shape: tuple[int, ...]) -> int:
    """Output elements of conv/linear layers with a bias: what ptflops adds and FlopCounterMode leaves out."""
    total = 0

    def hook(module, inputs, output):
        nonlocal total
        total += output.numel() if module.bias is not None else 0

    handles = [m.register_forward_hook(hook) for m in model.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    with torch.no_grad():
        model.eval()(torch.zeros(1, *shape))
    for h in handles:
        h.remove()
    return total


# --- counts ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,params,macs", [("resnet20", 269_722, 40_551_050), ("resnet56", 853_018, 125_485_706)])
def test_cifar_resnet_counts_match_the_literature(name, params, macs):
    torch.manual_seed(0)  # unseeded, an initialisation can draw an exact 0.0 now and then (seen once under xdist)
    model = create_backbone(name, num_classes=10, shortcut="A")
    counts = count_costs(model, (3, 32, 32))
    assert counts["params"] == count_params(model) == params
    assert counts["macs"] == macs
    assert counts["macs_nonzero"] == macs  # dense weights


def test_vgg16_counts_match_the_closed_form():
    model = create_backbone("vgg16", num_classes=10)
    macs, params, side, c = 0, 0, 32, 3
    for v in VGG16_CFG:
        if v == "M":
            side //= 2
            continue
        macs += v * c * 9 * side * side
        params += v * c * 9 + 2 * v  # conv weight, BN weight and bias
        c = v
    macs += 512 * 10 + 10  # classifier and its bias adds
    params += 512 * 10 + 10
    assert count_params(model) == params == 14_724_042
    assert count_macs(model, (3, 32, 32)) == macs == 313_201_674


@pytest.mark.parametrize("name", ["resnet20", "vgg16"])
def test_macs_agree_with_torch_flop_counter(name):
    model = create_backbone(name, num_classes=10)
    macs = count_macs(model, (3, 32, 32))
    assert _flop_counter_macs(model, (3, 32, 32)) + _bias_adds(model, (3, 32, 32)) == macs
    assert _bias_adds(model, (3, 32, 32)) == 10  # only the classifier has a bias


def test_grouped_and_depthwise_convs_match_the_closed_form():
    torch.manual_seed(0)  # no exact 0.0 drawn: macs_nonzero == macs below
    model = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1, groups=4, bias=True),  # (16, 10, 10)
        nn.ReLU(),
        nn.Conv2d(16, 16, 3, stride=2, padding=1, groups=16, bias=False),  # (16, 5, 5) depthwise
        nn.Flatten(),
        nn.Linear(16 * 5 * 5, 7),
    )
    expected = (16 * (8 // 4) * 9 * 100 + 16 * 100) + 16 * 1 * 9 * 25 + (400 * 7 + 7)
    counts = count_costs(model, (8, 10, 10))
    assert counts["macs"] == counts["macs_nonzero"] == expected == 36_807
    assert _flop_counter_macs(model, (8, 10, 10)) + 16 * 100 + 7 == expected


def _half_zero_(weight: torch.Tensor) -> None:
    with torch.no_grad():
        weight.view(-1)[::2] = 0.0


def _conv_linear_net() -> nn.Sequential:
    torch.manual_seed(0)
    net = nn.Sequential(nn.Conv2d(4, 8, 3, padding=1, bias=False), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    with torch.no_grad():
        net[0].weight.add_(torch.sign(net[0].weight) * 1e-3)  # no accidental zeros
        net[3].weight.add_(torch.sign(net[3].weight) * 1e-3)
        net[3].bias.fill_(1.0)
    return net


CONV_MACS, LINEAR_MACS, BIAS_ADDS = 8 * 4 * 9 * 64, 512 * 10, 10


def test_macs_nonzero_halves_with_half_the_weights_zeroed():
    net = _conv_linear_net()
    _half_zero_(net[0].weight)
    _half_zero_(net[3].weight)
    counts = count_costs(net, (4, 8, 8))
    assert counts["macs"] == CONV_MACS + LINEAR_MACS + BIAS_ADDS
    assert counts["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS // 2 + BIAS_ADDS
    assert count_params(net) == 288 + 5120 + 10
    assert count_params_nonzero(net) == 144 + 2560 + 10


def test_macs_nonzero_counts_only_the_zeroed_layer_down():
    net = _conv_linear_net()
    _half_zero_(net[0].weight)
    assert count_costs(net, (4, 8, 8))["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS + BIAS_ADDS


def test_pruning_masks_count_as_zeros():
    net = _conv_linear_net()
    prune.random_unstructured(net[0], "weight", amount=0.5)  # 144 of 288 entries masked
    assert count_params(net) == 288 + 5120 + 10  # weight_orig stays dense
    assert count_params_nonzero(net) == 144 + 5120 + 10
    assert count_costs(net, (4, 8, 8))["macs_nonzero"] == CONV_MACS // 2 + LINEAR_MACS + BIAS_ADDS


def test_count_macs_leaves_the_model_as_found():
    model = create_backbone("resnet20")
    model.train()
    model.layer2.eval()
    before_flags = [m.training for m in model.modules()]
    before_attrs = [set(vars(m)) for m in model.modules()]
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, (3, 32, 32))
    assert [m.training for m in model.modules()] == before_flags
    assert [set(vars(m)) for m in model.modules()] == before_attrs
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert all(torch.equal(before_state[k], v) for k, v in model.state_dict().items())


def test_count_macs_rejects_a_bad_shape():
    with pytest.raises(ValueError, match="input_shape"):
        count_macs(nn.Linear(3, 3), (0, 3))


@pytest.mark.parametrize("name,shortcut", [("resnet20", "A"), ("resnet20", "B"), ("vgg16", None), ("resnet18", None)])
def test_macs_equal_ptflops_aten_backend(name, shortcut):
    model = create_backbone(name, num_classes=10, shortcut=shortcut)
    macs, params = get_model_complexity_info(model, (3, 32, 32), as_strings=False, print_per_layer_stat=False,
                                             backend="aten", verbose=False)
    assert (count_macs(model, (3, 32, 32)), count_params(model)) == (macs, params)


def test_bunit_macs_equal_the_units_closed_form():
    """A BUnit model as bunitify builds it (default backend) counts exactly the units' closed forms."""
    from bunit import bunitify
    from bunit.layers import unit_layers
    from bunit.units import unit_macs

    dense = create_backbone("resnet20", num_classes=10, in_channels=3, shortcut="A").eval()
    model = bunitify(dense, "cifar-resnet-all").eval()
    reference = count_macs(model, (3, 16, 16))
    # closed form: the dense stem and classifier plus every unit layer's formula
    sizes = {"layer1": 16, "layer2": 8, "layer3": 4}
    units = 0
    for name, layer in unit_layers(model):
        out = sizes[name.split(".")[0]]
        units += unit_macs(layer.specs, out * layer.stride, out * layer.stride)
    stem = 3 * 16 * 9 * 16 * 16
    fc = 64 * 10 + 10  # ptflops aten counts the bias adds of the classifier
    assert reference == stem + units + fc
