"""Functional pieces of the unit layer's eager backends: batch norm over slices or concatenations of several
BN modules (running statistics written back into each module), and grouped convolutions written as an unfold +
batched matmul (``bmm``) or as shifted multiply-adds (``stencil``). :mod:`bunit.layers` and the backends of
:mod:`bunit.backends` compose them."""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["bn_mode", "bn_factors", "bn_stats", "bn_slice", "bn_cat", "conv_module", "conv_bmm", "conv_stencil",
           "out_size", "shift_residual", "is_channels_last"]


def is_channels_last(t: torch.Tensor) -> bool:
    """Whether ``t`` is laid out channels_last and not also NCHW-contiguous (a tensor with one channel or a 1x1 plane
    is both, and counts as NCHW)."""
    return not t.is_contiguous() and t.is_contiguous(memory_format=torch.channels_last)


def out_size(size: int, kernel: int, stride: int) -> int:
    """Output side of a convolution with ``kernel // 2`` padding."""
    return (size + 2 * (kernel // 2) - kernel) // stride + 1


def shift_residual(r: torch.Tensor, step: int, offset: int, channels: int) -> torch.Tensor:
    """An option-A shortcut of ``r`` (B, C, H, W): every ``step``-th row and column, channel ``o`` of the result
    taken from channel ``o - offset`` of ``r`` (zero where that does not exist), ``channels`` channels in all."""
    r = r[:, :, ::step, ::step] if step > 1 else r
    return F.pad(r, (0, 0, 0, 0, offset, channels - r.shape[1] - offset))  # (B, channels, H/step, W/step)


def bn_mode(bn: nn.BatchNorm2d) -> tuple[bool, float]:
    """What ``_BatchNorm.forward`` does before ``F.batch_norm``: bump the counter, return (batch stats?, factor)."""
    factor = 0.0 if bn.momentum is None else bn.momentum
    if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None:
        bn.num_batches_tracked.add_(1)
        factor = 1.0 / float(bn.num_batches_tracked) if bn.momentum is None else bn.momentum
    batch_stats = bn.training or (bn.running_mean is None and bn.running_var is None)
    return batch_stats, factor


def bn_factors(bns: Sequence[nn.BatchNorm2d]) -> list[float]:
    """``bn_mode(bn)[1]`` of each of ``bns``, their counters bumped as ``bn_mode`` bumps them: in one call where every
    one has a momentum (its factor, whatever the counter), else one by one."""
    if any(bn.momentum is None for bn in bns):
        return [bn_mode(bn)[1] for bn in bns]
    counters = [bn.num_batches_tracked for bn in bns
                if bn.training and bn.track_running_stats and bn.num_batches_tracked is not None]
    if counters:
        torch._foreach_add_(counters, 1)
    return [bn.momentum for bn in bns]


def bn_stats(bn: nn.BatchNorm2d) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    use = not bn.training or bn.track_running_stats
    return (bn.running_mean, bn.running_var) if use else (None, None)


def _sl(t: torch.Tensor | None, sl: slice) -> torch.Tensor | None:
    return None if t is None else t[sl]


def bn_slice(bn: nn.BatchNorm2d, x: torch.Tensor, sl: slice, mode: tuple[bool, float]) -> torch.Tensor:
    """BN over channels ``sl`` of ``bn``; running stats are updated in place through the slice views."""
    rm, rv = bn_stats(bn)
    return F.batch_norm(x, _sl(rm, sl), _sl(rv, sl), _sl(bn.weight, sl), _sl(bn.bias, sl), mode[0], mode[1], bn.eps)


def bn_cat(bns: Sequence[nn.BatchNorm2d], x: torch.Tensor, perm: torch.Tensor | None = None) -> torch.Tensor:
    """One BN call over the concatenated channels of ``bns`` (reordered by ``perm``), writing running stats back."""
    modes = [bn_mode(bn) for bn in bns]
    batch_stats, factor = modes[0]

    def cat(ts: list[torch.Tensor | None]) -> torch.Tensor | None:
        if any(t is None for t in ts):
            return None
        t = ts[0] if len(ts) == 1 else torch.cat(ts)
        return t if perm is None else t.index_select(0, perm)

    stats = [bn_stats(bn) for bn in bns]
    rm, rv = cat([s[0] for s in stats]), cat([s[1] for s in stats])
    if len(bns) == 1 and perm is None:  # the buffers themselves: F.batch_norm updates them in place
        return F.batch_norm(x, rm, rv, bns[0].weight, bns[0].bias, batch_stats, factor, bns[0].eps)
    out = F.batch_norm(x, rm, rv, cat([bn.weight for bn in bns]), cat([bn.bias for bn in bns]),
                       batch_stats, factor, bns[0].eps)
    if batch_stats and rm is not None:  # write the updated statistics back into each module's buffers
        with torch.no_grad():
            if perm is not None:
                rm, rv = torch.empty_like(rm).index_copy_(0, perm, rm), torch.empty_like(rv).index_copy_(0, perm, rv)
            sizes = [bn.num_features for bn in bns]
            for bn, m, v in zip(bns, rm.split(sizes), rv.split(sizes)):
                bn.running_mean.copy_(m)
                bn.running_var.copy_(v)
    return out


def conv_module(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """``conv(x)``: the convolution module itself (the ``grouped`` backends' convolution)."""
    return conv(x)


def conv_bmm(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A grouped conv as an unfold (im2col) + one batched matmul over the groups.

    The patches come from ``Tensor.unfold`` views of the padded input, copied once into the
    ``(groups, a*k*k, B*Ho*Wo)`` matrix; on CPU this is about ten times faster than ``F.unfold``.
    """
    n, k, s, p = conv.groups, conv.kernel_size[0], conv.stride[0], conv.padding[0]
    bsz, cin, h, w = x.shape
    ho, wo = out_size(h, k, s), out_size(w, k, s)
    patches = F.pad(x, (p, p, p, p)).unfold(2, k, s).unfold(3, k, s)  # (B, n*a, Ho, Wo, k, k), a view
    cols = patches.reshape(bsz, n, cin // n, ho, wo, k, k).permute(1, 2, 5, 6, 0, 3, 4)  # (n, a, k, k, B, Ho, Wo)
    cols = cols.reshape(n, (cin // n) * k * k, bsz * ho * wo)  # (n, a*k*k, B*Ho*Wo), the one copy
    weight = conv.weight.reshape(n, conv.out_channels // n, -1)  # (n, b, a*k*k); copies a channels_last weight
    out = torch.bmm(weight, cols)  # (n, b, B*Ho*Wo)
    return out.view(conv.out_channels, bsz, ho, wo).transpose(0, 1)  # (B, n*b, Ho, Wo), a strided view


def conv_stencil(x: torch.Tensor, conv: nn.Conv2d) -> torch.Tensor:
    """A grouped conv as ``k*k`` shifted multiply-adds: ``y[u, o] = sum_{j, tap} w[u, o, j, tap] * x[u, j] shifted``.

    Every tap broadcasts the ``(n, 1, a)`` input slices against the ``(n, b, a)`` weights and sums over ``a``;
    there is no convolution call, so under ``torch.compile`` the whole conv (and the BN and ReLU after it)
    becomes one pointwise loop nest with ``k*k*a`` loads per output.
    """
    n, k, s, p = conv.groups, conv.kernel_size[0], conv.stride[0], conv.padding[0]
    bsz, cin, h, w = x.shape
    a, b = cin // n, conv.out_channels // n
    ho, wo = out_size(h, k, s), out_size(w, k, s)
    xp = F.pad(x, (p, p, p, p)).unflatten(1, (n, 1, a))  # (B, n, 1, a, H+2p, W+2p)
    weight = conv.weight.reshape(n, b, a, k, k)
    out = None
    for dy in range(k):
        for dx in range(k):
            xs = xp[..., dy:dy + s * (ho - 1) + 1:s, dx:dx + s * (wo - 1) + 1:s]  # (B, n, 1, a, Ho, Wo)
            term = (xs * weight[:, :, :, dy, dx, None, None]).sum(3)  # (B, n, b, Ho, Wo)
            out = term if out is None else out + term
    return out.flatten(1, 2)  # (B, n*b, Ho, Wo)
