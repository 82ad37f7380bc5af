"""How much a BUnit model's training step, and each ``unit_train`` kernel call in it, differs from process to process.

A step timed in one process is one draw: what the heap hands a kernel's scratch buffers, and so their alignment,
changes with each process and each call's allocations. This starts ``--processes`` fresh Python processes one after
another; each builds dense ResNet-20 and the BUnit model (``bench_train_step.build``, 28x28, batch 128, bf16 autocast,
channels_last, unit layers on ``unit_train``), runs their SGD steps in turn (one untimed step of each first), and
times every extension call of the BUnit step (a timing proxy around the loaded module). The table gives, per process,
dense's and the model's median step and their ratio; then per kernel call (name and its first argument's shape, summed
over the calls of that shape in a step) the median over all processes and the slowest process's median, so that a
call that is slow in some processes only stands out (``spread`` = slowest / median).

Measured with it: before the hybrid-row kernels' gather buffer was 64-byte aligned (0c10265; since d472755 every
scratch buffer of the kernels is, ``Scratch`` in ``bunit/csrc/unit_train.cpp``), ``row_conv1_backward`` of
``bunit:macs:0.5``'s 48-lane rows read 2-3 ms per step in some processes and up to 16 ms in others, and the model
0.77-1.20x dense's step by process (see ``benchmarks/README.md``).

Usage: ``flock /tmp/bunitbench-cpu.lock python benchmarks/bench_process_spread.py [--processes 6] [--rounds 8]
[--model bunit:macs:0.5]``. Nothing else may run meanwhile (two torch processes on 2 cores thrash).
"""
from __future__ import annotations

import argparse
import collections
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def child(model: str, rounds: int, threads: int) -> dict:
    """One process's measurement: step times of dense and ``model``, and the model's kernel calls per step."""
    import torch

    from bench_train_step import build
    from bunit import unit_train
    from bunit.timing import cpu_snapshot, others_cpus, steady_allocator
    from harness.run.train_speed import TrainSetting, step_fn

    torch.set_num_threads(threads)
    steady_allocator()
    gen = torch.Generator().manual_seed(0)
    xb = torch.randn(128, 1, 28, 28, generator=gen)
    yb = torch.randint(0, 10, (128,), generator=gen)
    dense = step_fn(build("dense", 28), TrainSetting(True, True, None), xb, yb)
    units = step_fn(build(model, 28), TrainSetting(True, True, "unit_train"), xb, yb)
    ext = unit_train.load_extension(quiet=True)
    calls: list[tuple[str, float]] = []

    class Timed:  # the extension with each call timed
        def __getattr__(self, name):
            fn = getattr(ext, name)
            if not callable(fn):
                return fn

            def timed(*args, **kwargs):
                t = time.perf_counter()
                out = fn(*args, **kwargs)
                shape = "x".join(map(str, args[0].shape[1:])) if args and hasattr(args[0], "shape") else ""
                calls.append((f"{name}({shape})", time.perf_counter() - t))
                return out
            return timed

    unit_train._state["module"] = Timed()
    steps: dict[str, list[float]] = {"dense": [], model: []}
    per_call: dict[str, list[float]] = collections.defaultdict(list)
    snap = cpu_snapshot()
    for r in range(rounds + 1):
        for name, fn in (("dense", dense), (model, units)):
            fn()  # untimed: the turn's first step pays for the other model's memory and caches
            calls.clear()
            t = time.perf_counter()
            fn()
            dt = time.perf_counter() - t
            if r == 0:
                continue
            steps[name].append(dt)
            if name == model:
                summed: dict[str, float] = collections.defaultdict(float)
                for key, s in calls:
                    summed[key] += s
                for key, s in summed.items():
                    per_call[key].append(s)
    return {"others_cpus": others_cpus(snap, cpu_snapshot()),
            "steps": {k: statistics.median(v) * 1e3 for k, v in steps.items()},
            "calls": {k: statistics.median(v) * 1e3 for k, v in per_call.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=8, help="timed steps per model and process")
    parser.add_argument("--model", default="bunit:macs:0.5")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.model, args.rounds, args.threads)))
        return
    from bench_train_step import isa

    print(f"cpu: {isa()}; threads {args.threads}; {args.model} against dense, {args.processes} processes x "
          f"{args.rounds} rounds", flush=True)
    results = []
    for p in range(args.processes):
        out = subprocess.run([sys.executable, __file__, "--child", "--model", args.model, "--rounds", str(args.rounds),
                              "--threads", str(args.threads)], check=True, capture_output=True, text=True)
        res = json.loads(out.stdout.strip().splitlines()[-1])
        results.append(res)
        d, m = res["steps"]["dense"], res["steps"][args.model]
        print(f"process {p + 1}: dense {d:6.1f} ms, {args.model} {m:6.1f} ms, ratio {m / d:.2f}; other work kept "
              f"{res['others_cpus']} CPUs busy meanwhile", flush=True)
    print()
    keys = sorted({k for r in results for k in r["calls"]},
                  key=lambda k: -statistics.median(r["calls"].get(k, 0.0) for r in results))
    print(f"{'kernel call (per step)':48s} {'median ms':>9s} {'slowest':>8s} {'spread':>6s}")
    for k in keys:
        vals = [r["calls"].get(k, 0.0) for r in results]
        med, worst = statistics.median(vals), max(vals)
        print(f"{k:48s} {med:9.2f} {worst:8.2f} {worst / med if med else float('nan'):6.1f}")


if __name__ == "__main__":
    main()
