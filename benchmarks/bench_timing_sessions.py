"""How much does one timing session differ from the next? Session after session of the same two models.

Loads a store's dense reference and one other model afresh for every session and times them together
(:func:`bunit.timing.interleaved_times`, shuffled order) at one batch size, then prints per session the two
medians, their paired ratio and the CPUs other work kept busy meanwhile (:func:`bunit.timing.others_cpus`).
Sessions alternate between ``--batch`` and ``--between`` (the timing pass alternates batch sizes the same way).
This is the spread the timing pass's ``repeats`` average over; when the machine has distinct states the ratios
cluster, and a figure pooled over a few sessions can land in either cluster.

Usage: ``python benchmarks/bench_timing_sessions.py [--store results/quick] [--model '*bunit*0.9*s0-*']
[--threads 2] [--sessions 6] [--batch 1] [--between 64] [--rounds 40]``. Run it alone:
``flock -x /tmp/bunit-cpu.lock python benchmarks/bench_timing_sessions.py``.
"""
from __future__ import annotations

import argparse
import fnmatch

import harness  # noqa: F401  (torchvision shim first)
import torch

from baselines import get_method
from bunit.timing import cpu_snapshot, interleaved_times, others_cpus, summary_ms
from harness.measure.timing_pass import paired_ratio
from harness.core.artefacts import list_models, load_model


def _runner(store: str, meta: dict, batch: int):
    model = load_model(store, meta["key"]).eval()
    x = torch.randn(batch, meta["in_channels"], meta["image_size"], meta["image_size"],
                    generator=torch.Generator().manual_seed(0))
    get_method(meta["method"]).prepare_for_inference(model, x)
    return lambda: model(x)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results/quick")
    parser.add_argument("--model", default='*bunit*"macs_reduction":0.9}*s0-*', help="wildcard on the model key")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sessions", type=int, default=6)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--between", type=int, default=64, help="batch of the session between two (0: none)")
    parser.add_argument("--rounds", type=int, default=40)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    metas = {m["key"]: m for m in list_models(args.store)}
    picked = sorted(k for k in metas if fnmatch.fnmatch(k, args.model))
    if not picked:
        raise SystemExit(f"--model: no key of {args.store} matches {args.model!r}")
    other = metas[picked[0]]
    dense = next(m for k, m in sorted(metas.items()) if m["family"] == "dense" and m.get("seed") == other.get("seed"))
    print(f"dense {dense['key']}\nother {other['key']}\n{args.threads} threads, {args.rounds} rounds per session")
    print(f"{'session':>7} {'batch':>5} {'dense ms':>9} {'other ms':>9} {'ratio':>6} {'others CPUs':>11}")
    ratios = []
    with torch.inference_mode():
        for s in range(args.sessions):
            for batch in [args.batch] + ([args.between] if args.between else []):
                fns = {"dense": _runner(args.store, dense, batch), "other": _runner(args.store, other, batch)}
                start = cpu_snapshot()
                t = interleaved_times(fns, rounds=args.rounds, warmup=5, order="shuffle", seed=s)
                busy = others_cpus(start, cpu_snapshot())
                p50 = {k: summary_ms(v)["p50_ms"] for k, v in t.items()}
                ratio = paired_ratio(t["other"], t["dense"])[0]  # the timing pass's paired ratio
                if batch == args.batch:
                    ratios.append(ratio)
                print(f"{s:>7} {batch:>5} {p50['dense']:>9.3f} {p50['other']:>9.3f} {ratio:>6.3f} {busy!s:>11}",
                      flush=True)
    print(f"batch {args.batch}: paired ratio per session from {min(ratios):.3f} to {max(ratios):.3f} "
          f"({max(ratios) / min(ratios) - 1:.0%} apart)")


if __name__ == "__main__":
    main()
