"""Streaming loader throughput and memory: harness.core.stream against a plain torchvision ImageFolder + DataLoader.

Both read the same generated JPEG tree (mixed sizes), use the same worker count, batch size and transforms
(training: RandomResizedCrop + RandomHorizontalFlip; normalised float32 NCHW batches delivered on the device), and
keep their workers across epochs. One call is one training epoch of batches; the two take turns round-robin in one
process (``bunit.timing.interleaved_times``), so a slow spell of the machine lands on both. Peak memory is measured
apart: each loader alone runs one epoch in its own subprocess, which reports its own peak RSS and its largest
worker's. Both normalise with ImageNet's mean and std, so nothing is decoded before the first epoch.

Usage: ``python benchmarks/bench_loader.py [--images 1000] [--sizes 224 64] [--workers 2] [--rounds 3]``.
Prints one line per (image size, loader) and writes ``results/benchmarks/loader.csv``: images/s at the median epoch
and its ratio to torchvision's, and the paired ratio (this loader's images/s over torchvision's in the same round;
median and minimum over the rounds), which a slow spell of the machine moves less.
"""
from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import harness  # noqa: F401  (torchvision shim)
import numpy as np
import pandas as pd
import torch

from bunit.timing import interleaved_times, machine_load, summary_ms
from harness.compat import ensure_torchvision
from harness.core.decode import write_image_tree
from harness.core.stream import IMAGENET_STATS, StreamData, scan_splits

LOADERS = ("stream", "torchvision")


def _torchvision_loader(root: Path, size: int, batch: int, workers: int, device: torch.device, mean, std):
    """What users write: ImageFolder (PIL decode), per-sample transforms to float, default collate."""
    tv = ensure_torchvision()
    tf = tv.transforms.Compose([tv.transforms.RandomResizedCrop(size), tv.transforms.RandomHorizontalFlip(),
                                tv.transforms.ToTensor(), tv.transforms.Normalize(mean, std)])
    return torch.utils.data.DataLoader(tv.datasets.ImageFolder(str(root / "train"), transform=tf), batch_size=batch,
                                       shuffle=True, drop_last=True, num_workers=workers,
                                       pin_memory=device.type == "cuda", persistent_workers=workers > 0)


def _loaders(root: Path, size: int, batch: int, workers: int, device: torch.device, which=LOADERS) -> dict:
    """The loaders named in ``which``, both normalising with ImageNet's mean and std (nothing decoded up front)."""
    loaders = {}
    if "stream" in which:
        train, test = scan_splits("bench", root)
        data = StreamData("bench", train, test, size, device=device, workers=workers, **IMAGENET_STATS)
        loaders["stream"] = data.train_loader(batch, seed=0, augment=True)
    if "torchvision" in which:
        loaders["torchvision"] = _torchvision_loader(root, size, batch, workers, device, **IMAGENET_STATS)
    return loaders


def _epoch(loader, device: torch.device) -> int:
    """One epoch of batches on the device; returns the images delivered."""
    n = 0
    for xb, _ in loader:
        xb = xb.to(device, non_blocking=True)  # (B, 3, S, S) float32, normalised
        n += xb.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return n


def _peak_memory(root: Path, size: int, batch: int, workers: int, device: str, which: str) -> dict:
    """Run one epoch of ``which`` in a subprocess; its peak RSS (MB) and its largest worker's."""
    cmd = [sys.executable, __file__, "--_memory", which, "--root", str(root), "--sizes", str(size), "--batch",
           str(batch), "--workers", str(workers), "--device", device]
    out = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def _own_peak_rss_mb() -> float:
    """This process's peak RSS: ``VmHWM``, which starts afresh at ``exec``. ``ru_maxrss`` does not: Linux carries
    the spawning process's peak across ``exec``, so it reported the benchmark's own RSS for both loaders."""
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000, help="training images in the generated tree")
    parser.add_argument("--sizes", type=int, nargs="+", default=[224, 64], help="output image sizes")
    parser.add_argument("--source", type=int, nargs=2, default=[200, 500], help="min and max side of the JPEGs")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2, help="decoding workers, the same for both loaders")
    parser.add_argument("--rounds", type=int, default=3, help="timed epochs of each loader")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--root", default=None, help="an existing ImageFolder tree instead of a generated one")
    parser.add_argument("--out", default="results/benchmarks/loader.csv")
    parser.add_argument("--_memory", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = torch.device(args.device)
    if args._memory:  # the subprocess of _peak_memory
        loaders = _loaders(Path(args.root), args.sizes[0], args.batch, args.workers, device, which=(args._memory,))
        _epoch(loaders[args._memory], device)
        del loaders  # the workers exit and are waited for: RUSAGE_CHILDREN then covers them
        gc.collect()
        print(json.dumps({"peak_rss_mb": _own_peak_rss_mb(),
                          "worker_rss_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}))
        return
    with tempfile.TemporaryDirectory(prefix="bench-loader-") as tmp:
        root = Path(args.root) if args.root else write_image_tree(
            Path(tmp), n_train=args.images, n_val=16, classes=10, sizes=tuple(args.source))
        rows = []
        for size in args.sizes:
            loaders = _loaders(root, size, args.batch, args.workers, device)
            counts = {name: _epoch(loader, device) for name, loader in loaders.items()}  # also starts the workers
            load_start = machine_load()
            times = interleaved_times({name: (lambda lo=lo: _epoch(lo, device)) for name, lo in loaders.items()},
                                      rounds=args.rounds, warmup=0, settle=0, device=device)
            load_end = machine_load()
            del loaders
            for name, ts in times.items():
                memory = _peak_memory(root, size, args.batch, args.workers, args.device, name)
                paired = (counts[name] / np.asarray(ts)) / (counts["torchvision"] / np.asarray(times["torchvision"]))
                row = {"image_size": size, "loader": name, "workers": args.workers, "batch": args.batch,
                       "images": counts[name], "images_per_s": counts[name] / float(np.median(ts)),
                       "speedup_paired_p50": float(np.median(paired)), "speedup_paired_min": float(paired.min()),
                       **summary_ms(ts), **memory, "load1_start": load_start["load1"], "load1_end": load_end["load1"]}
                rows.append(row)
            base = next(r for r in rows if r["image_size"] == size and r["loader"] == "torchvision")
            for row in rows[-2:]:
                print(f"size {size:4d}  {row['loader']:12s} {row['images_per_s']:8.1f} images/s "
                      f"(x{row['images_per_s'] / base['images_per_s']:.2f}; paired x{row['speedup_paired_p50']:.2f}, "
                      f"min x{row['speedup_paired_min']:.2f})  epoch p50 {row['p50_ms'] / 1e3:.2f} s "
                      f"iqr {row['iqr_ms'] / 1e3:.2f} s  peak RSS {row['peak_rss_mb']:.0f} MB, "
                      f"largest worker {row['worker_rss_mb']:.0f} MB  load {row['load1_start']}-{row['load1_end']}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows).to_csv(out, index=False)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
