"""Image files to uint8 crops: the folder scan and the per-image transforms of the streaming loader.

:func:`scan_folder` lists an ImageFolder-style split (``split/<class>/**/*.jpg``) into a :class:`FileList`, whose
paths live in one numpy byte array rather than a Python list: forked decoding workers then share it without the
copy-on-write growth that reference counts cause on lists of strings. :func:`decode_batch` opens the files of one
batch with Pillow and applies the training transform (random-resized crop, flip) or the evaluation transform
(resize the shorter side to ``size / 0.875``, centre crop), both in one ``Image.resize`` with a source box, after
``Image.draft`` has let the JPEG decoder skip the resolution the crop does not need. Given a per-channel affine
map, it also normalises each image to float32 right after decoding it (the CPU-device path of the loader).
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["FileList", "scan_folder", "decode_batch", "crop_box", "write_image_tree", "IMAGE_EXTENSIONS",
           "EVAL_RESIZE"]

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")  # as ImageFolder
EVAL_RESIZE = 0.875  # evaluation: shorter side to size / 0.875 (256 for 224), then the centre crop
SCALE = (0.08, 1.0)  # random-resized crop: fraction of the image's area
RATIO = (3 / 4, 4 / 3)  # and aspect ratio


@dataclass(frozen=True)
class FileList:
    """The files of one split.

    Attributes:
        root: the split's folder.
        paths: paths relative to ``root``, UTF-8 bytes, in (class, path) order.
        labels: class index of every file.
        classes: class folder names, sorted; a label indexes this list.
    """

    root: str
    paths: np.ndarray
    labels: np.ndarray
    classes: tuple[str, ...]

    def __len__(self) -> int:
        return len(self.paths)

    def path(self, i: int) -> str:
        return os.path.join(self.root, self.paths[i].decode())

    def subset(self, indices: np.ndarray) -> "FileList":
        return FileList(self.root, self.paths[indices], self.labels[indices], self.classes)


def scan_folder(folder: Path, *, classes: tuple[str, ...] | None = None) -> FileList:
    """List ``folder/<class>/**/<image>``; ``classes`` (another split's) must then be the same set of folders."""
    found = tuple(sorted(e.name for e in os.scandir(folder) if e.is_dir()))
    if classes is not None and found != tuple(classes):
        extra, missing = sorted(set(found) - set(classes)), sorted(set(classes) - set(found))
        raise ValueError(f"dataset: {folder} has other class folders than train (extra: {extra[:5]}, "
                         f"missing: {missing[:5]})")
    if not found:
        raise ValueError(f"dataset: {folder} has no class folders")
    paths, labels = [], []
    for label, name in enumerate(found):
        for dirpath, _, files in sorted(os.walk(folder / name, followlinks=True)):
            rel = os.path.relpath(dirpath, folder)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTENSIONS):
                    paths.append(os.path.join(rel, f).encode())
                    labels.append(label)
    if not paths:
        raise ValueError(f"dataset: no image files ({', '.join(IMAGE_EXTENSIONS)}) under {folder}")
    return FileList(str(folder), np.array(paths, dtype=np.bytes_), np.array(labels, dtype=np.int64), found)


def crop_box(width: int, height: int, size: int, *, train: bool, rng: np.random.Generator | None = None
             ) -> tuple[float, float, float, float, bool]:
    """The source box ``(left, top, right, bottom)`` that becomes the ``size`` x ``size`` output, and a flip flag.

    Training: torchvision's ``RandomResizedCrop`` rule (10 tries at a random area and log-uniform aspect ratio,
    else the centre crop at the nearest allowed ratio), then a flip with probability 1/2. Evaluation: the centre
    square of side ``size / 0.875`` scaled back to the source.
    """
    if not train:
        side = min(width, height) * EVAL_RESIZE  # the centre crop, in source pixels
        return (width - side) / 2, (height - side) / 2, (width + side) / 2, (height + side) / 2, False
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*SCALE)
        aspect = math.exp(rng.uniform(math.log(RATIO[0]), math.log(RATIO[1])))
        w, h = int(round(math.sqrt(target * aspect))), int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            top, left = int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1))
            return left, top, left + w, top + h, bool(rng.random() < 0.5)
    ratio = width / height
    w, h = width, height
    if ratio < RATIO[0]:
        h = int(round(width / RATIO[0]))
    elif ratio > RATIO[1]:
        w = int(round(height * RATIO[1]))
    left, top = (width - w) // 2, (height - h) // 2
    return left, top, left + w, top + h, bool(rng.random() < 0.5)


def _load(path: str, size: int, *, train: bool, rng: np.random.Generator | None) -> np.ndarray:
    """One file -> ``(size, size, 3)`` uint8."""
    with Image.open(path) as im:
        width, height = im.size
        left, top, right, bottom, flip = crop_box(width, height, size, train=train, rng=rng)
        # Let the JPEG decoder downscale by 2, 4 or 8 while the crop keeps at least `size` pixels each way.
        im.draft("RGB", (math.ceil(width * size / (right - left)), math.ceil(height * size / (bottom - top))))
        sx, sy = im.size[0] / width, im.size[1] / height
        im = im.convert("RGB")
        out = im.resize((size, size), Image.Resampling.BILINEAR,
                        box=(left * sx, top * sy, right * sx, bottom * sy))
        if flip:
            out = out.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        return np.asarray(out)


def decode_batch(files: FileList, indices: np.ndarray, size: int, *, train: bool, seed: int, epoch: int,
                 affine: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[tuple[str, str]]]:
    """Decode ``files[indices]``: the images, labels ``(B',)``, and the ``(path, error)`` of every file that could
    not be decoded (left out, so ``B'`` may be smaller than ``len(indices)``).

    A file's augmentation comes from a generator seeded by ``(seed, epoch, index)``: the same draws whichever
    process decodes it.

    Args:
        files, indices: the split and the files of the batch.
        size: side of the square output.
        train: the training transform (seeded random-resized crop and flip), else the evaluation transform.
        seed, epoch: seed the training transform.
        affine: per-channel ``(scale, shift)``, each of 3 values: the images come out as float32
            ``x * scale + shift`` (one ``addcmul``, the values of normalising the uint8 batch), ``(B', 3, size,
            size)`` in channels_last memory, in shared memory when called in a ``DataLoader`` worker (so the batch
            reaches the training process without a copy). None: uint8 ``(B', size, size, 3)``.
    """
    n = len(indices)
    pixels = np.empty((n if affine is None else 1, size, size, 3), dtype=np.uint8)  # the batch, or one image
    if affine is not None:
        scale, shift = (t.reshape(3, 1, 1) for t in affine)
        image = torch.from_numpy(pixels[0]).permute(2, 0, 1)  # (3, S, S) view of the one-image buffer
        nhwc = _float_batch(n, size)  # (B, S, S, 3)
        out = nhwc.permute(0, 3, 1, 2)  # (B, 3, S, S), NHWC in memory
    keep = np.zeros(n, dtype=bool)
    bad = []
    for k, i in enumerate(indices):
        rng = np.random.default_rng((seed, epoch, int(i))) if train else None
        try:
            pixels[k if affine is None else 0] = _load(files.path(i), size, train=train, rng=rng)
        except Exception as err:  # corrupt, truncated, not an image: reported by the caller, never silent
            bad.append((files.path(i), f"{type(err).__name__}: {err}"[:300]))
            continue
        if affine is not None:  # normalised while the decoded image is still in the cache
            torch.addcmul(shift, image.float(), scale, out=out[k])
        keep[k] = True
    labels = torch.from_numpy(files.labels[np.asarray(indices, dtype=np.int64)][keep])
    if affine is None:
        return torch.from_numpy(pixels[keep] if bad else pixels), labels, bad
    return (nhwc[torch.from_numpy(keep)].permute(0, 3, 1, 2) if bad else out), labels, bad


def _float_batch(n: int, size: int) -> torch.Tensor:
    """An uninitialised float32 ``(n, size, size, 3)``; in shared memory inside a ``DataLoader`` worker, as the
    default collate allocates its batches there, so that sending it to the training process copies nothing."""
    if torch.utils.data.get_worker_info() is None:
        return torch.empty(n, size, size, 3)
    storage = torch.empty(0)._typed_storage()._new_shared(n * size * size * 3)
    return torch.empty(0).new(storage).view(n, size, size, 3)


def write_image_tree(root: Path, *, n_train: int, n_val: int, classes: int = 4, sizes: tuple[int, int] = (40, 160),
                     seed: int = 0, fmt: str = "JPEG") -> Path:
    """Write a generated ImageFolder tree ``root/{train,val}/c<k>/<i>.jpg`` for tests and benchmarks.

    Every image has its own random width and height in ``sizes``; class ``k`` is a colour (its hue) with a
    gradient and noise on top, so a small network can learn it from any crop.
    """
    rng = np.random.default_rng(seed)
    hues = np.linspace(0, 1, classes, endpoint=False)
    for split, n in (("train", n_train), ("val", n_val)):
        for k in range(classes):
            (root / split / f"c{k}").mkdir(parents=True, exist_ok=True)
        for i in range(n):
            k = i % classes
            w, h = (int(v) for v in rng.integers(sizes[0], sizes[1] + 1, size=2))
            base = np.array([np.cos(2 * np.pi * (hues[k] + d)) for d in (0, 1 / 3, 2 / 3)]) * 90 + 128  # (3,)
            ramp = np.linspace(-30, 30, w)[None, :, None]  # (1, W, 1)
            img = base[None, None, :] + ramp + rng.normal(0, 20, size=(h, w, 3))  # (H, W, 3)
            Image.fromarray(img.clip(0, 255).astype(np.uint8)).save(
                root / split / f"c{k}" / f"{i}.{'jpg' if fmt == 'JPEG' else fmt.lower()}", fmt, quality=90)
    return root
