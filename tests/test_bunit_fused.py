"""The ``fused_cpu`` backend: the C++ unit kernel equals the reference units; fallbacks and refusals are explicit.

The extension is built once into the default cache (``$BUNITBENCH_CACHE_DIR`` or ``~/.cache/bunitbench``) and
reused by later runs. These tests are skipped only where no C++ compiler exists; with one present, a failing
build fails them.
"""
from __future__ import annotations

import os
import shutil

import pytest
import torch
import torch.nn as nn

from bunit import fused_cpu
from bunit.autotune import autotune
from bunit.blocks import BUnitBasicBlock
from bunit.layers import UnitLayer
from bunit.spec import CATALOGUE, hybrid_mix
from conftest import spread_bn

RTOL = 1e-4


@pytest.fixture(scope="module", autouse=True)
def extension():
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        pytest.skip("no C++ compiler on this machine: the fused_cpu backend cannot be built")
    return fused_cpu.load_extension()  # a compiler is present: a failing build is an error, not a skip


def _rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y - ref).abs().max() / ref.abs().max().clamp_min(1e-12)).item()


def _fused_vs_reference(specs, stride: int, shape: tuple[int, int, int], seed: int = 0,
                        residual: bool = False) -> float:
    torch.manual_seed(seed)
    layer = spread_bn(UnitLayer(specs, stride=stride), seed).eval()
    reference = layer.to_impl("reference").eval()
    batch, h, w = shape
    x = torch.randn(batch, layer.in_channels, h, w)
    layer.backend = "fused_cpu"
    with torch.no_grad():
        ref = reference(x)
        r = torch.randn_like(ref) if residual else None
        y = layer(x, residual=r)
        ref = ref if r is None else torch.relu(ref + r)
    assert y.shape == ref.shape
    return _rel_err(y, ref)


# catalogue shapes, the uniform 2-4 plan shapes, other 3x3 shapes (channels at run time) and other kernels (generic)
SPECS = [*CATALOGUE, "2-4-2", "2-4-4", "2-3-5", "2-2-2", "4-4-8", "8-8-8", "1-2-1/k5", "2-2-2/k1"]


@pytest.mark.parametrize("spec", SPECS)
@pytest.mark.parametrize("stride", [1, 2])
def test_every_unit_shape_equals_reference(spec, stride):
    for shape in [(1, 7, 9), (3, 16, 16), (2, 13, 5), (1, 1, 1)]:  # odd sizes, a full vector, a single pixel
        assert _fused_vs_reference([f"3x{spec}"], stride, shape) < RTOL, (spec, stride, shape)


def test_specialised_and_generic_paths():
    assert all(fused_cpu.has_variant(UnitLayer([f"{s}/s{st}"]).specs[0]) for s in CATALOGUE for st in (1, 2))
    assert not fused_cpu.has_variant(UnitLayer(["2-3-5"]).specs[0])


@pytest.mark.parametrize("stride", [1, 2])
def test_hybrid_layer_with_scattered_groups_and_residual(stride):
    specs = hybrid_mix(22, 30, CATALOGUE, 3)  # units of one spec are not adjacent: in/out channels interleave
    layer = UnitLayer(specs)
    assert any(rng is None for rng in layer._in_ranges)
    assert _fused_vs_reference(specs, stride, (4, 11, 10)) < RTOL
    assert _fused_vs_reference(specs, stride, (2, 9, 17), residual=True) < RTOL


def test_large_batch_and_plane_tiles():
    # 48x48 with b=4 hidden channels needs several row tiles; batch 64 spreads over threads
    assert _fused_vs_reference(["8x2-4-2"], 1, (2, 48, 48)) < RTOL
    assert _fused_vs_reference(["8x2-4-4"], 2, (64, 8, 8)) < RTOL


@pytest.mark.parametrize("stride", [1, 2])
def test_row_widths_of_every_input_copy_path(stride):
    # rows are copied in vectors of 16 and 8 (stride 1) or split into even and odd columns 32 and 16 at a time
    # (stride 2), the rest one by one: widths that end in each of those, and odd heights
    for w in (7, 8, 16, 24, 31, 32, 34, 48, 57, 64):
        assert _fused_vs_reference(["3x2-4-4"], stride, (2, 5, w)) < RTOL, (stride, w)
        assert _fused_vs_reference(["3x1-2-3"], stride, (1, w, 3), residual=True) < RTOL, (stride, w)


def test_basic_block_adds_shortcut_in_kernel():
    conv = nn.Conv2d(16, 16, 3, padding=1, bias=False)
    dense = nn.Module()
    dense.conv1, dense.bn1, dense.conv2, dense.bn2 = conv, nn.BatchNorm2d(16), conv, nn.BatchNorm2d(16)
    block = spread_bn(BUnitBasicBlock.from_block(dense, ["8x2-4-2"]), 1).eval()
    x = torch.randn(3, 16, 12, 12)
    with torch.no_grad():
        ref = block(x)
        block.units.backend = "fused_cpu"
        y = block(x)
    assert _rel_err(y, ref) < RTOL
    assert (y >= 0).all() and (ref - torch.relu(block.units.to_impl("reference")(x) + x)).abs().max() < 1e-5


@pytest.mark.parametrize("cin, cout, stride, hw", [(16, 32, 2, 16), (8, 16, 2, 9), (6, 12, 1, 7), (8, 8, 1, 6)])
def test_option_a_shortcut_read_in_kernel(cin, cout, stride, hw):
    from harness.core.models import PadShortcut

    dense = nn.Module()
    dense.conv1, dense.bn1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False), nn.BatchNorm2d(cout)
    dense.conv2, dense.bn2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout)
    dense.shortcut = PadShortcut(cin, cout, stride)
    block = spread_bn(BUnitBasicBlock.from_block(dense, [f"{cin // 2}x2-4-{2 * cout // cin}"]), 2).eval()
    assert block._pad_map == (stride, (cout - cin) // 2)
    x = torch.randn(3, cin, hw, hw)
    with torch.no_grad():
        ref = torch.relu(block.units.to_impl("reference")(x) + dense.shortcut(x))
        grouped = block(x)  # grouped backend: the shortcut module runs
        block.units.backend = "fused_cpu"
        y = block(x)  # the kernel reads the shortcut from x
    assert _rel_err(grouped, ref) < RTOL and _rel_err(y, ref) < RTOL
    assert ((y - ref).abs() > 1e-3).sum() == 0


def _layouts(x: torch.Tensor) -> dict[str, torch.Tensor]:
    """The same values as ``x`` in other memory layouts: channels_last, and a strided view of a wider tensor."""
    wide = torch.randn(x.shape[0], x.shape[1], x.shape[2], 2 * x.shape[3])
    wide[..., ::2] = x
    return {"channels_last": x.contiguous(memory_format=torch.channels_last), "strided view": wide[..., ::2]}


@pytest.mark.parametrize("spec", ["2-4-2", "2-4-4", "1-2-3", "2-3-5"])  # specialised and generic
@pytest.mark.parametrize("stride", [1, 2])
def test_any_input_layout_gives_the_same_output(spec, stride):
    torch.manual_seed(3)
    layer = spread_bn(UnitLayer([f"4x{spec}"], stride=stride), 3).eval()
    layer.backend = "fused_cpu"
    x = torch.randn(3, layer.in_channels, 11, 9)
    with torch.no_grad():
        y = layer(x)
        r = torch.randn_like(y)
        y_res = layer(x, residual=r)
        for name, other in _layouts(x).items():
            assert not other.is_contiguous()
            assert torch.equal(layer(other), y), name  # read through strides: the same arithmetic, bit for bit
            for rname, r_other in _layouts(r).items():
                assert torch.equal(layer(other, residual=r_other), y_res), (name, rname)
    assert y.is_contiguous()


def test_option_a_shortcut_from_channels_last_input():
    from harness.core.models import PadShortcut

    dense = nn.Module()
    dense.conv1, dense.bn1 = nn.Conv2d(16, 32, 3, 2, 1, bias=False), nn.BatchNorm2d(32)
    dense.conv2, dense.bn2 = nn.Conv2d(32, 32, 3, 1, 1, bias=False), nn.BatchNorm2d(32)
    dense.shortcut = PadShortcut(16, 32, 2)
    block = spread_bn(BUnitBasicBlock.from_block(dense, ["8x2-4-4"]), 4).eval()
    block.units.backend = "fused_cpu"
    x = torch.randn(2, 16, 10, 10)
    with torch.no_grad():
        ref = torch.relu(block.units.to_impl("reference")(x) + dense.shortcut(x))
        y = block(x)
        y_cl = block(x.contiguous(memory_format=torch.channels_last))
    assert _rel_err(y, ref) < RTOL and torch.equal(y_cl, y)


def test_training_mode_runs_grouped_and_learns():
    layer = spread_bn(UnitLayer(["4x2-4-2"]), 0)
    twin = UnitLayer(["4x2-4-2"])
    twin.load_state_dict(layer.state_dict())
    layer.backend = "fused_cpu"
    x = torch.randn(4, 8, 6, 6)
    y, y_ref = layer(x), twin(x)  # train mode: both run the grouped convolutions
    assert torch.equal(y, y_ref)
    y.square().mean().backward()
    assert all(p.grad is not None for p in layer.parameters())
    assert int(layer.groups[0].bn1.num_batches_tracked) == 1
    layer.eval()
    x.requires_grad_()
    y = layer(x)  # eval, but autograd records: grouped again, so the gradient reaches the input
    y.sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


def test_folded_weights_follow_updates():
    layer = spread_bn(UnitLayer(["4x2-4-2"]), 0).eval()
    layer.backend = "fused_cpu"
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        y0 = layer(x)
        cached = layer.caches[fused_cpu.FOLD_CACHE][1][0][0]
        layer(x)
        assert layer.caches[fused_cpu.FOLD_CACHE][1][0][0] is cached  # nothing changed: the folded weights are reused
        layer.groups[0].bn2.running_var.mul_(4.0)  # an in-place update of a BN statistic
        y1 = layer(x)
        assert layer.caches[fused_cpu.FOLD_CACHE][1][0][0] is not cached
        layer.backend = "grouped"
        y_ref = layer(x)
    assert (y1 - y0).abs().max() > 1e-3 and _rel_err(y1, y_ref) < RTOL


def test_refuses_other_dtypes_clearly():
    layer = UnitLayer(["2-4-2"]).double().eval()
    layer.backend = "fused_cpu"
    with torch.no_grad(), pytest.raises(ValueError, match="allowed: cpu, torch.float32"):
        layer(torch.randn(1, 2, 4, 4, dtype=torch.float64))


def test_unavailable_backend_is_never_chosen(tmp_path, monkeypatch):
    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setattr(fused_cpu, "_build", lambda *args: (_ for _ in ()).throw(OSError("no c++ here")))
    assert not fused_cpu.is_available()
    info = fused_cpu.build_info()
    assert info["available"] is False and "no c++ here" in info["error"]
    layer = UnitLayer(["4x2-4-2"])
    layer.backend = "fused_cpu"
    with torch.no_grad(), pytest.raises(RuntimeError, match=r"unavailable: OSError: no c\+\+ here"):
        layer.eval()(torch.randn(1, 8, 4, 4))
    chosen = autotune(nn.Sequential(layer), torch.randn(2, 8, 6, 6), backends=["grouped", "fused_cpu"],
                      cache_path=tmp_path / "t.json", repeats=3)
    assert chosen == {"0": "grouped"} and set(layer.autotune_ms) == {"grouped"}


def test_layer_made_in_inference_mode():
    with torch.inference_mode():  # weights are inference tensors: no version counters, so nothing is cached
        layer = spread_bn(UnitLayer(["4x2-4-2"]), 0).eval()
        x = torch.randn(2, 8, 6, 6)
        ref = layer(x)
        for backend in ("fused_cpu", "blockdiag"):
            layer.backend = backend
            y0 = layer(x)
            layer.groups[0].bn2.running_var.mul_(4.0)
            y1 = layer(x)
            layer.groups[0].bn2.running_var.div_(4.0)
            assert _rel_err(y0, ref) < RTOL and (y1 - y0).abs().max() > 1e-3, backend


def test_no_compiler_for_the_kernel_library_leaves_the_backend_unavailable_with_one_line(tmp_path, monkeypatch):
    """The kernel library is built before the extension that links it; without a compiler that build says so in
    one line, and the backend records it as its error (nothing else is tried)."""
    monkeypatch.setattr(fused_cpu, "_state", {})
    monkeypatch.setenv("BUNITBENCH_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-g++"))
    with pytest.raises(RuntimeError, match=r"^unit kernel: no C\+\+ compiler found \(g\+\+, c\+\+ or \$CXX\)$"):
        fused_cpu.kernel_library()
    assert not fused_cpu.is_available()
    info = fused_cpu.build_info()
    assert info["available"] is False and info["error"].endswith("unit kernel: no C++ compiler found (g++, c++ or $CXX)")
    assert not list(tmp_path.rglob("*.so"))  # neither the library nor the extension was built
