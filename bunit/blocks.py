"""BUnit blocks: drop-in replacements for ResNet basic blocks, bottlenecks and VGG conv-BN-ReLU triples.

After Lan, Cheung et al., "Compact Neural Network via Stacking Hybrid Units" (TPAMI 2024) and its public
ResNet code: a unit layer replaces the dense 3x3 convolutions while the shortcut stays as it was. Blocks are
recognised by duck typing (``conv1, bn1, conv2, bn2``; ``conv3`` for a bottleneck; a shortcut module named
``shortcut`` as in the CIFAR ResNets or ``downsample`` as in torchvision).
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from bunit.layers import UnitLayer
from bunit.spec import UnitSpec

__all__ = ["BUnitBasicBlock", "BUnitBottleneck", "BUnitConv", "block_kind", "block_io"]


def block_kind(module: nn.Module) -> str | None:
    """``"bottleneck"``, ``"basic"`` or None, by the attributes a block carries."""
    if all(hasattr(module, a) for a in ("conv1", "bn1", "conv2", "bn2", "conv3", "bn3")):
        return "bottleneck"
    if all(hasattr(module, a) for a in ("conv1", "bn1", "conv2", "bn2")):
        return "basic"
    return None


def block_io(block: nn.Module) -> tuple[int, int, int]:
    """``(in_channels, out_channels, stride)`` of the part of a dense block that units replace."""
    kind = block_kind(block)
    if kind == "basic":
        return block.conv1.in_channels, block.conv2.out_channels, block.conv1.stride[0]
    if kind == "bottleneck":
        return block.conv2.in_channels, block.conv2.out_channels, block.conv2.stride[0]
    raise ValueError(f"block: {type(block).__name__} is neither a basic block (conv1, bn1, conv2, bn2) "
                     "nor a bottleneck (plus conv3, bn3)")


def _check_convs(*convs: nn.Conv2d) -> None:
    for conv in convs:
        if conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size[0] != conv.kernel_size[1]:
            raise ValueError(f"block: only square, undilated, ungrouped convs can become units; got {conv}")


def _shortcut_of(block: nn.Module) -> nn.Module:
    shortcut = getattr(block, "shortcut", None)
    if shortcut is None:
        shortcut = getattr(block, "downsample", None)
    return nn.Identity() if shortcut is None else shortcut


class BUnitBasicBlock(nn.Module):
    """A ResNet basic block whose conv1+bn1+conv2+bn2 are one unit layer.

    ``out = relu(units(x) + shortcut(x))``; every unit already ends in a ReLU before the concatenation,
    as in the paper's ``BunitBlock``.

    Args:
        units: the unit layer (carries the block's stride).
        shortcut: the original shortcut module (identity when None).
    """

    expansion = 1

    def __init__(self, units: UnitLayer, shortcut: nn.Module | None = None):
        super().__init__()
        self.units = units
        self.shortcut = nn.Identity() if shortcut is None else shortcut
        self.relu = nn.ReLU(inplace=True)
        self._pad_map = _pad_map(self.shortcut)

    @classmethod
    def from_block(cls, block: nn.Module, specs: Iterable[UnitSpec | str], *, impl: str = "fused",
                   backend: str = "grouped") -> "BUnitBasicBlock":
        """Replace the two 3x3 convs of a basic block by units; the block's shortcut module is reused.

        Args:
            block: a dense basic block (``conv1, bn1, conv2, bn2`` and ``shortcut`` or ``downsample``).
            specs: unit specs whose ``a`` sum to ``conv1.in_channels`` and ``c`` to ``conv2.out_channels``.
            impl: unit-layer implementation.
            backend: unit-layer backend.

        Returns:
            The new block (the shortcut module is shared with ``block``, not copied).
        """
        _check_convs(block.conv1, block.conv2)
        cin, cout, stride = block_io(block)
        units = UnitLayer(specs, stride=stride, impl=impl, backend=backend)
        _check_widths(units, cin, cout)
        return cls(units, _shortcut_of(block))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pad_map = self.__dict__.get("_pad_map")
        if pad_map is not None and self.units.fuses_residual:  # the kernel reads the shortcut from x
            return self.units(x, residual=x, residual_map=pad_map)  # (B, out, H/s, W/s)
        return self.units(x, residual=self.shortcut(x))  # relu(units(x) + shortcut(x)), (B, out, H/s, W/s)


class BUnitBottleneck(nn.Module):
    """A torchvision Bottleneck whose 3x3 conv2+bn2(+ReLU) is a unit layer; conv1/conv3/downsample are kept.

    Args:
        conv1, bn1: the 1x1 reduction and its BN.
        units: the unit layer on the bottleneck width (carries the stride).
        conv3, bn3: the 1x1 expansion and its BN.
        downsample: the shortcut projection (identity when None).
    """

    expansion = 4

    def __init__(self, conv1: nn.Conv2d, bn1: nn.Module, units: UnitLayer, conv3: nn.Conv2d, bn3: nn.Module,
                 downsample: nn.Module | None = None):
        super().__init__()
        self.conv1, self.bn1 = conv1, bn1
        self.units = units
        self.conv3, self.bn3 = conv3, bn3
        self.downsample = downsample
        self.relu = nn.ReLU(inplace=True)

    @classmethod
    def from_block(cls, block: nn.Module, specs: Iterable[UnitSpec | str], *, impl: str = "fused",
                   backend: str = "grouped") -> "BUnitBottleneck":
        """Replace ``conv2`` + ``bn2`` of a bottleneck by units whose widths match ``conv2``."""
        _check_convs(block.conv2)
        cin, cout, stride = block_io(block)
        units = UnitLayer(specs, stride=stride, impl=impl, backend=backend)
        _check_widths(units, cin, cout)
        return cls(block.conv1, block.bn1, units, block.conv3, block.bn3, getattr(block, "downsample", None))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, width, H, W)
        out = self.units(out)  # (B, width, H/s, W/s)
        out = self.bn3(self.conv3(out))  # (B, planes*4, H/s, W/s)
        identity = x if self.downsample is None else self.downsample(x)
        return self.relu(out + identity)


class BUnitConv(nn.Module):
    """A VGG conv-BN-ReLU triple as one unit layer (each unit ends in BN + ReLU itself)."""

    def __init__(self, units: UnitLayer):
        super().__init__()
        self.units = units

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, specs: Iterable[UnitSpec | str], *, impl: str = "fused",
                  backend: str = "grouped") -> "BUnitConv":
        """Units with the conv's widths and stride (the conv's BN and ReLU are absorbed into the units)."""
        _check_convs(conv)
        units = UnitLayer(specs, stride=conv.stride[0], impl=impl, backend=backend)
        _check_widths(units, conv.in_channels, conv.out_channels)
        return cls(units)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.units(x)  # (B, out, H/s, W/s)


def _pad_map(shortcut: nn.Module) -> tuple[int, int] | None:
    """``(stride, channel offset)`` of an option-A shortcut (``PadShortcut`` of the CIFAR ResNets: subsample by
    ``stride``, zero-pad channels evenly on both sides), else None."""
    if type(shortcut).__name__ != "PadShortcut" or any(True for _ in shortcut.parameters()):
        return None
    cin, cout, stride = (getattr(shortcut, a, None) for a in ("in_channels", "out_channels", "stride"))
    if not all(isinstance(v, int) for v in (cin, cout, stride)) or cout < cin or stride < 1:
        return None
    return stride, (cout - cin) // 2


def _check_widths(units: UnitLayer, cin: int, cout: int) -> None:
    if units.in_channels != cin or units.out_channels != cout:
        raise ValueError(f"specs: units map {units.in_channels}->{units.out_channels} channels "
                         f"but the replaced layer maps {cin}->{cout}")
