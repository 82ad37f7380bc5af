"""Training epoch time: the harness loop (device-resident data, on-device batch augmentation) against a
plain torchvision ``DataLoader`` loop (PIL images, per-sample RandomCrop/RandomHorizontalFlip/ToTensor/
Normalize) on the same model, data, batch size and optimizer, measured side by side in one process.

Usage: ``python benchmarks/bench_training.py [--device cpu|cuda] [--epochs 3] [--workers 2]``.
Prints one line per configuration and writes ``results/benchmarks/training.csv``.
"""
from __future__ import annotations

import argparse
import csv
import statistics
import time
from pathlib import Path

import harness  # noqa: F401  (torchvision shim)
import numpy as np
import torch
import torch.nn.functional as F

from harness.compat import ensure_torchvision
from harness.core.config import TrainConfig
from harness.core.data import load_dataset
from harness.core.models import create_backbone
from harness.run.train import train_model


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def _dataloader_epoch_times(model, images: np.ndarray, labels: np.ndarray, *, size: int, batch: int, epochs: int,
                            workers: int, device: torch.device, channels_last: bool) -> list[float]:
    tv = ensure_torchvision()
    from PIL import Image

    mean, std = float(images.mean() / 255), float(images.std() / 255)
    tf = tv.transforms.Compose([
        tv.transforms.RandomCrop(size, padding=max(1, size // 8)),
        tv.transforms.ToTensor(), tv.transforms.Normalize((mean,), (std,))])

    class PilSet(torch.utils.data.Dataset):
        def __init__(self):
            self.pil = [Image.fromarray(im) for im in images]

        def __len__(self):
            return len(self.pil)

        def __getitem__(self, i):
            return tf(self.pil[i]), int(labels[i])

    loader = torch.utils.data.DataLoader(PilSet(), batch_size=batch, shuffle=True, drop_last=True,
                                         num_workers=workers, pin_memory=device.type == "cuda",
                                         persistent_workers=workers > 0)
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, nesterov=True, weight_decay=5e-4)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    model.to(memory_format=fmt).train()
    times = []
    for _ in range(epochs):
        _sync(device)
        t0 = time.perf_counter()
        for xb, yb in loader:
            xb = xb.to(device, non_blocking=True).contiguous(memory_format=fmt)
            yb = yb.to(device, non_blocking=True)
            with torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
                loss = F.cross_entropy(model(xb).float(), yb)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _harness_epoch_times(model, data, *, batch: int, epochs: int, channels_last: bool, bf16: bool) -> list[float]:
    recipe = TrainConfig(batch_size=batch, lr=0.05, warmup_epochs=0, channels_last=channels_last, bf16=bf16,
                         bf16_cpu=bf16)
    times = []
    for e in range(epochs):
        result = train_model(model, data, recipe, epochs=1, seed=e, warmup=False)
        times.append(result.seconds)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--epochs", type=int, default=3, help="timed epochs per loop (after one warm-up epoch)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader worker processes for the plain loop")
    parser.add_argument("--out", default="results/benchmarks/training.csv")
    args = parser.parse_args()
    device = torch.device(args.device)
    configs = [("resnet8", 16, 128), ("resnet20", 32, 128)]  # a small, data-bound case and a compute-bound one
    rows = []
    for backbone, size, batch in configs:
        data = load_dataset("digits", image_size=size, device=device)
        # the same images as uint8 PIL inputs for the plain loop (de-normalised from the same split)
        x = data.x_train.float().cpu()
        x = ((x - x.min()) / (x.max() - x.min()) * 255).round().to(torch.uint8)[:, 0].numpy()
        y = data.y_train.cpu().numpy()
        # The plain loop is what users write: fp32 (bf16 autocast on CUDA), contiguous, DataLoader workers.
        # The harness is timed plain too, then with its speed options: channels_last + bf16 autocast.
        for cl, bf16 in [(False, False), (True, True)]:
            torch.manual_seed(0)
            m1 = create_backbone(backbone, num_classes=10, in_channels=1, shortcut="B").to(device)
            m2 = create_backbone(backbone, num_classes=10, in_channels=1, shortcut="B").to(device)
            _harness_epoch_times(m1, data, batch=batch, epochs=1, channels_last=cl, bf16=bf16)  # warm-up
            _dataloader_epoch_times(m2, x, y, size=size, batch=batch, epochs=1, workers=args.workers, device=device,
                                    channels_last=False)
            h = _harness_epoch_times(m1, data, batch=batch, epochs=args.epochs, channels_last=cl, bf16=bf16)
            d = _dataloader_epoch_times(m2, x, y, size=size, batch=batch, epochs=args.epochs, workers=args.workers,
                                        device=device, channels_last=False)
            row = {"device": str(device), "backbone": backbone, "image_size": size, "batch": batch,
                   "harness_channels_last": cl, "harness_bf16": bf16 or device.type == "cuda",
                   "samples": len(y), "harness_epoch_s": statistics.median(h),
                   "dataloader_epoch_s": statistics.median(d), "workers": args.workers,
                   "threads": torch.get_num_threads()}
            row["speedup"] = row["dataloader_epoch_s"] / row["harness_epoch_s"]
            rows.append(row)
            print(f"{device} {backbone}@{size} batch {batch} harness cl={cl} bf16={bf16}: harness {row['harness_epoch_s']:.3f}s/epoch, "
                  f"DataLoader {row['dataloader_epoch_s']:.3f}s/epoch -> {row['speedup']:.2f}x", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
