"""Training speed of BUnit against dense and L1-filter pruning, side by side: one SGD step, then whole epochs.

ResNet-20 (option B, one input channel, 28x28): dense; BUnit at 50, 80 and 95% fewer MACs (the cost-target planner);
L1-filter at 80% fewer MACs (a pruned model, as a fine-tune trains it). Every model is timed in every training setting
(:mod:`harness.run.train_speed`: fp32 or bf16 autocast, NCHW or channels_last, unit layers on ``grouped``,
``blockdiag`` or ``unit_train``, and the per-layer mix the harness's ``choose_setting`` picks, where it picks one),
all (model, setting) pairs taking turns round-robin in one session (``interleaved_times``),
each turn one untimed and one timed step. Per model the fastest setting is its step; the ratio divides by dense at
dense's fastest setting. Then each model trains whole epochs of the data set (Fashion-MNIST, else the digits) through
the harness loop (``harness.run.train.train_model``) at its fastest setting. The models' epochs take turns in slices
of ``--slice-steps`` steps (:func:`sliced_epochs`: each epoch in a greenlet, all on one thread), so the VM's drift over
the minutes an epoch takes falls on every model alike; each model's epoch time is the sum of its turns.
``--slice-steps 0`` runs the epochs one after the other instead (each epoch whole, the order rotated per epoch).

``--unfused`` adds, for the BUnit models, the ``unit_train`` kernel without its BN + ReLU fusion (each convolution in
the kernel, BN and ReLU PyTorch's: what ``unit_train`` ran before the fusion), registered here as the backend
``unit_train_unfused``, so that the fusion's effect is measured side by side in the same session.
``--fp32-storage`` adds, in every bf16 setting where the BUnit models run ``unit_train``, the same kernel with its
activations stored in float32 instead of bfloat16 (what ``unit_train`` did under autocast before bf16 storage),
registered as ``unit_train_fp32``; neither added backend is a candidate for a model's fastest setting.

Usage: ``flock /tmp/bunitbench-cpu.lock python benchmarks/bench_train_step.py [--rounds 10] [--epochs 1]
[--slice-steps 50] [--unfused]``.
Prints the tables and writes ``results/benchmarks/train_step.csv``.
"""
from __future__ import annotations

import argparse
import copy
import csv
import statistics
import time
from pathlib import Path
from typing import Callable

import harness  # noqa: F401  (torchvision shim)
import torch

from baselines import MethodContext, get_method
from baselines.counting import count_macs
from bunit.timing import cpu_snapshot, interleaved_times, others_cpus, steady_allocator
from harness.core.config import TrainConfig
from harness.core.data import load_dataset
from harness.core.models import create_backbone
from harness.run.train import train_model
from harness.run.train_speed import PER_LAYER, TrainSetting, apply_setting, candidates, choose_setting, step_fn

MODELS = ("dense", "bunit:macs:0.5", "bunit:macs:0.8", "bunit:macs:0.95", "l1-filter:macs:0.8")


def build(name: str, size: int) -> torch.nn.Module:
    torch.manual_seed(0)
    dense = create_backbone("resnet20", num_classes=10, in_channels=1, shortcut="B")
    if name == "dense":
        return dense
    method, _, target = name.partition(":")
    x = torch.randn(16, 1, size, size)
    ctx = MethodContext(example_inputs=x, calib_batches=[(x, torch.arange(16) % 10)], seed=0, backbone="resnet20",
                        shortcut="B", num_classes=10)
    return get_method(method).apply(dense, target, ctx)


def register_unfused() -> str:
    """Register ``unit_train_unfused``: each unit conv in the ``unit_train`` kernel, BN and ReLU PyTorch's."""
    from bunit import unit_train
    from bunit.backends import BACKENDS, Backend, register_backend

    name = "unit_train_unfused"
    if name not in BACKENDS:
        @register_backend(name)
        class UnitTrainUnfused(Backend):
            def run(self, layer, x: torch.Tensor) -> torch.Tensor:
                return layer.run_groups(x, unit_train.conv)  # (B, out, H/s, W/s)
    return name


def register_fp32_storage() -> str:
    """Register ``unit_train_fp32``: ``unit_train`` with autocast off around the unit layers, so that a fused group
    stores its input, activations and output in float32 (and the layer returns float32)."""
    from bunit.backends import BACKENDS, register_backend
    from bunit.backends.unit_train import UnitTrain

    name = "unit_train_fp32"
    if name not in BACKENDS:
        @register_backend(name)
        class UnitTrainFp32(UnitTrain):
            def run(self, layer, x: torch.Tensor) -> torch.Tensor:
                with torch.autocast("cpu", enabled=False):
                    return super().run(layer, x.float())
    return name


def register_fp32_multiplies() -> str:
    """Register ``unit_train_fp32_mul``: ``unit_train`` with the bf16 dot products off, so that a fused group under
    autocast stores bf16 but multiplies in float32."""
    from bunit import unit_train
    from bunit.backends import BACKENDS, register_backend
    from bunit.backends.unit_train import UnitTrain

    name = "unit_train_fp32_mul"
    if name not in BACKENDS:
        @register_backend(name)
        class UnitTrainFp32Mul(UnitTrain):
            def run(self, layer, x: torch.Tensor) -> torch.Tensor:
                with unit_train.float32_multiplies():
                    return super().run(layer, x)
    return name


def sliced_epochs(jobs: dict[str, Callable[[Callable], object]], slice_steps: int) -> dict[str, float]:
    """Run ``jobs`` (name -> ``job(after_step)``, one epoch through the harness loop, which calls ``after_step`` after
    every optimizer step) taking turns in ``jobs``' order, each for ``slice_steps`` steps, until all have finished.
    Each job runs in a greenlet, and all on this thread: one OpenMP thread pool, as in a plain training run (Python
    threads would each start a pool of their own, and with more OpenMP threads than CPUs libgomp stops spinning
    between parallel regions: measured, every operation 1.2-2x slower, dense's more than the units' kernels).
    Returns each job's seconds, the sum of its turns (the epoch's set-up and last steps included)."""
    from greenlet import getcurrent, greenlet  # only the sliced epochs need it (--slice-steps 0 does not)

    scheduler = getcurrent()
    spent = {n: 0.0 for n in jobs}

    def run(n: str) -> None:
        start, steps = time.perf_counter(), 0

        def after_step(_model) -> None:
            nonlocal start, steps
            steps += 1
            if steps % slice_steps == 0:
                spent[n] += time.perf_counter() - start
                scheduler.switch()  # the turn ends; the next one starts here
                start = time.perf_counter()

        jobs[n](after_step)
        spent[n] += time.perf_counter() - start

    turns = {n: greenlet(run) for n in jobs}
    active = list(jobs)
    while active:
        for n in list(active):
            try:
                turns[n].switch(n)  # starts run(n), or resumes it after its last hand-over (n then unused)
            except Exception as e:  # the job failed: no more turns for anyone
                raise RuntimeError(f"the epoch of {n} failed") from e
            if turns[n].dead:
                active.remove(n)
    return spent


def isa() -> str:
    try:
        flags = next(ln for ln in open("/proc/cpuinfo") if ln.startswith("flags")).split()
    except (OSError, StopIteration):
        return "unknown"
    return ",".join(f for f in ("avx2", "avx512f", "avx512_vbmi2", "avx512_bf16", "amx_bf16") if f in flags)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=28)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=10, help="timed steps per (model, setting)")
    parser.add_argument("--epochs", type=int, default=1, help="timed epochs per model (0: steps only)")
    parser.add_argument("--slice-steps", type=int, default=50,
                        help="the models' epochs take turns every this many steps (0: each epoch whole, in turn)")
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--dataset", default="fashion-mnist")
    parser.add_argument("--out", default="results/benchmarks/train_step.csv")
    parser.add_argument("--unfused", action="store_true", help="also time unit_train without its BN+ReLU fusion")
    parser.add_argument("--fp32-storage", action="store_true",
                        help="also time unit_train storing float32 activations under bf16 autocast")
    parser.add_argument("--fp32-multiplies", action="store_true",
                        help="also time unit_train storing bf16 but multiplying in float32 (no bf16 dot products)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    steady_allocator()
    names = args.models.split(",")
    models = {n: build(n, args.size) for n in names}
    macs = {n: count_macs(m, (1, args.size, args.size)) for n, m in models.items()}
    gen = torch.Generator().manual_seed(0)
    xb = torch.randn(args.batch, 1, args.size, args.size, generator=gen)
    yb = torch.randint(0, 10, (args.batch,), generator=gen)
    settings = {n: candidates(m, bf16=True, device=xb.device) for n, m in models.items()}
    for n, m in models.items():  # the harness's per-layer mix, where it chooses one, joins the session's candidates
        if not any(s.unit_backend for s in settings[n]):
            continue  # no unit layers: nothing to mix
        chosen, _ = choose_setting(m, xb, yb, bf16=True, channels_last=True, total_steps=10**9)
        if chosen.unit_backend == PER_LAYER:
            settings[n].append(chosen)
            print(f"{n}: per-layer unit backends {dict(chosen.layer_backends)}", flush=True)
    if args.unfused:
        extra = register_unfused()
        for n in names:
            settings[n] += [TrainSetting(s.bf16, s.channels_last, extra) for s in settings[n]
                            if s.unit_backend == "unit_train"]
    extras = {"unit_train_unfused"}
    # side-by-side variants of unit_train under bf16 autocast: (backend, what unit_train is compared with)
    variants = []
    if args.fp32_storage:
        variants.append((register_fp32_storage(), "bf16 storage against float32 storage"))
    if args.fp32_multiplies:
        variants.append((register_fp32_multiplies(), "bf16 dot products against float32 multiplies"))
    for variant, _ in variants:
        extras.add(variant)
        for n in names:
            settings[n] += [TrainSetting(True, s.channels_last, variant) for s in settings[n]
                            if s.unit_backend == "unit_train" and s.bf16]
    fns = {f"{n}|{s.name}": step_fn(models[n], s, xb, yb) for n in names for s in settings[n]}
    print(f"cpu: {isa()}; threads {args.threads}; batch {args.batch}; {args.size}x{args.size}; "
          f"{len(fns)} (model, setting) pairs x {args.rounds} rounds", flush=True)
    snap = cpu_snapshot()
    t0 = time.perf_counter()
    times = interleaved_times(fns, rounds=args.rounds, warmup=1, settle=1)
    busy = others_cpus(snap, cpu_snapshot())
    print(f"steps timed in {time.perf_counter() - t0:.0f} s; other work kept {busy} CPUs busy meanwhile")
    med = {k: statistics.median(v) * 1e3 for k, v in times.items()}
    real = {n: [s for s in settings[n] if s.unit_backend not in extras] for n in names}
    best = {n: min(real[n], key=lambda s: med[f"{n}|{s.name}"]) for n in names}  # the harness's candidates only
    ref = med[f"dense|{best['dense'].name}"]
    rows = []
    print(f"\n{'model':22s} {'MACs':>5s} {'setting':34s} {'step ms':>8s} {'/ dense best':>12s}")
    for n in names:
        for s in settings[n]:
            ms = med[f"{n}|{s.name}"]
            rows.append({"model": n, "macs_ratio": macs[n] / macs["dense"], "setting": s.name, "step_ms": ms,
                         "ratio_to_dense_best": ms / ref, "best": s == best[n], "kind": "step"})
            mark = " *" if s == best[n] else ""
            print(f"{n:22s} {macs[n] / macs['dense']:5.2f} {s.name:34s} {ms:8.1f} {ms / ref:12.2f}{mark}")
    for variant, what in variants:
        print(f"\nunit_train under bf16 autocast, {what} (step time ratio):")
        for n in names[1:]:
            for s in settings[n]:
                if s.unit_backend == variant:
                    new = med[f"{n}|{TrainSetting(True, s.channels_last, 'unit_train').name}"]
                    old = med[f"{n}|{s.name}"]
                    print(f"{n:22s} {s.name:34s} {old:8.1f} ms -> {new:8.1f} ms  {new / old:.3f}")
    if args.unfused:
        print("\nper model, fastest setting of each unit backend (ratio to dense's fastest):")
        for n in names[1:]:
            by = {}
            for s in settings[n]:
                ms = med[f"{n}|{s.name}"]
                if s.unit_backend and ms < by.get(s.unit_backend, (float("inf"),))[0]:
                    by[s.unit_backend] = (ms, s.name)
            print(f"{n:22s} " + "  ".join(f"{b}: {ms:.1f} ms {ms / ref:.2f} ({nm})" for b, (ms, nm) in by.items()))
    if args.epochs:
        data = load_dataset(args.dataset, image_size=args.size, device=torch.device("cpu"))
        print(f"\nepochs: {args.dataset}, {len(data.y_train)} training images, each model at its fastest setting")
        epoch_s: dict[str, list[float]] = {n: [] for n in names}
        trained = {n: copy.deepcopy(m) for n, m in models.items()}
        def epoch_job(n: str, e: int) -> Callable[[Callable | None], float]:
            def job(after_step: Callable | None = None) -> float:
                s = best[n]
                apply_setting(trained[n], s)
                recipe = TrainConfig(batch_size=args.batch, lr=0.05, warmup_epochs=0, channels_last=s.channels_last,
                                     bf16=s.bf16, bf16_cpu=s.bf16)
                return train_model(trained[n], data, recipe, epochs=1, seed=e, warmup=False, setting=s,
                                   after_step=after_step).seconds
            return job

        snap = cpu_snapshot()
        for e in range(args.epochs):
            order = names[e % len(names):] + names[:e % len(names)]
            if args.slice_steps > 0:
                spent = sliced_epochs({n: epoch_job(n, e) for n in order}, args.slice_steps)
                for n in order:
                    epoch_s[n].append(spent[n])
            else:
                for n in order:
                    epoch_s[n].append(epoch_job(n, e)())
        how = (f"taking turns every {args.slice_steps} steps" if args.slice_steps > 0 else "one after the other")
        print(f"epochs {how}; other work kept {others_cpus(snap, cpu_snapshot())} CPUs busy meanwhile")
        ref_e = statistics.median(epoch_s["dense"])
        for n in names:
            sec = statistics.median(epoch_s[n])
            rows.append({"model": n, "macs_ratio": macs[n] / macs["dense"], "setting": best[n].name,
                         "epoch_s": sec, "ratio_to_dense_best": sec / ref_e, "best": True, "kind": "epoch"})
            print(f"{n:22s} {best[n].name:34s} {sec:7.1f} s/epoch {sec / ref_e:6.2f} x dense")
    for r in rows:
        r.update(threads=args.threads, batch=args.batch, size=args.size, cpu_isa=isa(), others_cpus=busy)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    keys = sorted({k for r in rows for k in r})
    with open(out, "w", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=keys)
        writer.writeheader()
        writer.writerows(rows)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
