"""Unit-layer latency: every BUnit execution backend against the per-unit loops and the dense layer it replaces.

For each layer shape of CIFAR ResNet-20/56 (the three stages with uniform 2-4-2 units and the two stride-2
transitions with 2-4-4 units), of a 64-channel basic block at 16x16 and 32x32, and of CIFAR VGG-16 (the conv
layers from 64@32x32 to 512@2x2), at batch 1 and a throughput batch, in NCHW and channels_last, this times
side by side in one process:

- ``dense``: what the units replace, in eager mode: conv-BN-ReLU twice for a ResNet basic block
  (``cin -> cout``, stride, then ``cout -> cout``), conv-BN-ReLU once for a VGG conv.
- ``reference``: the paper's form, a Python loop over one tiny module per unit.
- every eager backend of the fused layer (``loop`` is the per-unit loop over the fused weights; ``fused_cpu``,
  the C++ unit kernel, is left out with a printed reason where it cannot run).
- with ``--compile`` (the default): ``compiled:<base>``, the layer's ``compiled`` backend over ``grouped`` and
  over ``stencil``, and ``dense:compiled``, the dense layer under ``torch.compile`` (compile both, to be fair).

Methods are timed round-robin by :func:`bunit.timing.interleaved_times` (each round gives every method two
untimed calls and one timed call, in a rotated order), so that a slow spell of the machine hits every method
alike; the ratio ``p50 / dense p50`` is measured side by side, not inferred. Each row
also carries the MACs ratio, the ratio the latency ratio would equal if the hardware ran every MAC alike.

Usage: ``python benchmarks/bench_layers.py [--device cpu|cuda] [--repeats 40] [--quick] [--out CSV]``.
Prints one line per configuration and writes ``results/benchmarks/layers.csv`` (one row per method and
configuration). Functions used by ``bench_networks.py`` live here too.
"""
from __future__ import annotations

import argparse
import copy
import csv
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo
import torch.nn as nn

from bunit import fused_cpu
from bunit.layers import EAGER_BACKENDS, UnitLayer
from bunit.units import unit_macs
from bunit.spec import parse_specs
from bunit.timing import interleaved_times, machine_load, summary_ms
from harness.core.devices import device_info
from harness.core.provenance import provenance

__all__ = ["LayerShape", "SHAPES", "environment", "write_csv", "prepare_dynamo", "dtype_from_name",
           "available_backends", "load1", "main"]


# --- shapes -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerShape:
    """One unit layer as a backbone uses it, and what it replaces.

    Attributes:
        name: short id, ``<backbone>.<place>``.
        specs: the unit row (run-length spec string).
        in_channels: input channels.
        out_channels: output channels.
        size: input height and width.
        stride: stride of the first convs.
        dense_convs: 2 when the units replace a residual block's conv pair, 1 for a VGG conv.
    """

    name: str
    specs: str
    in_channels: int
    out_channels: int
    size: int
    stride: int = 1
    dense_convs: int = 2

    @property
    def out_size(self) -> int:
        return (self.size - 1) // self.stride + 1

    def dense(self) -> nn.Sequential:
        """The dense conv-BN-ReLU layer(s) that the units replace."""
        cin, cout = self.in_channels, self.out_channels
        mods: list[nn.Module] = [nn.Conv2d(cin, cout, 3, self.stride, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        if self.dense_convs == 2:
            mods += [nn.Conv2d(cout, cout, 3, 1, 1, bias=False), nn.BatchNorm2d(cout), nn.ReLU()]
        return nn.Sequential(*mods)

    def dense_macs(self) -> int:
        per_pixel = 9 * self.in_channels * self.out_channels
        if self.dense_convs == 2:
            per_pixel += 9 * self.out_channels * self.out_channels
        return per_pixel * self.out_size ** 2

    def unit_macs(self) -> int:
        return unit_macs(parse_specs(self.specs), self.size, self.size, self.stride)


SHAPES: tuple[LayerShape, ...] = (
    # CIFAR ResNet-20/56: the three stages (every block but the first of a stage), then the two transitions.
    LayerShape("resnet.stage1", "8x2-4-2", 16, 16, 32),
    LayerShape("resnet.stage2", "16x2-4-2", 32, 32, 16),
    LayerShape("resnet.stage3", "32x2-4-2", 64, 64, 8),
    LayerShape("resnet.trans12", "8x2-4-4", 16, 32, 32, stride=2),
    LayerShape("resnet.trans23", "16x2-4-4", 32, 64, 16, stride=2),
    # A 64-channel basic block at 16x16 and 32x32 (wide ResNets, ResNet-18-like stages): the dense conv pair.
    LayerShape("block64.16", "32x2-4-2", 64, 64, 16),
    LayerShape("block64.32", "32x2-4-2", 64, 64, 32),
    # CIFAR VGG-16 (conv ordinal in `features`): one conv-BN-ReLU each; 2..9 is the vgg16-middle preset.
    LayerShape("vgg16.conv1", "32x2-4-2", 64, 64, 32, dense_convs=1),
    LayerShape("vgg16.conv2", "32x2-4-4", 64, 128, 16, dense_convs=1),
    LayerShape("vgg16.conv3", "64x2-4-2", 128, 128, 16, dense_convs=1),
    LayerShape("vgg16.conv4", "64x2-4-4", 128, 256, 8, dense_convs=1),
    LayerShape("vgg16.conv5", "128x2-4-2", 256, 256, 8, dense_convs=1),
    LayerShape("vgg16.conv7", "128x2-4-4", 256, 512, 4, dense_convs=1),
    LayerShape("vgg16.conv8", "256x2-4-2", 512, 512, 4, dense_convs=1),
    LayerShape("vgg16.conv10", "256x2-4-2", 512, 512, 2, dense_convs=1),
)
QUICK_SHAPES = ("resnet.stage3", "vgg16.conv8")


# --- where a row was measured (shared with bench_networks.py) ------------------------------------


def environment(device: torch.device) -> dict[str, Any]:
    """Columns that say where a row was measured: device name (a CPU's with its vector instruction sets and CPU
    count, :func:`harness.core.devices.device_info`), threads, torch version, git revision (``-dirty`` with
    uncommitted changes, from :func:`harness.core.provenance.provenance`)."""
    prov = provenance()
    git = prov["git_rev"][:7] + ("-dirty" if prov["git_dirty"] else "") if prov["git_rev"] else None
    return {"device": device.type, "device_name": device_info(device)["device_name"],
            "threads": torch.get_num_threads(), "torch": torch.__version__, "git": git,
            "fused_cpu_available": fused_cpu.is_available()}


def load1() -> float | None:
    """The 1-minute load average (other work competing for the cores), from :func:`bunit.timing.machine_load`."""
    return machine_load()["load1"]


def available_backends(backends: Sequence[str], device: torch.device) -> list[str]:
    """``backends`` less ``fused_cpu`` where it cannot run (not a CPU run, or no C++ compiler); says so once."""
    if "fused_cpu" not in backends:
        return list(backends)
    info = fused_cpu.build_info()
    if device.type == "cpu" and info["available"]:
        print(f"fused_cpu: extension ready ({info['build_s']:.1f} s to build or load, cached in "
              f"{info['build_dir']})", flush=True)
        return list(backends)
    why = "runs on CPU only" if device.type != "cpu" else f"unavailable: {info['error']}"
    print(f"fused_cpu: left out, {why}", flush=True)
    return [b for b in backends if b != "fused_cpu"]


def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write ``rows`` (dicts; columns are the union of keys in first-seen order) as CSV; returns the path."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields: list[str] = []
    for row in rows:
        fields += [k for k in row if k not in fields]
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    return out


def prepare_dynamo() -> None:
    """Compile every configuration for its own static shapes, with no recompile limit in the way.

    The benchmarks compile many shapes through the same code objects; automatic dynamic shapes would turn
    later compiles into slower shape-generic kernels, and the recompile limit would silently fall back to
    eager. Callers also run ``torch._dynamo.reset()`` between configurations.
    """
    torch._dynamo.config.automatic_dynamic_shapes = False
    for knob in ("recompile_limit", "cache_size_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 1024)


def dtype_from_name(name: str) -> torch.dtype:
    allowed = {"float32": torch.float32, "fp32": torch.float32, "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
               "float16": torch.float16, "fp16": torch.float16}
    if name not in allowed:
        raise ValueError(f"dtype: {name!r} is not allowed; allowed: {', '.join(allowed)}")
    return allowed[name]


# --- one configuration ----------------------------------------------------------------------------


def _trained_like(module: nn.Module, seed: int) -> nn.Module:
    """Spread BN statistics and affine parameters as training does (timings do not depend on them)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
    return module


def _methods(shape: LayerShape, x: torch.Tensor, *, backends: Sequence[str], compile_: bool,
             fmt: torch.memory_format) -> tuple[dict[str, Callable[[], Any]], dict[str, float]]:
    """The callables to time for one configuration, and the compile seconds of the compiled ones."""
    device, dtype = x.device, x.dtype
    torch.manual_seed(0)
    fused = _trained_like(UnitLayer(shape.specs, stride=shape.stride), 0)
    reference = fused.to_impl("reference")
    dense = _trained_like(shape.dense(), 1)
    nets: dict[str, nn.Module] = {"dense": dense, "reference": reference}
    for backend in backends:
        layer = copy.deepcopy(fused)
        layer.backend = backend
        nets[backend] = layer
    compiled: dict[str, nn.Module] = {}
    if compile_:
        for base in ("grouped", "stencil"):
            layer = copy.deepcopy(fused)
            layer.compile_base, layer.backend = base, "compiled"
            compiled[f"compiled:{base}"] = layer
        compiled["dense:compiled"] = copy.deepcopy(dense)
    nets.update(compiled)
    for name, net in nets.items():
        nets[name] = net.to(device=device, dtype=dtype).to(memory_format=fmt).eval()
    compile_s: dict[str, float] = {}
    with torch.inference_mode():
        expected = nets["reference"](x).float()
        for name, net in nets.items():
            if name == "dense:compiled":
                nets[name] = net = torch.compile(net)
            t0 = time.perf_counter()
            y = net(x)  # the first call of a compiled method compiles
            if name in compiled:
                compile_s[name] = time.perf_counter() - t0
            if not name.startswith("dense") and not torch.allclose(y.float(), expected, atol=_tol(dtype), rtol=0.0):
                raise RuntimeError(f"{shape.name}: backend {name} disagrees with the reference form "
                                   f"(max abs diff {(y.float() - expected).abs().max().item():.3g})")
    fns = {name: (lambda net=net: net(x)) for name, net in nets.items()}
    return fns, compile_s


def _tol(dtype: torch.dtype) -> float:
    return 1e-3 if dtype == torch.float32 else 0.25


def run_config(shape: LayerShape, *, batch: int, dtype: torch.dtype, channels_last: bool, device: torch.device,
               repeats: int, warmup: int, backends: Sequence[str], compile_: bool) -> list[dict[str, Any]]:
    """Time every method on one (shape, batch, dtype, layout); one row per method."""
    if compile_:
        torch._dynamo.reset()  # each configuration compiles afresh, for its own static shapes
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x = torch.randn(batch, shape.in_channels, shape.size, shape.size, device=device).to(dtype)
    x = x.contiguous(memory_format=fmt)
    load_start = load1()
    fns, compile_s = _methods(shape, x, backends=backends, compile_=compile_, fmt=fmt)
    with torch.inference_mode():
        times = interleaved_times(fns, rounds=repeats, warmup=warmup, device=device)
    summaries = {name: summary_ms(t) for name, t in times.items()}
    dense_p50 = summaries["dense"]["p50_ms"]
    dense_c = summaries.get("dense:compiled", {}).get("p50_ms")
    unit_macs_, dense_macs = shape.unit_macs(), shape.dense_macs()
    rows = []
    for name, s in summaries.items():
        is_dense = name.startswith("dense")
        rows.append({
            "shape": shape.name, "specs": shape.specs, "in_channels": shape.in_channels,
            "out_channels": shape.out_channels, "size": shape.size, "stride": shape.stride,
            "dense_convs": shape.dense_convs, "batch": batch, "dtype": str(dtype).removeprefix("torch."),
            "memory_format": "channels_last" if channels_last else "contiguous", "method": name,
            **s, "repeats": repeats,
            "ratio_vs_dense": s["p50_ms"] / dense_p50,
            "ratio_vs_dense_compiled": s["p50_ms"] / dense_c if dense_c else None,
            "macs": dense_macs if is_dense else unit_macs_, "macs_ratio": 1.0 if is_dense else unit_macs_ / dense_macs,
            "compile_s": compile_s.get(name), "load1_start": load_start, "load1_end": load1(),
        })
    return rows


def _print_config(rows: list[dict[str, Any]]) -> None:
    r0 = rows[0]
    by = {r["method"]: r for r in rows}
    eager = {m: r for m, r in by.items() if not m.startswith(("dense", "compiled"))}
    fastest = min(eager, key=lambda m: eager[m]["p50_ms"])
    parts = " ".join(f"{m}={r['ratio_vs_dense']:.2f}" for m, r in by.items() if m != "dense")
    print(f"{r0['shape']:15s} {r0['specs']:10s} {r0['in_channels']}->{r0['out_channels']}@{r0['size']} "
          f"s{r0['stride']} b{r0['batch']} {r0['dtype']} {'cl' if r0['memory_format'] == 'channels_last' else 'nchw'}"
          f" | MACs ratio {by[fastest]['macs_ratio']:.3f} | dense {by['dense']['p50_ms']:.3f} ms "
          f"(p90 {by['dense']['p90_ms']:.3f}) | latency ratio vs dense: {parts} | fastest eager: {fastest} "
          f"{eager[fastest]['p50_ms']:.3f} ms | load {r0['load1_start']}", flush=True)


# --- command line --------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 40; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true", help="few repeats and two shapes: a smoke test")
    parser.add_argument("--shapes", default=None, help="comma-separated shape names (default: all)")
    parser.add_argument("--batches", default=None, help="comma-separated batch sizes (default 1,64 CPU; 1,256 GPU)")
    parser.add_argument("--dtypes", default=None, help="comma-separated dtypes (default float32 CPU; "
                                                       "float32,bfloat16 GPU)")
    parser.add_argument("--formats", default="contiguous,channels_last", help="memory formats to time")
    parser.add_argument("--backends", default=",".join(EAGER_BACKENDS), help="eager backends of the fused layer")
    parser.add_argument("--no-compile", dest="compile", action="store_false",
                        help="skip the torch.compile methods (each configuration compiles three modules)")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--out", default="results/benchmarks/layers.csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (5 if args.quick else 40)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if repeats < 3:
        raise ValueError(f"repeats: need at least 3 for a median and p90; got {repeats}")
    known = {s.name: s for s in SHAPES}
    names = args.shapes.split(",") if args.shapes else list(QUICK_SHAPES if args.quick else known)
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ValueError(f"shapes: {unknown} unknown; allowed: {', '.join(known)}")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 256 if gpu else 64]
    dtypes = [dtype_from_name(d) for d in (args.dtypes.split(",") if args.dtypes else
                                           (["float32", "bfloat16"] if gpu else ["float32"]))]
    formats = args.formats.split(",")
    if any(f not in ("contiguous", "channels_last") for f in formats):
        raise ValueError(f"formats: {formats} not allowed; allowed: contiguous, channels_last")
    backends = args.backends.split(",")
    if any(b not in EAGER_BACKENDS for b in backends):
        raise ValueError(f"backends: {backends} not allowed; allowed: {', '.join(EAGER_BACKENDS)}")
    backends = available_backends(backends, device)
    if args.compile:
        prepare_dynamo()
    env = environment(device)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, repeats {repeats}, "
          f"load {load1()}", flush=True)
    rows: list[dict[str, Any]] = []
    for name in names:
        for dtype in dtypes:
            for fmt in formats:
                for batch in batches:
                    config = run_config(known[name], batch=batch, dtype=dtype, channels_last=fmt == "channels_last",
                                        device=device, repeats=repeats, warmup=warmup, backends=backends,
                                        compile_=args.compile)
                    _print_config(config)
                    rows += [{**r, **env} for r in config]
    print(f"wrote {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
