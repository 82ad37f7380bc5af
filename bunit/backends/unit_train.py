"""The ``unit_train`` backend: ``grouped`` with the units' grouped 3x3 convs run by kernels with their own backward,
the training path of unit layers. On CPU, the C++ kernel of :mod:`bunit.unit_train`: in training mode (BN with batch
statistics) each unit group runs whole in the kernel, BN and ReLU fused around its two convolutions
(:class:`bunit.unit_train.UnitGroupFn`; a one-group layer also adds its block's shortcut there; a row of 2-1-2
or 2-1-4 units, 16k of them under bf16 autocast, runs channels_last, in NCHW every other), and a hybrid row of small
units under bf16 autocast runs whole, lane by lane in channels_last (:class:`bunit.unit_rows.UnitRowFn`, which adds
the block's shortcut in its output pass too); otherwise
each conv
runs in the kernel and BN and ReLU are PyTorch's. On CUDA, the Triton kernels of :mod:`bunit.unit_triton` for each
conv, BN and ReLU PyTorch's (never run on a GPU so far: tested by Triton's interpreter on CPU). Where no kernel runs
(other devices, dtypes, kernel sizes, no compiler, no ``triton``) each conv runs as in ``grouped``."""
from __future__ import annotations

import torch

from bunit import unit_rows, unit_train, unit_triton
from bunit.backends.base import Backend, register_backend
from bunit.functional import is_channels_last

__all__ = ["UnitTrain"]


class _Relayout(torch.autograd.Function):
    """``x`` copied to ``memory_format``, and its gradient copied back to ``x``'s layout: every gradient keeps its
    tensor's layout (``Tensor.contiguous`` passes the gradient through in the copy's layout, and a gradient of the
    other layout makes autograd's sums, and the ops that read it beside their output, run several times slower)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
        ctx.fmt = torch.channels_last if is_channels_last(x) else torch.contiguous_format
        return x.contiguous(memory_format=memory_format)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return grad.contiguous(memory_format=ctx.fmt), None


def _to_layout(t: torch.Tensor, memory_format: torch.memory_format) -> torch.Tensor:
    """``t`` in ``memory_format`` (itself when it is already), through :class:`_Relayout`."""
    if t.is_contiguous(memory_format=memory_format):
        return t
    return _Relayout.apply(t, memory_format)


def _nchw(t: torch.Tensor) -> torch.Tensor:
    """A channels_last ``t`` copied to NCHW (the fused groups' layout); any other ``t`` as it is.

    The fused kernel reads a channels_last input and writes its output through their strides, one value at a time:
    a whole layer of it cost more than the one copy in and the NCHW layout after (at 28 px a 2x8-8-8 layer ran
    16.8 ms against 9.7 in NCHW; the copy takes 0.5 ms, and so does the input gradient's copy back). So a
    channels_last model's unit layers (in training, on CPU) take their input in NCHW, and return NCHW: the first one
    copies, every later one is handed NCHW. The layers before them keep channels_last (the dense stages of a partial
    BUnit plan, whose oneDNN convolutions are faster in it). The exception is a row of 2-1-2 units that the kernel
    runs in channels_last (:func:`_fused_layout`). Copies go through :class:`_Relayout`, which gives the gradient
    back in the input's layout."""
    return _to_layout(t, torch.contiguous_format) if is_channels_last(t) else t


def _fused_layout(layer, x: torch.Tensor) -> torch.Tensor:
    """``x`` in the layout a layer's fused groups run in: channels_last for a one-group row that the kernel runs in
    channels_last (:func:`bunit.unit_train.runs_channels_last`: 2-1-2 units side by side in one vector), else NCHW
    (:func:`_nchw`)."""
    if len(layer.groups) == 1 and unit_train.runs_channels_last(layer.groups[0], x):
        return _to_layout(x, torch.channels_last)
    return _nchw(x)


def _with_shortcut(xk: torch.Tensor, x: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``xk`` (``x`` in the kernel's layout) and the block's shortcut in that layout: an identity shortcut (``x``
    itself) is ``xk``; another one is copied where its layout differs (a projection's output can come in the other
    one), through :class:`_Relayout`, so that its gradient goes back in its own layout and the shortcut's BN gets
    the layout it saved (PyTorch's BN backward runs about 5x slower on a gradient of the other one)."""
    fmt = torch.channels_last if is_channels_last(xk) else torch.contiguous_format
    return xk, (xk if residual is x else _to_layout(residual, fmt))


@register_backend("unit_train")
class UnitTrain(Backend):
    """Training mode: each group through :func:`bunit.unit_train.group_forward` (a hybrid row that
    :func:`bunit.unit_rows.runs_row` takes: the whole row through :func:`bunit.unit_rows.row_forward`); else the
    groups' convolutions through :func:`bunit.unit_train.conv`, BN and ReLU PyTorch's."""

    caches = (unit_rows.ROW_PLAN_CACHE,)

    def run(self, layer, x: torch.Tensor) -> torch.Tensor:
        if x.is_cuda:
            return layer.run_groups(x, unit_triton.conv)  # (B, out, H/s, W/s)
        if not unit_train.fuses_layer(layer, x):
            return layer.run_groups(x, unit_train.conv)  # (B, out, H/s, W/s)
        if unit_rows.runs_row(layer, x):  # a hybrid row, lane by lane in channels_last
            return unit_rows.row_forward(layer, _to_layout(x, torch.channels_last))  # (B, out, H/s, W/s)
        x = _fused_layout(layer, x)
        if len(layer.groups) == 1 and layer.out_perm is None:
            return unit_train.group_forward(layer.groups[0], layer._group_input(x, 0))  # (B, out, H/s, W/s)
        return unit_train.layer_forward(layer, x)  # every group in one autograd node, (B, out, H/s, W/s)

    def run_with_residual(self, layer, x: torch.Tensor, residual: torch.Tensor | None,
                          residual_map: tuple[int, int]) -> torch.Tensor:
        """A one-group layer in training mode adds the shortcut and applies the block's ReLU in the group's output
        pass (:func:`bunit.unit_train.group_forward` with ``residual``), a hybrid row in the row's output pass
        (:func:`bunit.unit_rows.row_forward` with ``residual``); otherwise as every backend does."""
        if residual is None or tuple(residual_map) != (1, 0) or x.is_cuda:
            return super().run_with_residual(layer, x, residual, residual_map)
        out_shape = (x.shape[0], layer.out_channels, (x.shape[2] - 1) // layer.stride + 1,
                     (x.shape[3] - 1) // layer.stride + 1)
        if unit_train.fuses_layer(layer, x) and unit_rows.runs_row(layer, x):
            xc, residual = _with_shortcut(_to_layout(x, torch.channels_last), x, residual)
            if tuple(residual.shape) == out_shape and unit_rows.takes_row_residual(xc, residual):
                return unit_rows.row_forward(layer, xc, residual)  # relu(units(x) + residual), channels_last
        elif len(layer.groups) == 1 and layer.out_perm is None:
            grp = layer.groups[0]
            if unit_train.fuses_group(grp, x):
                x, residual = _with_shortcut(_fused_layout(layer, x), x, residual)
            xg = layer._group_input(x, 0)
            if unit_train.fuses_group(grp, xg) and unit_train.takes_residual(xg, residual, out_shape,
                                                                             grp.conv1.weight.dtype):
                return unit_train.group_forward(grp, xg, residual)  # relu(units(x) + residual), (B, out, H/s, W/s)
        return super().run_with_residual(layer, x, residual, residual_map)
