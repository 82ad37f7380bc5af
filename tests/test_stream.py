"""The streaming loader (harness.core.stream) on generated JPEG trees: training, order, shards, bad files, memory."""
import gc
import json
import logging
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from harness.core.config import ConfigError, TrainConfig, parse_suite
from harness.core.data import ImageData, Splits, load_dataset, pack_data, unpack_data
from harness.core.decode import write_image_tree
from harness.core.models import create_backbone
from harness.core.stream import BadImagesError, StreamData, choose_loader
from harness.run.train import evaluate, train_model

RECIPE = TrainConfig(epochs=1, batch_size=64, lr=0.05, warmup_epochs=0.2)


@pytest.fixture(scope="module")
def tree(tmp_path_factory):
    """2,000 training and 400 validation JPEGs of 4 classes, each 40-160 px wide and high."""
    return write_image_tree(tmp_path_factory.mktemp("jpegs"), n_train=2000, n_val=400)


@pytest.fixture(scope="module")
def small_tree(tmp_path_factory):
    return write_image_tree(tmp_path_factory.mktemp("small"), n_train=96, n_val=20, seed=1)


def _stream(root, size=32, workers=2, device="cpu"):
    return load_dataset(f"imagefolder:{root}", image_size=size, loader="stream", workers=workers, device=device)


def test_streams_a_jpeg_tree_end_to_end(tree):
    data = _stream(tree)
    assert isinstance(data, StreamData) and isinstance(data, ImageData)
    assert (data.num_classes, data.in_channels, data.image_size, data.data_loader) == (4, 3, 32, "stream")
    xb, yb = next(iter(data.train_loader(64, seed=0, augment=True)))
    assert xb.shape == (64, 3, 32, 32) and xb.dtype == torch.float32 and yb.dtype == torch.int64
    assert abs(xb.mean().item()) < 0.5 and 0.5 < xb.std().item() < 2  # normalised with the estimated statistics
    torch.manual_seed(0)
    model = create_backbone("resnet8", num_classes=4, in_channels=3, shortcut="B")
    result = train_model(model, data, RECIPE, epochs=1, seed=0)
    assert len(result.history) == 1 and np.isfinite(result.final_loss)
    metrics = evaluate(model, data, batch_size=128)
    assert metrics["top1"] > 80  # 4 colour classes: one epoch of 31 steps learns them
    assert data.bad_files == {}


def test_order_and_augmentation_are_seeded_per_epoch_not_per_worker(small_tree):
    def epochs(workers, seed):
        loader = _stream(small_tree, size=16, workers=workers).train_loader(32, seed=seed, augment=True)
        return [[(x.clone(), y.clone()) for x, y in loader] for _ in range(2)]

    a, b, c = epochs(2, 5), epochs(0, 5), epochs(2, 6)
    assert len(a[0]) == 3  # 96 // 32
    for ea, eb in zip(a, b):
        for (xa, ya), (xb, yb) in zip(ea, eb):
            assert torch.equal(xa, xb) and torch.equal(ya, yb)  # the same pixels, however many workers decoded them
    assert not torch.equal(a[0][0][0], a[1][0][0])  # a new order and new crops in epoch 2
    assert not torch.equal(a[0][0][0], c[0][0][0])  # another seed


def test_shards_are_disjoint_and_rebuild_the_one_process_batches(small_tree):
    data = _stream(small_tree, size=16, workers=0)
    whole = data.train_loader(32, seed=3, augment=True)
    shards = [whole.shard(rank, 2) for rank in (0, 1)]
    for epoch in range(2):
        idx = [list(s.batch_indices(epoch)) for s in shards]
        seen = np.concatenate([np.concatenate(i) for i in idx])
        assert len(seen) == len(np.unique(seen)) == 96  # disjoint, and together the whole epoch
        for full, i0, i1 in zip(whole.batch_indices(epoch), *idx):
            assert np.array_equal(np.concatenate([i0, i1]), full) and len(i0) == len(i1) == 16
    batches = list(whole)
    for (xb, yb), (x0, y0), (x1, y1) in zip(batches, *(list(s) for s in shards)):
        assert torch.equal(torch.cat([x0, x1]), xb) and torch.equal(torch.cat([y0, y1]), yb)  # same crops, flips


def test_crops_follow_the_imagenet_transforms(tmp_path):
    from PIL import Image

    from harness.core.decode import crop_box, decode_batch, scan_folder

    rng = np.random.default_rng(0)
    for _ in range(200):  # random-resized crop: inside the image, 8-100% of its area, aspect 3/4-4/3
        left, top, right, bottom, _ = crop_box(300, 200, 32, train=True, rng=rng)
        w, h = right - left, bottom - top
        assert 0 <= left and right <= 300 and 0 <= top and bottom <= 200
        assert 0.08 * 60_000 * 0.95 <= w * h <= 60_000 and 3 / 4 * 0.95 <= w / h <= 4 / 3 * 1.05
    assert crop_box(200, 100, 16, train=False) == (56.25, 6.25, 143.75, 93.75, False)  # 87.5 px: 100 * 0.875
    (tmp_path / "a").mkdir()
    img = np.zeros((100, 200, 3), np.uint8)
    img[:, :100, 0], img[:, 100:, 2] = 255, 255  # red left half, blue right half
    Image.fromarray(img).save(tmp_path / "a" / "x.png")
    x, y, bad = decode_batch(scan_folder(tmp_path), np.array([0]), 16, train=False, seed=0, epoch=0)
    assert x.shape == (1, 16, 16, 3) and y.tolist() == [0] and bad == []
    assert (x[0, :, :7, 0] > 250).all() and (x[0, :, 9:, 2] > 250).all()  # the centre crop keeps both halves


@pytest.mark.slow  # 20 s; the end-to-end stream test covers the protocol in CI
def test_data_protocol_on_streamed_data(small_tree):
    data = _stream(small_tree, size=16)
    examples = data.example_inputs(8)
    assert examples.shape == (8, 3, 16, 16) and torch.equal(data.example_inputs(4), examples[:4])
    calib = data.calibration_batches(4, 40)
    assert [x.shape[0] for x, _ in calib] == [40, 40]  # 96 images: two whole batches of 40
    assert len(torch.cat([y for _, y in calib]).unique()) == 4  # a fixed shuffled order, not class 0 first
    batches = list(data.eval_batches(8))
    assert len(batches) == len(data.eval_batches(8)) == 3 and sum(len(y) for _, y in batches) == 20
    assert torch.equal(batches[0][0], data.example_inputs(8))  # evaluation transform, in order


def test_auto_rule_and_forced_loaders(small_tree):
    # 116 images at 16x16 decode to 116 * 3 * 16 * 16 * 4 = 356,352 bytes; the budget is a quarter of free memory
    assert choose_loader(116, 16, "cpu", free=4 * 356_352) == "device"
    assert choose_loader(116, 16, "cpu", free=4 * 356_352 - 4) == "stream"
    assert choose_loader(1_281_167 + 50_000, 224, "cpu", free=2 * 1024**4) == "stream"  # ImageNet at 224: 802 GB
    assert isinstance(load_dataset(f"imagefolder:{small_tree}", image_size=16), Splits)  # fits: on the device
    assert isinstance(load_dataset(f"imagefolder:{small_tree}", image_size=16, loader="stream", workers=0), StreamData)


def test_imagenet_layout_under_data_dir(tmp_path):
    write_image_tree(tmp_path / "imagenet", n_train=8, n_val=4, classes=2)
    data = load_dataset("imagenet", data_dir=tmp_path, image_size=16, loader="stream", workers=0)
    assert data.name == "imagenet" and data.num_classes == 2
    assert data.mean.flatten().div(255).tolist() == pytest.approx([0.485, 0.456, 0.406])  # the published values


@pytest.mark.parametrize("field,value,message", [
    ("data_loader", "disk", "data_loader: 'disk' not allowed; allowed: auto, device, stream"),
    ("loader_workers", -1, "loader_workers: -1 not allowed; allowed: an integer >= 0"),
])
def test_config_errors_name_the_field(small_tree, field, value, message):
    raw = {"name": "s", "dataset": f"imagefolder:{small_tree}", "backbones": ["resnet8"],
           "methods": [{"name": "dense"}], field: value}
    with pytest.raises(ConfigError, match=message):
        parse_suite(raw)


def test_stream_needs_an_image_folder():
    raw = {"name": "s", "dataset": "digits", "backbones": ["resnet8"], "methods": [{"name": "dense"}],
           "data_loader": "stream"}
    with pytest.raises(ConfigError, match="data_loader: 'stream' reads image folders .* for digits: auto, device"):
        parse_suite(raw)
    suite = parse_suite({**raw, "data_loader": "device", "loader_workers": 3})
    assert (suite.data_loader, suite.loader_workers) == ("device", 3)


def test_packed_for_ray_workers_without_the_images(small_tree):
    data = _stream(small_tree, size=16, workers=0)
    packed = pack_data(data)
    assert packed["data_loader"] == "stream" and "x_train" not in packed
    again = unpack_data(packed, "cpu")
    assert torch.equal(again.mean, data.mean)  # not re-estimated on the worker
    assert all(torch.equal(a[0], b[0]) for a, b in zip(data.eval_batches(8), again.eval_batches(8)))
    digits = load_dataset("digits", image_size=8)
    assert torch.equal(unpack_data(pack_data(digits), "cpu").example_inputs(4), digits.example_inputs(4))


def _corrupt(root, n):
    files = sorted((root / "train").rglob("*.jpg"))[:n]
    for k, f in enumerate(files):
        blob = f.read_bytes()
        f.write_bytes(blob[:len(blob) // 2] if k % 2 == 0 else b"not a jpeg")  # truncated, or no image at all
    return [str(f) for f in files]


def test_a_few_bad_files_are_reported_and_skipped(tmp_path, caplog):
    root = write_image_tree(tmp_path, n_train=2000, n_val=16, sizes=(20, 40))
    bad = _corrupt(root, 2)  # at most 0.1% of 2,000 = 2 files may fail
    data = _stream(root, size=16)
    caplog.set_level(logging.WARNING, logger="harness.data")
    seen = sum(len(y) for _, y in data.train_loader(500, seed=0, augment=True))
    assert seen == 2000 - 2  # the two bad files are left out of their batches
    assert sorted(data.bad_files) == sorted(bad)
    assert "truncated" in data.bad_files[bad[0]] and "cannot identify" in data.bad_files[bad[1]]
    assert all(any(path in r.getMessage() for r in caplog.records) for path in bad)


def test_cpu_workers_normalise_to_the_values_of_the_uint8_path(tmp_path):
    from harness.core.decode import decode_batch

    root = write_image_tree(tmp_path, n_train=64, n_val=4, sizes=(20, 60))
    _corrupt(root, 1)  # one batch comes out a row short
    data = _stream(root, size=16, workers=2)
    assert data.host_affine() is not None  # a CPU device: the workers hand over finished float32 batches
    loader = data.train_loader(32, seed=5, augment=True)
    rows = []
    for (xb, yb), indices in zip(loader, loader.batch_indices(0)):
        pixels, labels, _ = decode_batch(data.train_files, indices, 16, train=True, seed=5, epoch=0)
        ref = data.normalise(pixels)  # the uint8 batch normalised in the training process, as on a CUDA device
        assert torch.equal(xb, ref) and xb.stride() == ref.stride() and torch.equal(yb, labels)
        assert xb.is_shared()  # written in shared memory by the worker, not copied there
        rows.append(len(yb))
    assert sorted(rows) == [31, 32]


@pytest.mark.slow  # 10 s; CI keeps the few-bad-files case (reported with paths, skipped, no hang)
def test_too_many_bad_files_stop_the_run_naming_them(tmp_path):
    root = write_image_tree(tmp_path, n_train=200, n_val=8, sizes=(20, 40))
    bad = _corrupt(root, 10)
    model = create_backbone("resnet8", num_classes=4, in_channels=3, shortcut="B")
    start = time.perf_counter()
    with pytest.raises(BadImagesError, match="10 of 200 files .* could not be decoded") as err:
        train_model(model, _stream(root, size=16), RECIPE, epochs=1)  # stops while estimating the statistics
    assert time.perf_counter() - start < 60  # raised, not hung
    assert any(path in str(err.value) for path in bad)


# --- data-parallel: 2 gloo processes --------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _rank_worker(rank: int, world: int, port: int, root: str, out: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), LOCAL_WORLD_SIZE=str(world))
    torch.set_num_threads(1)
    import torch.distributed as dist

    from harness.run.parallel import init_distributed

    parallel = init_distributed("cpu")
    data = _stream(root, size=16, workers=1)
    loader = parallel.shard(data.train_loader(32, seed=3, augment=True))
    batches = [(x, y) for x, y in loader]
    torch.save({"x": torch.cat([x for x, _ in batches]), "y": torch.cat([y for _, y in batches]),
                "indices": np.concatenate(list(loader.batch_indices(0)))}, os.path.join(out, f"rank{rank}.pt"))
    dist.destroy_process_group()


def test_two_ranks_decode_disjoint_shards_of_the_one_process_epoch(small_tree, tmp_path):
    mp.start_processes(_rank_worker, args=(2, _free_port(), str(small_tree), str(tmp_path)), nprocs=2,
                       start_method="spawn")
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in (0, 1)]
    i0, i1 = ranks[0]["indices"], ranks[1]["indices"]
    assert len(i0) == len(i1) == 48 and not set(i0) & set(i1) and len(set(i0) | set(i1)) == 96
    whole = list(_stream(small_tree, size=16, workers=0).train_loader(32, seed=3, augment=True))
    for k, (xb, yb) in enumerate(whole):  # rank 0 holds rows 0-15 of each batch, rank 1 rows 16-31
        assert torch.equal(ranks[0]["x"][16 * k:16 * (k + 1)], xb[:16])
        assert torch.equal(ranks[1]["x"][16 * k:16 * (k + 1)], xb[16:])
        assert torch.equal(torch.cat([ranks[0]["y"][16 * k:16 * (k + 1)], ranks[1]["y"][16 * k:16 * (k + 1)]]), yb)


def _suite_text(root) -> str:
    return (f'name = "streamed"\ndataset = "imagefolder:{root}"\nimage_size = 16\ndata_loader = "stream"\n'
            'loader_workers = 1\nbackbones = ["resnet8"]\nshortcut = "B"\nseeds = [0]\n\n[train]\nepochs = 1\n'
            'batch_size = 32\nwarmup_epochs = 0.2\n\n[measure]\nlatency = false\nrepeats = 3\nbatch_sizes = [1]\n\n'
            '[[methods]]\nname = "dense"\n')


@pytest.mark.slow  # two torchrun ranks each spawning decoders: test_ddp's torchrun suite covers rank 0 writing in CI
def test_torchrun_streamed_suite_writes_each_row_once(small_tree, tmp_path):
    from harness.core.store import ResultStore

    suite = tmp_path / "streamed.toml"
    suite.write_text(_suite_text(small_tree))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "harness.run.distributed", str(suite), "--results-dir", str(tmp_path / "out"), "--no-progress"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr[-3000:]
    rows = ResultStore(tmp_path / "out" / "streamed").rows()
    assert len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["world_size"] == 2
    assert rows[0]["image_size"] == 16 and 0 <= rows[0]["top1"] <= 100


@pytest.mark.slow
def test_ray_tasks_open_the_folder_themselves(small_tree, tmp_path):
    ray = pytest.importorskip("ray", reason="the Ray executor needs the optional extra: pip install 'bunit-bench[ray]'")
    from harness.core.config import load_suite
    from harness.run.ray_executor import run_suite_ray
    from harness.core.store import ResultStore

    suite = tmp_path / "streamed.toml"
    suite.write_text(_suite_text(small_tree))
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        outcome = run_suite_ray(load_suite(str(suite)), results_dir=tmp_path / "out", device="cpu", progress=False)
    finally:
        ray.shutdown()
    rows = ResultStore(tmp_path / "out" / "streamed").rows()
    assert outcome.ok == 1 and len(rows) == 1 and rows[0]["status"] == "ok" and rows[0]["executor"] == "ray"


# --- memory: resident set size does not grow with the number of images -----------------------------------------

_RSS_SCRIPT = """
import json, resource, sys, torch
import harness
from harness.core.config import TrainConfig
from harness.core.data import load_dataset
from harness.core.models import create_backbone
from harness.run.train import train_model
torch.set_num_threads(1)
data = load_dataset("imagefolder:" + sys.argv[1], image_size=32, loader="stream", workers=2)
model = create_backbone("resnet8", num_classes=4, in_channels=3, shortcut="B")
train_model(model, data, TrainConfig(epochs=1, batch_size=64, lr=0.05), epochs=1)
import gc; gc.collect()  # the loader's workers have exited and been waited for: RUSAGE_CHILDREN covers them
hwm = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(json.dumps({"self_kb": hwm,  # not ru_maxrss: Linux carries the spawning process's (pytest's) peak across exec
                  "workers_kb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))
"""


@pytest.mark.slow
def test_peak_memory_does_not_grow_with_the_tree(tmp_path):
    peaks = {}
    for n in (2000, 8000):
        root = write_image_tree(tmp_path / str(n), n_train=n, n_val=100, seed=n)
        out = subprocess.run([sys.executable, "-c", _RSS_SCRIPT, str(root)], capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-2000:]
        peaks[n] = json.loads(out.stdout.strip().splitlines()[-1])
    print("peak RSS (kB):", peaks)
    for part in ("self_kb", "workers_kb"):
        assert abs(peaks[8000][part] - peaks[2000][part]) < 0.10 * peaks[2000][part], peaks


@pytest.mark.parametrize("finish_the_epoch", [True, False])
def test_a_dropped_loader_stops_its_workers_at_once(small_tree, finish_the_epoch):
    # no garbage collector: the loader must be freed by its last reference going, with its decoding processes;
    # a reference cycle through the sampler left them to the collector, which then waited 5 s per worker
    data = _stream(small_tree, size=16, workers=2)
    loader = data.train_loader(8, seed=0, augment=True)  # 12 batches: more than the workers prefetch
    gc.disable()
    try:
        batches = iter(loader)
        next(batches)
        if finish_the_epoch:
            for _ in batches:
                pass
        assert len(mp.active_children()) == 2
        t0 = time.perf_counter()
        del batches, loader
        while mp.active_children() and time.perf_counter() - t0 < 3:
            time.sleep(0.05)
        assert mp.active_children() == [] and time.perf_counter() - t0 < 2
    finally:
        gc.enable()
