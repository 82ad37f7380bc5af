"""A hybrid row of unit layers in training on CPU, lane by lane in channels_last (the ``unit_train`` backend's path
for rows of several unit specs).

A hybrid row (a :class:`bunit.layers.UnitLayer` of several spec groups) on the per-group path of
:mod:`bunit.unit_train` makes one kernel call per group and pass, gathers each group's input channels and
concatenates the outputs. Under CPU bf16 autocast with AVX512-BF16, a row of units of at most ``ROW_MAX_CHANNELS``
channels (16k input and output channels, :func:`runs_row`) runs instead as :class:`UnitRowFn`: every channel is a
lane, each lane's inputs are gathered per pixel into bf16 pairs by tables built once per layer (:class:`RowPlan`),
and each pass over the row is one call of the :mod:`bunit.unit_train` extension whatever its specs
(``csrc/unit_train.cpp``, "hybrid rows in channels_last"; BN1's gradient sums in conv2's backward pass). Its
operands are autocast's, rounded to bf16 at strides 1 and 2.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from bunit.functional import bn_factors
from bunit.unit_train import bf16_dot_products, bn2_gradient, load_extension, storage_dtype

__all__ = ["ROW_PLAN_CACHE", "ROW_MAX_CHANNELS", "RowPlan", "row_plan", "runs_row", "UnitRowFn", "row_forward"]


ROW_PLAN_CACHE = "unit_train.row_plan"
ROW_MAX_CHANNELS = 4  # the most channels a unit's a, b or c may have for a row to run lane by lane


class RowPlan:
    """The gather tables of a hybrid row (a :class:`bunit.layers.UnitLayer` of several groups) for the kernel's
    lane-by-lane channels_last path (``csrc/unit_train.cpp``, "hybrid rows").

    Lanes: conv1's hidden channels in group order (the concatenation of the groups' ``bn1`` channels), padded with
    zero lanes to a multiple of 16 (``hidden``); conv2's outputs in layer order. A table ``idx`` ``[K, lanes]`` (int32)
    names, for each lane, the channel its k-th input is read from (-1: none), and ``widx`` ``[K, 9, lanes]`` (int64)
    the position of the matching weight in the concatenation of the groups' flattened weights (its last position,
    ``zero1``/``zero2``, a zero): ``*1``/``*2`` conv1's and conv2's forward (the weight gradient's order too),
    ``*1b``/``*2b`` their input gradients (a lane of the convolution's input reads the gradients of its unit's outputs
    of that convolution, taps flipped).
    ``inv1``/``inv2`` put a weight gradient in table order back in the groups' order; ``hid_lanes``/``out_lanes``
    give the lane of each channel of the groups' ``bn1``/``bn2`` in order."""

    def __init__(self, layer: nn.Module):
        specs, units = layer.specs, layer.group_units
        in_off, out_off = [0], [0]
        for s in specs:
            in_off.append(in_off[-1] + s.a)
            out_off.append(out_off[-1] + s.c)
        hid_off, h = {}, 0
        for us in units:
            for u in us:
                hid_off[u] = h
                h += specs[u].b
        self.hidden_channels, self.hidden = h, -(-h // 16) * 16
        cin, cout = layer.in_channels, layer.out_channels
        n1 = [grp.conv1.weight.numel() for grp in layer.groups]
        n2 = [grp.conv2.weight.numel() for grp in layer.groups]
        base1 = [sum(n1[:g]) for g in range(len(n1))]
        base2 = [sum(n2[:g]) for g in range(len(n2))]
        self.sizes1, self.sizes2 = n1, n2
        self.zero1, self.zero2 = sum(n1), sum(n2)
        ka, kb, kc = (max(getattr(s, f) for s in specs) for f in "abc")
        taps = torch.arange(9)
        idx1 = torch.full((ka, self.hidden), -1, dtype=torch.int32)
        w1 = torch.full((ka, 9, self.hidden), self.zero1, dtype=torch.long)
        idx2 = torch.full((kb, cout), -1, dtype=torch.int32)
        w2 = torch.full((kb, 9, cout), self.zero2, dtype=torch.long)
        idx2b = torch.full((kc, self.hidden), -1, dtype=torch.int32)
        w2b = torch.full((kc, 9, self.hidden), self.zero2, dtype=torch.long)
        idx1b = torch.full((kb, cin), -1, dtype=torch.int32)
        w1b = torch.full((kb, 9, cin), self.zero1, dtype=torch.long)
        out_lanes = []
        for g, us in enumerate(units):
            a, b, c = specs[us[0]].a, specs[us[0]].b, specs[us[0]].c
            for pos, u in enumerate(us):
                for j in range(b):
                    hl = hid_off[u] + j
                    for k in range(a):  # conv1: hidden lane hl reads input channel in_off + k
                        idx1[k, hl] = in_off[u] + k
                        w1[k, :, hl] = base1[g] + ((pos * b + j) * a + k) * 9 + taps
                        idx1b[j, in_off[u] + k] = hl  # its input gradient: input channel in_off + k reads hl
                        w1b[j, :, in_off[u] + k] = base1[g] + ((pos * b + j) * a + k) * 9 + 8 - taps
                    for m in range(c):  # conv2's input gradient: hidden lane hl reads output channel out_off + m
                        idx2b[m, hl] = out_off[u] + m
                        w2b[m, :, hl] = base2[g] + ((pos * c + m) * b + j) * 9 + 8 - taps
                for m in range(c):
                    o = out_off[u] + m
                    out_lanes.append(o)
                    for k in range(b):  # conv2: output lane o reads hidden lane hid_off + k
                        idx2[k, o] = hid_off[u] + k
                        w2[k, :, o] = base2[g] + ((pos * c + m) * b + k) * 9 + taps
        self.idx1, self.idx2, self.idx1b, self.idx2b = idx1, idx2, idx1b, idx2b
        self.widx1, self.widx2, self.widx1b, self.widx2b = w1, w2, w1b, w2b
        self.inv1, self.inv2 = _inverse(w1, self.zero1), _inverse(w2, self.zero2)
        self.hid_lanes = torch.arange(h)
        self.out_lanes = torch.tensor(out_lanes)
        self.hid_sizes = [grp.bn1.num_features for grp in layer.groups]
        self.out_sizes = [grp.bn2.num_features for grp in layer.groups]
        self.shapes1 = [tuple(grp.conv1.weight.shape) for grp in layer.groups]
        self.shapes2 = [tuple(grp.conv2.weight.shape) for grp in layer.groups]
        self.stride = layer.stride


def _inverse(widx: torch.Tensor, zero: int) -> torch.Tensor:
    """For each weight position below ``zero``, where it sits in ``widx`` flattened (each appears once)."""
    flat = widx.reshape(-1)
    real = (flat != zero).nonzero().squeeze(1)
    inv = torch.full((zero,), -1, dtype=torch.long)
    inv[flat[real]] = real
    assert bool((inv >= 0).all()), "every weight has a lane"
    return inv


def row_plan(layer: nn.Module) -> RowPlan:
    """The layer's :class:`RowPlan`, built once and kept in its caches (the tables follow its specs only)."""
    plan = layer.caches.get(ROW_PLAN_CACHE)
    if plan is None:
        plan = RowPlan(layer)
        layer.keep_cache(ROW_PLAN_CACHE, plan)
    return plan


def runs_row(layer: nn.Module, x: torch.Tensor) -> bool:
    """Whether the kernel runs ``layer`` (a fused :class:`bunit.layers.UnitLayer` whose groups all run here,
    :func:`fuses_group`) whole in channels_last, one lane per channel (:class:`UnitRowFn`): a hybrid row (several
    groups) of units of at most ``ROW_MAX_CHANNELS`` channels each, 16k input and output channels, stored in bf16
    and multiplied as the bf16 dot products multiply (CPU bf16 autocast, AVX512-BF16). Such a layer is given its
    input channels_last, and returns its output so."""
    grps = layer.groups
    if len(grps) < 2 or not x.is_cpu or layer.in_channels % 16 or layer.out_channels % 16:
        return False
    if max(max(s.a, s.b, s.c) for s in layer.specs) > ROW_MAX_CHANNELS or layer.stride not in (1, 2):
        return False
    bns = [g.bn1 for g in grps], [g.bn2 for g in grps]
    same = all(len({bn.eps for bn in b}) == 1 and len({bn.running_mean is None for bn in b}) == 1 for b in bns)
    return (same and storage_dtype(grps[0].conv1.weight.dtype) == torch.bfloat16 and bf16_dot_products()
            and load_extension().has_unit_rows())


def _split(t: torch.Tensor, sizes: list[int], shapes: list[tuple] | None = None) -> list[torch.Tensor]:
    parts = torch.split(t, sizes)
    return list(parts) if shapes is None else [p.view(s) for p, s in zip(parts, shapes)]


class UnitRowFn(torch.autograd.Function):
    """A hybrid row in training mode, every group as :class:`UnitGroupFn` computes it, in channels_last with one lane
    per channel (``csrc/unit_train.cpp``, "hybrid rows"): conv1 over all units in one call (each hidden lane's
    inputs gathered by the :class:`RowPlan`'s tables), BN1 of all lanes, conv2 likewise with BN1 + ReLU applied to
    its input as it is gathered, BN2 + ReLU written in layer order; no gather of a group's input channels, no
    concatenation. The backward takes BN2's gradient sums, conv2's input gradient with BN1's gradient sums in the
    same pass, conv2's weight gradient, then conv1's input gradient (in layer order) and weight gradient. Running
    statistics and counters change as ``nn.BatchNorm2d`` changes them. ``params``: per group ``(w1, g1, b1, w2, g2,
    b2)``, flattened; ``bns``: per group ``(bn1, bn2)``; ``factors``: per group the two averaging factors. With a
    ``residual`` (a block's shortcut, see :func:`takes_row_residual`), BN2's output pass also adds it and applies the
    block's ReLU, and the backward takes that ReLU in the pass of BN2's gradient sums (as :class:`UnitGroupFn`
    does); an identity shortcut (the input itself, stored bf16 channels_last) has its gradient added to the input
    gradient in conv1's backward pass, as autograd would add the two (bit for bit, tested)."""

    @staticmethod
    @torch.amp.custom_fwd(device_type="cpu")
    def forward(ctx, x, residual, plan: RowPlan, bns: tuple, factors: tuple, *params):
        ext = load_extension()
        ctx.input_dtype = x.dtype
        given = x
        x = x.to(torch.bfloat16).contiguous(memory_format=torch.channels_last)
        ctx.fold = residual is given and x is given  # an identity shortcut, stored as is: its gradient folded in
        w1s, g1s, b1s, w2s, g2s, b2s = (params[i::6] for i in range(6))
        zero = params[0].new_zeros(1)
        flat1 = torch.cat([w.detach().reshape(-1) for w in w1s] + [zero])
        flat2 = torch.cat([w.detach().reshape(-1) for w in w2s] + [zero])
        y1, st1 = ext.row_conv_forward(x, plan.idx1, flat1[plan.widx1], plan.stride)  # (B, hidden, H/s, W/s)
        count = y1.shape[0] * y1.shape[2] * y1.shape[3]
        if count <= 1:  # as F.batch_norm refuses it in training
            raise ValueError(f"Expected more than 1 value per channel when training, got input size {tuple(y1.shape)}")
        bn1s, bn2s = [b[0] for b in bns], [b[1] for b in bns]

        def coefficients(st, bn_list, gs, bs, lanes, fac):
            tracked = bn_list[0].running_mean is not None
            return ext.row_bn_coefficients(st, count, [g.detach() for g in gs], [b.detach() for b in bs],
                                           bn_list[0].eps, [bn.running_mean for bn in bn_list] if tracked else [],
                                           [bn.running_var for bn in bn_list] if tracked else [], list(fac), lanes,
                                           params[0])

        m1, sc1, sh1 = coefficients(st1, bn1s, g1s, b1s, plan.hid_lanes, [f[0] for f in factors])
        y2, st2 = ext.row_conv_forward(y1, plan.idx2, flat2[plan.widx2], 1, sc1, sh1)  # (B, out, H/s, W/s)
        m2, sc2, sh2 = coefficients(st2, bn2s, g2s, b2s, plan.out_lanes, [f[1] for f in factors])
        # with a residual: relu(that + residual) in the residual's dtype, the block's tail in the same pass
        out = ext.bn_relu_apply(y2, sc2, sh2, True, residual)
        ctx.save_for_backward(x, y1, y2, sc1, sh1, sc2, sh2, m1, m2, flat1, flat2,
                              out if residual is not None else None)
        ctx.plan, ctx.count = plan, count
        return out

    @staticmethod
    @torch.amp.custom_bwd(device_type="cpu")
    def backward(ctx, grad: torch.Tensor):
        ext = load_extension()
        x, y1, y2, sc1, sh1, sc2, sh2, m1, m2, flat1, flat2, out = ctx.saved_tensors
        plan, count = ctx.plan, ctx.count
        need = ctx.needs_input_grad
        need_x, need_res, need_w1, need_w2 = need[0], need[1], any(need[5::6]), any(need[8::6])
        dg2, db2, a2, b2, g, gres = bn2_gradient(ext, grad, y2, sc2, sh2, count, m2, flat1, out, torch.bfloat16)
        gh, sums1, gw2 = ext.row_conv2_backward(g, y2, sc2, sh2, a2, b2, y1, sc1, sh1, plan.idx2b,
                                                flat2[plan.widx2b], plan.idx2, need_w2)
        dg1, db1, a1, b1 = ext.row_grad_coefficients(sums1, sc1, m1, count, flat1)
        add = gres if ctx.fold and need_x and gres is not None and gres.dtype == x.dtype and gres.shape == x.shape \
            and gres.is_contiguous(memory_format=torch.channels_last) else None
        gx, gw1 = ext.row_conv1_backward(gh, y1, sc1, sh1, a1, b1, x, plan.idx1b, flat1[plan.widx1b], plan.idx1,
                                         plan.stride, need_x, need_w1, add)
        gres = gres if add is None else None  # with the fold, x's gradient carries the shortcut's
        n = len(plan.sizes1)
        w1g = _split(gw1.reshape(-1)[plan.inv1], plan.sizes1, plan.shapes1) if need_w1 else [None] * n
        w2g = _split(gw2.reshape(-1)[plan.inv2], plan.sizes2, plan.shapes2) if need_w2 else [None] * n
        g1g, b1g = (_split(t[plan.hid_lanes], plan.hid_sizes) for t in (dg1, db1))
        g2g, b2g = (_split(t[plan.out_lanes], plan.out_sizes) for t in (dg2, db2))
        grads = [t for k in range(n) for t in (w1g[k], g1g[k], b1g[k], w2g[k], g2g[k], b2g[k])]
        grads = [t if want else None for t, want in zip(grads, need[5:])]
        return gx.to(ctx.input_dtype) if need_x else None, gres if need_res else None, None, None, None, *grads


def takes_row_residual(x: torch.Tensor, residual: torch.Tensor) -> bool:
    """Whether :func:`row_forward` adds ``residual`` in its output pass for its (channels_last) input ``x``: a CPU
    tensor of the output's shape, channels_last, bf16 (the row's storage) or float32."""
    return (residual.is_cpu and residual.dim() == 4 and residual.is_contiguous(memory_format=torch.channels_last)
            and residual.dtype in (torch.bfloat16, torch.float32))


def row_forward(layer: nn.Module, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
    """The output of ``layer`` (see :func:`runs_row`) in training mode through :class:`UnitRowFn`, channels_last;
    counters and running statistics change as the layer's own forward changes them. With ``residual`` (see
    :func:`takes_row_residual`, of the output's shape), ``relu(layer(x) + residual)``, the add and ReLU in the row's
    output pass."""
    bns, params = [], []
    for grp in layer.groups:
        bn1, bn2, conv1, conv2 = grp.bn1, grp.bn2, grp.conv1, grp.conv2
        bns.append((bn1, bn2))
        params += [conv1.weight, bn1.weight, bn1.bias, conv2.weight, bn2.weight, bn2.bias]
    f = bn_factors([bn for pair in bns for bn in pair])  # bumps num_batches_tracked as BatchNorm2d does
    factors = tuple(zip(f[0::2], f[1::2]))
    return UnitRowFn.apply(x, residual, row_plan(layer), tuple(bns), factors, *params)
