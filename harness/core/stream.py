"""Image folders streamed from disk: decoded in worker processes, batched as uint8, normalised on the device.

For data too large to hold decoded on the device (ImageNet: 1.28M training images, about 770 GB as float32 at
224x224), :class:`StreamData` implements the same :class:`~harness.core.data.ImageData` protocol as the
device-resident :class:`~harness.core.data.Splits`, reading ``train/`` and ``val/`` (or ``test/``) class folders:

- Order: every epoch draws a seeded permutation of the training files, cut into global batches of ``batch_size``
  (the last partial batch dropped). Under torchrun each rank decodes only its contiguous slice of every global
  batch (:meth:`StreamLoader.shard`), so the ranks see disjoint shards that together make exactly the batches one
  process would see, and ``train.batch_size`` keeps its global meaning.
- Decoding: worker processes (a torch ``DataLoader`` over whole batches, persistent across epochs) open the files
  with Pillow. A JPEG is decoded at a reduced DCT scale (``Image.draft``) whenever the crop still has at least the
  output's resolution after the reduction, which is most of the work saved at small output sizes.
- Transforms: training takes the standard random-resized crop (scale 0.08-1, aspect 3/4-4/3) and a horizontal flip,
  drawn from a generator seeded by (seed, epoch, file index), so a sample's augmentation does not depend on which
  worker or rank decoded it; evaluation resizes the shorter side to ``size / 0.875`` and takes the centre crop.
  On a CUDA device both end as uint8 ``(B, H, W, 3)``, pinned, moved to the device and normalised there. On a CPU
  device the workers normalise every image right after decoding it, into a float32 batch in shared memory, and the
  training process receives finished batches: normalising there took ~60 ms of every 224-px batch of 64 beside two
  workers on two cores (two fresh 38.5 MB float32 buffers, above glibc's largest mmap threshold: ~19,000 page
  faults a batch). The values are the same either way.
- Unreadable files: a file that cannot be decoded (corrupt, truncated, not an image) is logged with its path and
  the error and left out of its batch. When more than 0.1% of a split's files (at least one) have failed, the
  next batch raises :class:`BadImagesError` listing them, so a broken tree stops the run instead of training on
  the rest. A batch with no readable file raises too. Workers that die raise in the training process (the
  ``DataLoader`` notices); nothing waits forever.
"""
from __future__ import annotations

import logging
import math
import multiprocessing as mp
import os
import weakref
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from harness.core.decode import FileList, decode_batch, scan_folder

__all__ = ["StreamData", "StreamLoader", "BadImagesError", "scan_splits", "choose_loader", "free_memory",
           "default_workers", "MAX_BAD_FRACTION", "IMAGENET_STATS", "DEVICE_BUDGET"]

log = logging.getLogger("harness.data")

MAX_BAD_FRACTION = 0.001  # more unreadable files than this (and at least one) stop the run
IMAGENET_STATS = {"mean": (0.485, 0.456, 0.406), "std": (0.229, 0.224, 0.225)}  # the published per-channel values
DEVICE_BUDGET = 0.25  # "auto" holds data on the device while it takes at most this share of the free memory
_STATS_SAMPLE = 256  # training images (evenly spaced, evaluation transform) that estimate mean and std


class BadImagesError(ValueError):
    """Too many files of a split could not be decoded; the message lists them."""


def default_workers() -> int:
    """Decoding processes per training process: the CPUs this process may use, shared by the ranks of a node, at
    most 8."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return max(1, min(8, cpus // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))))


class _BatchDecoder(torch.utils.data.Dataset):
    """Worker-side: a task is (epoch, file indices); the result is a whole decoded batch."""

    def __init__(self, files: FileList, size: int, train: bool, seed: int,
                 affine: tuple[torch.Tensor, torch.Tensor] | None):
        self.files, self.size, self.train, self.seed, self.affine = files, size, train, seed, affine

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, task: tuple[int, np.ndarray]):
        epoch, indices = task
        return decode_batch(self.files, indices, self.size, train=self.train, seed=self.seed, epoch=epoch,
                            affine=self.affine)


class _Tasks(torch.utils.data.Sampler):
    """Main-process side: the (epoch, indices) tasks of one pass, a new epoch number at every pass.

    It holds its loader weakly. A strong reference closed a cycle (loader -> DataLoader -> sampler -> loader), so a
    dropped loader waited for the garbage collector, which tore the worker queues down before torch's shutdown could
    tell the workers to stop: every dropped loader then cost 5 s per worker in joins that timed out.
    """

    def __init__(self, loader: "StreamLoader"):
        self._loader = weakref.ref(loader)

    @property
    def loader(self) -> "StreamLoader":
        loader = self._loader()
        if loader is None:
            raise RuntimeError("the StreamLoader of these tasks is gone")
        return loader

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        loader = self.loader
        epoch = loader.epoch
        batches = list(loader.batch_indices(epoch))  # the epoch's order, taken now: the pass keeps no loader alive
        del loader
        return ((epoch, indices) for indices in batches)


class StreamLoader:
    """Batches of one split, decoded by worker processes; iterating it runs one epoch.

    Args:
        data: the dataset the split belongs to (device, normalisation, record of unreadable files).
        files: the split's files and labels.
        batch_size: the global batch.
        train: shuffle (seeded per epoch), augment when ``augment``, drop the last partial batch.
        augment: random-resized crop and flip; off gives the evaluation transform.
        seed: seeds the order and the augmentation draws.
        rank, world_size: this process keeps rows ``[rank * B // world, (rank + 1) * B // world)`` of each batch.
    """

    def __init__(self, data: "StreamData", files: FileList, batch_size: int, *, train: bool, augment: bool = True,
                 seed: int = 0, rank: int = 0, world_size: int = 1):
        self.data, self.files, self.batch_size, self.train = data, files, batch_size, train
        self.augment, self.seed, self.rank, self.world_size = augment and train, seed, rank, world_size
        self.epoch = 0
        self._loader = None

    def shard(self, rank: int, world_size: int) -> "StreamLoader":
        """The same epochs, of which this rank decodes and yields only its slice of every global batch."""
        return StreamLoader(self.data, self.files, self.batch_size, train=self.train, augment=self.augment,
                            seed=self.seed, rank=rank, world_size=world_size)

    def __len__(self) -> int:
        n = len(self.files)
        if self.train and n >= self.batch_size:
            return n // self.batch_size
        return math.ceil(n / self.batch_size)

    def batch_indices(self, epoch: int) -> Iterator[np.ndarray]:
        """File indices of this rank's part of every batch of ``epoch`` (the same on every rank)."""
        n = len(self.files)
        if self.train:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed * 100_003 + epoch)).numpy()
        else:
            order = np.arange(n)
        for i in range(len(self)):
            batch = order[i * self.batch_size:(i + 1) * self.batch_size]
            lo, hi = len(batch) * self.rank // self.world_size, len(batch) * (self.rank + 1) // self.world_size
            yield batch[lo:hi]

    def _dataloader(self) -> torch.utils.data.DataLoader:
        workers = self.data.workers
        if workers and mp.current_process().daemon:  # a daemonic process may not start children
            log.warning("decoding in the training process: it is a daemonic worker, which cannot start processes")
            workers = 0
        return torch.utils.data.DataLoader(
            _BatchDecoder(self.files, self.data.image_size, self.augment, self.seed, self.data.host_affine()),
            batch_size=None,
            sampler=_Tasks(self), num_workers=workers, pin_memory=self.data.device.type == "cuda",
            persistent_workers=workers > 0 and self.train, prefetch_factor=4 if workers else None,
            timeout=self.data.worker_timeout if workers else 0)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if self._loader is None or not self.train:
            self._loader = self._dataloader()  # training keeps its workers from epoch to epoch
        for xb, yb, bad in self._loader:  # xb: (B, H, W, 3) uint8, or (B, 3, H, W) normalised float32 for a CPU
            self.data.record_bad(bad, self.files)
            if xb.shape[0] == 0:
                raise BadImagesError(f"dataset {self.data.name}: no file of a batch could be decoded: "
                                     f"{', '.join(path for path, _ in bad[:5])}")
            xb = self.data.normalise(xb) if xb.dtype == torch.uint8 else xb.to(self.data.device, non_blocking=True)
            yield xb, yb.to(self.data.device, non_blocking=True)
        self.epoch += 1


class StreamData:
    """An image-folder dataset streamed from disk; implements :class:`harness.core.data.ImageData`.

    Args:
        name: the dataset's name as the suite gives it.
        train, test: the splits' file lists (the same classes).
        image_size: side of the square crops.
        device: where batches go.
        workers: decoding processes (0: decode in this process).
        mean, std: per-channel normalisation in [0, 1] units; None estimates them from training images.
        worker_timeout: seconds to wait for one batch from a worker before raising.
    """

    in_channels = 3
    hflip = True
    data_loader = "stream"

    def __init__(self, name: str, train: FileList, test: FileList, image_size: int, *,
                 device: torch.device | str = "cpu", workers: int | None = None,
                 mean: tuple[float, ...] | None = None, std: tuple[float, ...] | None = None,
                 worker_timeout: float = 600.0):
        if train.classes != test.classes:
            raise ValueError(f"dataset {name}: train and evaluation splits have different class folders")
        self.name, self.train_files, self.test_files, self.image_size = name, train, test, image_size
        self.num_classes = len(train.classes)
        self.device = torch.device(device)
        self.workers = default_workers() if workers is None else workers
        self._workers_asked = workers  # what travels to other machines: None means their own CPU count
        self.worker_timeout = worker_timeout
        self.bad_files: dict[str, str] = {}  # path -> error, over both splits
        self._examples = torch.empty(0, image_size, image_size, 3, dtype=torch.uint8)
        if mean is None or std is None:
            mean, std = self._estimate_stats()
        self.mean = torch.tensor(mean, device=self.device).mul(255).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=self.device).mul(255).view(1, 3, 1, 1)
        self._scale, self._shift = 1 / self.std, -self.mean / self.std

    def _estimate_stats(self) -> tuple[list[float], list[float]]:
        n = len(self.train_files)
        picks = np.unique(np.linspace(0, n - 1, min(n, _STATS_SAMPLE)).round().astype(np.int64))
        x, _, bad = decode_batch(self.train_files, picks, self.image_size, train=False, seed=0, epoch=0)
        self.record_bad(bad, self.train_files)
        x = x.float().div_(255)  # (N, H, W, 3)
        return x.mean(dim=(0, 1, 2)).tolist(), x.std(dim=(0, 1, 2)).clamp_min(1e-3).tolist()

    def record_bad(self, bad: list[tuple[str, str]], files: FileList) -> None:
        """Log unreadable files once each; raise when a split has more of them than the documented rule allows."""
        for path, error in bad:
            if path not in self.bad_files:
                log.warning("skipped unreadable image %s: %s", path, error)
                self.bad_files[path] = error
        if not bad:
            return
        in_split = [p for p in self.bad_files if p.startswith(os.path.join(files.root, ""))]
        allowed = max(1, math.floor(MAX_BAD_FRACTION * len(files)))
        if len(in_split) > allowed:
            raise BadImagesError(f"dataset {self.name}: {len(in_split)} of {len(files)} files under {files.root} "
                                 f"could not be decoded (allowed: at most {allowed}, {MAX_BAD_FRACTION:.1%}): "
                                 + "; ".join(f"{p}: {self.bad_files[p]}" for p in in_split[:5]))

    def host_affine(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The per-channel ``(scale, shift)`` the decoding workers apply when the device is the CPU, else None
        (batches travel as uint8 and :meth:`normalise` runs on the device)."""
        return (self._scale.flatten(), self._shift.flatten()) if self.device.type == "cpu" else None

    def normalise(self, xb: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, H, W, 3)`` on the host -> normalised float32 ``(B, 3, H, W)`` (channels_last) on the device."""
        x = xb.to(self.device, non_blocking=True).permute(0, 3, 1, 2).float()  # (B, 3, H, W), NHWC in memory
        return torch.addcmul(self._shift, x, self._scale)  # (x - mean) / std in one pass

    # --- the ImageData protocol ---

    def example_inputs(self, n: int) -> torch.Tensor:
        n = min(n, len(self.test_files))
        if self._examples.shape[0] < n:  # decoded once, kept as uint8 on the host
            x, _, bad = decode_batch(self.test_files, np.arange(n), self.image_size, train=False, seed=0, epoch=0)
            self.record_bad(bad, self.test_files)
            self._examples = x
        return self.normalise(self._examples[:n])

    def calibration_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first batches of a fixed (seed 0) order of the training files, evaluation transform: a folder lists
        its files class by class, so the first files in folder order would all be of one class."""
        n = len(self.train_files)
        bs = min(batch_size, n)
        count = min(n_batches, max(1, n // bs))
        first = torch.randperm(n, generator=torch.Generator().manual_seed(0))[:count * bs].numpy()
        return list(StreamLoader(self, self.train_files.subset(first), bs, train=False))

    def train_loader(self, batch_size: int, *, seed: int, augment: bool) -> StreamLoader:
        return StreamLoader(self, self.train_files, batch_size, train=True, augment=augment, seed=seed)

    def eval_batches(self, batch_size: int) -> StreamLoader:
        return StreamLoader(self, self.test_files, batch_size, train=False)

    def pack(self) -> dict:
        """Plain values for :func:`harness.core.data.pack_data`: the file lists and normalisation, not the images."""
        return {"data_loader": "stream", "name": self.name, "train": self.train_files, "test": self.test_files,
                "image_size": self.image_size, "workers": self._workers_asked,
                "mean": (self.mean / 255).flatten().tolist(), "std": (self.std / 255).flatten().tolist()}

    @classmethod
    def unpack(cls, packed: dict, device: torch.device | str) -> "StreamData":
        return cls(packed["name"], packed["train"], packed["test"], packed["image_size"], device=device,
                   workers=packed["workers"], mean=packed["mean"], std=packed["std"])

    def to(self, device: torch.device | str) -> "StreamData":
        self.device = torch.device(device)
        self.mean, self.std = self.mean.to(self.device), self.std.to(self.device)
        self._scale, self._shift = 1 / self.std, -self.mean / self.std
        return self


def scan_splits(name: str, root: Path) -> tuple[FileList, FileList]:
    """The files of ``root/train`` and of ``root/val`` (or ``root/test``), with the same class folders."""
    if not (root / "train").is_dir():
        raise ValueError(f"dataset: {name} needs a 'train' folder of class folders under {root}")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise ValueError(f"dataset: {name} needs a 'val' or 'test' folder beside 'train' under {root}")
    train = scan_folder(root / "train")
    return train, scan_folder(test_dir, classes=train.classes)


def free_memory(device: torch.device | str) -> int:
    """Bytes free on ``device``: CUDA's free memory, or the host's MemAvailable."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    try:
        with open("/proc/meminfo") as f:
            info = dict(line.split(":", 1) for line in f)
        return int(info["MemAvailable"].split()[0]) * 1024
    except (OSError, KeyError, ValueError):
        return os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")


def choose_loader(n_images: int, image_size: int, device: torch.device | str, *, free: int | None = None) -> str:
    """The size rule of ``data_loader = "auto"``: "device" when the decoded splits fit the budget, else "stream".

    The decoded size is ``n_images x 3 x image_size^2 x 4`` bytes (float32, train and evaluation splits); the budget
    is :data:`DEVICE_BUDGET` of the device's free memory, and on the host that is shared by the ranks of the node
    (``LOCAL_WORLD_SIZE``), each of which holds its own copy.

    Args:
        n_images: images in both splits.
        image_size: side of the square images.
        device: where the data would live.
        free: free bytes to assume (default: :func:`free_memory` of ``device``).
    """
    need = n_images * 3 * image_size * image_size * 4
    budget = DEVICE_BUDGET * (free_memory(device) if free is None else free)
    if torch.device(device).type == "cpu":
        budget /= max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    return "device" if need <= budget else "stream"
