"""Golden counts: parameters and MACs of every registered backbone, dense and in its BUnit "paper" form, from the one
counter (baselines.counting), pinned in one place: tests/golden/counts.json.

A change of a backbone, of bunitify or of the counter shows here. When a change is intended, re-record with
``BUNITBENCH_RECORD_GOLDEN=1 python -m pytest tests/test_golden_counts.py`` and commit the new file with a reason.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import harness  # noqa: F401 - the torchvision shim
from baselines.counting import count_costs
from bunit import bunitify
from harness.core.models import create_backbone, get_backbone_info, list_backbones

GOLDEN = Path(__file__).parent / "golden" / "counts.json"
RECORD = "BUNITBENCH_RECORD_GOLDEN"
SHAPE = (3, 32, 32)


def _counts(name: str) -> dict[str, int]:
    shortcut = "A" if get_backbone_info(name).shortcut_variants else None
    dense = create_backbone(name, num_classes=10, in_channels=3, shortcut=shortcut)
    out = {f"dense_{k}": v for k, v in count_costs(dense, SHAPE).items() if k in ("params", "macs")}
    try:
        converted = bunitify(dense, "paper")
    except ValueError:  # no BUnit form for this backbone
        return out
    out.update({f"bunit_{k}": v for k, v in count_costs(converted, SHAPE).items() if k in ("params", "macs")})
    return out


def test_golden_counts_of_every_backbone():
    measured = {name: _counts(name) for name in list_backbones()}
    if os.environ.get(RECORD):
        GOLDEN.write_text(json.dumps(measured, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert measured == golden, f"counts changed; if intended, re-record with {RECORD}=1 (see this file's docstring)"


def test_golden_file_pins_the_literature():
    golden = json.loads(GOLDEN.read_text())
    assert (golden["resnet56"]["dense_params"], golden["resnet56"]["dense_macs"]) == (853_018, 125_485_706)
    assert (golden["resnet20"]["dense_params"], golden["resnet20"]["dense_macs"]) == (269_722, 40_551_050)
    assert (golden["vgg16"]["dense_params"], golden["vgg16"]["dense_macs"]) == (14_724_042, 313_201_674)

