"""Unit specs and unit layers: parsing, hybrid draws, closed forms, and reference == fused."""
from __future__ import annotations

import copy

import harness  # noqa: F401  (torchvision shim before ptflops)
import pytest
import torch
from ptflops import get_model_complexity_info

from bunit.layers import UnitLayer, to_fused, to_reference
from bunit.units import unit_macs, unit_params
from bunit.spec import (CATALOGUE, UnitSpec, compact_specs, hybrid_mix, parse_spec, parse_specs, uniform_units)
from baselines.counting import count_macs

from conftest import spread_bn

pytestmark = pytest.mark.usefixtures("one_thread")

# --- specs --------------------------------------------------------------------------------------


def test_parse_spec_forms():
    assert parse_spec("2-4-2") == UnitSpec(2, 4, 2)
    assert parse_spec(" 2-4-4/s2 ") == UnitSpec(2, 4, 4, stride=2)
    assert parse_spec("3-2-1/k5/s2") == UnitSpec(3, 2, 1, kernel=5, stride=2)
    assert str(UnitSpec(2, 4, 4, kernel=5, stride=2)) == "2-4-4/s2/k5"
    for s in CATALOGUE:
        assert str(parse_spec(s)) == s


@pytest.mark.parametrize("bad", ["2-4", "2-4-2-1", "a-b-c", "2-0-2", "2-4-2/x3", "2-4-2/s2/s2", "2-4-2/k4", ""])
def test_parse_spec_rejects_with_allowed_form(bad):
    with pytest.raises(ValueError, match="a-b-c|UnitSpec"):
        parse_spec(bad)


def test_parse_specs_runs_and_compaction_roundtrip():
    specs = parse_specs(["3x1-2-1", "2-1-2", "2x2-1-2", "1-2-3"])
    assert [str(s) for s in specs] == ["1-2-1"] * 3 + ["2-1-2"] * 3 + ["1-2-3"]
    assert compact_specs(specs) == ["3x1-2-1", "3x2-1-2", "1-2-3"]
    assert parse_specs(compact_specs(specs)) == specs
    assert len(parse_specs("32x2-4-2")) == 32


def test_uniform_units_paper_shapes():
    assert uniform_units(64, 64) == [UnitSpec(2, 4, 2)] * 32
    assert uniform_units(64, 128) == [UnitSpec(2, 4, 4)] * 32
    assert uniform_units(16, 32, a=4, b=8) == [UnitSpec(4, 8, 8)] * 4
    with pytest.raises(ValueError, match="in_channels"):
        uniform_units(3, 64)
    with pytest.raises(ValueError, match="out_channels"):
        uniform_units(64, 48, a=2)  # c = 1.5


@pytest.mark.parametrize("cin,cout", [(16, 16), (16, 32), (64, 64), (64, 128), (7, 11), (5, None)])
@pytest.mark.parametrize("seed", [0, 1, 7])
def test_hybrid_mix_sums_exact_and_deterministic(cin, cout, seed):
    units = hybrid_mix(cin, cout, CATALOGUE, seed)
    assert sum(u.a for u in units) == cin
    if cout is not None:
        assert sum(u.c for u in units) == cout
    assert all(str(u) in CATALOGUE for u in units)
    assert hybrid_mix(cin, cout, CATALOGUE, seed) == units  # fixed seed, same draw


def test_hybrid_mix_is_a_mix_and_seed_matters():
    draws = {tuple(hybrid_mix(64, 64, CATALOGUE, s)) for s in range(5)}
    assert len(draws) == 5
    kinds = {str(u) for u in hybrid_mix(64, 64, CATALOGUE, 0)}
    assert len(kinds) >= 4  # really hybrid, not one type


def test_hybrid_mix_infeasible_raises():
    with pytest.raises(ValueError, match="catalogue"):
        hybrid_mix(3, None, ["2-1-1"], 0)
    with pytest.raises(ValueError, match="catalogue"):
        hybrid_mix(4, 9, ["2-1-1", "2-1-2"], 0)  # two units give c <= 4


# --- closed forms -------------------------------------------------------------------------------


def test_unit_params_known_values():
    assert unit_params(["32x2-4-2"]) == 32 * (9 * (8 + 8) + 2 * (4 + 2)) == 4992
    assert unit_params(["32x2-4-4"]) == 32 * (9 * (8 + 16) + 2 * (4 + 4)) == 7424
    assert unit_macs(["32x2-4-2"], 16, 16, 1) == 32 * 256 * 9 * 16 == 1_179_648
    assert unit_macs(["32x2-4-4"], 16, 16, 2) == 32 * 64 * 9 * 24 == 442_368


@pytest.mark.parametrize("impl", ["reference", "fused"])
@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("seed", [0, 3])
def test_params_and_macs_equal_closed_form(impl, stride, seed):
    specs = hybrid_mix(24, 40, CATALOGUE, seed) + [UnitSpec(2, 3, 2, kernel=5)]
    layer = UnitLayer(specs, stride=stride, impl=impl)
    assert sum(p.numel() for p in layer.parameters()) == unit_params(specs)
    h, w = 15, 12
    x = torch.randn(2, layer.in_channels, h, w)
    assert count_macs(layer, x) == unit_macs(specs, h, w, stride)
    macs, params = get_model_complexity_info(layer, (layer.in_channels, h, w), as_strings=False,
                                             print_per_layer_stat=False, backend="aten")
    assert (macs, params) == (unit_macs(specs, h, w, stride), unit_params(specs))


# --- reference vs fused -------------------------------------------------------------------------


def _hybrid_pair(stride: int, seed: int) -> tuple[UnitLayer, UnitLayer]:
    torch.manual_seed(seed)
    specs = hybrid_mix(20, 28, CATALOGUE, seed)
    ref = UnitLayer(specs, stride=stride, impl="reference")
    spread_bn(ref, seed)
    return ref, to_fused(ref)


def _flat_state(layer: UnitLayer, *, grad: bool = False) -> list[torch.Tensor]:
    return [t for unit in layer.unit_state(grad=grad) for t in unit.values()]


def test_fused_groups_units_and_permutes():
    ref, fused = _hybrid_pair(1, 0)
    assert len(fused.groups) == len(set(ref.specs)) > 1
    assert fused.out_perm is not None  # hybrid layers need the inverse permutation
    assert sorted(u for g in fused.group_units for u in g) == list(range(len(ref.specs)))


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("train", [False, True])
@pytest.mark.parametrize("seed", [0, 5])
def test_reference_and_fused_equal_outputs_and_grads(stride, train, seed):
    ref, fused = _hybrid_pair(stride, seed)
    ref.train(train)
    fused.train(train)
    x = torch.randn(4, ref.in_channels, 11, 9, generator=torch.Generator().manual_seed(seed))
    xr, xf = x.clone().requires_grad_(), x.clone().requires_grad_()
    yr, yf = ref(xr), fused(xf)
    assert yr.shape == (4, 28, (11 - 1) // stride + 1, (9 - 1) // stride + 1)
    assert (yr - yf).abs().max().item() < 1e-5
    g = torch.randn(yr.shape, generator=torch.Generator().manual_seed(seed + 1))
    yr.backward(g)
    yf.backward(g)
    assert (xr.grad - xf.grad).abs().max().item() < 1e-5
    grads_r, grads_f = _flat_state(ref, grad=True), _flat_state(fused, grad=True)
    assert len(grads_r) == len(grads_f) == 10 * len(ref.specs)
    for a, b in zip(grads_r, grads_f):
        assert (a - b).abs().max().item() < 1e-4 * max(1.0, a.abs().max().item())
    # train mode updated the running statistics identically
    for a, b in zip(_flat_state(ref), _flat_state(fused)):
        assert (a - b).abs().max().item() < 1e-6


def test_conversion_roundtrip_is_exact_and_keeps_mode():
    ref, fused = _hybrid_pair(2, 1)
    fused.train()
    fused(torch.randn(2, 20, 8, 8))  # move the running stats and counters
    fused.eval()
    back = to_reference(fused)
    assert back.impl == "reference" and not back.training and back.stride == 2
    for a, b in zip(_flat_state(back), _flat_state(fused)):
        assert torch.equal(a, b)
    assert all(int(u.bn1.num_batches_tracked) == 1 for u in back.units)
    again = to_fused(back)
    assert all(torch.equal(a, b) for a, b in zip(fused.state_dict().values(), again.state_dict().values()))
    x = torch.randn(3, 20, 8, 8)
    assert torch.equal(fused(x), again(x))


def test_init_is_per_unit_fan_out():
    big = UnitLayer(["256x2-8-4"], impl="fused")
    w1, w2 = big.groups[0].conv1.weight, big.groups[0].conv2.weight
    assert abs(w1.std().item() / (2 / (8 * 9)) ** 0.5 - 1) < 0.05
    assert abs(w2.std().item() / (2 / (4 * 9)) ** 0.5 - 1) < 0.05


def test_layer_validation_errors():
    with pytest.raises(ValueError, match="stride"):
        UnitLayer(["2-4-2/s2", "2-4-2"])
    with pytest.raises(ValueError, match="impl"):
        UnitLayer(["2-4-2"], impl="sparse")
    with pytest.raises(ValueError, match="backend"):
        UnitLayer(["2-4-2"], backend="cuda-magic")
    with pytest.raises(ValueError, match="reference form"):
        UnitLayer(["2-4-2"], impl="reference").backend = "grouped"
    with pytest.raises(ValueError, match="input"):
        UnitLayer(["2-4-2"])(torch.randn(1, 3, 4, 4))


def test_deepcopy_is_independent():
    layer = UnitLayer(["3x1-2-1", "2-1-2"])
    clone = copy.deepcopy(layer)
    with torch.no_grad():
        clone.groups[0].conv1.weight.add_(1.0)
    assert not torch.equal(clone.groups[0].conv1.weight, layer.groups[0].conv1.weight)
