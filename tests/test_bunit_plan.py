"""BUnit at a chosen cost: targets land within the documented tolerance on every backbone with a BUnit form; the
paper's own ResNet-18 (ImageNet stem on 32x32) has the paper's counts."""
from __future__ import annotations

import pytest
import torch

import harness  # noqa: F401  (torchvision shim first)
from baselines import MethodContext, get_method
from baselines.bunit_plan import TOLERANCE, CostTarget, choose_plan, parse_cost_target, plan_family
from baselines.counting import count_macs
from bunit import bunitify
from harness.core.models import create_backbone

# backbone, shortcut, MACs targets, params targets (ResNet-50 converts only its 3x3 convs: at most ~45%)
CASES = [
    ("resnet20", "A", (0.5, 0.8, 0.95), (0.5, 0.7)),
    ("resnet20", "B", (0.5, 0.8, 0.95), (0.5, 0.7)),
    ("vgg16", None, (0.5, 0.8, 0.95), (0.5, 0.7)),
    ("resnet18", None, (0.5, 0.8), (0.5, 0.7)),
    ("resnet18-imagenet-stem", None, (0.5, 0.8), (0.5, 0.7)),
    ("resnet50", None, (0.3, 0.4), (0.3, 0.4)),
]
SIZE = 16  # small inputs keep the test fast; parameters do not depend on them


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("backbone,shortcut,macs_targets,params_targets", CASES,
                         ids=[f"{c[0]}-{c[1]}" for c in CASES])
def test_cost_targets_land_within_tolerance(backbone, shortcut, macs_targets, params_targets):
    model = create_backbone(backbone, num_classes=10, shortcut=shortcut)
    x = torch.randn(2, 3, SIZE, SIZE)
    family = plan_family(model, x)
    dense_macs, dense_params = count_macs(model, x), _params(model)
    assert (family.macs_dense, family.params_dense) == (dense_macs, dense_params)
    for kind, targets in (("macs_reduction", macs_targets), ("params_reduction", params_targets)):
        for value in targets:
            pick = choose_plan(family, CostTarget(kind, value))
            built = bunitify(model, pick.plan)
            macs_r = 1 - count_macs(built, x) / dense_macs
            params_r = 1 - _params(built) / dense_params
            achieved = macs_r if kind == "macs_reduction" else params_r
            assert abs(achieved - value) <= TOLERANCE, (backbone, kind, value, achieved, pick.choice)
            # the family's sum of per-layer savings is the whole model's count, exactly
            assert (pick.macs_reduction, pick.params_reduction) == pytest.approx((macs_r, params_r), abs=1e-12)
            assert built(x).shape == (2, 10)


def test_out_of_reach_target_is_refused_with_the_range():
    model = create_backbone("resnet50", num_classes=10)
    family = plan_family(model, torch.zeros(1, 3, SIZE, SIZE))
    lo, hi = family.reach("macs_reduction")
    assert 0.4 < hi < 0.5 and lo < 0.05
    with pytest.raises(ValueError, match=r"macs_reduction = 0.8 is out of reach .*reachable: 0.0\d\d to 0.4\d\d"):
        choose_plan(family, CostTarget("macs_reduction", 0.8))


def test_parse_cost_target_forms_and_errors():
    assert parse_cost_target({"macs_reduction": 0.8}) == CostTarget("macs_reduction", 0.8)
    assert parse_cost_target("params:0.7") == CostTarget("params_reduction", 0.7)
    assert parse_cost_target({"macs": 0.5}) == CostTarget("macs_reduction", 0.5)
    for plan in ("paper", "cifar-resnet-all", {"stages": ["layer2"]}, '{"stages": ["layer2"]}'):
        assert parse_cost_target(plan) is None
    for bad in ({"macs_reduction": 1.0}, {"macs_reduction": 0.5, "params_reduction": 0.5}, "macs:x", {"params": True}):
        with pytest.raises(ValueError, match="macs_reduction"):
            parse_cost_target(bad)


def test_bunit_method_records_target_plan_and_achieved():
    method = get_method("bunit")
    method.validate_target({"macs_reduction": 0.75})
    with pytest.raises(ValueError, match="allowed"):
        method.validate_target({"macs_reduction": 1.5})
    model = create_backbone("resnet20", num_classes=10, in_channels=1, shortcut="B")
    x = torch.randn(4, 1, SIZE, SIZE)
    ctx = MethodContext(example_inputs=x)
    out = method.apply(model, {"macs_reduction": 0.75}, ctx)
    rec = ctx.record["achieved"]
    assert rec["target_kind"] == "macs_reduction" and rec["target_value"] == 0.75 and rec["target_reached"]
    assert rec["macs_reduction"] == pytest.approx(1 - count_macs(out, x) / count_macs(model, x))
    assert abs(rec["macs_reduction"] - 0.75) <= TOLERANCE
    assert rec["params"] == _params(out) and rec["params_dense"] == _params(model)
    assert rec["plan_choice"] and set(rec["plan_choice"]) <= {"layer1", "layer2", "layer3"}
    # the architecture is data: rebuilding from it gives the same network
    again = bunitify(create_backbone("resnet20", num_classes=10, in_channels=1, shortcut="B"), method.architecture(out))
    assert _params(again) == _params(out) and count_macs(again, x) == count_macs(out, x)
    again.load_state_dict(out.state_dict())
    with torch.no_grad():
        assert torch.equal(out.eval()(x), again.eval()(x))


def test_paper_resnet18_counts():
    """The paper's CIFAR-100 model: torchvision ResNet-18, ImageNet stem, 32x32 inputs; the 'paper' plan."""
    dense = create_backbone("resnet18-imagenet-stem", num_classes=100)
    bunit = bunitify(dense, "paper")
    x = torch.zeros(1, 3, 32, 32)
    assert (_params(dense), _params(bunit)) == (11_227_812, 8_696_484)
    assert (count_macs(dense, x), count_macs(bunit, x)) == (37_062_756, 20_934_756)
    assert sorted(bunit.bunit_plan["layers"]) == ["layer2.0", "layer2.1", "layer3.0", "layer3.1"]
    assert bunit.bunit_plan["layers"]["layer2.0"] == ["32x2-4-4/s2"]
