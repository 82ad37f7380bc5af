"""BUnit-Net's basic unit and the fused group of same-spec units, with their closed-form costs.

Unit ``a-b-c``: conv(a->b, k x k, stride) + BN + ReLU, then conv(b->c, k x k) + BN + ReLU, no bias
(Lan, Cheung et al., TPAMI 2024). :class:`BasicUnit` is one unit as the paper's code builds it;
:class:`UnitGroup` holds ``n`` units of one spec as one grouped convolution and one BN per conv.
:func:`unit_params` and :func:`unit_macs` are the closed forms the tests check every counter against.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from bunit.functional import out_size
from bunit.spec import UnitSpec, parse_specs

__all__ = ["BasicUnit", "UnitGroup", "unit_params", "unit_macs"]


def unit_params(specs: Iterable[UnitSpec | str]) -> int:
    """Parameters of a unit row: ``sum k*k*(a*b + b*c) + 2*(b + c)`` (conv weights + affine BN)."""
    return sum(s.params for s in parse_specs(list(specs)))


def unit_macs(specs: Iterable[UnitSpec | str], h: int, w: int, stride: int | None = None) -> int:
    """Multiply-accumulates of a unit row for one ``h x w`` input (batch 1).

    Args:
        specs: the unit specs.
        h: input height.
        w: input width.
        stride: stride of the first convs; None takes each spec's own stride.

    Returns:
        ``sum Ho*Wo*k*k*(a*b + b*c)`` with ``Ho, Wo`` the output size of the first conv.
    """
    total = 0
    for s in parse_specs(list(specs)):
        st = s.stride if stride is None else stride
        hw = out_size(h, s.kernel, st) * out_size(w, s.kernel, st)
        total += hw * s.kernel * s.kernel * (s.a * s.b + s.b * s.c)
    return total


class BasicUnit(nn.Module):
    """One basic unit ``a-b-c`` (the reference form): conv-BN-ReLU, conv-BN-ReLU, no bias."""

    def __init__(self, spec: UnitSpec):
        super().__init__()
        self.spec = spec
        k, p = spec.kernel, spec.kernel // 2
        self.conv1 = nn.Conv2d(spec.a, spec.b, k, spec.stride, p, bias=False)
        self.bn1 = nn.BatchNorm2d(spec.b)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(spec.b, spec.c, k, 1, p, bias=False)
        self.bn2 = nn.BatchNorm2d(spec.c)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # (B, b, H/s, W/s)
        return self.act2(self.bn2(self.conv2(x)))  # (B, c, H/s, W/s)

    def extra_repr(self) -> str:
        return str(self.spec)


class UnitGroup(nn.Module):
    """``n`` units of one spec as grouped convolutions (``groups=n``) and one BN per conv over all of them.

    Unit ``j`` of the group owns rows ``j*b:(j+1)*b`` of ``conv1``/``bn1`` and ``j*c:(j+1)*c`` of
    ``conv2``/``bn2``.
    """

    def __init__(self, spec: UnitSpec, n: int):
        super().__init__()
        self.spec, self.n = spec, n
        k, p = spec.kernel, spec.kernel // 2
        self.conv1 = nn.Conv2d(n * spec.a, n * spec.b, k, spec.stride, p, groups=n, bias=False)
        self.bn1 = nn.BatchNorm2d(n * spec.b)
        self.act1 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(n * spec.b, n * spec.c, k, 1, p, groups=n, bias=False)
        self.bn2 = nn.BatchNorm2d(n * spec.c)
        self.act2 = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.act1(self.bn1(self.conv1(x)))  # (B, n*b, H/s, W/s)
        return self.act2(self.bn2(self.conv2(x)))  # (B, n*c, H/s, W/s)

    def extra_repr(self) -> str:
        return f"{self.n}x{self.spec}"
