"""Datasets by name, loaded once into tensors that live on the training device (or streamed, for image folders).

Every dataset object implements :class:`ImageData`, the one protocol the runner, training and the methods'
context use: its name, classes, channels, image size and flip rule, ``example_inputs(n)``,
``calibration_batches(n, batch_size)``, ``train_loader(batch_size, seed=, augment=)`` and
``eval_batches(batch_size)``. Nothing outside data and training touches the tensors themselves.

:class:`Splits` is the device-resident form: a pair of splits held as float tensors ``(N, C, H, W)``, normalised
with the training split's per-channel mean and std. :class:`DeviceLoader` slices batches from them with an
on-device ``randperm`` and applies augmentation to the whole batch at once (random crop with zero padding,
horizontal flip), so the training loop runs no per-sample Python — the airbench approach.

Names: ``digits`` (the 1,797 real 8x8 images that ship inside scikit-learn: no download), ``mnist`` and
``fashion-mnist`` (IDX files, looked for in ``data_dir``, then in the system's copy under ``/usr/share/datasets``,
then downloaded by torchvision; a copy of the published size must match the recorded SHA-256 of its decompressed
content), ``cifar10``, ``cifar100`` (torchvision download into ``data_dir``), and the image folders
``imagefolder:PATH`` (``PATH/train`` and ``PATH/val`` or ``PATH/test`` in torchvision's ImageFolder layout) and
``imagenet`` (the same layout under ``data_dir/imagenet``).

An image folder is either decoded once onto the device like the others, or streamed from disk by
:mod:`harness.core.stream` (``data_loader = "stream"``); ``"auto"`` streams when the decoded float32 splits would
take more than a quarter of the device's free memory (:func:`harness.core.stream.choose_loader`).
"""
from __future__ import annotations

import gzip
import hashlib
import os
import warnings
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Protocol, Sized, runtime_checkable

import numpy as np
import torch
import torch.nn.functional as F

from harness.core import stream
from harness.core.device_loader import DeviceLoader

__all__ = [
    "ImageData",
    "BatchIterable",
    "DatasetInfo",
    "Splits",
    "register_dataset",
    "list_datasets",
    "check_dataset_name",
    "load_dataset",
    "default_data_dir",
    "SYSTEM_DATA_DIR",
    "IDX_FILES",
    "FASHION_MNIST_SHA256",
    "IdxDataset",
    "IDX_DATASETS",
    "find_idx_copy",
    "load_idx_copy",
    "LOADERS",
    "check_loader",
    "folder_root",
    "load_suite_data",
    "pack_data",
    "unpack_data",
]

LOADERS = ("auto", "device", "stream")


class BatchIterable(Iterable[tuple[torch.Tensor, torch.Tensor]], Sized, Protocol):
    """An iterable of ``(x, y)`` batches on the data's device that knows how many batches it yields."""


@runtime_checkable
class ImageData(Protocol):
    """What every dataset object offers; the runner, training and methods use nothing else.

    Attributes:
        name: the dataset's name as the suite gives it.
        num_classes: number of classes.
        in_channels: image channels (1 or 3).
        image_size: side of the square images models see.
        hflip: whether horizontal flips are a valid augmentation (not for digits).
        device: where batches are delivered.
        data_loader: "device" (decoded once, held on the device) or "stream" (decoded from disk every epoch).
    """

    name: str
    num_classes: int
    hflip: bool
    data_loader: str

    @property
    def in_channels(self) -> int: ...

    @property
    def image_size(self) -> int: ...

    @property
    def device(self) -> torch.device: ...

    def example_inputs(self, n: int) -> torch.Tensor:
        """The first ``n`` evaluation images (fewer if the split is smaller), normalised, on the device."""

    def calibration_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The first training batches, unaugmented, on the device: ``min(n_batches, max(1, N // batch_size))`` of
        ``min(batch_size, N)`` images each."""

    def train_loader(self, batch_size: int, *, seed: int, augment: bool) -> BatchIterable:
        """One epoch per iteration of shuffled (seeded), optionally augmented, normalised batches; a partial last
        batch is dropped."""

    def eval_batches(self, batch_size: int) -> BatchIterable:
        """The evaluation split in order, unaugmented, every image exactly once."""


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    loader: Callable[..., "Splits"]
    default_size: int
    hflip: bool  # mirror-symmetric classes? (not for digits)
    description: str


@dataclass
class Splits:
    """Train and test tensors (normalised float32) plus what models need to know."""

    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int
    hflip: bool = True
    origin: str = ""  # where the data was read from (the folder), when it came from files
    data_loader = "device"  # a class attribute, not a field: what ImageData.data_loader reports

    @property
    def in_channels(self) -> int:
        return self.x_train.shape[1]

    @property
    def image_size(self) -> int:
        return self.x_train.shape[-1]

    @property
    def device(self) -> torch.device:
        return self.x_train.device

    def example_inputs(self, n: int) -> torch.Tensor:
        return self.x_test[:n]

    def calibration_batches(self, n_batches: int, batch_size: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        n = self.x_train.shape[0]
        bs = min(batch_size, n)
        count = min(n_batches, max(1, n // bs))
        return [(self.x_train[i * bs:(i + 1) * bs], self.y_train[i * bs:(i + 1) * bs]) for i in range(count)]

    def train_loader(self, batch_size: int, *, seed: int, augment: bool) -> "DeviceLoader":
        return DeviceLoader(self.x_train, self.y_train, batch_size, train=True, augment=augment, hflip=self.hflip,
                            seed=seed)

    def eval_batches(self, batch_size: int) -> "DeviceLoader":
        return DeviceLoader(self.x_test, self.y_test, batch_size, train=False)

    def to(self, device: torch.device | str) -> "Splits":
        for name in ("x_train", "y_train", "x_test", "y_test"):
            setattr(self, name, getattr(self, name).to(device))
        return self


_DATASETS: dict[str, DatasetInfo] = {}


def register_dataset(name: str, *, default_size: int, hflip: bool, description: str = ""):
    def wrap(fn):
        if name in _DATASETS:
            raise ValueError(f"dataset {name!r} is already registered")
        _DATASETS[name] = DatasetInfo(name, fn, default_size, hflip, description or (fn.__doc__ or "").strip())
        return fn

    return wrap


def list_datasets() -> list[str]:
    return sorted(_DATASETS) + ["imagefolder:PATH"]


def folder_root(name: str, data_dir: str | os.PathLike | None = None) -> Path | None:
    """The folder of an image-folder dataset (``imagefolder:PATH``, ``imagenet``); None for the others."""
    if name.startswith("imagefolder:"):
        return Path(name[len("imagefolder:"):]).expanduser()
    if name == "imagenet":
        return (Path(data_dir) if data_dir else default_data_dir()) / "imagenet"
    return None


def check_loader(dataset: str, data_loader: str, loader_workers: int | None) -> None:
    """Raise ValueError, naming the field and the allowed values, for a loader the dataset cannot use."""
    if data_loader not in LOADERS:
        raise ValueError(f"data_loader: {data_loader!r} not allowed; allowed: {', '.join(LOADERS)}")
    if data_loader == "stream" and folder_root(dataset) is None:
        raise ValueError(f"data_loader: 'stream' reads image folders (imagefolder:PATH, imagenet); allowed for "
                         f"{dataset}: auto, device")
    if loader_workers is not None and (isinstance(loader_workers, bool) or not isinstance(loader_workers, int)
                                       or loader_workers < 0):
        raise ValueError(f"loader_workers: {loader_workers!r} not allowed; allowed: an integer >= 0 "
                         "(0 decodes in the training process), or leave it out for one per CPU, at most 8")


def check_dataset_name(name: str) -> None:
    """Raise ValueError naming the allowed datasets for an unknown name."""
    if name.startswith("imagefolder:"):
        if not name[len("imagefolder:"):]:
            raise ValueError("dataset: imagefolder needs a path, e.g. imagefolder:/data/imagenet")
        return
    if name not in _DATASETS:
        raise ValueError(f"dataset: unknown {name!r}; allowed: {', '.join(list_datasets())}")


def default_data_dir() -> Path:
    return Path(os.environ.get("BUNITBENCH_DATA", Path.home() / ".cache" / "bunitbench" / "data"))


def _nchw_strides(t: torch.Tensor) -> torch.Tensor:
    """``t`` (N, C, H, W) with NCHW strides, copied where its strides differ. ``Tensor.contiguous`` is not enough for
    one channel: permuted from NHWC, such a tensor passes torch's contiguity test with strides (HW, 1, W, 1), and
    convolutions then read it as channels_last and return channels_last, whatever memory format a setting asked."""
    n, c, h, w = t.shape
    return t if t.stride() == (c * h * w, h * w, w, 1) else t.clone(memory_format=torch.contiguous_format)


def _finish(name: str, x_train: torch.Tensor, y_train, x_test: torch.Tensor, y_test, num_classes: int, *,
            size: int | None, hflip: bool) -> Splits:
    """Float [0,1] NCHW tensors -> resized, normalised with the train split's statistics, in NCHW strides."""
    if size is not None and x_train.shape[-1] != size:
        x_train = F.interpolate(x_train, size=(size, size), mode="bilinear", align_corners=False)
        x_test = F.interpolate(x_test, size=(size, size), mode="bilinear", align_corners=False)
    mean = x_train.mean(dim=(0, 2, 3), keepdim=True)
    std = x_train.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)
    y_train = torch.as_tensor(np.asarray(y_train), dtype=torch.long)
    y_test = torch.as_tensor(np.asarray(y_test), dtype=torch.long)
    return Splits(name, _nchw_strides((x_train - mean) / std), y_train, _nchw_strides((x_test - mean) / std),
                  y_test, num_classes, hflip)


def _uint8_nhwc(arr) -> torch.Tensor:
    t = torch.as_tensor(np.asarray(arr))
    if t.ndim == 3:  # (N, H, W) grey
        t = t.unsqueeze(-1)
    return t.permute(0, 3, 1, 2).float().div_(255.0)


@register_dataset("digits", default_size=16, hflip=False)
def _digits(data_dir: Path, size: int | None) -> Splits:
    """scikit-learn's 1,797 handwritten 8x8 digits (UCI), a fixed stratified 80/20 split."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    bunch = load_digits()
    images = bunch.images.astype(np.float32) / 16.0  # (1797, 8, 8) in [0, 1]
    x_tr, x_te, y_tr, y_te = train_test_split(images, bunch.target, test_size=0.2, random_state=0,
                                              stratify=bunch.target)
    x_tr = torch.from_numpy(x_tr).unsqueeze(1)
    x_te = torch.from_numpy(x_te).unsqueeze(1)
    return _finish("digits", x_tr, y_tr, x_te, y_te, 10, size=size, hflip=False)


def _torchvision_split(cls_name: str, data_dir: Path, train: bool):
    from harness.compat import ensure_torchvision  # torchvision: optional and slow to import, only these sets need it

    tv = ensure_torchvision()
    cls = getattr(tv.datasets, cls_name)
    return cls(root=str(data_dir), train=train, download=True)


# --- MNIST-format data (IDX files) ----------------------------------------------------------------------------------

SYSTEM_DATA_DIR = Path("/usr/share/datasets")  # where Debian's dataset-* packages put their data
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")

# SHA-256 of the decompressed IDX files of the published Fashion-MNIST (Xiao et al. 2017), 60,000 + 10,000 images,
# taken from Debian's dataset-fashion-mnist 0.0~git20200523.55506a9-1. Its .gz files are recompressed (their MD5
# differs from torchvision's), the decompressed content is the original: 47,040,016 / 60,008 / 7,840,016 / 10,008 bytes.
FASHION_MNIST_SHA256 = {
    "train-images-idx3-ubyte": "c59f468a2f672dc815687fe0f83887768d799fd8a3f3276145d20f83aa44d888",
    "train-labels-idx1-ubyte": "bad3541b69d912435c50bb6ba87bec294ff4f6a2e1246121d8633921760443d9",
    "t10k-images-idx3-ubyte": "5b4141f0afbad91edebe8549f8fcffe087ea10ca49f1dbef5c9a5cd8815ce37b",
    "t10k-labels-idx1-ubyte": "0402a96d92fd2663957122ceb108a494c5af83dab82d92729df917d7dec38c34",
}


@dataclass(frozen=True)
class IdxDataset:
    """Where an MNIST-format dataset may be found and what its published files are.

    Attributes:
        name: the dataset's name.
        torchvision_class: torchvision's class, which downloads into ``data_dir/<torchvision_class>/raw``.
        sha256: SHA-256 of each decompressed published file; empty when none is recorded.
        counts: images of the published (train, test) splits; a copy of this size must match ``sha256``.
        apt_package: the Debian package that installs ``SYSTEM_DATA_DIR/<name>``, or None where there is none.
    """

    name: str
    torchvision_class: str
    sha256: dict[str, str]
    counts: tuple[int, int] = (60_000, 10_000)
    apt_package: str | None = None

    def places(self, data_dir: Path) -> list[Path]:
        """The folders looked in, in order: the data folder (our layout, then torchvision's), the system copy."""
        places = [data_dir / self.name, data_dir / self.torchvision_class / "raw"]
        if self.apt_package:
            places.append(SYSTEM_DATA_DIR / self.name)
        return places


IDX_DATASETS = {
    "fashion-mnist": IdxDataset("fashion-mnist", "FashionMNIST", FASHION_MNIST_SHA256,
                                apt_package="dataset-fashion-mnist"),
    "mnist": IdxDataset("mnist", "MNIST", {}),  # no Debian package and no recorded digest
}


def _idx_file(folder: Path, stem: str) -> Path | None:
    """The file ``stem`` in ``folder``, decompressed or as ``.gz`` (the decompressed one when both are there)."""
    return next((p for p in (folder / stem, folder / f"{stem}.gz") if p.is_file()), None)


def _read_idx(path: Path, magic: int) -> tuple[bytes, np.ndarray]:
    """The decompressed content of an IDX file and its array; ValueError naming the damage."""
    try:
        with (gzip.open(path, "rb") if path.suffix == ".gz" else open(path, "rb")) as f:
            content = f.read()
    except (OSError, EOFError, zlib.error) as err:  # a truncated or corrupt .gz
        raise ValueError(f"cannot be decompressed ({err})") from None
    if len(content) < 4 or int.from_bytes(content[:4], "big") != magic:
        raise ValueError(f"not an IDX file of this kind (magic number {content[:4].hex() or 'missing'}, expected "
                         f"{magic:08x})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(content[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim))
    header = 4 + 4 * ndim
    if len(content) != header + int(np.prod(shape)):
        raise ValueError(f"{len(content):,} bytes where its header {shape} says {header + int(np.prod(shape)):,}")
    return content, np.frombuffer(content, dtype=np.uint8, offset=header).reshape(shape).copy()


def _load_idx_folder(info: IdxDataset, folder: Path, fix: str) -> tuple[np.ndarray, ...]:
    """``(x_train, y_train, x_test, y_test)`` as uint8 arrays from the four IDX files in ``folder``.

    A file with the published number of images must match the recorded SHA-256 of its decompressed content; a copy
    of other counts (a subset, data of one's own) loads with a warning. Anything else wrong raises ValueError naming
    the file and ``fix``.
    """
    arrays = []
    for stem in IDX_FILES:
        path = _idx_file(folder, stem)
        if path is None:
            raise ValueError(f"dataset: {info.name}: {folder} lacks {stem} (or {stem}.gz); {fix}")
        try:
            content, arr = _read_idx(path, 2051 if "images" in stem else 2049)
        except ValueError as err:
            raise ValueError(f"dataset: {info.name}: {path} is damaged: {err}; {fix}") from None
        published = info.counts[0 if stem.startswith("train") else 1]
        if info.sha256 and arr.shape[0] == published:
            digest = hashlib.sha256(content).hexdigest()
            if digest != info.sha256[stem]:
                raise ValueError(f"dataset: {info.name}: {path} is damaged: the SHA-256 of its content is "
                                 f"{digest[:16]}..., the published file's is {info.sha256[stem][:16]}...; {fix}")
        arrays.append(arr)
    x_train, y_train, x_test, y_test = arrays
    for split, x, y in (("train", x_train, y_train), ("t10k", x_test, y_test)):
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"dataset: {info.name}: {folder}: {x.shape[0]:,} {split} images but {y.shape[0]:,} "
                             f"labels; {fix}")
        if y.size and int(y.max()) >= 10:
            raise ValueError(f"dataset: {info.name}: {folder}: {split} label {int(y.max())} outside 0-9; {fix}")
    if (x_train.shape[0], x_test.shape[0]) != info.counts:
        warnings.warn(f"{info.name}: {folder} holds {x_train.shape[0]:,} + {x_test.shape[0]:,} images, not the "
                      f"published {info.counts[0]:,} + {info.counts[1]:,}; loaded as it is", stacklevel=3)
    return x_train, y_train, x_test, y_test


def find_idx_copy(name: str, data_dir: Path) -> tuple[Path | None, str]:
    """The first folder that holds ``name``'s IDX files, or None, and the fix to name if that copy is bad.

    A folder holding some of the four files is an incomplete copy and is returned (to be refused), except
    torchvision's download folder, which its next download completes.
    """
    info = IDX_DATASETS[name]
    for folder in info.places(data_dir):
        present = [stem for stem in IDX_FILES if _idx_file(folder, stem) is not None]
        if folder.parts[-1] == "raw" and len(present) < len(IDX_FILES):
            continue
        if present:
            if folder.is_relative_to(SYSTEM_DATA_DIR):
                return folder, f"reinstall it: apt-get install --reinstall {info.apt_package}"
            return folder, f"replace the file with a good copy, or delete {folder} to use the next place"
    return None, ""


def _download_idx(info: IdxDataset, data_dir: Path) -> Path:
    """torchvision's download of ``info`` into ``data_dir``; ValueError in one line, naming where we looked."""
    try:
        _torchvision_split(info.torchvision_class, data_dir, True)
    except Exception as err:  # noqa: BLE001  (no network, a mirror down, a full disk: all end in the one line)
        *others, last = (str(p) for p in info.places(data_dir))
        looked = f"{', '.join(others)} or {last}"
        install = (f"install it: apt-get install {info.apt_package} (or put the four IDX files in "
                   f"{data_dir / info.name})" if info.apt_package else
                   f"put the four IDX files ({', '.join(IDX_FILES)}, or .gz) in {data_dir / info.name}")
        reason = " ".join(str(err).split()) or type(err).__name__
        raise ValueError(f"dataset: {info.name} not found in {looked}, and torchvision's download failed "
                         f"({reason}); {install}") from None
    return data_dir / info.torchvision_class / "raw"


def load_idx_copy(name: str, data_dir: Path) -> tuple[Path, tuple[np.ndarray, ...]]:
    """The folder ``name`` was read from and its ``(x_train, y_train, x_test, y_test)`` uint8 arrays.

    Looks in :meth:`IdxDataset.places` in order and reads the first copy found; only when none is there does
    torchvision download one into ``data_dir``. A damaged copy is refused, never replaced (ValueError, one line).
    """
    info = IDX_DATASETS[name]
    folder, fix = find_idx_copy(name, data_dir)
    if folder is None:
        folder = _download_idx(info, data_dir)
        fix = f"delete {folder} to download it again"
    return folder, _load_idx_folder(info, folder, fix)


def _mnist_like(name: str, hflip: bool):
    def load(data_dir: Path, size: int | None) -> Splits:
        folder, (x_tr, y_tr, x_te, y_te) = load_idx_copy(name, data_dir)
        splits = _finish(name, _uint8_nhwc(x_tr), y_tr, _uint8_nhwc(x_te), y_te, 10, size=size, hflip=hflip)
        splits.origin = str(folder)
        return splits

    return load


def _cifar(cls_name: str, name: str):
    def load(data_dir: Path, size: int | None) -> Splits:
        tr, te = (_torchvision_split(cls_name, data_dir, t) for t in (True, False))
        return _finish(name, _uint8_nhwc(tr.data), tr.targets, _uint8_nhwc(te.data), te.targets,
                       len(tr.classes), size=size, hflip=True)

    return load


register_dataset("mnist", default_size=28, hflip=False,
                 description="MNIST: data_dir/mnist, data_dir/MNIST/raw, or torchvision download")(
    _mnist_like("mnist", False))
register_dataset("fashion-mnist", default_size=28, hflip=True,
                 description="Fashion-MNIST: data_dir/fashion-mnist, data_dir/FashionMNIST/raw, "
                             "/usr/share/datasets/fashion-mnist (apt-get install dataset-fashion-mnist), "
                             "or torchvision download")(
    _mnist_like("fashion-mnist", True))
register_dataset("cifar10", default_size=32, hflip=True, description="CIFAR-10, torchvision download")(
    _cifar("CIFAR10", "cifar10"))
register_dataset("cifar100", default_size=32, hflip=True, description="CIFAR-100, torchvision download")(
    _cifar("CIFAR100", "cifar100"))


def _imagefolder(root: Path, size: int | None, name: str | None = None) -> Splits:
    """A user's ImageFolder tree: ROOT/train/<class>/*.png and ROOT/val (or ROOT/test)."""
    from harness.compat import ensure_torchvision  # torchvision: optional and slow to import, only these sets need it

    tv = ensure_torchvision()
    if not (root / "train").is_dir():
        raise ValueError(f"dataset: imagefolder:{root} needs a 'train' folder of class folders")
    test_dir = next((root / d for d in ("val", "test") if (root / d).is_dir()), None)
    if test_dir is None:
        raise ValueError(f"dataset: imagefolder:{root} needs a 'val' or 'test' folder beside 'train'")
    size = size or 32
    tf = tv.transforms.Compose([tv.transforms.Resize((size, size)), tv.transforms.PILToTensor()])
    train_set = tv.datasets.ImageFolder(str(root / "train"), transform=tf)
    test_set = tv.datasets.ImageFolder(str(test_dir), transform=tf)
    if train_set.classes != test_set.classes:
        raise ValueError(f"dataset: imagefolder:{root}: train and {test_dir.name} have different class folders")

    def stack(ds):
        xs, ys = zip(*[ds[i] for i in range(len(ds))])  # loaded once, outside the training loop
        x = torch.stack(xs).float().div_(255.0)
        if x.shape[1] == 4:
            x = x[:, :3]
        return x, list(ys)

    x_tr, y_tr = stack(train_set)
    x_te, y_te = stack(test_set)
    return _finish(name or f"imagefolder:{root}", x_tr, y_tr, x_te, y_te, len(train_set.classes), size=None,
                   hflip=True)


register_dataset("imagenet", default_size=224, hflip=True,
                 description="ImageNet: train/ and val/ class folders under data_dir/imagenet")(
    lambda data_dir, size: _imagefolder(data_dir / "imagenet", size, "imagenet"))


def load_dataset(name: str, *, image_size: int | None = None, data_dir: str | os.PathLike | None = None,
                 device: torch.device | str = "cpu", loader: str = "auto", workers: int | None = None) -> ImageData:
    """Load a dataset by name, on ``device`` or streamed to it.

    Args:
        name: a registered name or ``imagefolder:PATH``.
        image_size: resize to this side; None keeps the dataset's default (32 for ``imagefolder:``).
        data_dir: where ``mnist`` and ``fashion-mnist`` are looked for first (:func:`load_idx_copy`), where
            torchvision downloads to and ``imagenet`` lives (default ``$BUNITBENCH_DATA`` or ~/.cache/bunitbench/data).
        device: where the tensors live, or where streamed batches go.
        loader: "device", "stream" (image folders only) or "auto" (:func:`harness.core.stream.choose_loader`).
        workers: decoding processes of the streaming loader (None: one per CPU, at most 8).
    """
    check_dataset_name(name)
    check_loader(name, loader, workers)
    root = folder_root(name, data_dir)
    size = image_size or (_DATASETS[name].default_size if name in _DATASETS else 32)
    if root is not None and loader != "device":
        train, test = stream.scan_splits(name, root)
        if loader == "stream" or stream.choose_loader(len(train) + len(test), size, device) == "stream":
            return stream.StreamData(name, train, test, size, device=device, workers=workers,
                                     **(stream.IMAGENET_STATS if name == "imagenet" else {}))
    if name.startswith("imagefolder:"):
        return _imagefolder(root, size).to(device)
    info = _DATASETS[name]
    base = Path(data_dir) if data_dir else default_data_dir()
    return info.loader(base, size).to(device)


def load_suite_data(suite, device: torch.device | str) -> ImageData:
    """The dataset of a :class:`harness.core.config.Suite`, loaded as its ``data_loader`` and ``loader_workers`` say."""
    return load_dataset(suite.dataset, image_size=suite.image_size, data_dir=suite.data_dir, device=device,
                        loader=getattr(suite, "data_loader", "auto"), workers=getattr(suite, "loader_workers", None))


def pack_data(data: ImageData) -> dict:
    """The dataset as plain values for other processes (Ray's object store shares numpy arrays zero-copy).

    Device data travels whole; a streamed folder travels as its file lists and normalisation, and every process
    that unpacks it opens the files itself (the same path must reach them there).
    """
    if data.data_loader == "stream":
        return data.pack()
    return {"data_loader": "device", "name": data.name, "num_classes": data.num_classes, "hflip": data.hflip,
            **{k: getattr(data, k).cpu().numpy() for k in ("x_train", "y_train", "x_test", "y_test")}}


def unpack_data(packed: dict, device: torch.device | str) -> ImageData:
    """The dataset :func:`pack_data` packed, on (or streamed to) ``device``."""
    if packed["data_loader"] == "stream":
        return stream.StreamData.unpack(packed, device)
    tensors = {k: torch.tensor(packed[k], device=device) for k in ("x_train", "y_train", "x_test", "y_test")}
    return Splits(packed["name"], num_classes=packed["num_classes"], hflip=packed["hflip"], **tensors)
