"""Execution backends of fused unit layers give equal results; the autotuner picks the measured fastest."""
from __future__ import annotations

import copy
import json
import pickle

import pytest
import torch
import torch.nn as nn

from bunit import blockdiag
from bunit.autotune import autotune, default_cache_path, has_unit_layers, layer_key
from bunit.backends import list_backends
from bunit.convert import bunitify
from bunit.layers import BACKENDS, EAGER_BACKENDS, UnitLayer, set_backend, unit_layers
from bunit.spec import CATALOGUE, UnitSpec, hybrid_mix
from conftest import spread_bn

TOL = 1e-5


def _layer(stride: int, seed: int, *, mixed_kernels: bool = False) -> UnitLayer:
    torch.manual_seed(seed)
    specs = hybrid_mix(22, 30, CATALOGUE, seed)
    if mixed_kernels:
        specs = specs[:3] + [UnitSpec(2, 3, 2, kernel=5), UnitSpec(1, 2, 1, kernel=1)] + specs[3:]
    return spread_bn(UnitLayer(specs, stride=stride), seed)


def _buffers(layer: nn.Module) -> list[torch.Tensor]:
    return [b.clone() for b in layer.buffers(recurse=True) if b.dtype != torch.long or b.dim() == 0]


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("mixed", [False, True])
def test_eager_backends_equal_in_eval(stride, mixed):
    layer = _layer(stride, 2, mixed_kernels=mixed).eval()
    x = torch.randn(3, layer.in_channels, 10, 13)
    with torch.no_grad():
        outs = {}
        for b in EAGER_BACKENDS:
            layer.backend = b
            outs[b] = layer(x)
    for b, y in outs.items():
        assert y.shape == outs["loop"].shape
        assert (y - outs["loop"]).abs().max().item() < TOL, b


@pytest.mark.parametrize("stride", [1, 2])
def test_eager_backends_equal_in_training(stride):
    """Outputs, input/weight gradients, running stats and counters agree in train mode."""
    base = _layer(stride, 4, mixed_kernels=True).train()
    x = torch.randn(4, base.in_channels, 9, 9)
    g = None
    results = {}
    for b in EAGER_BACKENDS:
        layer = copy.deepcopy(base)
        layer.backend = b
        xi = x.clone().requires_grad_()
        y = layer(xi)
        g = torch.randn(y.shape, generator=torch.Generator().manual_seed(0)) if g is None else g
        y.backward(g)
        results[b] = (y.detach(), xi.grad, [p.grad for p in layer.parameters()], _buffers(layer))
        assert all(int(bn.num_batches_tracked) == 1 for grp in layer.groups for bn in (grp.bn1, grp.bn2)), b
        assert not torch.equal(layer.groups[0].bn1.running_mean, base.groups[0].bn1.running_mean), b  # stats moved
    ref = results["loop"]
    for b, (y, gx, gw, bufs) in results.items():
        assert (y - ref[0]).abs().max().item() < TOL, b
        assert (gx - ref[1]).abs().max().item() < TOL, b
        for p, q in zip(gw, ref[2]):
            assert (p - q).abs().max().item() < 1e-4 * max(1.0, q.abs().max().item()), b
        for p, q in zip(bufs, ref[3]):
            assert torch.allclose(p.float(), q.float(), atol=1e-6), b


def test_blockdiag_weights_are_block_diagonal():
    layer = _layer(1, 1)
    w1, w2 = layer.blockdiag_weights()
    assert w1.shape == (layer.hidden_channels, layer.in_channels, 3, 3)
    assert w2.shape == (layer.out_channels, layer.hidden_channels, 3, 3)
    nonzero = sum(int((grp.conv1.weight != 0).sum()) + int((grp.conv2.weight != 0).sum()) for grp in layer.groups)
    assert int((w1 != 0).sum()) + int((w2 != 0).sum()) == nonzero
    dense = w1.numel() + w2.numel()
    assert nonzero < dense / 4


def test_blockdiag_cache_reused_and_invalidated():
    layer = _layer(1, 3).eval()
    layer.backend = "blockdiag"
    x = torch.randn(2, layer.in_channels, 8, 8)
    with torch.no_grad():
        y0 = layer(x)
        cached = layer.caches[blockdiag.WEIGHT_CACHE][1][0]
        layer(x)
        assert layer.caches[blockdiag.WEIGHT_CACHE][1][0] is cached  # same weights: cache reused
    opt = torch.optim.SGD(layer.parameters(), lr=0.5)
    layer.train()
    layer(x).square().mean().backward()  # grad mode: rebuilt on the fly, gradients reach the group weights
    assert all(grp.conv1.weight.grad is not None and grp.conv1.weight.grad.abs().sum() > 0 for grp in layer.groups)
    opt.step()  # in-place update bumps the weights' versions
    layer.eval()
    with torch.no_grad():
        y1 = layer(x)
        assert layer.caches[blockdiag.WEIGHT_CACHE][1][0] is not cached
        layer.backend = "grouped"
        y_ref = layer(x)
    assert (y1 - y0).abs().max().item() > 1e-3
    assert (y1 - y_ref).abs().max().item() < TOL


def test_deepcopy_drops_caches():
    layer = _layer(1, 0).eval()
    layer.backend = "blockdiag"
    with torch.no_grad():
        layer(torch.randn(1, layer.in_channels, 4, 4))
    assert set(layer.caches) == {blockdiag.WEIGHT_CACHE}
    clone = copy.deepcopy(layer)
    assert clone.caches == {} and set(layer.caches) == {blockdiag.WEIGHT_CACHE}
    restored = pickle.loads(pickle.dumps(layer))
    assert restored.caches == {}
    layer.to(torch.float64)  # moved: the dense weights are rebuilt on the new tensors
    assert layer.caches == {}


def test_only_declared_caches_are_kept():
    layer = _layer(1, 0)
    with pytest.raises(KeyError, match="not declared"):
        layer.keep_cache("my_backend.weights", 1)


def test_compiled_backend_matches():
    layer = _layer(2, 6).eval()
    x = torch.randn(2, layer.in_channels, 8, 8)
    with torch.no_grad():
        ref = layer(x)
        layer.backend = "compiled"
        try:
            y = layer(x)
        except Exception as err:  # no working compiler toolchain on this machine
            pytest.skip(f"torch.compile unavailable: {type(err).__name__}: {err}")
    assert (y - ref).abs().max().item() < TOL


def test_set_backend_on_model():
    layer = _layer(1, 0)
    holder = nn.Sequential(layer)
    set_backend(holder, "bmm")
    assert layer.backend == "bmm"
    with pytest.raises(ValueError, match="backend"):
        set_backend(holder, "fastest")


# --- autotune -----------------------------------------------------------------------------------


class _ScriptedTimer:
    """Returns fixed seconds per backend and counts calls."""

    def __init__(self, seconds: dict[str, float], fail: tuple[str, ...] = ()):
        self.seconds, self.fail, self.calls = seconds, fail, []

    def __call__(self, layer, x, backend, repeats):
        self.calls.append((layer_key(layer, x), backend))
        if backend in self.fail:
            raise RuntimeError("cannot run here")
        return self.seconds[backend]


def _cifar_bunit() -> nn.Module:
    import harness  # noqa: F401
    from harness.core.models import create_backbone

    return bunitify(create_backbone("resnet20"), "cifar-resnet-paper")


def test_autotune_picks_fastest_injected_and_caches(tmp_path):
    model = _cifar_bunit()
    assert has_unit_layers(model) and not has_unit_layers(nn.Sequential(UnitLayer(["2-4-2"], impl="reference")))
    x = torch.randn(4, 3, 32, 32)
    seconds = {"loop": 5e-3, "grouped": 2e-3, "grouped_cl": 3e-3, "blockdiag": 1e-3, "bmm": 4e-3}
    timer = _ScriptedTimer(seconds, fail=("bmm",))
    cache = tmp_path / "tune.json"
    chosen = autotune(model, x, cache_path=cache, timer=timer, repeats=3)
    names = [n for n, _ in unit_layers(model)]
    assert sorted(chosen) == sorted(names) and len(names) == 6
    assert set(chosen.values()) == {"blockdiag"}
    assert all(m.backend == "blockdiag" for _, m in unit_layers(model))
    # layer2.1 and layer2.2 share a key: each distinct (shape, batch, dtype, device) is timed once
    keys = {k for k, _ in timer.calls}
    assert len(keys) == 4 and len(timer.calls) == 4 * len(EAGER_BACKENDS)
    data = json.loads(cache.read_text())
    entry = next(iter(data["entries"].values()))
    assert "bmm" in entry["errors"] and "bmm" not in entry["timings_ms"]
    assert entry["timings_ms"]["blockdiag"] == pytest.approx(1.0)
    # second call: everything from the cache, nothing timed
    again = _ScriptedTimer({b: 1.0 for b in BACKENDS})
    assert autotune(_cifar_bunit(), x, cache_path=cache, timer=again, repeats=3) == chosen
    assert again.calls == []
    # a different batch size is a different key
    autotune(model, torch.randn(2, 3, 32, 32), cache_path=cache, timer=again, repeats=3)
    assert len(again.calls) == 4 * len(EAGER_BACKENDS)


def test_autotune_times_a_changed_fused_kernel_afresh(tmp_path, monkeypatch):
    from bunit import fused_cpu

    model, x, cache = nn.Sequential(UnitLayer(["4x2-4-2"])), torch.randn(2, 8, 6, 6), tmp_path / "c.json"
    first = _ScriptedTimer({"grouped": 2e-3, "fused_cpu": 1e-3})
    assert autotune(model, x, backends=["grouped", "fused_cpu"], cache_path=cache, timer=first, repeats=1) == \
        {"0": "fused_cpu"}
    again = _ScriptedTimer({"grouped": 2e-3, "fused_cpu": 1e-3})
    autotune(model, x, backends=["grouped", "fused_cpu"], cache_path=cache, timer=again, repeats=1)
    assert again.calls == []  # same kernel source: the cached timings decide
    monkeypatch.setattr(fused_cpu, "source_tag", lambda: "another-kernel")
    changed = _ScriptedTimer({"grouped": 2e-3, "fused_cpu": 3e-3})  # the edited kernel is slower
    assert autotune(model, x, backends=["grouped", "fused_cpu"], cache_path=cache, timer=changed, repeats=1) == \
        {"0": "grouped"}
    assert sorted(b for _, b in changed.calls) == ["fused_cpu", "grouped"]
    assert len(json.loads(cache.read_text())["entries"]) == 2


def test_autotune_restricted_backends_and_env_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("BUNITBENCH_CACHE_DIR", str(tmp_path / "cache"))
    assert default_cache_path() == tmp_path / "cache" / "autotune.json"
    model = _cifar_bunit()
    timer = _ScriptedTimer({"loop": 1e-3, "grouped": 2e-3, "grouped_cl": 3e-3, "blockdiag": 1e-4, "bmm": 4e-3})
    chosen = autotune(model, torch.randn(2, 3, 32, 32), backends=["grouped", "loop"], timer=timer, repeats=1)
    assert set(chosen.values()) == {"loop"}
    assert {b for _, b in timer.calls} == {"grouped", "loop"}
    assert (tmp_path / "cache" / "autotune.json").exists()


def test_autotune_compiled_builds_on_fastest_eager(tmp_path):
    layer = UnitLayer(["4x2-4-2"])
    model = nn.Sequential(layer)
    timer = _ScriptedTimer({"loop": 3e-3, "grouped": 2e-3, "bmm": 1e-3, "compiled": 5e-4})
    bases = []
    timer_calls = timer.__call__

    def spy(layer_, x, backend, repeats):
        if backend == "compiled":
            bases.append(layer_.compile_base)
        return timer_calls(layer_, x, backend, repeats)

    chosen = autotune(model, torch.randn(2, 8, 6, 6), backends=["loop", "grouped", "bmm", "compiled"],
                      cache_path=tmp_path / "c.json", timer=spy, repeats=1)
    assert bases == ["bmm"]  # compiled is timed as the compile of the fastest eager backend
    assert chosen == {"0": "compiled"} and layer.compile_base == "bmm"
    fresh = UnitLayer(["4x2-4-2"])
    autotune(nn.Sequential(fresh), torch.randn(2, 8, 6, 6), backends=["loop", "grouped", "bmm", "compiled"],
             cache_path=tmp_path / "c.json", timer=spy, repeats=1)
    assert fresh.backend == "compiled" and fresh.compile_base == "bmm" and bases == ["bmm"]  # from the cache


def test_autotune_real_timings_choose_measured_median(tmp_path):
    layer = UnitLayer(["8x2-4-2"])
    model = nn.Sequential(layer).train()
    chosen = autotune(model, torch.randn(8, 16, 8, 8), cache_path=tmp_path / "t.json", repeats=3)
    timings = layer.autotune_ms
    assert set(timings) == set(EAGER_BACKENDS)
    assert chosen == {"0": min(timings, key=timings.get)} and layer.backend == chosen["0"]
    assert model.training  # mode restored
    stored = json.loads((tmp_path / "t.json").read_text())["entries"]
    assert [e["timings_ms"] for e in stored.values()] == [timings]


def test_autotune_rejects_unknown_backend(tmp_path):
    with pytest.raises(ValueError, match="backends"):
        autotune(nn.Sequential(UnitLayer(["2-4-2"])), torch.randn(1, 2, 4, 4), backends=["warp"],
                 cache_path=tmp_path / "x.json")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_backends_equal_on_cuda(tmp_path):
    layer = _layer(2, 1).cuda().eval()
    x = torch.randn(8, layer.in_channels, 16, 16, device="cuda")
    with torch.no_grad():
        outs = {}
        for b in list_backends(eager=True, device="cuda"):  # fused_cpu is a CPU kernel; on CUDA it raises
            layer.backend = b
            outs[b] = layer(x)
    for b, y in outs.items():
        assert (y - outs["loop"]).abs().max().item() < 1e-4, b
    chosen = autotune(nn.Sequential(layer), x, cache_path=tmp_path / "gpu.json", repeats=5)
    assert chosen["0"] == min(layer.autotune_ms, key=layer.autotune_ms.get)
