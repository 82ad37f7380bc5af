"""The ``unit_train`` training path gives the gradients, outputs and BN statistics of the ``grouped`` backend.

The kernel (:mod:`bunit.unit_train`) replaces only the grouped 3x3 convolutions; these tests check it against
``F.conv2d`` (gradcheck in float64) and whole unit layers against ``grouped`` in float32 within 1e-4 relative
(outputs, input gradient, every parameter gradient, BN running statistics and weights after an SGD step) on every
catalogue shape and the shapes the cost-target planner picks, strides 1 and 2, with and without a residual.
"""
from __future__ import annotations

import copy
import subprocess
import sysconfig

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.cpp_extension import include_paths

from bunit import unit_rows, unit_train
from bunit.fused_cpu import cxx_compiler
from bunit.layers import UnitLayer
from bunit.spec import CATALOGUE, hybrid_mix
from conftest import spread_bn, torch_threads

# No skip when the extension does not build: a compiler is present wherever the tests run, so a failing build is an
# error (and asking at collection would build it there, in every xdist worker, before the session's fixture)
pytestmark = pytest.mark.usefixtures("one_thread")

RTOL = 1e-4  # float32, relative to the largest magnitude of the reference tensor

# (specs, in_channels) of the layers the planner and the paper build: uniform rows of the plan family
# (baselines/bunit_plan.py SHAPES), catalogue hybrids, and every catalogue shape alone.
PLANNER_ROWS = [["2x8-8-8"], ["8x2-1-2"], ["16x2-1-2"], ["8x2-1-4"], ["4x8-8-16"], ["8x2-4-2"], ["4x4-4-4"],
                ["8x1-2-1"], ["16x1-1-1"], ["4x2-2-2"]]
CATALOGUE_ROWS = [[f"3x{s}"] for s in CATALOGUE]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize("march", ["x86-64-v3", pytest.param("skylake-avx512", marks=pytest.mark.slow)])  # 7 s each
def test_kernel_source_compiles_for_cpus_without_avx512_bf16(march):
    """The extension is built with ``-march=native``, and this project's machines have differed (AVX2 only, or AVX-512
    with AVX512-BF16): the kernel's source compiles for an AVX2 CPU and for an AVX-512 CPU without AVX512-BF16 too
    (their float32 paths; ``-fsyntax-only`` with the extension's include paths). While calls of the channels_last
    kernels stood in ``if constexpr`` branches of plain functions (compiled, though discarded) it did not, and such
    CPUs had no ``unit_train``."""
    compiler = cxx_compiler()
    assert compiler, "no C++ compiler: the extension cannot be built here either"
    cmd = [compiler, "-fsyntax-only", "-std=c++17", f"-march={march}", "-fopenmp", "-DTORCH_EXTENSION_NAME=check",
           *[f"-I{p}" for p in include_paths()], f"-I{sysconfig.get_paths()['include']}", str(unit_train._SOURCE)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-3000:]


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_kernel_float64(stride):
    gen = torch.Generator().manual_seed(stride)
    for groups, a, b, h, w in [(2, 2, 3, 5, 6), (3, 1, 2, 4, 3), (1, 3, 1, 1, 2)]:
        x = torch.randn(2, groups * a, h, w, dtype=torch.float64, generator=gen, requires_grad=True)
        weight = torch.randn(groups * b, a, 3, 3, dtype=torch.float64, generator=gen, requires_grad=True)
        out = unit_train.UnitConv.apply(x, weight, groups, stride)
        torch.testing.assert_close(out, F.conv2d(x, weight, None, stride, 1, groups=groups), rtol=1e-12, atol=1e-12)
        assert torch.autograd.gradcheck(lambda t, wt: unit_train.UnitConv.apply(t, wt, groups, stride), (x, weight))


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_layer_float64_train_mode(stride):
    """The whole layer in training mode (BN with batch statistics), residual included, in float64."""
    torch.manual_seed(stride)
    layer = spread_bn(UnitLayer(["2-1-2", "1-2-3", "1-2-1"], stride=stride), 3).double().train()
    layer.backend = "unit_train"
    x = torch.randn(2, layer.in_channels, 4, 3, dtype=torch.float64, requires_grad=True)
    res = torch.randn(2, layer.out_channels, (4 - 1) // stride + 1, (3 - 1) // stride + 1, dtype=torch.float64,
                      requires_grad=True)
    assert torch.autograd.gradcheck(lambda t, r: layer(t, residual=r), (x, res), fast_mode=True)
    params = list(layer.parameters())
    assert torch.autograd.gradcheck(lambda *ps: torch.func.functional_call(
        layer, dict(zip([n for n, _ in layer.named_parameters()], ps)), (x.detach(),)), tuple(
        p.detach().clone().requires_grad_() for p in params), fast_mode=True)


def _step(layer: UnitLayer, x: torch.Tensor, residual: torch.Tensor | None, grad: torch.Tensor) -> dict:
    """One SGD step; what it produced: output, input and residual gradients, parameter grads, state after."""
    x = x.clone().requires_grad_()
    res = None if residual is None else residual.clone().requires_grad_()
    opt = torch.optim.SGD(layer.parameters(), lr=0.1, momentum=0.9)
    out = layer(x, residual=res)
    out.backward(grad)
    grads = {n: p.grad.clone() for n, p in layer.named_parameters()}
    opt.step()
    return {"out": out.detach(), "x.grad": x.grad, "res.grad": None if res is None else res.grad,
            **{f"grad:{n}": g for n, g in grads.items()}, **{f"state:{n}": t.clone() for n, t in
                                                              layer.state_dict().items()}}


def _compare(specs, *, stride: int, batch: int, size: int, residual: bool, seed: int = 0,
             channels_last: bool = False) -> None:
    torch.manual_seed(seed)
    ref = spread_bn(UnitLayer(specs, stride=stride), seed).train()
    new = spread_bn(UnitLayer(specs, stride=stride), seed).train()
    new.load_state_dict(ref.state_dict())
    new.backend = "unit_train"
    x = torch.randn(batch, ref.in_channels, size, size)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    side = (size - 1) // stride + 1
    r = torch.randn(batch, ref.out_channels, side, side) if residual else None
    grad = torch.randn(batch, ref.out_channels, side, side)
    want, got = _step(ref, x, r, grad), _step(new, x, r, grad)
    assert want.keys() == got.keys()
    for key in want:
        if want[key] is None:
            assert got[key] is None
            continue
        if want[key].dtype == torch.long:  # num_batches_tracked
            assert torch.equal(got[key], want[key]), key
            continue
        assert _rel(got[key], want[key]) <= RTOL, f"{key}: relative difference {_rel(got[key], want[key]):.2e}"


@pytest.mark.parametrize("specs", CATALOGUE_ROWS + PLANNER_ROWS, ids=lambda s: ",".join(s))
@pytest.mark.parametrize("stride", [1, 2])
def test_float32_matches_grouped(specs, stride):
    with torch_threads(2):
        _compare(specs, stride=stride, batch=4, size=9, residual=stride == 1)


@pytest.mark.parametrize("stride", [1, 2])
@pytest.mark.parametrize("residual", [False, True])
def test_float32_hybrid_rows_match_grouped(stride, residual):
    """Catalogue hybrids as the paper and the planner draw them (several groups, gathered inputs, permuted outputs)."""
    for seed, (cin, cout) in enumerate([(16, 16), (32, 32), (16, 32)]):
        _compare(hybrid_mix(cin, cout, CATALOGUE, seed), stride=stride, batch=3, size=8, residual=residual,
                 seed=seed)


@pytest.mark.parametrize("batch", [1, 2, 5])
def test_float32_small_batches_and_layouts(batch):
    _compare(["2x8-8-8"], stride=1, batch=batch, size=12, residual=True, channels_last=batch == 5)
    _compare(["8x2-1-4"], stride=2, batch=batch, size=11, residual=False, channels_last=batch != 5)


@pytest.mark.parametrize("size", [32, 37])
def test_float32_stride2_rows_past_one_vector_pair(size):
    """A stride-2 conv reads its input split by column phase and writes its input gradient merged back, 32 columns
    at a time: rows of one whole chunk (32) and of a whole and a part chunk (37), NCHW and channels_last."""
    _compare(["2x2-1-4"], stride=2, batch=2, size=size, residual=False)
    _compare(["2x2-1-4"], stride=2, batch=2, size=size, residual=False, channels_last=True)


@pytest.mark.slow
@pytest.mark.parametrize("specs,stride,size", [(["2x8-8-8"], 1, 28), (["8x2-1-4"], 2, 28), (["16x2-1-2"], 1, 14),
                                               (["16x2-1-4"], 2, 14), (["32x2-1-2"], 1, 7), (["4x8-8-16"], 2, 14)])
@pytest.mark.parametrize("batch", [32, 128])
def test_float32_large_batches(specs, stride, size, batch):
    """Each of the layer's convolutions (forward, input and weight gradient) against ``F.conv2d`` at ResNet-20's
    planes, and the layer's output and BN running statistics against ``grouped``.

    Whole-layer gradients are compared at small batches (above): at batch 128 a few of the ~1.6M ReLU inputs lie
    within float32 rounding of zero and switch either way, in ``grouped`` as in ``unit_train`` (here both then
    differ from the float64 result by up to 5-15% at single elements of the input gradient).
    """
    torch.manual_seed(batch)
    layer = UnitLayer(specs, stride=stride)
    side = (size - 1) // stride + 1
    for grp, (cin, hw, s) in zip(layer.groups, [(layer.in_channels, size, stride)]):
        for conv, c_in, h, st in [(grp.conv1, cin, hw, s), (grp.conv2, grp.conv1.out_channels, side, 1)]:
            x = torch.randn(batch, c_in, h, h, requires_grad=True)
            out = unit_train.UnitConv.apply(x, conv.weight, conv.groups, st)
            ref = F.conv2d(x, conv.weight, None, st, 1, groups=conv.groups)
            assert _rel(out, ref) <= RTOL
            g = torch.randn_like(ref)
            got = torch.autograd.grad(out, (x, conv.weight), g)
            want = torch.autograd.grad(ref, (x, conv.weight), g)
            assert _rel(got[0], want[0]) <= RTOL and _rel(got[1], want[1]) <= RTOL
    ref = spread_bn(UnitLayer(specs, stride=stride), 1).train()
    new = UnitLayer(specs, stride=stride).train()
    new.load_state_dict(ref.state_dict())
    new.backend = "unit_train"
    x = torch.randn(batch, ref.in_channels, size, size)
    with torch.no_grad():
        assert _rel(new(x), ref(x)) <= RTOL
    for (name, a), b in zip(new.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) if a.dtype == torch.long else _rel(a, b) <= RTOL, name


@pytest.mark.parametrize("shape", [(3, 4, 2, 2, 1, 10, 13), (2, 16, 8, 8, 2, 9, 9), (2, 8, 16, 1, 1, 28, 28),
                                   (2, 6, 12, 3, 2, 20, 17)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_storage_is_the_float32_kernel_rounded_once(shape, channels_last):
    """bfloat16 storage (the fused path under autocast) widens on load and rounds to nearest even on store: every
    kernel call on bf16 tensors equals, bit for bit, the same call in float32 on the widened values with its tensor
    results rounded by ``Tensor.bfloat16()``; the batch sums are those of the stored (rounded) outputs; the weight
    gradient stays float32."""
    n, cin, cout, groups, s, h, w = shape
    ext = unit_train.load_extension()
    gen = torch.Generator().manual_seed(cout + s)
    x = torch.randn(n, cin, h, w, generator=gen).bfloat16()
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    w1 = torch.randn(cout, cin // groups, 3, 3, generator=gen)
    y, st = ext.conv_forward_stats(x, w1, groups, s)
    y32, _ = ext.conv_forward_stats(x.float(), w1, groups, s)
    assert y.dtype == torch.bfloat16 and torch.equal(y, y32.bfloat16())
    stored = torch.stack([y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3))])
    torch.testing.assert_close(st, stored, rtol=1e-6, atol=1e-6)  # float lanes, then double
    sc, sh = torch.rand(cout, generator=gen) + 0.5, torch.randn(cout, generator=gen) * 0.3
    w2 = torch.randn(cout, 1, 3, 3, generator=gen)
    y2, _ = ext.conv_forward_stats(y, w2, cout, 1, sc, sh)  # input through BN and ReLU while padded
    assert torch.equal(y2, ext.conv_forward_stats(y.float(), w2, cout, 1, sc, sh)[0].bfloat16())
    out = ext.bn_relu_apply(y, sc, sh, channels_last)
    assert torch.equal(out, ext.bn_relu_apply(y.float(), sc, sh, channels_last).bfloat16())
    assert out.is_contiguous(memory_format=torch.channels_last if channels_last else torch.contiguous_format)
    g = torch.randn(y.shape, generator=gen).bfloat16()
    a, b = torch.randn(cout, generator=gen) * 0.01, torch.randn(cout, generator=gen) * 0.01
    gx, gw = ext.conv_backward_bn(x, w1, g, y, sc, sh, a, b, groups, s, None, None, True, True)
    gx32, gw32 = ext.conv_backward_bn(x.float(), w1, g.float(), y.float(), sc, sh, a, b, groups, s, None, None, True,
                                      True)
    assert gx.dtype == torch.bfloat16 and torch.equal(gx, gx32.bfloat16())
    assert gw.dtype == torch.float32 and torch.equal(gw, gw32)
    assert torch.equal(ext.bn_relu_grad_sums(g, y, sc, sh), ext.bn_relu_grad_sums(g.float(), y.float(), sc, sh))


def test_bf16_store_rounds_ties_to_even_as_torch_does():
    """A float32 result stored as bf16 rounds to nearest, ties to even, with overflow to infinity and NaN kept:
    the products 1 * w of a centre-only 3x3 filter, in whole vectors (16 columns) and in the tail (17th)."""
    ext = unit_train.load_extension()
    centre = torch.tensor([1 + 2 ** -8, 1 + 3 * 2 ** -8, -(1 + 2 ** -8), 1 + 2 ** -9, 3.0e38, 3.4e38, float("inf"),
                           float("nan")])
    w = torch.zeros(len(centre), 1, 3, 3)
    w[:, 0, 1, 1] = centre
    y, _ = ext.conv_forward_stats(torch.ones(1, len(centre), 2, 17, dtype=torch.bfloat16), w, len(centre), 1)
    want = centre.bfloat16().view(1, -1, 1, 1).expand_as(y)
    assert torch.equal(y[:, :-1], want[:, :-1]) and torch.isnan(y[:, -1]).all()
    assert want[0, 0, 0, 0] == 1 and want[0, 1, 0, 0] == 1 + 2 ** -6 and torch.isinf(want[0, 5, 0, 0])  # ties, overflow


def _within_bf16_rounding(got: torch.Tensor, want: torch.Tensor) -> bool:
    """Each value within one bf16 rounding (2^-8 relative) of the float64 reference, plus float32 summation slack."""
    want = want.double()
    return bool(((got.double() - want).abs() <= 2 ** -8 * want.abs() + 1e-5 * want.abs().max()).all())


@pytest.mark.parametrize("shape", [(2, 16, 16, 2, 1, 28, 28), (3, 4, 2, 2, 1, 10, 13), (2, 6, 12, 3, 2, 20, 17),
                                   (2, 16, 8, 8, 1, 9, 9), (2, 8, 16, 1, 2, 7, 7),
                                   # rows of up to 8 at stride 1: 8-lane dot products (forward and backward)
                                   (2, 16, 16, 2, 1, 7, 7), (3, 4, 4, 2, 1, 5, 8), (2, 4, 8, 4, 1, 7, 6),
                                   # odd counts past one pair: the last channel paired with zeros
                                   (2, 6, 9, 3, 1, 7, 7), (2, 9, 6, 3, 1, 14, 14),
                                   # flattened planes (output planes of up to 7 columns, NCHW): taller than wide, one
                                   # column; at stride 2 phase planes, odd sides
                                   (2, 4, 6, 2, 1, 9, 5), (3, 8, 8, 4, 1, 3, 1), (2, 4, 6, 2, 2, 13, 9),
                                   (2, 6, 3, 3, 2, 16, 14),
                                   # stride 2: 8-lane rows (a 4x8-8-16/s2 conv1 at 14 px), odd sides, 16-lane rows
                                   # with a second vector of input columns (w > 16), odd output-channel counts
                                   (3, 32, 32, 4, 2, 14, 14), (2, 8, 8, 1, 2, 9, 15), (2, 4, 6, 2, 2, 28, 28),
                                   (2, 6, 9, 3, 2, 13, 35)])
@pytest.mark.parametrize("channels_last", [False, True])
def test_bf16_dot_products_sum_bf16_rounded_operands_in_float32(shape, channels_last):
    """With bf16_dot the kernel multiplies bf16 operands: the weights, conv2's input relu(y1 * sc) and the output
    gradient taken through BN are rounded to bf16 (nearest even), the products summed in float32. Forward and input
    gradient (stored bf16) are within one bf16 rounding of float64 convolutions of the rounded operands; the weight
    gradient (float32, not rounded on output) within 1e-5, while the float32-multiply path, which does not round the
    gradient, is about 1e-3 away from it. An odd count per group (the forward's input channels, the input gradient's
    output channels) pairs its last channel with zeros, so it is rounded the same way. Strides 1 and 2 (the input
    gradient at stride 2 by its own kernel: each input row and column phase from its own taps), odd output heights (a
    row pair with one row), odd input sides at stride 2 (a row phase with one row fewer), rows of up to 8 and of more
    than 16 phase columns."""
    n, cin, cout, groups, s, h, w = shape
    ext = unit_train.load_extension()
    if not ext.has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: the extension is built without bf16 dot products")
    gen = torch.Generator().manual_seed(cin * cout + s)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(n, cin, h, w, generator=gen).bfloat16().contiguous(memory_format=fmt)
    wt = torch.randn(cout, cin // groups, 3, 3, generator=gen)
    wr = wt.bfloat16().double()
    isc = torch.rand(cin, generator=gen) + 0.5  # y * isc rounds once in float32, as torch rounds it (no shift)
    for bn_in in (False, True):
        y, st = ext.conv_forward_stats(x, wt, groups, s, *((isc, torch.zeros(cin)) if bn_in else ()), bf16_dot=True)
        xin = torch.relu(x.float() * isc.view(1, -1, 1, 1)) if bn_in else x
        want = F.conv2d(xin.bfloat16().double(), wr, None, s, 1, groups=groups)
        assert _within_bf16_rounding(y, want)
        stored = torch.stack([y.double().sum((0, 2, 3)), y.double().square().sum((0, 2, 3))])
        torch.testing.assert_close(st, stored, rtol=1e-6, atol=1e-6)
    sc = torch.rand(cout, generator=gen) + 0.5
    g = torch.randn(y.shape, generator=gen).bfloat16()
    zeros = torch.zeros(cout)  # A = B = 0 and no shift: the transformed gradient is g * sc where y * sc > 0
    gx, gw = ext.conv_backward_bn(x, wt, g, y, sc, zeros, zeros, zeros, groups, s, None, None, True, True,
                                  bf16_dot=True)
    gt = torch.where(y.float() * sc.view(1, -1, 1, 1) > 0, g.float() * sc.view(1, -1, 1, 1), torch.zeros(()))
    xd = x.double().requires_grad_()
    wd = wr.clone().requires_grad_()
    F.conv2d(xd, wd, None, s, 1, groups=groups).backward(gt.bfloat16().double())
    assert gw.dtype == torch.float32 and _rel(gw.double(), wd.grad) <= 1e-5
    want = xd.grad
    assert gx.dtype == torch.bfloat16 and gx.is_contiguous(memory_format=fmt)
    assert _within_bf16_rounding(gx, want)
    _, gw32 = ext.conv_backward_bn(x, wt, g, y, sc, zeros, zeros, zeros, groups, s, None, None, False, True)
    assert _rel(gw32.double(), wd.grad) > 1e-4  # float32 multiplies: the unrounded gradient


@pytest.mark.parametrize("shape", [(4, 64, 64, 8, 1, 7, 7), (3, 32, 64, 4, 1, 7, 7), (2, 6, 9, 3, 1, 9, 5),
                                   (3, 8, 4, 4, 1, 2, 7), (5, 4, 6, 2, 1, 1, 1), (2, 14, 21, 7, 1, 12, 3),
                                   # stride 2: the input in phase planes (14 px to 7, odd sides, 16 columns to 8)
                                   (4, 32, 32, 4, 2, 14, 14), (3, 6, 9, 3, 2, 13, 11), (2, 4, 4, 2, 2, 1, 2),
                                   (2, 8, 6, 2, 2, 20, 13)])
def test_flattened_planes_compute_what_padded_rows_compute(shape):
    """Output planes of up to 7 columns (NCHW, bf16 dot products) run flattened in rows of 8 words, built whole and
    placed by word expands (at stride 2 the input split into phase planes row by row): the forward, its BN sums and
    the input gradient equal, bit for bit, what the padded rows compute (the same rounded operands, the same order of
    products per output); the weight gradient, summed over pixel pairs in another order, to float32 rounding. Every
    path: BN1 + ReLU on the input, the gradient through BN (shift, A and B nonzero), the identity shortcut's gradient
    added (stride 1), the input or the weight gradient alone; 8-8-8 and 8-8-16 groups at 7 px, a 4x8-8-8/s2 conv1 at
    14 px, odd channel counts and sides, taller than wide, one row, one pixel."""
    n, cin, cout, groups, s, h, w = shape
    ext = unit_train.load_extension()
    if not (ext.has_bf16_dot() and ext.has_flat_planes()):
        pytest.skip("this CPU lacks AVX512-BF16 or AVX512-VBMI2: the extension is built without flattened planes")
    gen = torch.Generator().manual_seed(n * cin + h)
    x = torch.randn(n, cin, h, w, generator=gen).bfloat16()
    wt = torch.randn(cout, cin // groups, 3, 3, generator=gen) * 0.3
    isc, ish = torch.rand(cin, generator=gen) + 0.5, torch.randn(cin, generator=gen) * 0.3
    sc, sh = torch.rand(cout, generator=gen) + 0.5, torch.randn(cout, generator=gen) * 0.3
    A, B = torch.randn(cout, generator=gen) * 0.1, torch.randn(cout, generator=gen) * 0.1
    add = torch.randn(x.shape, generator=gen).bfloat16()

    def run():
        out = []
        for bn_in in ((isc, ish), (None, None)):
            y, st = ext.conv_forward_stats(x, wt, groups, s, *bn_in, bf16_dot=True)
            g = torch.randn(y.shape, generator=torch.Generator().manual_seed(7)).bfloat16()
            out += [y, st]
            for need_x, need_w, extra in ((True, True, None), (True, False, add if s == 1 else None),
                                          (False, True, None)):
                out += ext.conv_backward_bn(x, wt, g, y, sc, sh, A, B, groups, s, *bn_in, need_x, need_w,
                                            bf16_dot=True, add=extra)
        return out

    flat = run()
    with unit_train.padded_row_planes():
        rows = run()
    # per input BN: y, its sums, then (gx, gw), (gx with the shortcut's gradient, None), (None, gw)
    assert len(flat) == len(rows) == 16 and all((a is None) == (k % 8 in (5, 6)) for k, a in enumerate(flat))
    for k, (a, b) in enumerate(zip(flat, rows)):
        if k % 8 in (3, 7):  # the weight gradients: float32, summed in another order
            assert a.dtype == torch.float32 and _rel(a.double(), b.double()) <= 1e-6, k
        elif a is not None:
            assert torch.equal(a, b), k
    assert unit_train.load_extension().has_flat_planes()  # the context gave the layout back


def test_bf16_autocast_fused_group_stores_bf16():
    """Under CPU bf16 autocast a fused unit group stores its output (and takes its input) in bfloat16, returns the
    input gradient in the input's dtype and the parameter gradients in float32. Its output is within bf16 rounding
    of ``grouped`` run in float32 on the same (bf16) input when it multiplies in float32; with bf16 dot products
    (operands rounded too) no further from it than ``grouped`` under autocast (within 1%)."""
    torch.manual_seed(0)
    layer = spread_bn(UnitLayer(["8x2-1-2"]), 1).train()
    ref = spread_bn(UnitLayer(["8x2-1-2"]), 1).train()
    ref.load_state_dict(layer.state_dict())
    layer.backend = "unit_train"
    for dtype in (torch.bfloat16, torch.float32):
        x = torch.randn(4, layer.in_channels, 10, 10).bfloat16().to(dtype).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
            with unit_train.float32_multiplies():
                y32 = layer(x.detach())
            autocast_grouped = ref(x.detach())
        assert y.dtype == torch.bfloat16
        y.float().square().sum().backward()
        assert x.grad.dtype == dtype
        assert all(p.grad.dtype == torch.float32 for p in layer.parameters())
        want = ref(x.detach().float())
        assert _rel(y32.float(), want) <= 2 ** -7  # one bf16 rounding of each stored tensor
        bound = 1.01 * _rel(autocast_grouped.float(), want) if unit_train.bf16_dot_products() else 2 ** -7
        assert _rel(y.float(), want) <= bound
    assert unit_train.storage_dtype(torch.float32) == torch.float32  # outside autocast
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert unit_train.storage_dtype(torch.float32) == torch.bfloat16
        assert unit_train.storage_dtype(torch.float64) == torch.float64


def test_unsupported_convs_fall_back_to_the_module():
    """A 5x5 and a 1x1 unit run their nn.Conv2d (the kernel is 3x3 only) and still match ``grouped``."""
    from bunit.spec import UnitSpec

    specs = [UnitSpec(2, 3, 2, kernel=5), UnitSpec(1, 2, 1, kernel=1), UnitSpec(2, 1, 2)]
    _compare(specs, stride=1, batch=2, size=7, residual=False)
    conv = nn.Conv2d(4, 4, 5, padding=2, groups=2, bias=False)
    assert not unit_train.supports(torch.randn(1, 4, 5, 5), conv)


def test_channels_last_stays_channels_last():
    """A channels_last input gives a channels_last output and input gradient (no layout copies around the kernel),
    with the values of the NCHW call."""
    x = torch.randn(2, 4, 7, 6).contiguous(memory_format=torch.channels_last).requires_grad_()
    weight = torch.randn(6, 2, 3, 3, requires_grad=True)
    out = unit_train.UnitConv.apply(x, weight, 2, 1)
    assert out.is_contiguous(memory_format=torch.channels_last) and not out.is_contiguous()
    (gx,) = torch.autograd.grad(out, x, torch.ones_like(out))
    assert gx.is_contiguous(memory_format=torch.channels_last)
    xn = x.detach().contiguous().requires_grad_()
    out_n = unit_train.UnitConv.apply(xn, weight, 2, 1)
    (gx_n,) = torch.autograd.grad(out_n, xn, torch.ones_like(out_n))
    assert torch.equal(out, out_n) and torch.equal(gx, gx_n)


@pytest.mark.parametrize("specs,residual", [(["2x8-8-8"], "identity"), (["4x2-1-4"], "projection"),
                                             (["8x2-1-2", "2-1-2"], None)])
def test_channels_last_layer_trains_in_nchw_with_the_same_values(specs, residual):
    """In training, a ``unit_train`` layer given a channels_last input computes in NCHW (one copy in) and returns
    NCHW, bit for bit the values and gradients of the same layer given the NCHW input (identity and projection
    shortcuts added in the kernel, several groups)."""
    torch.manual_seed(0)
    layer = spread_bn(UnitLayer(specs, stride=2 if residual == "projection" else 1), 0).train()
    layer.backend = "unit_train"
    twin = copy.deepcopy(layer)
    x = torch.randn(3, layer.in_channels, 10, 10)
    side = 5 if residual == "projection" else 10
    r = torch.randn(3, layer.out_channels, side, side) if residual == "projection" else None
    grad = torch.randn(3, layer.out_channels, side, side)
    got, want = {}, {}
    for mod, fmt, into in ((layer, torch.channels_last, got), (twin, torch.contiguous_format, want)):
        xi = x.contiguous(memory_format=fmt).requires_grad_()
        ri = None if r is None else r.contiguous(memory_format=fmt).requires_grad_()
        with torch.autocast("cpu", torch.bfloat16):
            out = mod(xi, residual=xi if residual == "identity" else ri)
        out.backward(grad)
        into.update(out=out, gx=xi.grad, gr=None if ri is None else ri.grad,
                    **{n: p.grad for n, p in mod.named_parameters()})
    assert got["out"].is_contiguous()
    for key in want:
        assert (got[key] is None) == (want[key] is None) and (want[key] is None or torch.equal(got[key], want[key])), key


def _group_calls(ext, x, w1, w2, res, stride=1):
    """One 2-1-c group's kernel calls in training order (what ``_group_forward`` and ``_group_backward`` call), with
    fixed BN parameters and output gradient; every result by name."""
    n, c = w1.shape[0], w2.shape[0] // w1.shape[0]
    count = x.shape[0] * ((x.shape[2] - 1) // stride + 1) * ((x.shape[3] - 1) // stride + 1)
    gen = torch.Generator().manual_seed(5)
    g1, b1 = torch.rand(n, generator=gen) + 0.5, torch.randn(n, generator=gen) * 0.1
    g2, b2 = torch.rand(c * n, generator=gen) + 0.5, torch.randn(c * n, generator=gen) * 0.1
    cl = x.is_contiguous(memory_format=torch.channels_last) and not x.is_contiguous()
    fmt = torch.channels_last if cl else torch.contiguous_format
    y1, st1 = ext.conv_forward_stats(x, w1, n, stride, bf16_dot=True)
    m1, sc1, sh1 = ext.bn_coefficients(st1, count, g1, b1, 1e-5, torch.zeros(n), torch.ones(n), 0.1, w1)
    y2, st2 = ext.conv_forward_stats(y1, w2, n, 1, sc1, sh1, bf16_dot=True)
    m2, sc2, sh2 = ext.bn_coefficients(st2, count, g2, b2, 1e-5, torch.zeros(c * n), torch.ones(c * n), 0.1, w2)
    out = ext.bn_relu_apply(y2, sc2, sh2, cl, None if res is None else res.contiguous(memory_format=fmt))
    grad = torch.randn(out.shape, generator=gen).bfloat16().contiguous(memory_format=fmt)
    got = ext.bn_relu_grad_coefficients(grad, y2, sc2, sh2, count, m2, w2, *(() if res is None else (out,)))
    g = got[4] if res is not None else grad
    gh, gw2 = ext.conv_backward_bn(y1, w2, g, y2, sc2, sh2, got[2], got[3], n, 1, sc1, sh1, True, True,
                                   bf16_dot=True)
    dg1, db1, a1, c1 = ext.bn_relu_grad_coefficients(gh, y1, sc1, sh1, count, m1, w1)
    gx, gw1 = ext.conv_backward_bn(x, w1, gh, y1, sc1, sh1, a1, c1, n, stride, None, None, True, True,
                                   bf16_dot=True)
    return dict(y1=y1, st1=st1, y2=y2, st2=st2, out=out, g=g, dg2=got[0], db2=got[1], gh=gh, gw2=gw2, dg1=dg1,
                db1=db1, gx=gx, gw1=gw1)


@pytest.mark.parametrize("batch,units,size,outs,stride", [(3, 16, 7, 2, 1), (2, 32, 14, 2, 1), (4, 16, 5, 2, 1),
                                                          (2, 48, 6, 2, 1), (2, 16, 7, 4, 1), (3, 16, 14, 4, 2),
                                                          (2, 32, 9, 4, 2), (2, 16, 8, 2, 2), (3, 8, 7, 2, 1),
                                                          (2, 8, 28, 2, 1), (2, 8, 5, 4, 1), (3, 8, 14, 4, 2),
                                                          (2, 8, 9, 4, 2), (2, 8, 8, 2, 2), (3, 8, 11, 2, 2)])
@pytest.mark.parametrize("residual", [False, True])
def test_channels_last_rows_of_2_1_c_units_compute_what_the_nchw_kernels_do(batch, units, size, outs, stride,
                                                                            residual):
    """A row of 2-1-2 or 2-1-4 units (16k of them, stride 1 or 2, bf16 dot products) given channels_last tensors runs
    the kernels that hold 16 units per vector, and returns channels_last tensors with the values of the NCHW kernels
    (the same bf16-rounded operands, float32 sums in another order): activations and input gradients within one bf16
    rounding, weight gradients and BN's gradients within 1e-5, BN's sums within 1e-6 (relative to the largest); with
    a block's shortcut, the output pass and the ReLU's gradient too. Plane widths of 5-14 (whole blocks of 4 columns
    and single ones), odd and even sides at stride 2."""
    ext = unit_train.load_extension()
    if not ext.has_bf16_dot():
        pytest.skip("this CPU has no AVX512-BF16: the extension is built without bf16 dot products")
    gen = torch.Generator().manual_seed(units + size)
    x = torch.randn(batch, 2 * units, size, size, generator=gen).bfloat16()
    w1, w2 = torch.randn(units, 2, 3, 3, generator=gen), torch.randn(outs * units, 1, 3, 3, generator=gen)
    side = (size - 1) // stride + 1
    res = torch.randn(batch, outs * units, side, side, generator=gen).bfloat16() if residual else None
    want = _group_calls(ext, x, w1, w2, res, stride)
    got = _group_calls(ext, x.contiguous(memory_format=torch.channels_last), w1, w2, res, stride)
    for key in ("y1", "y2", "out", "g", "gh", "gx"):
        assert got[key].is_contiguous(memory_format=torch.channels_last) and not got[key].is_contiguous(), key
        assert _within_bf16_rounding(got[key], want[key]), key
    for key in ("gw1", "gw2"):
        assert _rel(got[key], want[key]) <= 1e-5, key
    for key in ("st1", "st2"):
        assert _rel(got[key], want[key]) <= 1e-6, key
    for key in ("dg1", "db1", "dg2", "db2"):  # sums over a gradient with some values a bf16 rounding apart
        assert _rel(got[key], want[key]) <= 1e-5, key


@pytest.mark.parametrize("spec,stride,shortcut", [("16x2-1-2", 1, None), ("16x2-1-2", 1, "identity"),
                                                  ("16x2-1-4", 2, None), ("8x2-1-2", 1, "identity"),
                                                  ("8x2-1-4", 2, None)])
def test_channels_last_row_of_2_1_c_units_trains_as_grouped_does(spec, stride, shortcut):
    """In a layer, a row of 16 or 8 2-1-2 (or 2-1-4 at stride 2) units under bf16 autocast runs channels_last (given
    an NCHW input: one copy in; its input gradient copied back to NCHW), and its output, input and parameter gradients
    and BN running statistics are no further from float32 than ``grouped`` under the same autocast (relative L2
    within 1.25x)."""
    if not unit_train.bf16_dot_products():
        pytest.skip("this CPU has no AVX512-BF16: no channels_last unit kernels")
    torch.manual_seed(0)
    layer = spread_bn(UnitLayer([spec], stride=stride), 1).train()
    ref = copy.deepcopy(layer)
    exact = copy.deepcopy(layer)
    layer.backend = "unit_train"
    x = torch.randn(4, layer.in_channels, 9, 9)
    side = (9 - 1) // stride + 1
    grad = torch.randn(4, layer.out_channels, side, side)

    def run(mod, autocast):
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
            assert not autocast or mod is not layer or unit_train.runs_channels_last(mod.groups[0], xi)
            out = mod(xi, residual=xi if shortcut else None)
        out.float().backward(grad)
        return out, [out.float(), xi.grad.float(), *[p.grad for p in mod.parameters()],
                     *[b.float() for b in mod.buffers() if b.is_floating_point()]]

    out, got = run(layer, True)
    assert out.is_contiguous(memory_format=torch.channels_last) and got[1].is_contiguous()  # x.grad: x's layout
    _, want = run(ref, True)
    _, exact_vals = run(exact, False)

    def dist(a, b):
        return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-12))

    for k, (a, b, e) in enumerate(zip(got, want, exact_vals)):
        assert dist(a, e) <= 1.25 * dist(b, e) + 1e-6, k


# --- the fused group path: BN (batch statistics) and ReLU inside the kernel's forward and backward -------------------


def test_training_mode_runs_the_fused_group_and_eval_mode_does_not():
    """In training mode a one-group ``unit_train`` layer runs as one :class:`UnitGroupFn` and a layer of several
    groups as one :class:`UnitLayerFn` (BN and ReLU fused, no gather or scatter of its own in the graph); with BN in
    eval mode (running statistics) the convolutions run alone and BN is PyTorch's."""
    def graph(layer, x) -> list[str]:
        seen = []

        def walk(fn):
            if fn is not None and fn not in seen:
                seen.append(fn)
                for nxt, _ in fn.next_functions:
                    walk(nxt)
        walk(layer(x).grad_fn)
        return [type(f).__name__ for f in seen if type(f).__name__ != "AccumulateGrad"]

    one = UnitLayer(["2x8-8-8"]).train()
    one.backend = "unit_train"
    x = torch.randn(2, 16, 6, 6, requires_grad=True)
    assert graph(one, x) == ["UnitGroupFnBackward"]
    layer = UnitLayer(["8x2-1-2", "2x8-8-8", "2-1-2"]).train()  # three groups, outputs permuted
    layer.backend = "unit_train"
    x = torch.randn(2, layer.in_channels, 6, 6, requires_grad=True)
    assert graph(layer, x) == ["UnitLayerFnBackward"]
    layer.eval()
    names = graph(layer, x)
    assert "UnitLayerFnBackward" not in names and "UnitConvBackward" in names


@pytest.mark.parametrize("stride", [1, 2])
def test_gradcheck_fused_group_float64(stride):
    """:class:`UnitGroupFn` in float64 against numerical gradients: input, both conv weights, both BN affines."""
    from bunit.units import UnitGroup
    from bunit.spec import UnitSpec

    torch.manual_seed(10 + stride)
    grp = spread_bn(UnitGroup(UnitSpec(2, 3, 2, stride=stride), 2), 1).double().train()
    x = torch.randn(3, 4, 5, 4, dtype=torch.float64, requires_grad=True)
    params = [grp.conv1.weight, grp.bn1.weight, grp.bn1.bias, grp.conv2.weight, grp.bn2.weight, grp.bn2.bias]
    stats = [b.clone() for b in grp.buffers()]

    def f(t, *ps):
        return unit_train.UnitGroupFn.apply(t, *ps, 2, stride, (grp.bn1, grp.bn2), (0.1, 0.1))
    leaves = (x,) + tuple(p.detach().clone().requires_grad_() for p in params)
    assert torch.autograd.gradcheck(f, leaves)
    torch.testing.assert_close(f(*leaves), grp(x), rtol=1e-12, atol=1e-12)
    assert any(not torch.equal(a, b) for a, b in zip(stats, grp.buffers()))  # running statistics moved


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fused_group_running_statistics_and_counter(momentum):
    """Running mean, unbiased running variance and ``num_batches_tracked`` after three training steps equal
    ``grouped``'s, with a momentum and with the cumulative average (``momentum=None``)."""
    torch.manual_seed(3)
    ref = spread_bn(UnitLayer(["4x2-1-2", "2-2-2"]), 2).train()
    new = spread_bn(UnitLayer(["4x2-1-2", "2-2-2"]), 2).train()
    for layer in (ref, new):
        for m in layer.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.momentum = momentum
    new.load_state_dict(ref.state_dict())
    new.backend = "unit_train"
    for step in range(3):
        x = torch.randn(4, ref.in_channels, 7, 7) * (step + 1) + step
        ref(x).sum().backward()
        new(x).sum().backward()
    for (name, a), b in zip(new.state_dict().items(), ref.state_dict().values()):
        assert torch.equal(a, b) if a.dtype == torch.long else _rel(a, b) <= RTOL, name


def test_fused_group_under_no_grad_and_without_input_grad():
    """Training-mode forward without autograd (BN recalibration) and a backward that needs no input gradient."""
    torch.manual_seed(4)
    ref = spread_bn(UnitLayer(["8x2-1-4"], stride=2), 1).train()
    new = spread_bn(UnitLayer(["8x2-1-4"], stride=2), 1).train()
    new.load_state_dict(ref.state_dict())
    new.backend = "unit_train"
    x = torch.randn(3, ref.in_channels, 9, 9)
    with torch.no_grad():
        assert _rel(new(x), ref(x)) <= RTOL
    ref(x).square().sum().backward()
    new(x).square().sum().backward()
    for (name, a), b in zip(new.named_parameters(), ref.parameters()):
        assert _rel(a.grad, b.grad) <= RTOL, name


def test_fused_group_refuses_one_value_per_channel_as_batchnorm_does():
    layer = UnitLayer(["2-1-2"]).train()
    layer.backend = "unit_train"
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        layer(torch.randn(1, 2, 1, 1))


@pytest.mark.parametrize("bf16,shortcut", [(False, torch.float32), (True, torch.float32),
                                            (True, torch.bfloat16)])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("shortcut_layout", ["same", "other"])
def test_residual_added_in_the_output_pass_equals_add_then_relu(bf16, shortcut, channels_last, shortcut_layout):
    """A one-group layer given a block's shortcut adds it and applies the block's ReLU in the group's output pass;
    output, input, shortcut and parameter gradients and BN statistics equal, bit for bit, the unit output followed
    by ``relu(y + shortcut)`` (float32, and under bf16 autocast with a float32 or a bf16 shortcut: with a shortcut
    of the stored dtype, the backward takes the block's ReLU in the pass of BN's sums). A shortcut in the other
    memory format than the input (a projection's output can be channels_last beside an NCHW unit layer) is copied to
    the kernel's layout and still added in the pass, its gradient handed back in its own layout."""
    base = spread_bn(UnitLayer(["8x2-1-2"]), 1).train()
    base.backend = "unit_train"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(3)
    x, r = torch.randn(4, 16, 9, 10, generator=gen), torch.randn(4, 16, 9, 10, generator=gen).to(shortcut)
    got = {}
    for fused in (True, False):
        layer = copy.deepcopy(base)
        xi = x.contiguous(memory_format=fmt).requires_grad_()
        rfmt = fmt if shortcut_layout == "same" else (torch.contiguous_format if channels_last else torch.channels_last)
        ri = r.contiguous(memory_format=rfmt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = layer(xi, residual=ri) if fused else layer.add_residual(layer(xi), ri, (1, 0))
        assert (type(y.grad_fn).__name__ == "UnitGroupFnBackward") == fused  # the fused pass did run
        y.backward(torch.randn(y.shape, generator=torch.Generator().manual_seed(1)))
        assert ri.grad.is_contiguous(memory_format=rfmt)
        got[fused] = [y.detach(), xi.grad, ri.grad, *[p.grad for p in layer.parameters()], *layer.buffers()]
    assert got[True][0].dtype == shortcut  # the block's output in the shortcut's dtype
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


@pytest.mark.parametrize("specs,dtype,channels_last", [(["8x2-1-2"], torch.float32, False),
                                                       (["8x2-1-2"], torch.bfloat16, False),
                                                       (["8x2-1-2"], torch.bfloat16, True),
                                                       (["2x8-8-8"], torch.bfloat16, False),
                                                       (["16x2-1-2"], torch.bfloat16, True)])
def test_identity_shortcut_gradient_is_added_in_the_kernel_as_autograd_adds_it(specs, dtype, channels_last):
    """With an identity shortcut (the residual is the input itself, in the stored dtype) the kernel adds the
    shortcut's gradient to the input gradient in its own pass: the input gradient equals, bit for bit, autograd's sum
    of the two when the block is computed as ``relu(units(x) + x)`` (float32; bf16 stored, NCHW and channels_last;
    the 8x2-1-2 and 16x2-1-2 rows through the channels_last kernels under bf16 dot products, at an odd width)."""
    base = spread_bn(UnitLayer(specs), 1).train()
    base.backend = "unit_train"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    gen = torch.Generator().manual_seed(4)
    x = torch.randn(3, base.in_channels, 7, 9, generator=gen).to(dtype).contiguous(memory_format=fmt)
    grad = torch.randn(3, base.out_channels, 7, 9, generator=gen).to(dtype)
    got = {}
    for fused in (True, False):
        layer = copy.deepcopy(base)
        xi = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            y = layer(xi, residual=xi) if fused else layer.add_residual(layer(xi), xi, (1, 0))
        assert (type(y.grad_fn).__name__ == "UnitGroupFnBackward") == fused
        y.backward(grad.contiguous(memory_format=torch.channels_last if y.stride(1) == 1 else torch.contiguous_format))
        got[fused] = [y.detach(), xi.grad, *[p.grad for p in layer.parameters()]]
    assert torch.equal(got[True][1], got[False][1])
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_block_relu_taken_with_bn_sums_equals_threshold_backward(dtype):
    """``bn_relu_grad_coefficients`` given a block's output takes the gradient through that ReLU first: the
    gradient it returns equals ``threshold_backward(g, out, 0)`` bit for bit (zeros where out is 0 or below, g
    elsewhere), and the coefficients equal those computed from that gradient. Planes of 49 and 63 values (whole
    vectors and a part of one)."""
    ext = unit_train.load_extension()
    for h, w in ((7, 7), (7, 9)):
        gen = torch.Generator().manual_seed(h * w)
        y = torch.randn(3, 5, h, w, generator=gen).to(dtype)
        g = torch.randn(3, 5, h, w, generator=gen).to(dtype)
        out = torch.relu(torch.randn(3, 5, h, w, generator=gen)).to(dtype)  # a ReLU's output: many exact zeros
        sc, sh = torch.rand(5, generator=gen) + 0.5, torch.randn(5, generator=gen) * 0.1
        moments = torch.stack([torch.randn(5, generator=gen).double(), torch.rand(5, generator=gen).double() + 0.5,
                               torch.rand(5, generator=gen).double() + 0.5])
        wt = torch.randn(5, 1, 3, 3)
        got = ext.bn_relu_grad_coefficients(g, y, sc, sh, 3 * h * w, moments, wt, out)
        want_g = torch.ops.aten.threshold_backward(g, out, 0)
        assert len(got) == 5 and got[4].dtype == dtype and torch.equal(got[4], want_g)
        assert (got[4] == 0).sum() > (g == 0).sum()  # the mask did zero some
        want = ext.bn_relu_grad_coefficients(want_g, y, sc, sh, 3 * h * w, moments, wt)
        assert len(want) == 4 and all(torch.equal(a, b) for a, b in zip(got[:4], want))


def test_gradcheck_fused_group_with_residual_float64():
    layer = spread_bn(UnitLayer(["2x2-1-2"]), 1).double().train()
    layer.backend = "unit_train"
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    r = torch.randn(3, 4, 5, 6, dtype=torch.float64, requires_grad=True)
    assert type(layer(x, residual=r).grad_fn).__name__ == "UnitGroupFnBackward"
    assert torch.autograd.gradcheck(lambda a, b: layer(a, residual=b), (x, r), eps=1e-6, atol=1e-5)


# --- hybrid rows in channels_last, one lane per channel (UnitRowFn) ------------------------------------------------

ROW_CASES = [  # (specs, stride, size): catalogue hybrids of 32 and 64 channels (hidden lanes past 64: two blocks of
    # gathered words), a row with 4-channel units (full pairs of inputs) and 1-1-1 units, at 7-14 px
    ([str(s) for s in hybrid_mix(32, 32, seed=0)], 1, 14),
    ([str(s) for s in hybrid_mix(32, 32, seed=0)], 2, 14),
    ([str(s) for s in hybrid_mix(64, 64, seed=1)], 1, 7),
    ([str(s) for s in hybrid_mix(64, 64, seed=1)], 2, 9),
    (["2x4-4-4", "4x1-1-1", "2x2-1-2"], 1, 8),
]


def _needs_rows():
    if not (unit_train.bf16_dot_products() and unit_train.load_extension().has_unit_rows()):
        pytest.skip("this CPU has no AVX512-BF16: no lane-by-lane hybrid rows")


def _train_values(mod, x, grad, autocast, residual=False):
    """A layer's training step on a copy of x: output, input gradient, parameter gradients, floating buffers (running
    statistics) and counters."""
    xi = x.clone().requires_grad_()
    with torch.autocast("cpu", torch.bfloat16, enabled=autocast):
        out = mod(xi)
    out.float().backward(grad)
    return out, [out.float(), xi.grad.float(), *[p.grad for p in mod.parameters()],
                 *[b.float() for b in mod.buffers()]]


def _dist(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-12))


@pytest.mark.parametrize("specs,stride,size", ROW_CASES, ids=lambda v: str(len(v)) if isinstance(v, list) else str(v))
@pytest.mark.parametrize("layout", ["nchw", "channels_last"])
def test_hybrid_row_runs_lane_by_lane_and_trains_as_grouped_does(specs, stride, size, layout):
    """Under bf16 autocast a hybrid row runs whole in one :class:`UnitRowFn` (given NCHW input: one copy in, its
    input gradient copied back), returns channels_last, and its output, input and parameter gradients, BN running
    statistics and counters are no further from float32 than ``grouped`` under the same autocast (relative L2 within
    1.25x, each tensor)."""
    _needs_rows()
    torch.manual_seed(0)
    layer = spread_bn(UnitLayer(specs, stride=stride), 1).train()
    assert len(layer.groups) > 1
    ref, exact = copy.deepcopy(layer), copy.deepcopy(layer)
    layer.backend = "unit_train"
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = torch.randn(4, layer.in_channels, size, size).contiguous(memory_format=fmt)
    side = (size - 1) // stride + 1
    grad = torch.randn(4, layer.out_channels, side, side)
    with torch.autocast("cpu", torch.bfloat16):
        assert unit_rows.runs_row(layer, x)
    calls = []
    real = unit_rows.UnitRowFn.apply
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unit_rows.UnitRowFn, "apply", lambda *a: calls.append(1) or real(*a))
        out, got = _train_values(layer, x, grad, True)
    assert calls == [1] and out.is_contiguous(memory_format=torch.channels_last)
    _, want = _train_values(ref, x, grad, True)
    _, exact_vals = _train_values(exact, x, grad, False)
    for k, (a, b, e) in enumerate(zip(got, want, exact_vals)):
        if a.is_floating_point():
            assert _dist(a, e) <= 1.25 * _dist(b, e) + 1e-6, k
        else:
            assert torch.equal(a, e), k  # num_batches_tracked


@pytest.mark.parametrize("shortcut,shortcut_layout", [("identity", "same"), ("identity-bf16", "same"),
                                                      (torch.float32, "same"), (torch.float32, "other"),
                                                      (torch.bfloat16, "same"), (torch.bfloat16, "other")])
@pytest.mark.parametrize("channels_last", [False, True])
def test_hybrid_row_adds_the_residual_in_its_output_pass_as_add_then_relu(shortcut, shortcut_layout, channels_last):
    """A hybrid row given a block's shortcut under bf16 autocast adds it and applies the block's ReLU in the row's
    output pass (a bf16 shortcut: the backward takes that ReLU in the pass of BN2's sums); output, input, shortcut
    and parameter gradients, running statistics and counters equal, bit for bit, the row's output followed by
    ``relu(y + shortcut)``. The shortcut is the input itself (identity: float32; or bf16, as a block's input comes
    under autocast, whose gradient conv1's backward adds to the input gradient in its own pass), or a tensor of either
    dtype in the input's layout or the other one (copied to channels_last, its gradient handed back in its own
    layout)."""
    _needs_rows()
    base = spread_bn(UnitLayer([str(s) for s in hybrid_mix(32, 32, seed=0)]), 1).train()
    base.backend = "unit_train"
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    rfmt = fmt if shortcut_layout == "same" else (torch.contiguous_format if channels_last else torch.channels_last)
    gen = torch.Generator().manual_seed(3)
    x, r = torch.randn(4, 32, 9, 10, generator=gen), torch.randn(4, 32, 9, 10, generator=gen)
    grad = torch.randn(4, 32, 9, 10, generator=gen)
    got = {}
    for fused in (True, False):
        layer = copy.deepcopy(base)
        xi = (x.bfloat16() if shortcut == "identity-bf16" else x).contiguous(memory_format=fmt).requires_grad_()
        identity = shortcut in ("identity", "identity-bf16")
        ri = xi if identity else r.to(shortcut).contiguous(memory_format=rfmt).requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(xi, residual=ri) if fused else layer.add_residual(layer(xi), ri, (1, 0))
        assert (type(y.grad_fn).__name__ == "UnitRowFnBackward") == fused  # the fused pass did run
        y.backward(grad.to(y.dtype))
        assert ri.grad.is_contiguous(memory_format=fmt if identity else rfmt)
        got[fused] = [y.detach(), xi.grad, ri.grad, *[p.grad for p in layer.parameters()], *layer.buffers()]
    assert got[True][0].dtype == {"identity": torch.float32, "identity-bf16": torch.bfloat16}.get(shortcut, shortcut)
    assert all(torch.equal(a, b) for a, b in zip(got[True], got[False]))


@pytest.mark.parametrize("specs,stride,size", [c for c in ROW_CASES if c[1] == 1],
                         ids=lambda v: str(len(v)) if isinstance(v, list) else str(v))
def test_hybrid_row_computes_what_the_group_kernels_compute(specs, stride, size):
    """At stride 1 a hybrid row lane by lane multiplies the operands the per-group kernels multiply (the same bf16
    roundings), only summed in another order: outputs, gradients and running statistics within 2e-4 relative L2 of
    the per-group path (:class:`UnitLayerFn`, the kernels' NCHW path) under the same autocast."""
    _needs_rows()
    torch.manual_seed(1)
    layer = spread_bn(UnitLayer(specs, stride=stride), 2).train()
    layer.backend = "unit_train"
    groups = copy.deepcopy(layer)
    x = torch.randn(5, layer.in_channels, size, size)
    grad = torch.randn(5, layer.out_channels, size, size)
    _, got = _train_values(layer, x, grad, True)
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(unit_rows, "runs_row", lambda *a: False)
        out, want = _train_values(groups, x, grad, True)
    assert not out.is_contiguous(memory_format=torch.channels_last)  # the other path did run
    for k, (a, b) in enumerate(zip(got, want)):
        assert _dist(a, b) <= 2e-4, k


@pytest.mark.parametrize("stride,conv2", [(1, False), (2, False), (1, True)])
def test_hybrid_row_convolution_sums_bf16_rounded_operands_in_float32(stride, conv2):
    """``row_conv_forward`` of a hybrid row: each output within one bf16 rounding of the float64 grouped convolutions
    of the groups (conv1: each group's input channels; conv2: its hidden lanes through relu(y * sc + sh) rounded to
    bf16) with the weights rounded to bf16, at strides 1 and 2, in the lanes the plan gives (padding lanes zero); the
    batch sums are those of the stored outputs."""
    _needs_rows()
    torch.manual_seed(2)
    layer = UnitLayer([str(s) for s in hybrid_mix(32, 32, seed=3)], stride=stride)
    plan = unit_rows.RowPlan(layer)
    ext = unit_train.load_extension()

    def rounded(w):
        return w.detach().bfloat16().double()

    if conv2:
        y1 = torch.randn(3, plan.hidden, 9, 9).bfloat16().contiguous(memory_format=torch.channels_last)
        sc, sh = torch.rand(plan.hidden) + 0.5, torch.randn(plan.hidden) * 0.3
        flat = torch.cat([g.conv2.weight.detach().reshape(-1) for g in layer.groups] + [torch.zeros(1)])
        y, st = ext.row_conv_forward(y1, plan.idx2, flat[plan.widx2], 1, sc, sh)
        z = torch.relu(y1.double() * sc.double()[:, None, None] + sh.double()[:, None, None]).bfloat16().double()
        outs, first = [], 0
        for g in layer.groups:  # group g's hidden channels: the next lanes in group order
            n = g.conv2.in_channels
            outs.append(F.conv2d(z[:, first:first + n], rounded(g.conv2.weight), None, 1, 1, groups=g.conv2.groups))
            first += n
        want = torch.zeros(3, layer.out_channels, 9, 9, dtype=torch.double)
        want[:, plan.out_lanes] = torch.cat(outs, 1)  # the groups' outputs, concatenated, to layer order
    else:
        x = torch.randn(3, 32, 9, 9).bfloat16().contiguous(memory_format=torch.channels_last)
        flat = torch.cat([g.conv1.weight.detach().reshape(-1) for g in layer.groups] + [torch.zeros(1)])
        y, st = ext.row_conv_forward(x, plan.idx1, flat[plan.widx1], stride)
        outs = [F.conv2d(layer._group_input(x.double(), k), rounded(g.conv1.weight), None, stride, 1,
                         groups=g.conv1.groups) for k, g in enumerate(layer.groups)]
        hidden = torch.cat(outs, 1)
        want = torch.zeros(3, plan.hidden, *hidden.shape[2:], dtype=torch.double)
        want[:, :plan.hidden_channels] = hidden
    assert y.is_contiguous(memory_format=torch.channels_last) and y.dtype == torch.bfloat16
    assert _within_bf16_rounding(y, want)
    stored = y.double()
    assert torch.allclose(st, torch.stack([stored.sum((0, 2, 3)), (stored ** 2).sum((0, 2, 3))]), rtol=1e-5,
                          atol=1e-6)


def test_hybrid_row_path_is_taken_only_where_it_applies():
    """``runs_row``: a hybrid row under bf16 autocast; not one group, not float32, not units past 4 channels, not
    a width off 16k."""
    _needs_rows()
    x32 = torch.randn(2, 32, 8, 8)
    hybrid = UnitLayer([str(s) for s in hybrid_mix(32, 32, seed=0)]).train()
    with torch.autocast("cpu", torch.bfloat16):
        assert unit_rows.runs_row(hybrid, x32)
        assert not unit_rows.runs_row(UnitLayer(["16x2-1-2"]), x32)  # one group: UnitGroupFn
        assert not unit_rows.runs_row(UnitLayer(["2x8-8-8", "8x2-1-2"]), x32)  # 8-channel units
        assert not unit_rows.runs_row(UnitLayer(["2x4-4-4", "2x2-1-2"]), torch.randn(2, 12, 8, 8))  # 12 channels
    assert not unit_rows.runs_row(hybrid, x32)  # float32: the per-group kernels
