"""The ``blockdiag`` execution backend: each conv of a unit layer as one dense convolution, zero off the unit blocks.

Conv1's dense weight is ``(hidden, in, k, k)`` with the hidden channels in group order; conv2's is
``(out, hidden, k, k)`` with its rows in layer order, so no activation permutation is needed between or after the
two convolutions. The weights are built with ``index_put`` from the group weights: while autograd records they are
rebuilt on every forward (gradients reach the group weights, training is exact); otherwise they are kept in the
layer's cache ``WEIGHT_CACHE`` (declared by the backend, :mod:`bunit.backends.blockdiag`) and rebuilt whenever a
group weight changes (storage, version counter, dtype or device).

The functions take a fused :class:`bunit.layers.UnitLayer`; :func:`register_index` is called once when the layer
builds its groups.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F

from bunit.functional import bn_cat

__all__ = ["WEIGHT_CACHE", "register_index", "weights", "cached_weights", "forward"]

WEIGHT_CACHE = "blockdiag.weights"
"""The layer's cache of dense weights: ``(what they were built from, (w1, w2))``."""


def register_index(layer: Any, in_off: list[int], out_off: list[int]) -> None:
    """Buffers of index pairs that place each group's weights into the dense weights; sets ``hidden_channels``.

    Args:
        layer: the fused unit layer (its ``specs``, ``group_units``; buffers are registered on it).
        in_off, out_off: first input and output channel of every unit, in layer order (one more entry at the end).
    """
    hidden_off = 0
    for g, us in enumerate(layer.group_units):
        s, n = layer.specs[us[0]], len(us)
        unit_in = torch.tensor([in_off[u] for u in us])  # (n,) first input channel of each unit
        unit_out = torch.tensor([out_off[u] for u in us])  # (n,) first output channel of each unit
        rows1 = hidden_off + torch.arange(n * s.b)  # conv1 rows: hidden channels in group order
        cols1 = unit_in.repeat_interleave(s.b)[:, None] + torch.arange(s.a)  # (n*b, a)
        rows2 = unit_out.repeat_interleave(s.c) + torch.arange(s.c).repeat(n)  # conv2 rows: layer order
        cols2 = hidden_off + (torch.arange(n) * s.b).repeat_interleave(s.c)[:, None] + torch.arange(s.b)  # (n*c, b)
        layer.register_buffer(f"bd_rows1_{g}", rows1[:, None].expand(-1, s.a).contiguous(), persistent=False)
        layer.register_buffer(f"bd_cols1_{g}", cols1, persistent=False)
        layer.register_buffer(f"bd_rows2_{g}", rows2[:, None].expand(-1, s.b).contiguous(), persistent=False)
        layer.register_buffer(f"bd_cols2_{g}", cols2, persistent=False)
        hidden_off += n * s.b
    layer.hidden_channels = hidden_off


def weights(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """The dense weights ``(hidden, in, k, k)`` and ``(out, hidden, k, k)``, differentiable in the group weights."""
    k = layer.kernel
    ref = layer.groups[0].conv1.weight
    w1 = ref.new_zeros(layer.hidden_channels, layer.in_channels, k, k)
    w2 = ref.new_zeros(layer.out_channels, layer.hidden_channels, k, k)
    for g, grp in enumerate(layer.groups):
        pad = (k - grp.spec.kernel) // 2
        a1, a2 = grp.conv1.weight, grp.conv2.weight
        if pad:
            a1, a2 = F.pad(a1, (pad,) * 4), F.pad(a2, (pad,) * 4)
        w1 = w1.index_put((getattr(layer, f"bd_rows1_{g}"), getattr(layer, f"bd_cols1_{g}")), a1)
        w2 = w2.index_put((getattr(layer, f"bd_rows2_{g}"), getattr(layer, f"bd_cols2_{g}")), a2)
    return w1, w2


def cached_weights(layer: Any) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`weights`, cached in the layer unless autograd records or the weights are inference tensors."""
    group_weights = [w for grp in layer.groups for w in (grp.conv1.weight, grp.conv2.weight)]
    if torch.is_grad_enabled() and any(w.requires_grad for w in group_weights):
        return weights(layer)  # autograd records: rebuild so gradients reach the group weights
    if any(w.is_inference() for w in group_weights):
        return weights(layer)  # inference tensors have no version counter: nothing can be cached
    key = tuple((w.data_ptr(), w._version, w.dtype, w.device) for w in group_weights)
    cache = layer.caches.get(WEIGHT_CACHE)
    if cache is None or cache[0] != key:
        with torch.no_grad():
            cache = (key, weights(layer))
        layer.keep_cache(WEIGHT_CACHE, cache)
    return cache[1]


def forward(layer: Any, x: torch.Tensor) -> torch.Tensor:
    """The layer's output on ``x`` ``(B, in, H, W)``: two dense convolutions, each followed by its BNs and ReLU."""
    w1, w2 = cached_weights(layer)
    p = layer.kernel // 2
    h = F.conv2d(x, w1, None, layer.stride, p)  # (B, hidden, H/s, W/s), group order
    h = F.relu(bn_cat([grp.bn1 for grp in layer.groups], h))
    y = F.conv2d(h, w2, None, 1, p)  # (B, out, H/s, W/s), layer order
    return F.relu(bn_cat([grp.bn2 for grp in layer.groups], y, layer.out_perm))
