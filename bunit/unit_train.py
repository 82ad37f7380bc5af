"""The training path of unit layers on CPU: their grouped 3x3 convolutions in a C++ kernel with its own backward.

A unit layer's group of ``n`` same-spec units runs two grouped convolutions with 1-8 channels per group. In
training, oneDNN's grouped convolution is slow at these sizes (a ResNet-20 at 80% fewer MACs spent more than half of
its step in their backward), so :func:`conv` replaces ``F.conv2d(x, w, None, s, 1, groups=n)`` by
:class:`UnitConv`, an ``autograd.Function`` whose forward, input gradient and weight gradient are one C++ kernel
each (``csrc/unit_train.cpp``: work items (image, group) in parallel, VW columns x up to 8 output channels in
vector registers, input read through its strides).

In training mode (BN with batch statistics) a whole unit group runs as :class:`UnitGroupFn`: conv1 with its output's
batch sums, BN1 + ReLU applied while conv2 pads its input, conv2 with its sums, BN2 + ReLU written once in the
input's memory format; the backward takes the output gradient through ReLU and BN (one pass of per-channel sums, then
a per-channel affine map applied while the convolution's backward pads it) and rebuilds conv2's input the same way,
so neither the normalised nor the hidden activations are ever stored. Given a residual block's shortcut (a one-group
layer, ``UnitTrain.run_with_residual``), the output pass also adds it and applies the block's ReLU, bit for bit what
``relu(units(x) + shortcut)`` computes from the stored output (tested, float32 and bf16); the backward takes that
ReLU in the pass of BN2's gradient sums, and adds an identity shortcut's gradient (the input itself) to the input
gradient in the kernel's own pass, as autograd would add the two (bit for bit, tested). BN's sums, and the
per-channel maths on them (moments, the affine map, the backward's coefficients), are in double in the kernel, one
call each; running statistics, ``num_batches_tracked`` and the momentum (or cumulative average) follow
``nn.BatchNorm2d``. A layer of several groups (a hybrid row, :func:`layer_forward`) runs them in one autograd node,
:class:`UnitLayerFn`: each group's input channels gathered, the outputs concatenated in layer order, and the input
gradient assembled by one concatenation and one inverse gather (not a scatter-add per group into a zeroed tensor and
a sum over the groups). Under CPU bf16 autocast with AVX512-BF16, a hybrid row of small units runs instead lane by
lane in channels_last, one kernel call per pass (:mod:`bunit.unit_rows`). Outside training mode each convolution runs alone (:func:`conv`) and BN and ReLU are
PyTorch's.
The results equal the ``grouped`` backend's to float32 rounding (another order of accumulation), checked by the tests
(gradcheck in float64, float32 within 1e-4 relative on every catalogue and planner shape, running statistics after
steps).

Under CPU bf16 autocast a unit group (:class:`UnitGroupFn`) stores in bfloat16 what it reads and writes in memory,
as autocast's own convolutions do: its input, both convolutions' outputs, its output and their gradients; the
kernel widens each value to float32 as it loads it (exact), sums in float32 (BN's sums in double), and rounds to
nearest even as it stores. Half the bytes: the unit layers keep every activation of the dense layer they replace.
Where the CPU has AVX512-BF16 (:func:`bf16_dot_products`), the convolutions also multiply in bfloat16, as autocast's
convolutions do: the weights, conv2's input and the gradient taken through BN are rounded to bf16 and multiplied in
pairs by ``vdpbf16ps`` (32 multiply-adds per instruction, twice float32's), the products summed in float32; an
odd channel count per group pairs its last channel with zeros. At stride 2 too: the forward reads channel pairs
split by column phase, the input gradient takes each input row and column phase from its own taps. The
paired operands are built straight from the stored bf16 tensors (each value rounded once, no float32 work buffer),
and rows of up to 8 values (7 px planes) multiply in 8-lane instead of 16-lane dot products. NCHW output planes of up
to 7 columns are built whole and flattened into rows of 8 words (AVX512-VBMI2 word expands; at stride 2 the input
split into four phase planes), whose word pairs the weight gradient multiplies as they lie, summed over up to 16
items (image, group) of a group in registers (:func:`padded_row_planes` turns that layout off). A row of 2-1-2 or 2-1-4
units (a multiple of 16 or 8 of them, stride 1 or 2; :func:`runs_channels_last`) runs in channels_last instead, in
kernels that hold 16 units in one vector (a pixel's 32 input channels are the 16 channel pairs of one dot product;
8 units of two neighbouring pixels for a row of 8), where the NCHW kernels spend
their time on per-(image, unit) work over planes of 7-14 px: the same rounded operands, sums in another order
(tested against the NCHW kernels and, in a layer, against ``grouped`` under autocast).
The tolerance is autocast's: outputs and input gradients within one bf16 rounding of float32 sums of the rounded
operands, weight gradients within 1e-5 of them (tested); a whole model no further from float32 than ``grouped``
under autocast (within 25%, tested). :func:`float32_multiplies` turns the dot products off, for side-by-side timing.
The weights and their gradients stay float32. A lone convolution
(:class:`UnitConv`, outside training mode) runs in float32 (:func:`torch.amp.custom_fwd` casts its input). Other
devices, dtypes and kernel sizes fall back to ``F.conv2d``; :func:`supports` says which run here.

The extension is built on first use with ``torch.utils.cpp_extension.load`` into the same cache as
:mod:`bunit.fused_cpu` (``$BUNITBENCH_CACHE_DIR/ext/``), keyed by torch version and CPU, at ``-O2`` (its loops are
vectorised and unrolled by hand; ``-O3`` built twice as long for no faster step); later processes load it.
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bunit.functional import bn_mode, is_channels_last
from bunit.fused_cpu import load_cpu_extension

__all__ = ["source_tag", "load_extension", "is_available", "build_info", "supports", "UnitConv", "conv",
           "UnitGroupFn", "UnitLayerFn", "layer_forward", "storage_dtype", "bf16_dot_products", "float32_multiplies", "fuses_group", "group_forward",
           "takes_residual", "runs_channels_last", "bn2_gradient", "padded_row_planes", "fuses_layer"]

_SOURCE = Path(__file__).resolve().parent / "csrc" / "unit_train.cpp"
_NAME = "bunit_unit_train"
_state: dict[str, Any] = {}


@functools.lru_cache(maxsize=1)
def source_tag() -> str:
    """A short hash of the kernel's C++ source (the autotuner keys its timings on it)."""
    return hashlib.sha1(_SOURCE.read_bytes()).hexdigest()[:10]


def load_extension(*, quiet: bool = False) -> Any:
    """The compiled extension, built (or loaded from the cache) on the first call of the process.

    Raises:
        RuntimeError: when it cannot be built or loaded here (the message carries the reason).
    """
    # -O2: as fast as -O3 for this kernel (whole training steps within 3%, interleaved A/B) in half the build time
    return load_cpu_extension(_NAME, _SOURCE, _state, "unit_train", quiet=quiet, opt="-O2")


def is_available() -> bool:
    """Whether the extension builds and loads here (builds it on the first call)."""
    if "module" in _state:
        return True
    try:
        load_extension()
    except RuntimeError:
        return False
    return True


def build_info() -> dict[str, Any]:
    """``available``, ``build_s``, ``build_dir`` and ``error`` of this process (tries the build first)."""
    is_available()
    return {"available": "module" in _state, "build_s": _state.get("build_s"), "build_dir": _state.get("build_dir"),
            "error": _state.get("error")}


class UnitConv(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, 1, groups=groups)`` for a 3x3 weight, with the kernel's backward."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu", cast_inputs=torch.float32)
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
        ext = _state.get("module") or load_extension()
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.stride = groups, stride
        return ext.conv_forward(x, weight, groups, stride)  # (B, out, H/s, W/s), in x's memory format

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gx, gw = _state["module"].conv_backward(x, weight, grad.to(x.dtype), ctx.groups, ctx.stride, need_x, need_w)
        return (gx if need_x else None), (gw if need_w else None), None, None


def _takes_input(x: torch.Tensor) -> bool:
    """The input's part of :func:`supports`: a CPU tensor of float32 or float64, or bf16 under CPU autocast, and the
    extension loaded."""
    dtype_ok = x.dtype in (torch.float32, torch.float64) or (torch.is_autocast_enabled("cpu") and
                                                               x.dtype == torch.bfloat16)
    return x.is_cpu and dtype_ok and is_available()


def _runs_conv(conv_module: nn.Conv2d) -> bool:
    """The convolution's part of :func:`supports`: 3x3, padding 1, stride 1 or 2, no dilation or bias, float
    weights."""
    k, s, p = conv_module.kernel_size, conv_module.stride, conv_module.padding
    return (conv_module.weight.dtype in (torch.float32, torch.float64) and k == (3, 3) and p == (1, 1)
            and s[0] == s[1] and s[0] in (1, 2) and conv_module.dilation == (1, 1) and conv_module.bias is None)


def supports(x: torch.Tensor, conv_module: nn.Conv2d) -> bool:
    """Whether :func:`conv` runs the kernel for ``conv_module`` on inputs like ``x`` (else ``F.conv2d``)."""
    return _takes_input(x) and _runs_conv(conv_module)


def conv(x: torch.Tensor, conv_module: nn.Conv2d) -> torch.Tensor:
    """``conv_module(x)`` through the kernel where it runs (:func:`supports`), else the module itself."""
    if not supports(x, conv_module):
        return conv_module(x)
    return UnitConv.apply(x, conv_module.weight, conv_module.groups, conv_module.stride[0])


# --- the whole group: conv1 + BN1 + ReLU + conv2 + BN2 + ReLU, BN with batch statistics ---------------------------


def _group_forward(ext: Any, x, w1, g1, b1, w2, g2, b2, groups: int, stride: int, bns: tuple, factors: tuple,
                   residual, channels_last: bool, dot: bool):
    """One unit group's forward in the kernel (``x`` already in the storage dtype, read through its strides): the
    output in ``channels_last`` or NCHW, and what its backward needs (:func:`_group_backward`)."""
    bn1, bn2 = bns
    w1, w2 = w1.contiguous(), w2.contiguous()
    y1, st1 = ext.conv_forward_stats(x, w1, groups, stride, bf16_dot=dot)  # (B, n*b, H/s, W/s), NCHW
    n1 = y1.shape[0] * y1.shape[2] * y1.shape[3]
    if n1 <= 1:  # as F.batch_norm refuses it in training
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y1.shape)}")
    # [mean; biased var; 1/std] in double, and relu(y * sc + sh) in the weights' dtype; running statistics updated
    m1, sc1, sh1 = ext.bn_coefficients(st1, n1, g1.detach(), b1.detach(), bn1.eps, bn1.running_mean,
                                       bn1.running_var, factors[0], w1)
    y2, st2 = ext.conv_forward_stats(y1, w2, groups, 1, sc1, sh1, bf16_dot=dot)  # (B, n*c, H/s, W/s), NCHW
    m2, sc2, sh2 = ext.bn_coefficients(st2, n1, g2.detach(), b2.detach(), bn2.eps, bn2.running_mean,
                                       bn2.running_var, factors[1], w2)
    # in the asked memory format and x's dtype; with a residual, relu(that + residual) in the residual's dtype
    out = ext.bn_relu_apply(y2, sc2, sh2, channels_last, residual)
    saved = (x, w1, w2, y1, y2, sc1, sh1, sc2, sh2, m1, m2, out if residual is not None else None)
    return out, saved, n1


def bn2_gradient(ext: Any, grad: torch.Tensor, y2: torch.Tensor, sc2: torch.Tensor, sh2: torch.Tensor, count: int,
                 m2: torch.Tensor, param: torch.Tensor, out: torch.Tensor | None, store: torch.dtype) -> tuple:
    """The gradient of a unit output ``relu(y2 * sc2 + sh2)`` (with ``out``, of a block's tail ``out = relu(that +
    shortcut)``) through BN2: ``(dg2, db2, A, B, g, gres)``, BN2's weight and bias gradients, A and B of conv2's
    output gradient ``(mask ? sc * g : 0) + y * A + B``, ``g`` the units' output gradient in the storage dtype and
    y2's layout, and ``gres`` the gradient through the block's ReLU (the shortcut's; None without ``out``). Given
    ``grad`` and ``out`` in the storage dtype, the block's ReLU is taken in the same pass as BN's sums (a gradient of
    the other layout, from a pooling layer, copied to y2's first); else by ``threshold_backward`` before."""
    fmt = torch.channels_last if is_channels_last(y2) else torch.contiguous_format  # the kernels' layout
    if out is not None and grad.dtype == out.dtype == store and out.is_contiguous(memory_format=fmt):
        grad = grad.contiguous(memory_format=fmt)
        dg2, db2, a2, b2, grad = ext.bn_relu_grad_coefficients(grad, y2, sc2, sh2, count, m2, param, out)
        return dg2, db2, a2, b2, grad, grad
    if out is not None:  # through the block's ReLU: the shortcut's gradient, and the units' output gradient
        grad = torch.ops.aten.threshold_backward(grad, out, 0)
    g = grad.to(store).contiguous(memory_format=fmt)
    dg2, db2, a2, b2 = ext.bn_relu_grad_coefficients(g, y2, sc2, sh2, count, m2, param)
    return dg2, db2, a2, b2, g, (grad if out is not None else None)


def _group_backward(ext: Any, saved: tuple, count: int, groups: int, stride: int, dot: bool, grad: torch.Tensor,
                    need: tuple, fold: bool = False) -> tuple:
    """The gradients of :func:`_group_forward`'s inputs from its output's gradient: ``(x, w1, g1, b1, w2, g2, b2,
    residual)``, None where ``need`` (flags in that order) says no. ``fold``: the residual is ``x`` itself (an
    identity shortcut); its gradient is then added to x's in the kernel's input-gradient pass, as autograd would add
    the two (values stored, summed, rounded once), and returned as None where it could be."""
    x, w1, w2, y1, y2, sc1, sh1, sc2, sh2, m1, m2, out = saved
    dg2, db2, a2, b2, g, grad = bn2_gradient(ext, grad, y2, sc2, sh2, count, m2, w2, out, x.dtype)
    gh, gw2 = ext.conv_backward_bn(y1, w2, g, y2, sc2, sh2, a2, b2, groups, 1, sc1, sh1, True, need[4], bf16_dot=dot)
    dg1, db1, a1, b1 = ext.bn_relu_grad_coefficients(gh, y1, sc1, sh1, count, m1, w1)
    x_fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format  # the input gradient's layout
    add = (grad if fold and need[0] and out is not None and grad.dtype == x.dtype and stride == 1
           and grad.shape == x.shape and grad.is_contiguous(memory_format=x_fmt) else None)
    gx, gw1 = ext.conv_backward_bn(x, w1, gh, y1, sc1, sh1, a1, b1, groups, stride, None, None, need[0], need[1],
                                   bf16_dot=dot, add=add)
    grads = (gx, gw1, dg1, db1, gw2, dg2, db2, grad if add is None else None)
    return tuple(t if want else None for t, want in zip(grads, need))


def _storage_and_multiplies(x: torch.Tensor, weight_dtype: torch.dtype) -> tuple[torch.Tensor, bool]:
    """``x`` in the storage dtype (bf16 under CPU bf16 autocast, else the weights' dtype), and whether the group
    multiplies in bf16 dot products (:func:`bf16_dot_products`), as autocast's convolutions do."""
    x = x.to(storage_dtype(weight_dtype))
    return x, x.dtype == torch.bfloat16 and bf16_dot_products()


class UnitGroupFn(torch.autograd.Function):
    """A unit group in training mode, ``relu(bn2(conv2(relu(bn1(conv1(x))))))`` with batch statistics, in the
    kernel: BN and ReLU are applied while the next convolution pads its input, so the normalised activations are
    never written, and BN's backward is folded into the convolutions' backward. Running statistics are updated as
    ``nn.BatchNorm2d`` updates them (``factors``: their exponential-average factors)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, w1, g1, b1, w2, g2, b2, groups: int, stride: int, bns: tuple, factors: tuple,
                residual=None):
        ext = _state.get("module") or load_extension()
        channels_last = is_channels_last(x)
        ctx.input_dtype = x.dtype
        given = x
        x, dot = _storage_and_multiplies(x, w1.dtype)
        ctx.fold = residual is given and x is given  # an identity shortcut, stored as is: its gradient folded in
        out, saved, ctx.count = _group_forward(ext, x, w1, g1, b1, w2, g2, b2, groups, stride, bns, factors,
                                               residual, channels_last, dot)
        ctx.save_for_backward(*saved)
        ctx.groups, ctx.stride, ctx.dot = groups, stride, dot
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        need = ctx.needs_input_grad
        gx, gw1, dg1, db1, gw2, dg2, db2, gres = _group_backward(
            _state["module"], ctx.saved_tensors, ctx.count, ctx.groups, ctx.stride, ctx.dot, grad,
            need[:7] + (len(need) > 11 and need[11],), ctx.fold)  # residual: the twelfth argument, where passed
        return (gx.to(ctx.input_dtype) if gx is not None else None, gw1, dg1, db1, gw2, dg2, db2, None, None, None,
                None, gres)


class UnitLayerFn(torch.autograd.Function):
    """A unit layer of several groups in training mode, each group as :class:`UnitGroupFn` computes it, in one
    autograd node: each group's input channels gathered, the groups' outputs concatenated and put in layer order,
    and in the backward the input gradient assembled by one concatenation and one gather (the inverse permutation of
    the input channels) instead of one scatter-add per group into a zeroed tensor and a sum over the groups.

    ``plan``: per group ``(in_index, groups, stride, bns, factors)`` (``in_index`` the group's input channels in
    layer order: a tensor, or ``(first, count)`` for a range), and ``params`` its ``(w1, g1, b1, w2, g2, b2)`` in
    group order, flattened; ``in_inverse``, ``out_perm`` and ``out_inverse`` the layer's channel maps
    (:class:`bunit.layers.UnitLayer`; None: the identity)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, plan: tuple, in_inverse, out_perm, out_inverse, *params):
        ext = _state.get("module") or load_extension()
        channels_last = is_channels_last(x)
        ctx.input_dtype = x.dtype
        x, dot = _storage_and_multiplies(x, params[0].dtype)
        outs, saved, meta = [], [], []
        for k, (index, groups, stride, bns, factors) in enumerate(plan):
            # (B, n*a, H, W): the channels of index (a range: a view, read by the kernel through its strides)
            xg = x.narrow(1, *index) if isinstance(index, tuple) else x.index_select(1, index)
            out, s, count = _group_forward(ext, xg, *params[6 * k:6 * k + 6], groups, stride, bns, factors, None,
                                           channels_last, dot)
            outs.append(out)
            saved.extend(s[:-1])  # no residual: the last is None
            meta.append((count, groups, stride, out.shape[1]))
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, out, H/s, W/s), group order
        if out_perm is not None:
            y = y.index_select(1, out_perm)  # layer order
        ctx.save_for_backward(*saved)
        ctx.meta, ctx.in_inverse, ctx.out_inverse, ctx.dot = meta, in_inverse, out_inverse, dot
        return y

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        ext = _state["module"]
        saved = ctx.saved_tensors
        need_x, need_p = ctx.needs_input_grad[0], ctx.needs_input_grad[5:]
        gxs, gparams, first = [], [], 0
        for k, (count, groups, stride, width) in enumerate(ctx.meta):
            rows = slice(first, first + width) if ctx.out_inverse is None else ctx.out_inverse[first:first + width]
            gk = grad[:, rows] if ctx.out_inverse is None else grad.index_select(1, rows)  # group k's output grad
            first += width
            g = _group_backward(ext, saved[11 * k:11 * k + 11] + (None,), count, groups, stride, ctx.dot, gk,
                                (need_x,) + tuple(need_p[6 * k:6 * k + 6]) + (False,))
            gxs.append(g[0])
            gparams.extend(g[1:7])
        gx = None
        if need_x:
            gx = gxs[0] if len(gxs) == 1 else torch.cat(gxs, dim=1)  # group order
            if ctx.in_inverse is not None:
                gx = gx.index_select(1, ctx.in_inverse)  # layer order
            gx = gx.to(ctx.input_dtype)
        return (gx, None, None, None, None, *gparams)


def bf16_dot_products() -> bool:
    """Whether :class:`UnitGroupFn` multiplies its bf16-stored operands in bfloat16 (AVX512-BF16 dot products, sums
    in float32): the extension was built with them and :func:`float32_multiplies` is not in force."""
    ext = _state.get("module") or load_extension()
    return ext.has_bf16_dot() and not _state.get("float32_multiplies", False)


@contextlib.contextmanager
def float32_multiplies():
    """Within it, unit groups that store bf16 multiply in float32 (the widened values) instead of with bf16 dot
    products; read at each group's forward, which fixes its backward too. For side-by-side timing."""
    before = _state.get("float32_multiplies", False)
    _state["float32_multiplies"] = True
    try:
        yield
    finally:
        _state["float32_multiplies"] = before


@contextlib.contextmanager
def padded_row_planes():
    """Within it, the kernels build output planes of up to 7 columns (a ResNet's last stage at 28 px input) in padded
    rows, as they build larger planes, instead of flattened (``csrc/unit_train.cpp``, "planes of up to 7 columns,
    flattened"); read at each kernel call. The same operands and products in another layout, for side-by-side
    timing (outputs and input gradients equal bit for bit, weight gradients to float32 rounding: tested)."""
    ext = load_extension()
    if not ext.has_flat_planes():
        yield
        return
    ext.set_flat_planes(False)
    try:
        yield
    finally:
        ext.set_flat_planes(True)


def storage_dtype(weight_dtype: torch.dtype) -> torch.dtype:
    """The dtype :class:`UnitGroupFn` stores its input, activations, output and their gradients in: bfloat16 under
    CPU bf16 autocast with float32 weights (computing in float32), else the weights' dtype."""
    if (weight_dtype == torch.float32 and torch.is_autocast_enabled("cpu")
            and torch.get_autocast_dtype("cpu") == torch.bfloat16):
        return torch.bfloat16
    return weight_dtype


def runs_channels_last(grp: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel runs ``grp`` (a :class:`bunit.units.UnitGroup`) on inputs like ``x`` in its channels_last
    path, one vector holding 16 units (or 8 units of two neighbouring pixels): a row of 2-1-2 or 2-1-4 units, a
    multiple of 16 of them or 8, at stride 1 or 2, stored in bf16 and multiplied in bf16 dot products (CPU bf16
    autocast, AVX512-BF16). Such a group is then given its input channels_last, and returns its output so."""
    c1, c2 = grp.conv1, grp.conv2
    n = c1.groups
    return ((n % 16 == 0 or n == 8) and c1.in_channels == 2 * n and c1.out_channels == n
            and c2.out_channels in (2 * n, 4 * n)
            and c1.stride in ((1, 1), (2, 2)) and x.is_cpu and storage_dtype(c1.weight.dtype) == torch.bfloat16
            and bf16_dot_products())


def _fuses(grp: nn.Module) -> bool:
    """The group's part of :func:`fuses_group`."""
    bn1, bn2, conv1, conv2 = grp.bn1, grp.bn2, grp.conv1, grp.conv2
    return (bn1.training and bn1.affine and bn2.training and bn2.affine and _runs_conv(conv1)
            and conv2.stride == (1, 1) and _runs_conv(conv2))


def fuses_group(grp: nn.Module, x: torch.Tensor) -> bool:
    """Whether :func:`group_forward` runs ``grp`` (a :class:`bunit.units.UnitGroup`) on inputs like ``x``: both BNs
    with batch statistics (training mode), affine, and both convolutions the kernel's (:func:`supports`)."""
    return _takes_input(x) and _fuses(grp)


def fuses_layer(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether every group of ``layer`` (a :class:`bunit.layers.UnitLayer`) runs fused on inputs like ``x``
    (:func:`fuses_group` for each; the input checked once)."""
    return _takes_input(x) and all(_fuses(grp) for grp in layer.groups)


def group_forward(grp: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """``grp(x)`` in training mode through :class:`UnitGroupFn` (see :func:`fuses_group`); counters and running
    statistics change as ``grp(x)`` changes them. With ``residual`` (see :func:`takes_residual`),
    ``relu(grp(x) + residual)``, the add and ReLU in the group's output pass."""
    factors = (bn_mode(grp.bn1)[1], bn_mode(grp.bn2)[1])  # bumps num_batches_tracked as BatchNorm2d.forward does
    return UnitGroupFn.apply(x, grp.conv1.weight, grp.bn1.weight, grp.bn1.bias, grp.conv2.weight, grp.bn2.weight,
                             grp.bn2.bias, grp.conv1.groups, grp.conv1.stride[0], (grp.bn1, grp.bn2), factors,
                             residual)


def layer_forward(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The output of ``layer`` (a fused :class:`bunit.layers.UnitLayer` whose groups all run here,
    :func:`fuses_group`) in training mode, its groups in one :class:`UnitLayerFn`; counters and running statistics
    change as the layer's own forward changes them."""
    plan, params = [], []
    for g, grp in enumerate(layer.groups):
        rng = layer._in_ranges[g]
        plan.append((rng if rng is not None else getattr(layer, f"in_index{g}"), grp.conv1.groups,
                     grp.conv1.stride[0], (grp.bn1, grp.bn2),
                     (bn_mode(grp.bn1)[1], bn_mode(grp.bn2)[1])))  # bumps num_batches_tracked as BatchNorm2d does
        params += [grp.conv1.weight, grp.bn1.weight, grp.bn1.bias, grp.conv2.weight, grp.bn2.weight, grp.bn2.bias]
    return UnitLayerFn.apply(x, tuple(plan), layer.in_inverse, layer.out_perm, layer.out_inverse, *params)


def takes_residual(x: torch.Tensor, residual: torch.Tensor, out_shape: tuple[int, ...],
                   weight_dtype: torch.dtype) -> bool:
    """Whether :func:`group_forward` adds ``residual`` in its output pass for input ``x``: a CPU tensor of the
    output's shape, in ``x``'s memory format, of the group's storage dtype or (for bf16 storage) float32."""
    fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
    store = storage_dtype(weight_dtype)
    return (residual.is_cpu and tuple(residual.shape) == tuple(out_shape) and residual.is_contiguous(memory_format=fmt)
            and (residual.dtype == store or (store == torch.bfloat16 and residual.dtype == torch.float32)))

