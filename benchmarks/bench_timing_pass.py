"""Is the timing pass repeatable? Run it twice on the same store and compare the ratios to dense.

The store (default ``results/quick``: ``runs.jsonl`` and ``models/``) is copied twice into a temporary folder,
without its ``timings.jsonl``, and :func:`harness.measure.timing_pass.time_store` times each copy in turn: two
fresh result tables from the same artefacts. Per model and batch the script prints the two paired ratios to
dense, whether they agree within the tolerance (``|r2 - r1| <= tol * r1``, default 10%), and the MACs ratio.
It exits with status 1 when any model disagrees. Run it on a quiet machine:
``flock -x /tmp/bunit-cpu.lock python benchmarks/bench_timing_pass.py``.

Usage: ``python benchmarks/bench_timing_pass.py [--store results/quick] [--runtime eager] [--rounds 60]
[--warmup 5] [--batch-sizes 1,64] [--threads N] [--tolerance 0.10] [--out CSV]``.
"""
from __future__ import annotations

import argparse
import shutil
import sys
import tempfile
import time
from pathlib import Path

import harness  # noqa: F401  (torchvision shim first)
from bunit.timing import machine_load
from harness.measure.timing_pass import TIMINGS_FILE, load_timings, time_store

COLUMNS = ["key", "batch", "latency_ratio_1", "latency_ratio_2", "ci_1", "ci_2", "agree", "macs_ratio", "p50_ms_1",
           "p50_ms_2", "busy_1", "busy_2", "unsteady_1", "unsteady_2"]


def _args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="results/quick")
    parser.add_argument("--runtime", default="eager")
    parser.add_argument("--rounds", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3, help="sessions per condition, models loaded afresh")
    parser.add_argument("--settle", type=int, default=2)
    parser.add_argument("--batch-sizes", default="1,64")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--only", action="append", default=None)
    parser.add_argument("--tolerance", type=float, default=0.10)
    parser.add_argument("--out", default="results/benchmarks/timing_pass.csv")
    return parser.parse_args(argv)


def run_twice(args: argparse.Namespace) -> list[dict]:
    """Two passes on two fresh copies of the store; one merged row per (model, batch)."""
    store = Path(args.store)
    if not (store / "runs.jsonl").exists():
        raise SystemExit(f"--store: no runs.jsonl in {str(store)!r}; run `bunitbench run quick` first")
    tables = []
    with tempfile.TemporaryDirectory(prefix="bench-timing-") as tmp:
        for i in (1, 2):
            copy = Path(tmp) / f"pass{i}"
            shutil.copytree(store, copy, ignore=shutil.ignore_patterns(TIMINGS_FILE, "timings.csv", "plots"))
            t0 = time.perf_counter()
            out = time_store(copy, runtime=args.runtime, threads=args.threads, rounds=args.rounds, warmup=args.warmup,
                             settle=args.settle, only=args.only, repeats=args.repeats,
                             batch_sizes=tuple(int(b) for b in args.batch_sizes.split(",")))
            print(f"pass {i}: {out.written} rows, {out.busy_sessions}/{out.sessions} busy and "
                  f"{out.unsteady_sessions}/{out.sessions} unsteady sessions, "
                  f"{time.perf_counter() - t0:.0f} s, errors: {out.errors or 'none'}", file=sys.stderr)
            table = load_timings(copy)
            print(f"pass {i}: other work kept at most {table.others_cpus.max()} CPUs busy during a session",
                  file=sys.stderr)
            tables.append(table.set_index(["key", "batch"]))
    first, second = tables
    rows = []
    for (key, batch), a in first.iterrows():
        b = second.loc[(key, batch)]
        r1, r2 = a.latency_ratio, b.latency_ratio
        rows.append({"key": key, "batch": batch, "latency_ratio_1": r1, "latency_ratio_2": r2,
                     "ci_1": f"[{a.latency_ratio_lo:.3f}, {a.latency_ratio_hi:.3f}]",
                     "ci_2": f"[{b.latency_ratio_lo:.3f}, {b.latency_ratio_hi:.3f}]",
                     "agree": bool(abs(r2 - r1) <= args.tolerance * r1), "macs_ratio": a.macs_ratio,
                     "p50_ms_1": a.p50_ms, "p50_ms_2": b.p50_ms, "busy_1": a.busy, "busy_2": b.busy,
                     "unsteady_1": a.unsteady, "unsteady_2": b.unsteady})
    return rows


def main(argv: list[str] | None = None) -> int:
    args = _args(argv)
    start = machine_load()
    rows = run_twice(args)
    end = machine_load()
    print(f"{'key':<72} {'batch':>5} {'ratio 1':>8} {'ratio 2':>8} {'agree':>6} {'MACs':>6}  unsteady")
    for r in sorted(rows, key=lambda r: (r["batch"], r["key"])):
        print(f"{r['key'][:72]:<72} {r['batch']:>5} {r['latency_ratio_1']:>8.3f} {r['latency_ratio_2']:>8.3f} "
              f"{'yes' if r['agree'] else 'NO':>6} {r['macs_ratio']:>6.3f}  "
              f"{'/'.join('yes' if r[f'unsteady_{i}'] is True else 'no' for i in (1, 2))}")
    agree = sum(r["agree"] for r in rows)
    print(f"{agree} of {len(rows)} ratios agree within ±{args.tolerance:.0%} ({args.runtime}, {args.rounds} rounds, "
          f"warm-up {args.warmup}; load {start['load1']} -> {end['load1']} on {start['cpus']} CPUs)")
    import pandas as pd

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(rows, columns=COLUMNS).assign(runtime=args.runtime, rounds=args.rounds, warmup=args.warmup).to_csv(
        out, index=False)
    return 0 if agree == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
