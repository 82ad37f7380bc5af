"""Dense backbones by name.

CIFAR ResNets follow He et al. 2016 (sec. 4.2): three stages of 16/32/64 channels, ``n`` basic
blocks each (depth = 6n + 2). Shortcut "A" is the parameter-free identity with zero-padded
channels and stride-2 subsampling the paper used on CIFAR (the variant behind every pruning
paper's 0.85M-parameter ResNet-56); shortcut "B" is a 1x1 conv + BN projection. VGG-16 is the
BN variant used on CIFAR by the pruning literature (Li et al. 2017, Liu et al. 2017). ResNet-18
and ResNet-50 are torchvision's, ResNet-18 with the CIFAR stem (3x3 stride-1 conv, no max-pool);
``resnet18-imagenet-stem`` keeps torchvision's ImageNet stem on any input size, as the BUnit-Net paper's CIFAR code does.

Module anatomy that ``bunit.bunitify`` and the pruners rely on: a residual block has
``conv1, bn1, conv2, bn2`` (and ``conv3, bn3`` for a bottleneck); stages are ``layer1..layerN``.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from bunit.functional import shift_residual

__all__ = [
    "BackboneInfo",
    "register_backbone",
    "list_backbones",
    "get_backbone_info",
    "create_backbone",
    "PadShortcut",
    "SubsampledProjection",
    "CifarBasicBlock",
    "CifarResNet",
    "VGG",
]


@dataclass(frozen=True)
class BackboneInfo:
    """Metadata that sits next to a builder."""

    name: str
    builder: Callable[..., nn.Module]
    family: str  # "cifar-resnet" | "vgg" | "resnet"
    shortcut_variants: tuple[str, ...] = ()
    description: str = ""


_BACKBONES: dict[str, BackboneInfo] = {}


def register_backbone(name: str, *, family: str, shortcut_variants: tuple[str, ...] = (), description: str = ""):
    """Decorator registering a builder ``fn(*, num_classes, in_channels, shortcut=None) -> nn.Module``."""

    def wrap(fn):
        if name in _BACKBONES:
            raise ValueError(f"backbone {name!r} is already registered")
        _BACKBONES[name] = BackboneInfo(name, fn, family, shortcut_variants, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def list_backbones(pattern: str = "*") -> list[str]:
    return sorted(n for n in _BACKBONES if fnmatch.fnmatch(n, pattern))


def get_backbone_info(name: str) -> BackboneInfo:
    try:
        return _BACKBONES[name]
    except KeyError:
        raise ValueError(f"backbone: unknown {name!r}; allowed: {', '.join(list_backbones())}") from None


def create_backbone(name: str, *, num_classes: int = 10, in_channels: int = 3, shortcut: str | None = None) -> nn.Module:
    """Build a dense backbone. ``shortcut`` ("A" or "B") applies to CIFAR ResNets only."""
    info = get_backbone_info(name)
    if shortcut is not None and info.shortcut_variants and shortcut not in info.shortcut_variants:
        raise ValueError(f"shortcut: {shortcut!r} not allowed for {name}; allowed: {', '.join(info.shortcut_variants)}")
    kwargs = {"num_classes": num_classes, "in_channels": in_channels}
    if info.shortcut_variants:
        kwargs["shortcut"] = shortcut or info.shortcut_variants[0]
    return info.builder(**kwargs)


# --- CIFAR ResNet -------------------------------------------------------------------------------


class PadShortcut(nn.Module):
    """Option-A shortcut: subsample spatially by ``stride`` and zero-pad channels up to ``out_channels``."""

    def __init__(self, in_channels: int, out_channels: int, stride: int):
        super().__init__()
        self.in_channels, self.out_channels, self.stride = in_channels, out_channels, stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        extra = self.out_channels - x.shape[1]
        if extra > 0:  # the map the fused BUnit kernel reads in place of this module (bunit.blocks)
            return shift_residual(x, self.stride, extra // 2, self.out_channels)
        return x[:, :, :: self.stride, :: self.stride] if self.stride > 1 else x

    def extra_repr(self) -> str:
        return f"{self.in_channels}->{self.out_channels}, stride={self.stride}"


class SubsampledProjection(nn.Conv2d):
    """Option-B shortcut's 1x1 convolution at stride ``s``; in training, on an NCHW-contiguous input, computed as the
    stride-1 convolution of ``x[:, :, ::s, ::s]`` (the pixels a strided 1x1 convolution reads: the same values).

    Measured (torch profiler, ResNet-20 at 28 px, batch 128, bf16 autocast, NCHW, a BUnit model on ``unit_train``):
    oneDNN's backward of the strided 1x1 convolution took 4.8 ms plus a 1.5 ms copy of its input for 16 -> 32
    channels at 28 px, the subsampled stride-1 one 1.4 ms; a whole step 0.89-0.91x (interleaved A/B), dense's within
    1% (channels_last, and dense's NCHW). Elsewhere (eval mode, channels_last, export) it is ``nn.Conv2d`` as is, so
    deployment graphs keep their strided convolution. Parameters, ``state_dict`` and counts are ``nn.Conv2d``'s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = self.stride
        if self.training and s != (1, 1) and self.kernel_size == (1, 1) and self.padding == (0, 0) and x.is_contiguous():
            return F.conv2d(x[:, :, :: s[0], :: s[1]], self.weight, self.bias, 1, 0, self.dilation, self.groups)
        return super().forward(x)


class CifarBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1, *, shortcut: str = "A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        if stride == 1 and in_planes == planes:
            self.shortcut = nn.Identity()
        elif shortcut == "A":
            self.shortcut = PadShortcut(in_planes, planes, stride)
        else:
            self.shortcut = nn.Sequential(SubsampledProjection(in_planes, planes, 1, stride, bias=False),
                                          nn.BatchNorm2d(planes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.relu(self.bn1(self.conv1(x)))  # (B, planes, H/s, W/s)
        out = self.bn2(self.conv2(out))
        return self.relu(out + self.shortcut(x))


class CifarResNet(nn.Module):
    def __init__(self, depth: int, *, num_classes: int = 10, in_channels: int = 3, shortcut: str = "A",
                 widths: tuple[int, ...] = (16, 32, 64)):
        super().__init__()
        if (depth - 2) % 6:
            raise ValueError(f"depth: {depth} is not 6n+2")
        n = (depth - 2) // 6
        self.depth, self.shortcut_variant = depth, shortcut
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        in_planes = widths[0]
        for i, planes in enumerate(widths):
            blocks = []
            for j in range(n):
                stride = 2 if (i > 0 and j == 0) else 1
                blocks.append(CifarBasicBlock(in_planes, planes, stride, shortcut=shortcut))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.num_stages = len(widths)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))  # (B, 16, H, W)
        for i in range(self.num_stages):
            x = getattr(self, f"layer{i + 1}")(x)  # (B, 64, H/4, W/4) after the last stage
        return self.fc(torch.flatten(self.avgpool(x), 1))  # (B, classes)


def _cifar_resnet(depth: int):
    def build(*, num_classes: int, in_channels: int, shortcut: str = "A") -> nn.Module:
        return CifarResNet(depth, num_classes=num_classes, in_channels=in_channels, shortcut=shortcut)

    build.__doc__ = f"CIFAR ResNet-{depth} (He et al. 2016), {(depth - 2) // 6} basic blocks per stage"
    return build


for _depth in (8, 14, 20, 32, 44, 56, 110):
    register_backbone(f"resnet{_depth}", family="cifar-resnet", shortcut_variants=("A", "B"))(_cifar_resnet(_depth))


# --- VGG ----------------------------------------------------------------------------------------

VGG16_CFG = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(nn.Module):
    """CIFAR VGG with BN: 3x3 conv-BN-ReLU layers in ``features``, global average pool, one linear classifier."""

    def __init__(self, cfg=VGG16_CFG, *, num_classes: int = 10, in_channels: int = 3):
        super().__init__()
        layers: list[nn.Module] = []
        c = in_channels
        for v in cfg:
            if v == "M":
                layers.append(nn.MaxPool2d(2))
            else:
                layers += [nn.Conv2d(c, v, 3, 1, 1, bias=False), nn.BatchNorm2d(v), nn.ReLU(inplace=True)]
                c = v
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(c, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.features(x)  # (B, 512, H/16, W/16)
        return self.classifier(torch.flatten(self.avgpool(x), 1))


@register_backbone("vgg16", family="vgg")
def vgg16(*, num_classes: int, in_channels: int) -> nn.Module:
    """VGG-16 with BN, CIFAR variant (13 conv layers, one linear classifier)."""
    return VGG(num_classes=num_classes, in_channels=in_channels)


# --- torchvision ResNets ------------------------------------------------------------------------


def _torchvision_resnet(arch: str, *, num_classes: int, in_channels: int, cifar_stem: bool) -> nn.Module:
    from harness.compat import ensure_torchvision  # torchvision: slow to import, only these backbones need it

    tv = ensure_torchvision()
    model = getattr(tv.models, arch)(weights=None, num_classes=num_classes)
    if cifar_stem:
        model.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
        model.maxpool = nn.Identity()
    elif in_channels != 3:
        model.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
    return model


@register_backbone("resnet18", family="resnet")
def resnet18(*, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 with the CIFAR stem (3x3 stride-1 first conv, no max-pool)."""
    return _torchvision_resnet("resnet18", num_classes=num_classes, in_channels=in_channels, cifar_stem=True)


@register_backbone("resnet18-imagenet-stem", family="resnet")
def resnet18_imagenet_stem(*, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-18 with the ImageNet stem (7x7 stride-2 conv + max-pool), the BUnit-Net paper's CIFAR model.

    On 32x32 inputs the stem leaves 8x8 maps for layer1 (a CIFAR-stem ResNet-18 costs about 14x more MACs);
    100 classes: 11,227,812 parameters dense, 8,696,484 in the paper's BUnit form (stages 2 and 3 of 2-4-k units).
    """
    return _torchvision_resnet("resnet18", num_classes=num_classes, in_channels=in_channels, cifar_stem=False)


@register_backbone("resnet50", family="resnet")
def resnet50(*, num_classes: int, in_channels: int) -> nn.Module:
    """torchvision ResNet-50 with the ImageNet stem (for imagefolder datasets at 224x224)."""
    return _torchvision_resnet("resnet50", num_classes=num_classes, in_channels=in_channels, cifar_stem=False)
