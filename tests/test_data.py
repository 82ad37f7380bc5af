"""Datasets load through the same code a user runs, from real files made here."""
import gzip
import struct

import numpy as np
import pytest
import torch

from harness.core.data import load_dataset
from harness.core.device_loader import DeviceLoader, augment_batch


def test_digits_split_and_normalisation():
    d = load_dataset("digits", image_size=16)
    assert d.x_train.shape == (1437, 1, 16, 16) and d.x_test.shape == (360, 1, 16, 16)
    assert d.num_classes == 10 and d.in_channels == 1
    from sklearn.datasets import load_digits

    full = np.bincount(load_digits().target)
    test = torch.bincount(d.y_test).numpy()
    assert test.sum() == 360 and (np.abs(test - 0.2 * full) < 1).all()  # stratified 20%
    assert abs(d.x_train.mean().item()) < 1e-5 and abs(d.x_train.std().item() - 1) < 1e-3


def _write_idx(path, array, magic):
    header = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    path.write_bytes(header + array.astype(np.uint8).tobytes())


@pytest.mark.parametrize("name,folder", [("mnist", "MNIST"), ("fashion-mnist", "FashionMNIST")])
def test_mnist_from_idx_files(tmp_path, name, folder):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", 20), ("t10k", 6)):
        images = rng.integers(0, 256, size=(n, 28, 28))
        labels = np.arange(n) % 10
        _write_idx(raw / f"{split}-images-idx3-ubyte", images, 2051)
        _write_idx(raw / f"{split}-labels-idx1-ubyte", labels, 2049)
    with pytest.warns(UserWarning, match="20 \\+ 6 images, not the published 60,000 \\+ 10,000"):
        d = load_dataset(name, data_dir=tmp_path)
    assert d.origin == str(raw)
    assert d.x_train.shape == (20, 1, 28, 28) and d.x_test.shape == (6, 1, 28, 28)
    assert d.y_train.tolist() == [i % 10 for i in range(20)]
    assert d.num_classes == 10
    # normalised with the train split's own statistics
    assert abs(d.x_train.mean().item()) < 1e-5
    # NCHW strides, not the (HW, 1, W, 1) of a one-channel NHWC permute, which passes torch's contiguity test too:
    # a convolution of a batch then returns NCHW, as an NCHW setting asks (it returned channels_last)
    assert d.x_train.stride() == (784, 784, 28, 1) and d.x_test.stride() == (784, 784, 28, 1)
    out = torch.nn.Conv2d(1, 4, 3, padding=1)(d.x_train[:5].contiguous())
    assert out.stride() == (4 * 784, 784, 28, 1)


def test_imagefolder_tree(tmp_path):
    from PIL import Image

    colours = {"red": (255, 0, 0), "green": (0, 255, 0), "blue": (0, 0, 255)}
    for split, n in (("train", 4), ("val", 2)):
        for cls, rgb in colours.items():
            folder = tmp_path / split / cls
            folder.mkdir(parents=True)
            for i in range(n):
                Image.new("RGB", (12 + i, 10), rgb).save(folder / f"{i}.png")
    d = load_dataset(f"imagefolder:{tmp_path}", image_size=8)
    assert d.x_train.shape == (12, 3, 8, 8) and d.x_test.shape == (6, 3, 8, 8)
    assert d.num_classes == 3
    assert sorted(d.y_train.tolist()) == [0] * 4 + [1] * 4 + [2] * 4
    # class "blue" (index 0, sorted) is brightest in channel 2 after normalisation
    blue = d.x_test[d.y_test == 0]
    assert (blue[:, 2] > blue[:, 0]).all()


def test_imagefolder_needs_val(tmp_path):
    (tmp_path / "train" / "a").mkdir(parents=True)
    with pytest.raises(ValueError, match="'val' or 'test'"):
        load_dataset(f"imagefolder:{tmp_path}")


def test_crop_is_a_shift_and_flip_mirrors():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).reshape(2, 1, 4, 4) + 1
    g = torch.Generator().manual_seed(0)
    out = augment_batch(x, pad=1, hflip=False, generator=g)
    for b in range(2):  # each output is the input shifted by at most 1 px with zeros entering
        matches = []
        for dy in (-1, 0, 1):
            for dx in (-1, 0, 1):
                shifted = torch.zeros(4, 4)
                src = x[b, 0]
                ys, xs = slice(max(0, dy), 4 + min(0, dy)), slice(max(0, dx), 4 + min(0, dx))
                yd, xd = slice(max(0, -dy), 4 + min(0, -dy)), slice(max(0, -dx), 4 + min(0, -dx))
                shifted[yd, xd] = src[ys, xs]
                matches.append(torch.equal(shifted, out[b, 0]))
        assert sum(matches) == 1
    flipped = augment_batch(x.repeat(64, 1, 1, 1), pad=0, hflip=True, generator=g)
    is_flip = [torch.equal(f, x[i % 2].flip(-1)) for i, f in enumerate(flipped)]
    is_same = [torch.equal(f, x[i % 2]) for i, f in enumerate(flipped)]
    assert all(a or b for a, b in zip(is_flip, is_same)) and 40 < sum(is_flip) < 88


def test_loader_covers_every_sample_once_per_epoch():
    x = torch.arange(10, dtype=torch.float32).reshape(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    y = torch.arange(10)
    loader = DeviceLoader(x, y, 3, train=True, augment=False, seed=1, drop_last=False)
    seen = torch.cat([yb for _, yb in loader])
    assert len(loader) == 4 and sorted(seen.tolist()) == list(range(10))
    again = torch.cat([yb for _, yb in DeviceLoader(x, y, 3, train=True, augment=False, seed=1, drop_last=False)])
    assert torch.equal(seen, again)  # same seed, same order


def test_splits_implement_the_data_protocol():
    from harness.core.data import ImageData

    d = load_dataset("digits", image_size=8)
    assert isinstance(d, ImageData)
    assert d.device == torch.device("cpu") and d.image_size == 8 and d.in_channels == 1 and not d.hflip
    assert torch.equal(d.example_inputs(8), d.x_test[:8])
    calib = d.calibration_batches(4, 500)  # 1437 training images: two whole batches of 500
    assert [x.shape[0] for x, _ in calib] == [500, 500] and torch.equal(calib[1][1], d.y_train[500:1000])
    assert len(d.calibration_batches(4, 5000)) == 1 and d.calibration_batches(4, 5000)[0][0].shape[0] == 1437
    batches = list(d.eval_batches(100))
    assert len(d.eval_batches(100)) == len(batches) == 4 and torch.equal(torch.cat([y for _, y in batches]), d.y_test)
    loader = d.train_loader(128, seed=3, augment=False)
    seen = torch.cat([y for _, y in loader])
    assert len(loader) == 1437 // 128 and seen.numel() == 128 * len(loader) and seen.unique().numel() == 10
