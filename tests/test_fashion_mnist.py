"""Fashion-MNIST from the system's own copy (Debian's dataset-fashion-mnist), and the loader's lookup order.

The tests marked by the ``system_copy`` fixture read the real files under /usr/share/datasets/fashion-mnist. CI
installs the package (.ci/run), so there a missing copy fails; elsewhere it skips.
"""
import gzip
import hashlib
import os
import struct

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from harness.core import data as data_mod
from harness.core.data import FASHION_MNIST_SHA256, IDX_FILES, Splits, load_dataset, load_idx_copy

SYSTEM_COPY = data_mod.SYSTEM_DATA_DIR / "fashion-mnist"


@pytest.fixture(scope="module")
def system_copy():
    if all((SYSTEM_COPY / f"{stem}.gz").is_file() for stem in IDX_FILES):
        return SYSTEM_COPY
    message = f"{SYSTEM_COPY} missing: apt-get install dataset-fashion-mnist"
    if os.environ.get("CI") == "true":
        pytest.fail(f"CI installs the package first (.ci/run); {message}")
    pytest.skip(message)


@pytest.fixture(scope="module")
def real(system_copy, tmp_path_factory):
    """The real data at 28 px, loaded as a suite would load it with an empty data_dir."""
    return load_dataset("fashion-mnist", data_dir=tmp_path_factory.mktemp("empty"), image_size=28)


def _write_idx(path, array, magic, *, gz=False):
    content = struct.pack(">I", magic) + b"".join(struct.pack(">I", s) for s in array.shape)
    content += np.asarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if gz:
        path = path.with_name(path.name + ".gz")
        content = gzip.compress(content)
    path.write_bytes(content)


def _small_copy(folder, n_train=20, n_test=6, *, offset=0, gz=False):
    """Four small IDX files whose labels start at ``offset``, so a test can tell copies apart."""
    rng = np.random.default_rng(offset)
    for split, n in (("train", n_train), ("t10k", n_test)):
        _write_idx(folder / f"{split}-images-idx3-ubyte", rng.integers(0, 256, size=(n, 28, 28)), 2051, gz=gz)
        _write_idx(folder / f"{split}-labels-idx1-ubyte", (np.arange(n) + offset) % 10, 2049, gz=gz)


# --- the real files ---------------------------------------------------------------------------------------------

def test_system_copy_is_the_published_data(system_copy):
    for stem in IDX_FILES:
        content = gzip.decompress((system_copy / f"{stem}.gz").read_bytes())
        assert hashlib.sha256(content).hexdigest() == FASHION_MNIST_SHA256[stem]
    sizes = {stem: len(gzip.decompress((system_copy / f"{stem}.gz").read_bytes())) for stem in IDX_FILES}
    assert sizes == {"train-images-idx3-ubyte": 47_040_016, "train-labels-idx1-ubyte": 60_008,
                     "t10k-images-idx3-ubyte": 7_840_016, "t10k-labels-idx1-ubyte": 10_008}


def test_real_loader_on_the_system_copy(real, system_copy):
    assert real.origin == str(system_copy)
    assert real.x_train.shape == (60_000, 1, 28, 28) and real.x_test.shape == (10_000, 1, 28, 28)
    assert real.num_classes == 10 and real.hflip
    assert torch.bincount(real.y_train).tolist() == [6_000] * 10
    assert torch.bincount(real.y_test).tolist() == [1_000] * 10
    # the published order: the first training image is an ankle boot (9), the first test image too
    assert real.y_train[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]
    assert real.y_test[:10].tolist() == [9, 2, 1, 1, 6, 1, 4, 6, 5, 7]
    # normalised with the train split's statistics; the test split is a little brighter in those units
    assert abs(real.x_train.mean().item()) < 1e-4 and abs(real.x_train.std().item() - 1) < 1e-3
    assert 0.001 < real.x_test.mean().item() < 0.004


def test_real_pixel_statistics(system_copy, tmp_path):
    folder, (x_tr, y_tr, x_te, y_te) = load_idx_copy("fashion-mnist", tmp_path)
    assert folder == system_copy
    assert x_tr.dtype == np.uint8 and x_tr.shape == (60_000, 28, 28) and y_te.shape == (10_000,)
    assert x_tr.max() == 255 and x_tr.min() == 0
    # Fashion-MNIST's widely quoted statistics: mean 0.2860, std 0.3530 (train), mean 0.2868 (test)
    assert abs(x_tr.mean() / 255 - 0.2860) < 1e-4 and abs(x_tr.std() / 255 - 0.3530) < 1e-4
    assert abs(x_te.mean() / 255 - 0.2868) < 1e-4


def test_a_small_real_slice_trains_one_epoch(real):
    from harness.core.config import TrainConfig
    from harness.core.models import create_backbone
    from harness.run.train import evaluate, seed_everything, train_model

    seed_everything(0)
    small = [F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
             for x in (real.x_train[:4096], real.x_test[:1000])]
    part = Splits("fashion-mnist", small[0], real.y_train[:4096], small[1], real.y_test[:1000], 10, hflip=True)
    model = create_backbone("resnet8", num_classes=10, in_channels=1, shortcut="B")
    result = train_model(model, part, TrainConfig(batch_size=32, lr=0.05, warmup_epochs=0.0), epochs=1, seed=0)
    metrics = evaluate(model, part)
    # images and labels line up: one pass over 4,096 images lands far above chance (10%); 65.4% measured here
    assert result.epochs == 1 and np.isfinite(result.final_loss)
    assert metrics["top1"] > 55, metrics


# --- damaged copies ---------------------------------------------------------------------------------------------

def test_a_flipped_byte_is_refused(system_copy, tmp_path):
    copy = tmp_path / "fashion-mnist"
    copy.mkdir()
    for stem in IDX_FILES:
        (copy / f"{stem}.gz").symlink_to(system_copy / f"{stem}.gz")
    labels = bytearray(gzip.decompress((system_copy / "train-labels-idx1-ubyte.gz").read_bytes()))
    labels[8 + 1234] = (labels[8 + 1234] + 1) % 10  # still a valid label: only the digest can tell
    (copy / "train-labels-idx1-ubyte").write_bytes(bytes(labels))  # read before the .gz beside it
    with pytest.raises(ValueError) as err:
        load_dataset("fashion-mnist", data_dir=tmp_path)
    message = str(err.value)
    assert "\n" not in message
    assert str(copy / "train-labels-idx1-ubyte") in message and "SHA-256" in message
    assert f"delete {copy}" in message


def test_damage_in_the_system_copy_names_the_reinstall(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _small_copy(system / "fashion-mnist", gz=True)
    truncated = system / "fashion-mnist" / "t10k-images-idx3-ubyte.gz"
    truncated.write_bytes(truncated.read_bytes()[:-40])
    monkeypatch.setattr(data_mod, "SYSTEM_DATA_DIR", system)
    with pytest.raises(ValueError, match="apt-get install --reinstall dataset-fashion-mnist") as err:
        load_dataset("fashion-mnist", data_dir=tmp_path / "empty")
    assert str(truncated) in str(err.value) and "cannot be decompressed" in str(err.value)


@pytest.mark.parametrize("cut", ["header", "pixels"])
def test_a_file_shorter_than_its_header_is_refused(tmp_path, cut):
    copy = tmp_path / "fashion-mnist"
    _small_copy(copy)
    images = copy / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:10] if cut == "header" else images.read_bytes()[:-1])
    with pytest.raises(ValueError, match=f"{images} is damaged"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


def test_an_incomplete_copy_names_the_missing_file(tmp_path):
    copy = tmp_path / "fashion-mnist"
    _small_copy(copy)
    (copy / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(ValueError, match=f"{copy} lacks t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", data_dir=tmp_path)


# --- where the data is looked for -------------------------------------------------------------------------------

def test_a_data_dir_copy_wins_over_the_system_copy(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _small_copy(system / "fashion-mnist", n_train=30, offset=5)
    monkeypatch.setattr(data_mod, "SYSTEM_DATA_DIR", system)
    data_dir = tmp_path / "data"
    _small_copy(data_dir / "FashionMNIST" / "raw", n_train=20, offset=3)  # torchvision's layout
    with pytest.warns(UserWarning, match="20 \\+ 6 images, not the published 60,000 \\+ 10,000"):
        d = load_dataset("fashion-mnist", data_dir=data_dir, image_size=28)
    assert d.origin == str(data_dir / "FashionMNIST" / "raw") and d.y_train[:3].tolist() == [3, 4, 5]
    _small_copy(data_dir / "fashion-mnist", n_train=12, offset=7, gz=True)  # our layout comes first
    with pytest.warns(UserWarning):
        d = load_dataset("fashion-mnist", data_dir=data_dir)
    assert d.origin == str(data_dir / "fashion-mnist") and d.x_train.shape[0] == 12 and d.y_train[0] == 7
    monkeypatch.setenv("BUNITBENCH_DATA", str(tmp_path / "nothing-here"))  # no data_dir: $BUNITBENCH_DATA, then system
    with pytest.warns(UserWarning):
        d = load_dataset("fashion-mnist")
    assert d.origin == str(system / "fashion-mnist") and d.x_train.shape[0] == 30 and d.y_train[0] == 5


def test_an_incomplete_torchvision_download_is_left_to_torchvision(tmp_path, monkeypatch):
    system = tmp_path / "system"
    _small_copy(system / "fashion-mnist", offset=2)
    monkeypatch.setattr(data_mod, "SYSTEM_DATA_DIR", system)
    raw = tmp_path / "data" / "FashionMNIST" / "raw"
    _small_copy(raw)
    (raw / "train-images-idx3-ubyte").unlink()  # an interrupted download
    with pytest.warns(UserWarning):
        d = load_dataset("fashion-mnist", data_dir=tmp_path / "data")
    assert d.origin == str(system / "fashion-mnist")


@pytest.fixture
def no_network(monkeypatch):
    """Every HTTP(S) request torchvision makes goes to a closed local port."""
    for var in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    for var in ("no_proxy", "NO_PROXY"):
        monkeypatch.delenv(var, raising=False)


def test_missing_everywhere_without_network_is_one_line(tmp_path, monkeypatch, no_network):
    monkeypatch.setattr(data_mod, "SYSTEM_DATA_DIR", tmp_path / "system")
    data_dir = tmp_path / "data"
    with pytest.raises(ValueError) as err:
        load_dataset("fashion-mnist", data_dir=data_dir)
    message = str(err.value)
    assert "\n" not in message and message.startswith("dataset: fashion-mnist not found in ")
    for place in (data_dir / "fashion-mnist", data_dir / "FashionMNIST" / "raw", tmp_path / "system" / "fashion-mnist"):
        assert str(place) in message
    assert "download failed" in message and "apt-get install dataset-fashion-mnist" in message


def test_the_cli_says_what_to_do_in_one_line(tmp_path, monkeypatch, capsys, no_network):
    from harness.cli import main

    monkeypatch.setattr(data_mod, "SYSTEM_DATA_DIR", tmp_path / "system")
    suite = tmp_path / "s.toml"
    suite.write_text(f'name = "s"\ndataset = "fashion-mnist"\ndata_dir = "{tmp_path / "data"}"\n'
                     'backbones = ["resnet20"]\n[train]\nepochs = 1\n[[methods]]\nname = "dense"\n')
    assert main(["run", str(suite), "--results-dir", str(tmp_path / "results"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "apt-get install dataset-fashion-mnist" in err[0]
    assert not (tmp_path / "results" / "s" / "runs.jsonl").exists() or \
        (tmp_path / "results" / "s" / "runs.jsonl").read_text() == ""


def test_mnist_has_no_system_copy_to_suggest(tmp_path, no_network):
    with pytest.raises(ValueError) as err:
        load_dataset("mnist", data_dir=tmp_path)
    assert "apt-get" not in str(err.value) and str(tmp_path / "mnist") in str(err.value)
