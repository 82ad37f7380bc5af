"""The training path of unit layers on CUDA: their grouped 3x3 convolutions as Triton kernels with their own backward.

The GPU counterpart of :mod:`bunit.unit_train`'s convolutions. :func:`conv` replaces ``F.conv2d(x, w, None, s, 1,
groups=n)`` (3x3, stride 1 or 2, no bias) by :class:`TritonUnitConv`, an ``autograd.Function`` with three kernels:

- forward: one program per (image, output channel, block of output pixels) sums its group's ``cin`` input channels
  and 9 taps;
- input gradient: one program per (image, input channel, block of input pixels) sums, over its group's ``cout``
  output channels and 9 taps, the weights times the output gradient at the positions that read it (at stride 2 only
  the positions of the right parity);
- weight gradient: one program per (output channel, block of (image, row, column) positions) sums the products of
  the output gradient and the input for each of its ``cin`` x 9 weights into a partial buffer, summed over the
  blocks afterwards (a fixed order: deterministic).

Every sum is in float32; the input may be float32, float16 or bfloat16 (the output and input gradient are in its
dtype, the weight gradient in the weight's). BN and ReLU stay PyTorch's (the ``unit_triton`` backend runs
``UnitLayer.run_groups`` with :func:`conv`).

Status: never run on a GPU (none was lent to this project yet). The kernels are tested on CPU tensors by Triton's
interpreter (``TRITON_INTERPRET=1``, float32 only: it has no bfloat16), against ``F.conv2d`` and its autograd
(``tests/test_unit_triton.py``). Without the interpreter, :func:`supports` is true on CUDA tensors only; elsewhere,
and where ``triton`` is not installed, :func:`conv` runs the module itself.
"""
from __future__ import annotations

import functools
import os
from typing import Any

import torch
import torch.nn as nn

from bunit.functional import is_channels_last

__all__ = ["is_available", "interpreting", "supports", "TritonUnitConv", "conv"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


@functools.lru_cache(maxsize=1)
def is_available() -> bool:
    """Whether ``triton`` imports here."""
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def interpreting() -> bool:
    """Whether Triton runs its kernels in its interpreter (``TRITON_INTERPRET=1``; read when the kernels are made)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@functools.lru_cache(maxsize=1)
def _kernels() -> dict[str, Any]:
    """The three kernels, made on first use (``triton`` imported then, and ``TRITON_INTERPRET`` read then)."""
    import triton
    import triton.language as tl

    @triton.jit
    def conv_fwd(x_ptr, w_ptr, y_ptr, c_out, h, w, ho, wo, xs0, xs1, xs2, xs3, ys0, ys1, ys2, ys3,
                 CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # image * c_out + output channel
        n = (pid // c_out).to(tl.int64)
        co = pid % c_out
        grp = co // COUT
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = p < ho * wo
        i = p // wo
        j = p % wo
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for c in tl.static_range(CIN):
            for t in tl.static_range(9):
                r = i * STRIDE + (t // 3) - 1
                q = j * STRIDE + (t % 3) - 1
                m = live & (r >= 0) & (r < h) & (q >= 0) & (q < w)
                xv = tl.load(x_ptr + n * xs0 + (grp * CIN + c) * xs1 + r * xs2 + q * xs3, mask=m, other=0.0)
                wv = tl.load(w_ptr + (co * CIN + c) * 9 + t)
                acc += xv.to(tl.float32) * wv.to(tl.float32)
        tl.store(y_ptr + n * ys0 + co * ys1 + i * ys2 + j * ys3, acc.to(y_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def conv_gx(g_ptr, w_ptr, gx_ptr, c_in, h, w, ho, wo, gs0, gs1, gs2, gs3, xs0, xs1, xs2, xs3,
                CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)  # image * c_in + input channel
        n = (pid // c_in).to(tl.int64)
        ci = pid % c_in
        grp = ci // CIN
        c = ci % CIN
        p = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
        live = p < h * w
        r = p // w
        q = p % w
        acc = tl.zeros([BLOCK], dtype=tl.float32)
        for o in tl.static_range(COUT):
            for t in tl.static_range(9):
                a = r + 1 - (t // 3)  # = i * STRIDE for the output row i whose tap t read row r
                b = q + 1 - (t % 3)
                i = a // STRIDE
                j = b // STRIDE
                m = live & (a >= 0) & (b >= 0) & (i * STRIDE == a) & (j * STRIDE == b) & (i < ho) & (j < wo)
                gv = tl.load(g_ptr + n * gs0 + (grp * COUT + o) * gs1 + i * gs2 + j * gs3, mask=m, other=0.0)
                wv = tl.load(w_ptr + ((grp * COUT + o) * CIN + c) * 9 + t)
                acc += gv.to(tl.float32) * wv.to(tl.float32)
        tl.store(gx_ptr + n * xs0 + ci * xs1 + r * xs2 + q * xs3, acc.to(gx_ptr.dtype.element_ty), mask=live)

    @triton.jit
    def conv_gw(x_ptr, g_ptr, part_ptr, c_out, h, w, ho, wo, total, xs0, xs1, xs2, xs3, gs0, gs1, gs2, gs3,
                CIN: tl.constexpr, COUT: tl.constexpr, STRIDE: tl.constexpr, BLOCK: tl.constexpr):
        co = tl.program_id(0)
        blk = tl.program_id(1)
        grp = co // COUT
        k = blk * BLOCK + tl.arange(0, BLOCK)  # flat (image, row, column) of the output
        live = k < total
        n = (k // (ho * wo)).to(tl.int64)
        i = (k % (ho * wo)) // wo
        j = k % wo
        gv = tl.load(g_ptr + n * gs0 + co * gs1 + i * gs2 + j * gs3, mask=live, other=0.0).to(tl.float32)
        for c in tl.static_range(CIN):
            for t in tl.static_range(9):
                r = i * STRIDE + (t // 3) - 1
                q = j * STRIDE + (t % 3) - 1
                m = live & (r >= 0) & (r < h) & (q >= 0) & (q < w)
                xv = tl.load(x_ptr + n * xs0 + (grp * CIN + c) * xs1 + r * xs2 + q * xs3, mask=m, other=0.0)
                tl.store(part_ptr + ((blk * c_out + co) * CIN + c) * 9 + t, tl.sum(gv * xv.to(tl.float32), axis=0))

    return {"fwd": conv_fwd, "gx": conv_gx, "gw": conv_gw}


_BLOCK = 256  # output (or input) pixels per program
_BLOCK_GW = 1024  # (image, row, column) positions per weight-gradient program


def _strides(t: torch.Tensor) -> tuple[int, int, int, int]:
    s = t.stride()
    return s[0], s[1], s[2], s[3]


def _forward(x: torch.Tensor, w: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    n, c_in, h, wd = x.shape
    c_out = w.shape[0]
    ho, wo = (h - 1) // stride + 1, (wd - 1) // stride + 1
    y = torch.empty(n, c_out, ho, wo, device=x.device, dtype=x.dtype, memory_format=_format(x))
    grid = (n * c_out, _cdiv(ho * wo, _BLOCK))
    _kernels()["fwd"][grid](x, w, y, c_out, h, wd, ho, wo, *_strides(x), *_strides(y), CIN=c_in // groups,
                            COUT=c_out // groups, STRIDE=stride, BLOCK=_BLOCK)
    return y


def _input_grad(g: torch.Tensor, w: torch.Tensor, x: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    n, c_in, h, wd = x.shape
    gx = torch.empty_like(x, memory_format=_format(x))
    grid = (n * c_in, _cdiv(h * wd, _BLOCK))
    _kernels()["gx"][grid](g, w, gx, c_in, h, wd, g.shape[2], g.shape[3], *_strides(g), *_strides(gx),
                           CIN=c_in // groups, COUT=w.shape[0] // groups, STRIDE=stride, BLOCK=_BLOCK)
    return gx


def _weight_grad(x: torch.Tensor, g: torch.Tensor, w: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
    n, c_in, h, wd = x.shape
    c_out, ho, wo = g.shape[1], g.shape[2], g.shape[3]
    total = n * ho * wo
    blocks = _cdiv(total, _BLOCK_GW)
    part = torch.empty(blocks, c_out, c_in // groups, 9, device=x.device, dtype=torch.float32)
    _kernels()["gw"][(c_out, blocks)](x, g, part, c_out, h, wd, ho, wo, total, *_strides(x), *_strides(g),
                                      CIN=c_in // groups, COUT=c_out // groups, STRIDE=stride, BLOCK=_BLOCK_GW)
    return part.sum(0).view_as(w).to(w.dtype)


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def _format(x: torch.Tensor) -> torch.memory_format:
    return torch.channels_last if is_channels_last(x) else torch.contiguous_format


class TritonUnitConv(torch.autograd.Function):
    """``F.conv2d(x, weight, None, stride, 1, groups=groups)`` for a 3x3 weight, forward and both gradients in
    Triton kernels (sums in float32; the output in ``x``'s dtype and memory format)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cuda")
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, groups: int, stride: int) -> torch.Tensor:
        weight = weight.contiguous()
        ctx.save_for_backward(x, weight)
        ctx.groups, ctx.stride = groups, stride
        return _forward(x, weight, groups, stride)  # (B, out, H/s, W/s)

    @staticmethod
    @torch.amp.custom_bwd(device_type="cuda")
    def backward(ctx, grad: torch.Tensor):
        x, weight = ctx.saved_tensors
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        grad = grad.to(x.dtype)
        gx = _input_grad(grad, weight, x, ctx.groups, ctx.stride) if need_x else None
        gw = _weight_grad(x, grad, weight, ctx.groups, ctx.stride) if need_w else None
        return gx, gw, None, None


def supports(x: torch.Tensor, conv_module: nn.Conv2d) -> bool:
    """Whether :func:`conv` runs the kernels for ``conv_module`` on inputs like ``x``: a CUDA tensor (or a CPU one
    under the interpreter), 3x3, padding 1, stride 1 or 2, no bias or dilation, and ``triton`` installed."""
    k, s, p = conv_module.kernel_size, conv_module.stride, conv_module.padding
    on_device = x.is_cuda or (x.is_cpu and interpreting())
    return (on_device and x.dtype in _DTYPES and conv_module.weight.dtype in _DTYPES and k == (3, 3)
            and p == (1, 1) and s[0] == s[1] and s[0] in (1, 2) and conv_module.dilation == (1, 1)
            and conv_module.bias is None and is_available())


def conv(x: torch.Tensor, conv_module: nn.Conv2d) -> torch.Tensor:
    """``conv_module(x)`` through the Triton kernels where they run (:func:`supports`), else the module itself."""
    if not supports(x, conv_module):
        return conv_module(x)
    return TritonUnitConv.apply(x, conv_module.weight, conv_module.groups, conv_module.stride[0])
