"""The training path of unit layers on CPU: their grouped 3x3 convolutions in a C++ kernel with its own backward.

A unit layer's group of ``n`` same-spec units runs two grouped convolutions with 1-8 channels per group. In
training, oneDNN's grouped convolution is slow at these sizes (a ResNet-20 at 80% fewer MACs spent more than half of
its step in their backward), so :func:`conv` replaces ``F.conv2d(x, w, None, s, 1, groups=n)`` by
:class:`UnitConv`, an ``autograd.Function`` whose forward, input gradient and weight gradient are one C++ kernel
each (``csrc/unit_train.cpp``: work items (image, group) in parallel, VW columns x up to 8 output channels in
vector registers, input read through its strides). BatchNorm with batch statistics and ReLU stay PyTorch's
modules, so running statistics and their gradients are exactly the ``grouped`` backend's; the convolution agrees
to float32 rounding (another order of accumulation) and is checked against ``F.conv2d`` by the tests (gradcheck in
float64, float32 within 1e-4 relative on every catalogue and planner shape).

Under bf16 autocast the convolution runs in float32 (:func:`torch.amp.custom_fwd` casts its input): units are so
small that bf16 buys no speed here, and float32 keeps them exact. Other devices, dtypes and kernel sizes fall back
to ``F.conv2d``; :func:`supports` says which run here.

The extension is built on first use with ``torch.utils.cpp_extension.load`` into the same cache as
:mod:`bunit.fused_cpu` (``$BUNITBENCH_CACHE_DIR/ext/``), keyed by torch version and CPU; later processes load it.
"""
from __future__ import annotations

import functools
import hashlib
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn

from bunit.fused_cpu import load_cpu_extension

__all__ = ["source_tag", "load_extension", "is_available", "build_info", "supports", "UnitConv", "conv"]

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
    return load_cpu_extension(_NAME, _SOURCE, _state, "unit_train", quiet=quiet)


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


def supports(x: torch.Tensor, conv_module: nn.Conv2d) -> bool:
    """Whether :func:`conv` runs the kernel for ``conv_module`` on inputs like ``x`` (else ``F.conv2d``)."""
    k, s, p = conv_module.kernel_size, conv_module.stride, conv_module.padding
    dtype_ok = x.dtype in (torch.float32, torch.float64) or (torch.is_autocast_enabled("cpu") and
                                                               x.dtype == torch.bfloat16)
    return (x.is_cpu and dtype_ok and conv_module.weight.dtype in (torch.float32, torch.float64) and k == (3, 3)
            and p == (1, 1) and s[0] == s[1] and s[0] in (1, 2) and conv_module.dilation == (1, 1)
            and conv_module.bias is None and is_available())


def conv(x: torch.Tensor, conv_module: nn.Conv2d) -> torch.Tensor:
    """``conv_module(x)`` through the kernel where it runs (:func:`supports`), else the module itself."""
    if not supports(x, conv_module):
        return conv_module(x)
    return UnitConv.apply(x, conv_module.weight, conv_module.groups, conv_module.stride[0])
