"""Batches of device-resident data: a loader that slices shuffled batches from tensors on the device and augments
each whole batch at once (random crop with zero padding, horizontal flip), so the training loop runs no
per-sample Python (the airbench approach). :class:`harness.core.data.Splits` hands these out."""
from __future__ import annotations

import math
from typing import Iterator

import torch
import torch.nn.functional as F

__all__ = ["augment_batch", "DeviceLoader"]


def augment_batch(x: torch.Tensor, *, pad: int, hflip: bool, generator: torch.Generator) -> torch.Tensor:
    """Random crop with zero padding and optional horizontal flip, for a whole batch at once.

    Args:
        x: (B, C, H, W) normalised images (zero padding is then the mean colour).
        pad: the crop's padding in pixels.
        hflip: flip a random half of the batch horizontally.
        generator: the on-device random generator.
    """
    b, c, h, w = x.shape
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))  # (B, C, H+2p, W+2p)
        oy = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        ox = torch.randint(0, 2 * pad + 1, (b,), device=x.device, generator=generator)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, None, :, None]  # (B, 1, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, None, :]  # (B, 1, 1, W)
        batch = torch.arange(b, device=x.device)[:, None, None, None]
        chans = torch.arange(c, device=x.device)[None, :, None, None]
        x = padded[batch, chans, rows, cols]  # (B, C, H, W)
    if hflip:
        flip = torch.rand(b, device=x.device, generator=generator) < 0.5
        x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    return x


class DeviceLoader:
    """Batches sliced from device tensors with an on-device permutation; augmentation per batch.

    Args:
        x, y: the split, already on the device.
        batch_size: samples per batch; the last partial batch is dropped when ``drop_last``.
        train: shuffle and augment.
        augment: apply crop/flip when training.
        hflip: allow horizontal flips.
        seed: seeds the loader's generator, so a run is reproducible.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, *, train: bool = True,
                 augment: bool = True, hflip: bool = True, seed: int = 0, drop_last: bool | None = None):
        self.x, self.y, self.batch_size, self.train = x, y, batch_size, train
        self.augment, self.hflip = augment and train, hflip
        self.drop_last = train if drop_last is None else drop_last
        self.pad = max(1, math.ceil(x.shape[-1] / 8))  # 4 px at 32x32, as in the CIFAR recipe
        self.generator = torch.Generator(device=x.device)
        self.generator.manual_seed(seed)

    def __len__(self) -> int:
        n = self.x.shape[0]
        if self.drop_last and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x.shape[0]
        if not self.train:  # in order: views, no gather
            for i in range(len(self)):
                rows = slice(i * self.batch_size, (i + 1) * self.batch_size)
                yield self.x[rows], self.y[rows]
            return
        order = torch.randperm(n, device=self.x.device, generator=self.generator)
        for i in range(len(self)):
            idx = order[i * self.batch_size:(i + 1) * self.batch_size]
            xb, yb = self.x[idx], self.y[idx]
            if self.augment:
                xb = augment_batch(xb, pad=self.pad, hflip=self.hflip, generator=self.generator)
            yield xb, yb
