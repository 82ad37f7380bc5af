"""Unit layers: a row of BUnit-Net basic units over one tensor, in a reference and a fused form.

After Lan, Cheung et al., "Compact Neural Network via Stacking Hybrid Units" (TPAMI 2024). The input
channels are split in order by each unit's ``a``; unit ``a-b-c`` maps its slice through
conv(a->b, stride) + BN + ReLU and conv(b->c) + BN + ReLU (no bias); the outputs are concatenated.

Two implementations compute the same function from the same weights:

- ``reference``: a ModuleList of tiny unit modules run in a Python loop, like the paper's code.
- ``fused``: units of one spec are gathered into a :class:`UnitGroup` (one grouped conv and one BN per
  conv); a channel gather feeds each group and one inverse permutation restores the output order.

The fused form runs on one of several execution backends (``layer.backend``), all with equal outputs. Each is a
:class:`bunit.backends.Backend` registered by name (one file in :mod:`bunit.backends`); the built-in ones:

- ``loop``: the per-unit loop over slices of the fused weights (the reference algorithm).
- ``grouped``: one grouped convolution per group and conv, NCHW (the default).
- ``grouped_cl``: the same in channels_last memory format.
- ``blockdiag``: one dense convolution per conv whose weight is zero off the unit blocks
  (:mod:`bunit.blockdiag`): rebuilt differentiably while autograd records, otherwise cached until a weight
  changes.
- ``bmm``: ``unfold`` + one batched matmul over the units of a group.
- ``stencil``: each grouped conv written out as ``k*k`` shifted, broadcast multiply-adds over the unit
  inputs, with no convolution kernel at all. Slow eagerly (it materialises a temporary per tap); it exists
  to be compiled: inductor turns a whole group (conv, BN, ReLU) into one vectorised loop nest, which on CPU
  beats the library's grouped convolution for units this small.
- ``compiled``: ``torch.compile`` of ``layer.compile_base`` (an eager backend, ``grouped`` unless the
  autotuner found a faster one, often ``stencil`` on CPU); the first call compiles and may take tens of
  seconds. Each layer compiles a function with its own code object, so each has its own dynamo cache (dynamo
  allows 8 graphs per code object and would otherwise run every layer past the eighth eagerly).
- ``fused_cpu``: one C++ kernel per group (:mod:`bunit.fused_cpu`), BN folded into the convs, the hidden
  activations of a tile of rows kept in cache; float32 on CPU in eval mode. In training mode, or while
  autograd records, it runs ``grouped`` instead (exact gradients and BN statistics); without a C++ compiler
  it raises, and the autotuner never picks it.
- ``unit_train``: the training path (:mod:`bunit.unit_train`), a C++ kernel with its own backward: in training mode
  each unit group runs whole in it, BatchNorm with batch statistics and ReLU fused around its two convolutions
  (``UnitGroupFn``); in eval mode each grouped 3x3 conv runs in the kernel and BN and ReLU are PyTorch's. Its cost
  follows the units' MACs where oneDNN's grouped convolution does not. Float32 (float64 too) on CPU; where the
  extension is not built, or for other kernel sizes, devices and dtypes, each conv runs as in ``grouped``.

State a backend keeps per layer (``blockdiag``'s dense weights, ``fused_cpu``'s folded weights, ``compiled``'s
function) lives in ``layer.caches`` under a name the backend declares; the layer empties it when it is pickled,
deep-copied or moved, and each backend checks its entry against the weights it was built from.
"""
from __future__ import annotations

from typing import Any, Callable, Iterable, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from bunit import blockdiag
from bunit.backends import BACKENDS, EAGER_BACKENDS, declared_caches, get_backend
from bunit.functional import bn_mode, bn_slice, shift_residual
from bunit.spec import UnitSpec, compact_specs, parse_specs
from bunit.units import BasicUnit, UnitGroup

__all__ = [
    "BACKENDS",
    "EAGER_BACKENDS",
    "IMPLS",
    "UnitLayer",
    "to_reference",
    "to_fused",
    "convert_units",
    "set_backend",
    "unit_layers",
]

IMPLS = ("reference", "fused")
_UNIT_KEYS = ("conv1.weight", "bn1.weight", "bn1.bias", "bn1.running_mean", "bn1.running_var",
              "conv2.weight", "bn2.weight", "bn2.bias", "bn2.running_mean", "bn2.running_var")


# --- the layer ----------------------------------------------------------------------------------


def _normalize(specs: Sequence[UnitSpec], stride: int | None) -> tuple[list[UnitSpec], int]:
    own = {s.stride for s in specs}
    if len(own) > 1:
        raise ValueError(f"specs: all units of a layer need one stride, got strides {sorted(own)}")
    spec_stride = own.pop()
    if stride is None:
        stride = spec_stride
    elif spec_stride not in (1, stride):
        raise ValueError(f"stride: {stride} contradicts the specs' own stride {spec_stride}")
    if stride < 1:
        raise ValueError(f"stride: must be >= 1, got {stride}")
    return [s if s.stride == stride else UnitSpec(s.a, s.b, s.c, kernel=s.kernel, stride=stride) for s in specs], stride


class UnitLayer(nn.Module):
    """A row of basic units over one tensor: split by ``a`` in order, run each unit, concatenate.

    Args:
        specs: unit specs in channel order (UnitSpecs or spec strings, ``"32x2-4-2"`` allowed).
        stride: stride of every unit's first conv; None takes it from the specs (default 1).
        impl: "fused" (grouped units, runs on ``backend``) or "reference" (per-unit modules in a loop).
        backend: execution backend of the fused form, a registered name (``BACKENDS``; the reference form always
            runs its own loop and ignores it).
    """

    def __init__(self, specs: Iterable[UnitSpec | str], *, stride: int | None = None, impl: str = "fused",
                 backend: str = "grouped"):
        super().__init__()
        parsed = parse_specs(list(specs) if not isinstance(specs, str) else specs)
        if not parsed:
            raise ValueError("specs: a unit layer needs at least one unit")
        if impl not in IMPLS:
            raise ValueError(f"impl: {impl!r} is not allowed; allowed: {', '.join(IMPLS)}")
        parsed, self.stride = _normalize(parsed, stride)
        self.specs: tuple[UnitSpec, ...] = tuple(parsed)
        self.impl = impl
        self.in_channels = sum(s.a for s in self.specs)
        self.out_channels = sum(s.c for s in self.specs)
        self.compile_base = "grouped"
        self._backend = "loop" if impl == "reference" else "grouped"
        self.caches: dict[str, Any] = {}  # the backends' per-layer state, by declared name (keep_cache)
        if impl == "reference":
            self.units = nn.ModuleList(BasicUnit(s) for s in self.specs)
        else:
            self._build_fused()
        self.backend = backend if impl == "fused" else "loop"
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Per-unit He init as the paper's code does it: ``kaiming_normal_(fan_out, relu)`` on every unit conv.

        The fan-out is the unit's own (``b*k*k`` for conv1, ``c*k*k`` for conv2), not the grouped weight's, so
        both implementations draw from the same distribution. BN weights are set to 1 and biases to 0.
        """
        with torch.no_grad():
            for mods in (self.units if self.impl == "reference" else self.groups):
                s = mods.spec
                mods.conv1.weight.normal_(0.0, (2.0 / (s.b * s.kernel ** 2)) ** 0.5)
                mods.conv2.weight.normal_(0.0, (2.0 / (s.c * s.kernel ** 2)) ** 0.5)
                for bn in (mods.bn1, mods.bn2):
                    bn.reset_parameters()

    # -- fused bookkeeping -----------------------------------------------------------------------

    def _build_fused(self) -> None:
        members: dict[UnitSpec, list[int]] = {}
        for i, s in enumerate(self.specs):
            members.setdefault(s, []).append(i)
        self.group_units: tuple[tuple[int, ...], ...] = tuple(tuple(v) for v in members.values())
        self.groups = nn.ModuleList(UnitGroup(s, len(v)) for s, v in members.items())
        in_off, out_off = [0], [0]
        for s in self.specs:
            in_off.append(in_off[-1] + s.a)
            out_off.append(out_off[-1] + s.c)
        # where unit i lives: (group, position in group)
        self._where = {u: (g, j) for g, us in enumerate(self.group_units) for j, u in enumerate(us)}
        self._in_ranges: list[tuple[int, int] | None] = []
        # fused_cpu: per group, the spec and each unit's first input and output channel in layer order
        self.kernel_plan = [(s.a, s.b, s.c, s.kernel, s.stride, torch.tensor([in_off[u] for u in us]),
                              torch.tensor([out_off[u] for u in us])) for us in self.group_units
                             for s in [self.specs[us[0]]]]
        cat_pos = [0] * self.out_channels
        pos = 0
        for g, us in enumerate(self.group_units):
            idx = [ch for u in us for ch in range(in_off[u], in_off[u + 1])]
            contiguous = idx == list(range(idx[0], idx[0] + len(idx)))
            self._in_ranges.append((idx[0], len(idx)) if contiguous else None)
            self.register_buffer(f"in_index{g}", torch.tensor(idx, dtype=torch.long), persistent=False)
            for u in us:
                for ch in range(out_off[u], out_off[u + 1]):
                    cat_pos[ch] = pos
                    pos += 1
        perm = None if cat_pos == list(range(self.out_channels)) else torch.tensor(cat_pos, dtype=torch.long)
        self.register_buffer("out_perm", perm, persistent=False)  # y = cat(groups)[:, out_perm]
        # the inverse maps, for gradients: cat(groups)'s grad = grad[:, out_inverse]; the layer's input gradient =
        # cat(each group's input gradient)[:, in_inverse] (None: the identity)
        self.register_buffer("out_inverse", None if perm is None else torch.argsort(perm), persistent=False)
        order = [ch for us in self.group_units for u in us for ch in range(in_off[u], in_off[u + 1])]
        inverse = None if order == list(range(self.in_channels)) else torch.argsort(torch.tensor(order))
        self.register_buffer("in_inverse", inverse, persistent=False)
        self.kernel = max(s.kernel for s in self.specs)
        blockdiag.register_index(self, in_off, out_off)

    # -- backend selection -----------------------------------------------------------------------

    @property
    def backend(self) -> str:
        """The execution backend (``loop`` only for the reference form)."""
        return self._backend

    @backend.setter
    def backend(self, name: str) -> None:
        get_backend(name)  # raises for a name that is not registered
        if self.impl == "reference" and name != "loop":
            raise ValueError(f"backend: the reference form runs only 'loop'; convert with to_fused() to use {name!r}")
        self._backend = name

    @property
    def fuses_residual(self) -> bool:
        """Whether the backend adds a residual inside its kernel and reads an option-A shortcut from the block input
        (``forward``'s ``residual_map``), so that a block hands over that input rather than the shortcut."""
        return self.impl == "fused" and get_backend(self._backend).fuses_residual

    # -- the backends' caches --------------------------------------------------------------------

    def keep_cache(self, name: str, value: Any) -> None:
        """Keep ``value`` as the cache ``name``, which a registered backend declares (``Backend.caches``)."""
        if name not in declared_caches():
            raise KeyError(f"cache: {name!r} is not declared by any backend; declared: "
                           f"{', '.join(sorted(declared_caches()))}")
        self.caches[name] = value

    def clear_caches(self) -> None:
        """Forget every backend's cached state (compiled functions, derived weights)."""
        self.caches = {}

    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["caches"] = {}  # a compiled closure and a cached weight belong to this object only
        return state

    def _apply(self, fn, *args, **kwargs):
        self.clear_caches()  # to(), float(), cuda(), ...: derived weights are rebuilt on the new tensors
        return super()._apply(fn, *args, **kwargs)

    # -- forward ---------------------------------------------------------------------------------

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None,
                residual_map: tuple[int, int] = (1, 0)) -> torch.Tensor:
        """The units' output; with ``residual``, ``relu(units(x) + residual)`` (a residual block's tail).

        Args:
            x: input ``(B, in, H, W)``.
            residual: None, or the shortcut ``(B, out, H/s, W/s)`` (``fused_cpu`` adds it inside the kernel).
            residual_map: ``(step, offset)``: the residual is ``shift_residual(residual, step, offset, out)``, an
                option-A shortcut of the tensor passed (``fused_cpu`` reads it so in the kernel, never building it).
        """
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input: expected (B, {self.in_channels}, H, W), got {tuple(x.shape)}")
        if self.impl == "reference":
            return self.add_residual(self._forward_reference(x), residual, residual_map)
        return get_backend(self._backend).run_with_residual(self, x, residual, residual_map)  # (B, out, H/s, W/s)

    def add_residual(self, y: torch.Tensor, residual: torch.Tensor | None,
                      residual_map: tuple[int, int]) -> torch.Tensor:
        """``relu(y + residual)`` with the residual mapped as ``forward`` says; ``y`` alone without one."""
        if residual is None:
            return y
        if tuple(residual_map) != (1, 0):
            residual = shift_residual(residual, *residual_map, self.out_channels)
        return F.relu(y + residual, inplace=True)

    def _forward_reference(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.split(x, [s.a for s in self.specs], dim=1)  # each (B, a, H, W)
        return torch.cat([unit(p) for unit, p in zip(self.units, parts)], dim=1)  # (B, out, H/s, W/s)

    def _group_input(self, x: torch.Tensor, g: int) -> torch.Tensor:
        rng = self._in_ranges[g]
        if rng is not None:
            return x if rng[1] == x.shape[1] else x.narrow(1, rng[0], rng[1])
        return x.index_select(1, getattr(self, f"in_index{g}"))  # (B, n*a, H, W)

    def run_groups(self, x: torch.Tensor, conv: Callable[[torch.Tensor, nn.Conv2d], torch.Tensor]) -> torch.Tensor:
        """The fused groups on ``x``: per group, its input channels gathered, ``conv`` (the backend's convolution of
        a group's conv module) + BN + ReLU twice; the outputs concatenated and put back in layer order."""
        outs = []
        for g, grp in enumerate(self.groups):
            h = grp.act1(grp.bn1(conv(self._group_input(x, g), grp.conv1)))  # (B, n*b, H/s, W/s)
            outs.append(grp.act2(grp.bn2(conv(h, grp.conv2))))  # (B, n*c, H/s, W/s)
        y = outs[0] if len(outs) == 1 else torch.cat(outs, dim=1)  # (B, out, H/s, W/s), group order
        return y if self.out_perm is None else y.index_select(1, self.out_perm)  # layer order

    def run_unit_loop(self, x: torch.Tensor) -> torch.Tensor:
        """Each unit on its own input slice through slices of the fused weights, in a Python loop (``loop``)."""
        modes = {id(bn): bn_mode(bn) for grp in self.groups for bn in (grp.bn1, grp.bn2)}
        parts = torch.split(x, [s.a for s in self.specs], dim=1)
        outs = []
        for u, part in enumerate(parts):
            g, j = self._where[u]
            grp, s = self.groups[g], self.specs[u]
            hb, hc = slice(j * s.b, (j + 1) * s.b), slice(j * s.c, (j + 1) * s.c)
            h = F.conv2d(part, grp.conv1.weight[hb], None, self.stride, s.kernel // 2)  # (B, b, H/s, W/s)
            h = F.relu(bn_slice(grp.bn1, h, hb, modes[id(grp.bn1)]))
            h = F.conv2d(h, grp.conv2.weight[hc], None, 1, s.kernel // 2)  # (B, c, H/s, W/s)
            outs.append(F.relu(bn_slice(grp.bn2, h, hc, modes[id(grp.bn2)])))
        return torch.cat(outs, dim=1)  # (B, out, H/s, W/s)

    def blockdiag_weights(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The ``blockdiag`` backend's dense weights ``(hidden, in, k, k)`` and ``(out, hidden, k, k)``, zero off
        the unit blocks, differentiable in the group weights (:func:`bunit.blockdiag.weights`)."""
        return blockdiag.weights(self)

    # -- state in unit order, conversion ---------------------------------------------------------

    def unit_state(self, *, grad: bool = False) -> list[dict[str, torch.Tensor | None]]:
        """Per unit, in layer order: views of its conv weights, BN affine parameters and running stats.

        Args:
            grad: return views of the parameters' ``.grad`` instead (None where a grad is missing; the
                running stats are returned as they are).

        Returns:
            One dict per unit with keys ``conv1.weight, bn1.weight, bn1.bias, bn1.running_mean,
            bn1.running_var`` and the same for ``conv2``/``bn2``.
        """
        out = []
        for u, s in enumerate(self.specs):
            if self.impl == "reference":
                mods, rows = self.units[u], {"1": slice(None), "2": slice(None)}
            else:
                g, j = self._where[u]
                mods, rows = self.groups[g], {"1": slice(j * s.b, (j + 1) * s.b), "2": slice(j * s.c, (j + 1) * s.c)}
            entry = {}
            for key in _UNIT_KEYS:
                mod_name, attr = key.split(".")
                t = getattr(getattr(mods, mod_name), attr)
                if grad and isinstance(t, nn.Parameter):
                    t = t.grad
                entry[key] = None if t is None else t[rows[mod_name[-1]]]
            out.append(entry)
        return out

    def _bn_modules(self) -> list[list[nn.BatchNorm2d]]:
        """Per unit, its (bn1, bn2) modules."""
        if self.impl == "reference":
            return [[m.bn1, m.bn2] for m in self.units]
        groups = [self.groups[self._where[u][0]] for u in range(len(self.specs))]
        return [[grp.bn1, grp.bn2] for grp in groups]

    def to_impl(self, impl: str) -> "UnitLayer":
        """A new layer of implementation ``impl`` with the same weights, BN statistics, mode, device and dtype."""
        if impl not in IMPLS:
            raise ValueError(f"impl: {impl!r} is not allowed; allowed: {', '.join(IMPLS)}")
        ref = next(self.parameters())
        new = UnitLayer(self.specs, stride=self.stride, impl=impl).to(device=ref.device, dtype=ref.dtype)
        new.train(self.training)
        if impl == "fused" and self.impl == "fused":
            new.backend, new.compile_base = self.backend, self.compile_base
        with torch.no_grad():
            for dst, src in zip(new.unit_state(), self.unit_state()):
                for key in _UNIT_KEYS:
                    dst[key].copy_(src[key])
            for dst_bns, src_bns in zip(new._bn_modules(), self._bn_modules()):
                for dst_bn, src_bn in zip(dst_bns, src_bns):
                    count = max(int(dst_bn.num_batches_tracked), int(src_bn.num_batches_tracked))
                    dst_bn.num_batches_tracked.fill_(count)
                    dst_bn.momentum, dst_bn.eps = src_bn.momentum, src_bn.eps
        for dst, src in zip(new.parameters(), self.parameters()):
            dst.requires_grad_(src.requires_grad)
        return new

    def extra_repr(self) -> str:
        units = ", ".join(compact_specs(self.specs))
        return (f"{self.in_channels}->{self.out_channels}, stride={self.stride}, impl={self.impl}, "
                f"backend={self.backend}, units=[{units}]")


# --- model-level helpers ------------------------------------------------------------------------


def to_reference(layer: UnitLayer) -> UnitLayer:
    """A reference-form copy of ``layer`` (same weights and BN statistics)."""
    return layer.to_impl("reference")


def to_fused(layer: UnitLayer) -> UnitLayer:
    """A fused-form copy of ``layer`` (same weights and BN statistics)."""
    return layer.to_impl("fused")


def unit_layers(model: nn.Module) -> list[tuple[str, UnitLayer]]:
    """All unit layers of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, UnitLayer)]


def convert_units(model: nn.Module, impl: str) -> nn.Module:
    """Swap every unit layer of ``model`` to ``impl`` in place (weights kept); returns ``model``."""
    for name, layer in unit_layers(model):
        if layer.impl != impl:
            parent = model.get_submodule(name.rpartition(".")[0]) if "." in name else model
            setattr(parent, name.rpartition(".")[2], layer.to_impl(impl))
    return model


def set_backend(model: nn.Module, backend: str) -> nn.Module:
    """Set the execution backend (a registered name) of every fused unit layer of ``model``; returns ``model``."""
    get_backend(backend)  # raises for a name that is not registered
    for _, layer in unit_layers(model):
        if layer.impl == "fused":
            layer.backend = backend
    return model
