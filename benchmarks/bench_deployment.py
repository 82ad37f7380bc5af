"""Latency at each model's best deployment: eager PyTorch, ONNX Runtime, OpenVINO, and BUnit's kernel inside OpenVINO.

A user who ships a CPU model ships it through ONNX Runtime or OpenVINO. This script times ResNet-56 (option A)
dense and BUnit (presets ``cifar-resnet-paper``, 0.40x MACs, and ``cifar-resnet-all``, 0.15x) in every deployment,
ALL candidates of a batch size in ONE interleaved round-robin (:func:`bunit.timing.interleaved_times`, a freshly
shuffled order per round, ``settle`` untimed calls before each timed one), so that every ratio is paired per round:

- ``eager/contiguous``, ``eager/channels_last``: PyTorch; BUnit's unit layers on the backend the autotuner measured
  fastest for exactly this input (``fused_cpu`` here), as the timing pass prepares them.
- ``onnx``: ``torch.onnx.export(..., dynamo=False, opset_version=17)``, ONNX Runtime, CPU provider.
- ``openvino``: the same export, OpenVINO's CPU plugin, f32.
- ``openvino+units`` (BUnit only): unit layers exported as ``bunit::UnitGroup`` nodes and run by BUnit's unit kernel
  as an OpenVINO custom operation (:mod:`harness.measure.openvino_ext`); dense layers by OpenVINO.

Every candidate's output is checked against the eager model before it is timed (:func:`harness.measure.runtimes.
make_runner`, ``rtol=1e-3, atol=1e-4``), and the relative error of ``openvino+units`` (max |got - eager| / max
|eager|) is printed. BatchNorm statistics and affine parameters are drawn at random (fixed seed), so folding them
into the unit kernel's weights is exercised; weights are otherwise freshly initialised (latency does not depend on
them).

Printed per batch: each candidate's p50; each model's ratio to dense in the same runtime (median of per-round
ratios); and each model at its fastest deployment over dense at its fastest (``best``), per round as well. Rows go
to ``results/benchmarks/deployment.csv``.

Usage: ``flock /tmp/bunitbench-cpu.lock python benchmarks/bench_deployment.py [--batches 1,64] [--threads 2]
[--rounds 30] [--warmup 3] [--settle 1] [--presets cifar-resnet-paper,cifar-resnet-all] [--quick]``.
"""
from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
from collections import Counter
from pathlib import Path
from typing import Any, Callable

import harness  # noqa: F401  (torchvision shim, before anything imports torchvision or ptflops)
import numpy as np
import torch
import torch.nn as nn

from baselines import get_method
from baselines.counting import count_costs
from bunit import bunitify
from bunit.timing import cpu_snapshot, interleaved_times, others_cpus, steady_allocator
from harness.measure.runtimes import make_runner, runtime_version
from harness.core.models import create_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import write_csv  # noqa: E402

INPUT_SHAPE = (3, 32, 32)
EAGER_FORMATS = ("contiguous", "channels_last")


def randomize_bn(model: nn.Module, seed: int) -> nn.Module:
    """Spread BatchNorm statistics and affine parameters (fixed seed): folding them must then be exact."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                n = m.num_features
                m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
                m.running_var.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.weight.copy_(torch.rand(n, generator=gen) * 0.5 + 0.75)
                m.bias.copy_(torch.randn(n, generator=gen) * 0.1)
    return model.eval()


def build_models(presets: list[str]) -> dict[str, nn.Module]:
    """ResNet-56 option A dense and its BUnit forms, BN spread."""
    torch.manual_seed(0)
    dense = create_backbone("resnet56", shortcut="A").eval()
    models = {"dense": dense}
    for preset in presets:
        models[f"bunit:{preset}"] = bunitify(dense, preset).eval()
    return {name: randomize_bn(m, i) for i, (name, m) in enumerate(models.items())}


def cpu_flags() -> str:
    """The CPU model and the instruction-set extensions that matter here."""
    name, flags = platform.processor() or "?", set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                elif line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    break
    except OSError:
        pass
    wanted = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile")
    return f"{name}; " + " ".join(f for f in wanted if f in flags)


def candidates(models: dict[str, nn.Module], batch: int, threads: int, runtimes: list[str]
               ) -> tuple[dict[str, Callable[[], Any]], dict[str, dict]]:
    """``"<model>|<runtime>/<format>"`` -> a call of one inference, each checked against eager; and what each did."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *INPUT_SHAPE, generator=gen)
    fns, infos = {}, {}
    for name, model in models.items():
        with torch.inference_mode():
            expected = model(x)
        for runtime in runtimes:
            if runtime == "openvino+units" and not name.startswith("bunit"):
                continue  # a model without unit layers exports exactly as under openvino
            formats = EAGER_FORMATS if runtime == "eager" else ("contiguous",)
            for fmt in formats:
                label = f"{name}|{runtime}/{fmt}"
                net = copy.deepcopy(model)
                xi = x
                if fmt == "channels_last":
                    net = net.to(memory_format=torch.channels_last)
                    xi = x.contiguous(memory_format=torch.channels_last)
                info: dict[str, Any] = {"runtime_version": runtime_version(runtime)}
                if runtime == "eager":
                    info["prepared"] = get_method("bunit" if name.startswith("bunit") else "dense"
                                                  ).prepare_for_inference(net, xi)
                fns[label], more = make_runner(runtime, net, xi, threads=threads, device=torch.device("cpu"))
                info.update(more)
                got = fns[label]()
                got = torch.as_tensor(got[0] if not isinstance(got, torch.Tensor) else got)
                info["rel_err"] = float((got - expected).abs().max() / expected.abs().max())
                infos[label] = info
                fns[label]()  # lazy caches built outside the session
    return fns, infos


def paired(a: list[float], b: list[float]) -> float:
    """Median over rounds of ``a[r] / b[r]``."""
    return float(np.median(np.asarray(a) / np.asarray(b)))


def summarise(times: dict[str, list[float]], batch: int, macs: dict[str, float]) -> list[dict[str, Any]]:
    """Rows: every candidate with its ratio to dense in the same runtime and format; then each model at its best."""
    p50 = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    rows = []
    for label in sorted(times):
        name, deploy = label.split("|")
        ref = f"dense|{deploy.replace('openvino+units', 'openvino')}"
        rows.append({"batch": batch, "model": name, "deployment": deploy, "p50_ms": round(p50[label], 4),
                     "ref": ref, "ratio": round(paired(times[label], times[ref]), 4) if ref in times else None,
                     "macs_ratio": round(macs[name], 4)})
    dense_best = min((k for k in times if k.startswith("dense|")), key=p50.get)
    for name in sorted({k.split("|")[0] for k in times}):
        mine = min((k for k in times if k.startswith(f"{name}|")), key=p50.get)
        rows.append({"batch": batch, "model": name, "deployment": f"best ({mine.split('|')[1]})",
                     "p50_ms": round(p50[mine], 4), "ref": dense_best,
                     "ratio": round(paired(times[mine], times[dense_best]), 4), "macs_ratio": round(macs[name], 4)})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--batches", default="1,64")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=30)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--settle", type=int, default=1)
    p.add_argument("--presets", default="cifar-resnet-paper,cifar-resnet-all")
    p.add_argument("--runtimes", default="eager,onnx,openvino,openvino+units")
    p.add_argument("--quick", action="store_true", help="batches 1,8, 5 rounds (a smoke run)")
    p.add_argument("--out", default="results/benchmarks/deployment.csv")
    args = p.parse_args(argv)
    batches = [1, 8] if args.quick else [int(b) for b in args.batches.split(",")]
    rounds = 5 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    steady_allocator()
    models = build_models([s for s in args.presets.split(",") if s])
    dense_macs = count_costs(models["dense"], INPUT_SHAPE)["macs"]
    macs = {n: count_costs(m, INPUT_SHAPE)["macs"] / dense_macs for n, m in models.items()}
    print(f"# CPU: {cpu_flags()}; {args.threads} threads; torch {torch.__version__}; "
          f"{runtime_version('onnx')}; {runtime_version('openvino')}", flush=True)
    rows: list[dict[str, Any]] = []
    for batch in batches:
        fns, infos = candidates(models, batch, args.threads, args.runtimes.split(","))
        for label, info in infos.items():
            backends = Counter(((info.get("prepared") or {}).get("bunit_backend") or {}).values())
            nodes = info.get("openvino_unit_nodes")
            print(f"# b{batch} {label}: rel_err {info['rel_err']:.2e}" + (f", unit backends {dict(backends)}" if backends
                  else "") + (f", {nodes} UnitGroup nodes" if nodes else ""), flush=True)
        start = cpu_snapshot()
        with torch.inference_mode():
            times = interleaved_times(fns, rounds=rounds, warmup=args.warmup, device="cpu", settle=args.settle,
                                      order="shuffle", seed=batch)
        others = others_cpus(start, cpu_snapshot())
        busy = others is not None and others > 0.25 + max(0, len(os.sched_getaffinity(0)) - args.threads)
        print(f"# b{batch}: other work kept {others} CPUs busy during the session" + (" -- BUSY, do not use" if busy
              else ""), flush=True)
        got = summarise(times, batch, macs)
        for r in got:
            r.update(rel_err=infos.get(f"{r['model']}|{r['deployment']}", {}).get("rel_err"),
                     threads=args.threads, rounds=rounds, others_cpus=others, busy=busy, cpu=cpu_flags())
        rows += got
        print(f"\nbatch {batch}: {'model':<26} {'deployment':<36} {'p50 ms':>9} {'ratio':>7}  reference", flush=True)
        for r in got:
            print(f"{'':9}{r['model']:<26} {r['deployment']:<36} {r['p50_ms']:>9.3f} "
                  f"{r['ratio'] if r['ratio'] is not None else '-':>7}  {r['ref']}", flush=True)
        del fns
    print(f"-> {write_csv(rows, args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
