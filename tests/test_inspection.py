"""inspect_backbone: dense vs BUnit params/MACs per stage, cross-checked against ptflops (aten backend)."""
from __future__ import annotations

import harness  # noqa: F401  (torchvision shim first)
import pytest
import torch
from ptflops import get_model_complexity_info

from bunit.convert import bunitify
from baselines.counting import count_macs
from harness.measure.inspection import format_inspection, inspect_backbone, sections
from harness.core.models import create_backbone

pytestmark = pytest.mark.usefixtures("one_thread")


def _aten(model, res=32):
    macs, params = get_model_complexity_info(model, (3, res, res), as_strings=False, print_per_layer_stat=False,
                                             backend="aten")
    return params, macs


@pytest.mark.parametrize("name,params,macs", [("resnet56", 853_018, 125_485_706), ("resnet20", 269_722, 40_551_050)])
def test_dense_cifar_resnet_reference_counts(name, params, macs):
    """The literature's ResNet-56/20 (option A) at 32x32: ptflops aten and our hooks agree with them."""
    model = create_backbone(name, shortcut="A")
    assert _aten(model) == (params, macs)
    assert count_macs(model, torch.zeros(1, 3, 32, 32)) == macs
    assert count_macs(model, torch.randn(3, 3, 32, 32)) == macs  # per sample
    assert count_macs(model, (3, 32, 32)) == macs  # from the shape


@pytest.mark.parametrize("name,plan,shortcut", [
    ("resnet56", "cifar-resnet-paper", "A"), ("vgg16", "vgg16-middle", None), ("resnet18", "resnet-paper", None),
    ("resnet20", "cifar-resnet-hybrid", "B"),
])
def test_rows_sum_to_total_and_match_ptflops(name, plan, shortcut):
    rows = inspect_backbone(name, plan, shortcut=shortcut)
    total = rows[-1]
    assert total["module"] == "total"
    for key in ("dense_params", "bunit_params", "dense_macs", "bunit_macs"):
        assert sum(r[key] for r in rows[:-1]) == total[key], key
    dense = create_backbone(name, shortcut=shortcut)
    assert (total["dense_params"], total["dense_macs"]) == _aten(dense)
    assert (total["bunit_params"], total["bunit_macs"]) == _aten(bunitify(dense, plan))
    assert total["params_saved"] == pytest.approx(1 - total["bunit_params"] / total["dense_params"])
    assert total["unit_layers"] == sum(r["unit_layers"] for r in rows[:-1]) > 0


def test_resnet56_rows():
    rows = {r["module"]: r for r in inspect_backbone("resnet56", "cifar-resnet-paper")}
    assert list(rows) == ["conv1", "bn1", "layer1", "layer2", "layer3", "fc", "total"]
    assert rows["layer1"]["dense_params"] == rows["layer1"]["bunit_params"] == 42_048
    assert rows["layer2"]["bunit_params"] == 21_824 and rows["layer3"]["bunit_params"] == 43_648
    assert rows["layer3"]["dense_macs"] == 41_287_680 and rows["layer3"]["bunit_macs"] == 2_580_480
    assert rows["layer2"]["units"] == "[8x2-4-4/s2]; 8x[16x2-4-2]"
    assert rows["total"]["bunit_params"] == 108_634 and rows["total"]["bunit_macs"] == 50_651_786


def test_vgg_sections_split_at_pools():
    labels = [label for label, _ in sections(create_backbone("vgg16"))]
    assert labels == ["features.0-6", "features.7-13", "features.14-23", "features.24-33", "features.34-42",
                      "avgpool", "classifier"]


def test_inspection_accepts_a_model_and_formats():
    model = create_backbone("resnet20", num_classes=100)
    rows = inspect_backbone(model, {"stages": ["layer3"]}, image_size=16)
    assert rows[-1]["dense_params"] == sum(p.numel() for p in model.parameters())
    text = format_inspection(rows, title="resnet20")
    assert "layer3" in text and "total" in text and f"{rows[-1]['bunit_params']:,}" in text
    assert "\x1b[" not in text  # plain text
