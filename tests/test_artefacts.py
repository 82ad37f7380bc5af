"""Artefacts: every method family round-trips through save_model/load_model; damage is detected, never loaded."""
import copy
import functools
import json
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import prune

from baselines import MethodContext, get_method
from baselines.counting import count_costs
from harness.core.artefacts import CorruptArtefact, artefact_name, list_models, load_model, read_meta, save_model
from harness.core.models import create_backbone
from harness.core.store import ResultStore

X = torch.randn(8, 3, 16, 16, generator=torch.Generator().manual_seed(0))
Y = torch.arange(8) % 10
FAMILIES = [("dense", None, "B"), ("bunit", "paper", "B"), ("bunit", "paper", "A"), ("global-magnitude", 0.7, "B"),
            ("l1-filter", 0.5, "A"), ("l1-filter", 0.5, "B")]


def trained_like(model: nn.Module, seed: int) -> nn.Module:
    """BN statistics and affine parameters away from their fresh values (a fresh BN hides wrong loading)."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.weight.data = 0.5 + torch.rand(m.num_features, generator=gen)
            m.bias.data = 0.1 * torch.randn(m.num_features, generator=gen)
            m.running_mean = 0.1 * torch.randn(m.num_features, generator=gen)
            m.running_var = 0.5 + torch.rand(m.num_features, generator=gen)
    return model


def compressed(method: str, target, shortcut: str, seed: int = 0, backbone: str = "resnet8") -> nn.Module:
    """A compressed model with BN away from fresh values; built once per session, a fresh copy per call."""
    return copy.deepcopy(_compressed(method, target, shortcut, seed, backbone))


@functools.lru_cache(maxsize=None)
def _compressed(method: str, target, shortcut: str, seed: int, backbone: str) -> nn.Module:
    torch.manual_seed(seed)
    model = trained_like(create_backbone(backbone, shortcut=shortcut), seed)
    if method != "dense":
        ctx = MethodContext(example_inputs=X, calib_batches=[(X, Y)], seed=seed, backbone=backbone, shortcut=shortcut)
        model = get_method(method).apply(model, target, ctx)
    return trained_like(model, seed + 100).eval()


def meta_for(method: str, shortcut: str, backbone: str = "resnet8", image_size: int = 16) -> dict:
    return {"method": method, "backbone": backbone, "shortcut": shortcut, "num_classes": 10, "in_channels": 3,
            "image_size": image_size, "dataset": "digits", "config_hash": "0" * 12}


def run_key(method: str, target, shortcut: str, seed: int, backbone: str = "resnet8") -> str:
    label = "-" if target is None else (json.dumps(target) if isinstance(target, dict) else str(target))
    return f"digits/{backbone}-{shortcut}/{method}/{label}/oneshot/s{seed}-{method[:3]}{seed:09d}"


def build_store(directory, entries, *, backbone: str = "resnet8", shortcut: str = "B", image_size: int = 16) -> dict:
    """Save a model and write an ok row for each ``(method, target, seed)``; returns key -> model."""
    store, models = ResultStore(directory), {}
    for method, target, seed in entries:
        model = compressed(method, target, shortcut, seed, backbone)
        key = run_key(method, target, shortcut, seed, backbone)
        path = save_model(directory, key, model, meta=meta_for(method, shortcut, backbone, image_size))
        costs = count_costs(model, (3, image_size, image_size))
        store.append({"key": key, "status": "ok", "top1": 50.0, "dataset": "digits", "image_size": image_size,
                      "backbone": backbone, "shortcut": shortcut, "method": method, "family": get_method(method).family,
                      "target": target, "seed": seed, "macs": costs["macs"], "macs_nonzero": costs["macs_nonzero"],
                      "model_path": path})
        models[key] = model
    return models


@pytest.mark.parametrize("method,target,shortcut", FAMILIES)
def test_round_trip_gives_equal_outputs(tmp_path, method, target, shortcut):
    model = compressed(method, target, shortcut)
    key = run_key(method, target, shortcut, 0)
    path = save_model(tmp_path, key, model, meta=meta_for(method, shortcut))
    assert path == f"models/{artefact_name(key)}.pt" and (tmp_path / path).is_file()
    loaded = load_model(tmp_path, key)
    assert not loaded.training
    assert loaded.state_dict().keys() == model.state_dict().keys()
    with torch.no_grad():
        assert torch.equal(loaded(X), model(X))
    meta = read_meta(tmp_path, key)
    assert meta["family"] == get_method(method).family and meta["key"] == key
    assert meta["architecture"] == get_method(method).architecture(model)


def test_pruning_reparametrisation_is_made_permanent_on_a_copy(tmp_path):
    model = compressed("dense", None, "B")
    prune.l1_unstructured(model.conv1, "weight", amount=0.5)
    with torch.no_grad():
        expected = model(X)
    save_model(tmp_path, "k/pruned", model, meta=meta_for("dense", "B"))
    assert hasattr(model.conv1, "weight_orig")  # the caller's model is untouched
    state = torch.load(tmp_path / "models" / "k__pruned.pt", weights_only=True)
    assert "conv1.weight_orig" not in state
    assert int((state["conv1.weight"] == 0).sum()) == model.conv1.weight.numel() // 2
    with torch.no_grad():
        assert torch.equal(load_model(tmp_path, "k/pruned")(X), expected)


@pytest.mark.parametrize("damage", ["flip", "truncate"])
def test_damaged_artefact_raises_one_clear_line(tmp_path, damage):
    save_model(tmp_path, "k/m", compressed("dense", None, "B"), meta=meta_for("dense", "B"))
    pt = tmp_path / "models" / "k__m.pt"
    blob = bytearray(pt.read_bytes())
    if damage == "flip":
        blob[len(blob) // 2] ^= 0xFF
    else:
        blob = blob[: len(blob) // 3]
    pt.write_bytes(bytes(blob))
    with pytest.raises(CorruptArtefact) as info:
        load_model(tmp_path, "k/m")
    message = str(info.value)
    assert str(pt) in message and "\n" not in message and "SHA-256" in message


def test_weights_that_do_not_fit_the_architecture_are_reported(tmp_path):
    save_model(tmp_path, "k/m", compressed("l1-filter", 0.5, "B"), meta=meta_for("l1-filter", "B"))
    side = tmp_path / "models" / "k__m.json"
    meta = json.loads(side.read_text())
    meta["architecture"] = None  # the digest still matches: the weights are fine, the meta lies
    side.write_text(json.dumps(meta))
    with pytest.raises(CorruptArtefact, match="do not fit the rebuilt architecture"):
        load_model(tmp_path, "k/m")


def test_missing_artefact_and_missing_meta_fields(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model for key"):
        load_model(tmp_path, "nope")
    with pytest.raises(ValueError, match="meta: missing in_channels, image_size"):
        save_model(tmp_path, "k", compressed("dense", None, "B"),
                   meta={k: v for k, v in meta_for("dense", "B").items() if k not in ("in_channels", "image_size")})


def test_list_models_and_a_copied_store(tmp_path):
    models = build_store(tmp_path / "a", [("dense", None, 0), ("global-magnitude", 0.7, 0)])
    shutil.copytree(tmp_path / "a", tmp_path / "b")
    shutil.rmtree(tmp_path / "a")
    listed = list_models(tmp_path / "b")
    assert [m["key"] for m in listed] == sorted(models)
    assert all((tmp_path / "b" / m["path"]).is_file() and m["sha256"] for m in listed)
    for key, model in models.items():
        with torch.no_grad():
            assert torch.equal(load_model(tmp_path / "b", key)(X), model(X))


def test_harness_load_model_is_lazy():
    code = ("import sys, harness; assert 'harness.core.artefacts' not in sys.modules; "
            "from harness.core.artefacts import load_model; assert harness.load_model is load_model; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "ok", out.stderr
