"""Whole-network latency: BUnit ResNet-56 and VGG-16 against their dense backbones, latency ratio next to MACs ratio.

Per backbone, every model below is timed round-robin with its dense reference in one process (one call each
per round, in a rotated order), at batch 1 and a throughput batch, NCHW and channels_last, and two modes:

- ``eager``: BUnit layers on the backends :func:`bunit.autotune.autotune` measured fastest for exactly this
  input (batch, layout, dtype, device, threads); dense models as they are.
- ``compiled``: the whole model under ``torch.compile``, dense and BUnit alike. Before compiling a BUnit model
  each unit layer gets the eager backend that compiled fastest on its own (``--compile-plan autotune``: the
  autotuner times ``compiled`` over the best eager backend and over ``stencil``), or one fixed backend.

Models (CIFAR inputs, 32x32, 10 classes; weights are freshly initialised, which dense kernels do not care about):

- ResNet-56 (option A): dense; BUnit presets ``cifar-resnet-paper`` and ``cifar-resnet-all``; a 90%-sparse
  global-magnitude prune (``baselines.get_method("global-magnitude")``, no fine-tune) run on the same dense
  kernels, eager only (compiled, it is the dense graph again).
- ResNet-56 (option B): dense-B, and an ``l1-filter`` structured prune at ``{"macs_reduction": 0.6}`` (a
  smaller dense network), timed against dense-B.
- VGG-16: dense; BUnit presets ``vgg16-middle`` and ``vgg16-all``.

``macs_ratio`` is ``macs_nonzero / reference macs`` (``baselines.counting.count_costs``): for BUnit and structured
pruning it equals the plain MACs ratio, for unstructured pruning it is what FLOP counts in papers claim.

``--stages`` (eager only) also times every top-level child of every model (stem conv, BN, ReLU, each residual
stage, pool, classifier) on the input it sees in the whole model, the children of all models of a configuration
interleaved, and prints where each model's time goes (``stages_ms`` column: child -> p50 ms).

``--formats best`` times NCHW and channels_last in ONE configuration: every model twice (each copy tuned for its
own input), all (model, format) pairs interleaved. Besides a row per (model, format), ratio to dense in the same
format, it adds one row per model with ``memory_format = "best"``: the model at its fastest format (``best_format``)
over dense at dense's fastest (``ref_format``), both measured side by side.

Usage: ``python benchmarks/bench_networks.py [--device cpu|cuda] [--repeats 30] [--quick] [--stages]
[--formats contiguous,channels_last|best] [--out CSV]``.
Prints one line per model and configuration and writes ``results/benchmarks/networks.csv``.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import harness  # noqa: F401  (torchvision shim, before anything imports torchvision or ptflops)
import torch
import torch._dynamo
import torch.nn as nn

from baselines import MethodContext, get_method
from baselines.counting import count_costs
from bunit import bunitify
from bunit.autotune import DEFAULT_BACKENDS, autotune
from bunit.layers import EAGER_BACKENDS, unit_layers
from bunit.timing import interleaved_times, summary_ms
from harness.core.models import create_backbone

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_layers import (available_backends, dtype_from_name, environment, load1, prepare_dynamo,  # noqa: E402
                          write_csv)

COMPILE_PLANS = ("autotune", "grouped", "grouped_cl", "stencil")
FORMATS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}
INPUT_SHAPE = (3, 32, 32)


@dataclass
class Entry:
    """One model of a backbone group.

    Attributes:
        name: row label (``dense``, ``bunit:<preset>``, ``global-magnitude:0.9`` ...).
        family: dense | bunit | unstructured | structured.
        model: the network (fp32, CPU, eval); copied per configuration.
        reference: name of the dense entry it is compared with (itself for a dense entry).
        compile: also time it under torch.compile.
        info: counts and what the method achieved, copied into every row.
    """

    name: str
    family: str
    model: nn.Module
    reference: str
    compile: bool = True
    info: dict[str, Any] = field(default_factory=dict)


def _context(backbone: str, shortcut: str) -> MethodContext:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(16, *INPUT_SHAPE, generator=gen)
    y = torch.arange(16) % 10
    return MethodContext(example_inputs=x, calib_batches=[(x, y)], seed=0, backbone=backbone, shortcut=shortcut,
                         num_classes=10)


def build_group(backbone: str, *, presets: list[str], pruning: bool) -> list[Entry]:
    """The dense model and what is compared with it, for ``resnet56`` or ``vgg16``."""
    torch.manual_seed(0)
    if backbone == "resnet56":
        dense = create_backbone("resnet56", shortcut="A").eval()
    elif backbone == "vgg16":
        dense = create_backbone("vgg16").eval()
    else:
        raise ValueError(f"backbone: {backbone!r} is not allowed; allowed: resnet56, vgg16")
    entries = [Entry("dense", "dense", dense, "dense")]
    for preset in presets:
        entries.append(Entry(f"bunit:{preset}", "bunit", bunitify(dense, preset).eval(), "dense"))
    if backbone == "resnet56" and pruning:
        ctx = _context("resnet56", "A")
        sparse = get_method("global-magnitude").apply(copy.deepcopy(dense), 0.9, ctx).eval()
        entries.append(Entry("global-magnitude:0.9", "unstructured", sparse, "dense", compile=False,
                             info={"achieved": ctx.record.get("sparsity")}))
        torch.manual_seed(0)
        dense_b = create_backbone("resnet56", shortcut="B").eval()
        entries.append(Entry("dense-B", "dense", dense_b, "dense-B"))
        ctx = _context("resnet56", "B")
        pruned = get_method("l1-filter").apply(copy.deepcopy(dense_b), {"macs_reduction": 0.6}, ctx).eval()
        entries.append(Entry("l1-filter:macs0.6", "structured", pruned, "dense-B",
                             info={"achieved": ctx.record.get("macs_reduction")}))
    for e in entries:
        e.info.update(count_costs(e.model, INPUT_SHAPE))
    return entries


def _backend_summary(model: nn.Module) -> str | None:
    layers = [m for _, m in unit_layers(model)]
    if not layers:
        return None
    return json.dumps(dict(Counter(m.backend for m in layers).most_common()))


def _prepare(entry: Entry, x: torch.Tensor, *, mode: str, fmt: torch.memory_format, plan: str,
             cache: Path, tune_repeats: int, tune_backends: list[str]) -> tuple[nn.Module, dict[str, Any]]:
    """A timed copy of ``entry.model`` for this configuration (tuned, compiled), and what was done to it."""
    net = copy.deepcopy(entry.model).to(device=x.device, dtype=x.dtype).to(memory_format=fmt).eval()
    meta: dict[str, Any] = {"backends": None, "compile_s": None, "tune_s": None}
    t0 = time.perf_counter()
    if entry.family == "bunit":
        if mode == "eager":
            autotune(net, x, backends=tune_backends, cache_path=cache, repeats=tune_repeats)
        elif plan == "autotune":
            autotune(net, x, backends=[*tune_backends, "compiled"], cache_path=cache, repeats=tune_repeats)
            for _, layer in unit_layers(net):  # the whole model is compiled: each layer runs its best compile base
                if layer.backend == "compiled":
                    layer.backend = layer.compile_base
            torch._dynamo.reset()  # the per-layer compiles are not needed any more
        else:
            for _, layer in unit_layers(net):
                layer.backend = plan
        meta["backends"] = _backend_summary(net)
        meta["tune_s"] = time.perf_counter() - t0
    if mode == "compiled":
        net = torch.compile(net)
        t0 = time.perf_counter()
        with torch.inference_mode():
            net(x)  # compiles
        meta["compile_s"] = time.perf_counter() - t0
    return net, meta


def _stage_fns(net: nn.Module, x: torch.Tensor) -> dict[str, Callable[[], Any]]:
    """One function per top-level child of ``net`` that ``net(x)`` calls, each on (a copy of) the input it sees."""
    inputs: dict[str, torch.Tensor] = {}
    children = dict(net.named_children())
    hooks = [m.register_forward_pre_hook(lambda _m, args, name=name: inputs.setdefault(name, args[0].clone()))
             for name, m in children.items()]
    try:
        net(x)
    finally:
        for h in hooks:
            h.remove()
    return {name: (lambda m=children[name], t=t: m(t)) for name, t in inputs.items()}


def time_stages(nets: dict[str, nn.Module], inputs: dict[str, torch.Tensor], *, repeats: int, warmup: int,
                device: torch.device) -> dict[str, dict[str, float]]:
    """``{model: {child: p50 ms}}``: every top-level child of every model (``nets[k]`` fed ``inputs[k]``) timed on
    its own input, all interleaved."""
    fns = {(name, child): fn for name, net in nets.items() for child, fn in _stage_fns(net, inputs[name]).items()}
    times = interleaved_times({f"{n}/{c}": fn for (n, c), fn in fns.items()}, rounds=repeats, warmup=warmup,
                              device=device)
    out: dict[str, dict[str, float]] = {name: {} for name in nets}
    for name, child in fns:
        out[name][child] = round(summary_ms(times[f"{name}/{child}"])["p50_ms"], 4)
    return out


def best_rows(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One ``memory_format = "best"`` row per model of a configuration that timed several formats side by side.

    Each model is taken at its fastest format (lowest p50), its reference at the reference's own fastest format;
    ``latency_ratio`` is the one p50 over the other, ``latency_ratio_p90`` the p90s of those two formats.

    Args:
        rows: the per-(model, format) rows of one configuration (:func:`run_config`).

    Returns:
        Per model, in first-seen order, a copy of its winning row with ``memory_format`` ``"best"``,
        ``best_format`` (the winner), ``ref_format`` (the reference's winner) and the reference columns and
        ratios recomputed; ``stages_ms`` is left to the per-format rows.
    """
    fastest: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["model"] not in fastest or r["p50_ms"] < fastest[r["model"]]["p50_ms"]:
            fastest[r["model"]] = r
    out = []
    for name, r in fastest.items():
        ref = fastest[r["reference"]]
        out.append({**r, "memory_format": "best", "best_format": r["memory_format"],
                    "ref_format": ref["memory_format"], "ref_p50_ms": ref["p50_ms"],
                    "latency_ratio": r["p50_ms"] / ref["p50_ms"], "latency_ratio_p90": r["p90_ms"] / ref["p90_ms"],
                    "stages_ms": None})
    return out


def run_config(group: list[Entry], backbone: str, *, batch: int, dtype: torch.dtype, formats: list[str],
               mode: str, device: torch.device, repeats: int, warmup: int, plan: str, cache: Path,
               tune_repeats: int, tune_backends: list[str], stages: bool = False) -> list[dict[str, Any]]:
    """Time every entry of ``group`` (those that take part in ``mode``) in every memory format of ``formats``,
    all (entry, format) pairs round-robin in one :func:`bunit.timing.interleaved_times`.

    Each pair is its own copy of the model, tuned (and compiled) for its own input, and checked against the eager
    fp32 model before timing.

    Returns:
        One row per (entry, format), ratio to the reference in the same format; with several formats, then one
        :func:`best_rows` row per entry.
    """
    torch._dynamo.reset()
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(batch, *INPUT_SHAPE, generator=gen).to(device=device, dtype=dtype)
    xs = {f: x.contiguous(memory_format=FORMATS[f]) for f in formats}
    entries = [e for e in group if mode == "eager" or e.compile]
    pairs = {f"{e.name}@{f}": (e, f) for f in formats for e in entries}  # timing key -> (entry, format)
    load_start = load1()
    nets, metas, outs = {}, {}, {}
    for key, (e, f) in pairs.items():
        nets[key], metas[key] = _prepare(e, xs[f], mode=mode, fmt=FORMATS[f], plan=plan, cache=cache,
                                         tune_repeats=tune_repeats, tune_backends=tune_backends)
        with torch.inference_mode():
            outs[key] = nets[key](xs[f]).float()
    with torch.inference_mode():  # a compiled or tuned model must still compute what the eager fp32 model does
        for e in entries:
            expected = e.model.to(device)(x.float().contiguous())
            tol = 1e-2 if dtype == torch.float32 else 0.5
            for f in formats:
                err = (outs[f"{e.name}@{f}"] - expected).abs().max().item() / max(1.0, expected.abs().max().item())
                if err > tol:
                    raise RuntimeError(f"{backbone} {e.name} {mode} {f}: output differs from the eager model by "
                                       f"{err:.3g}")
            e.model.cpu()
        fns = {key: (lambda net=nets[key], x=xs[f]: net(x)) for key, (_, f) in pairs.items()}
        times = interleaved_times(fns, rounds=repeats, warmup=warmup, device=device)
        by_stage = time_stages(nets, {key: xs[f] for key, (_, f) in pairs.items()}, repeats=repeats, warmup=warmup,
                               device=device) if stages else {}
    load_end = load1()
    summaries = {key: summary_ms(t) for key, t in times.items()}
    by_name = {e.name: e for e in group}
    rows = []
    for key, (e, f) in pairs.items():
        ref = by_name[e.reference]
        s, rs = summaries[key], summaries[f"{ref.name}@{f}"]
        rows.append({
            "backbone": backbone, "model": e.name, "family": e.family, "reference": ref.name, "mode": mode,
            "batch": batch, "dtype": str(dtype).removeprefix("torch."), "memory_format": f,
            **s, "ref_p50_ms": rs["p50_ms"], "latency_ratio": s["p50_ms"] / rs["p50_ms"],
            "latency_ratio_p90": s["p90_ms"] / rs["p90_ms"],
            "macs_ratio": e.info["macs_nonzero"] / ref.info["macs"],
            "macs": e.info["macs"], "macs_nonzero": e.info["macs_nonzero"], "ref_macs": ref.info["macs"],
            "params": e.info["params"], "params_nonzero": e.info["params_nonzero"],
            "achieved": e.info.get("achieved"), "throughput_img_s": batch / (s["p50_ms"] / 1e3),
            "repeats": repeats, "compile_plan": plan if mode == "compiled" and e.family == "bunit" else None,
            **metas[key], "load1_start": load_start, "load1_end": load_end,
            "stages_ms": json.dumps(by_stage[key]) if key in by_stage else None,
        })
    return rows + best_rows(rows) if len(formats) > 1 else rows


def _format_label(row: dict[str, Any]) -> str:
    if row["memory_format"] == "best":
        return f"best ({row['best_format']})"
    return "cl" if row["memory_format"] == "channels_last" else "nchw"


def _print_config(rows: list[dict[str, Any]]) -> None:
    width = max(4, *(len(_format_label(r)) for r in rows))
    for r in rows:
        head = f"{r['backbone']} {r['mode']:8s} b{r['batch']:<3d} {r['dtype']} {_format_label(r):{width}s}"
        ref = r["reference"] + (f" {r['ref_format']}" if r["memory_format"] == "best" else "")
        extra = f" backends={r['backends']}" if r["backends"] else ""
        extra += f" compile={r['compile_s']:.0f}s" if r["compile_s"] else ""
        print(f"{head} {r['model']:24s} p50 {r['p50_ms']:9.3f} ms p90 {r['p90_ms']:9.3f} | latency ratio "
              f"{r['latency_ratio']:.3f} vs MACs ratio {r['macs_ratio']:.3f} (ref {ref}){extra} "
              f"| load {r['load1_start']}", flush=True)
        if r["stages_ms"]:
            parts = json.loads(r["stages_ms"])
            print(f"{head}   stages of {r['model']}: " + ", ".join(
                f"{k} {v:.3f} ms ({v / r['p50_ms']:.0%})" for k, v in parts.items()) +
                f"; sum {sum(parts.values()):.3f} ms", flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--repeats", type=int, default=None, help="timed rounds (default 30; 5 with --quick)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed rounds (default 5; 2 with --quick)")
    parser.add_argument("--quick", action="store_true",
                        help="few repeats, one preset per backbone, fixed compile plan: a smoke test")
    parser.add_argument("--backbones", default="resnet56,vgg16")
    parser.add_argument("--presets", default=None,
                        help="comma-separated BUnit presets (default: cifar-resnet-paper, cifar-resnet-all for "
                             "resnet56, vgg16-middle, vgg16-all for vgg16; the '-all' ones with --quick)")
    parser.add_argument("--batches", default=None, help="comma-separated (default 1,64 CPU; 1,256 GPU)")
    parser.add_argument("--dtypes", default=None, help="comma-separated (default float32 CPU; float32,bfloat16 GPU)")
    parser.add_argument("--formats", default="contiguous,channels_last",
                        help="comma-separated configurations: contiguous, channels_last (each timed on its own), "
                             "best (both formats timed side by side, plus each model at its fastest format "
                             "against dense at dense's fastest)")
    parser.add_argument("--modes", default="eager,compiled")
    parser.add_argument("--compile-plan", default=None, choices=COMPILE_PLANS,
                        help="unit-layer backends under torch.compile (default autotune; grouped with --quick)")
    parser.add_argument("--no-pruning", dest="pruning", action="store_false", help="skip the pruned ResNet-56 rows")
    parser.add_argument("--tune-repeats", type=int, default=7, help="autotuner repetitions per backend")
    parser.add_argument("--tune-backends", default=",".join(DEFAULT_BACKENDS),
                        help="eager backends the autotuner chooses from (default: all; fused_cpu is left out "
                             "where it cannot run)")
    parser.add_argument("--autotune-cache", default=None,
                        help="autotuner JSON cache (default: autotune.json next to --out; a temporary file "
                             "with --quick); delete it to tune afresh")
    parser.add_argument("--threads", type=int, default=None, help="CPU intra-op threads (default: torch's)")
    parser.add_argument("--stages", action="store_true",
                        help="eager only: also time each top-level child (stem, stages, head) of every model")
    parser.add_argument("--out", default="results/benchmarks/networks.csv")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    if args.threads:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (5 if args.quick else 30)
    warmup = args.warmup if args.warmup is not None else (2 if args.quick else 5)
    if repeats < 3:
        raise ValueError(f"repeats: need at least 3 for a median and p90; got {repeats}")
    plan = args.compile_plan or ("grouped" if args.quick else "autotune")
    modes = args.modes.split(",")
    if any(m not in ("eager", "compiled") for m in modes):
        raise ValueError(f"modes: {modes} not allowed; allowed: eager, compiled")
    formats = args.formats.split(",")
    if any(f not in (*FORMATS, "best") for f in formats):
        raise ValueError(f"formats: {formats} not allowed; allowed: contiguous, channels_last, best")
    batches = [int(b) for b in args.batches.split(",")] if args.batches else [1, 256 if gpu else 64]
    dtypes = [dtype_from_name(d) for d in (args.dtypes.split(",") if args.dtypes else
                                           (["float32", "bfloat16"] if gpu else ["float32"]))]
    presets = {"resnet56": ["cifar-resnet-paper", "cifar-resnet-all"], "vgg16": ["vgg16-middle", "vgg16-all"]}
    if args.quick:
        presets = {"resnet56": ["cifar-resnet-all"], "vgg16": ["vgg16-all"]}
    if args.presets:
        chosen = args.presets.split(",")
        presets = {b: [p for p in chosen if p.startswith("vgg16") == (b == "vgg16")] for b in presets}
    if args.autotune_cache:
        cache = Path(args.autotune_cache)
    elif args.quick:  # noisy few-repeat choices must not leak into a later full run
        cache = Path(tempfile.mkdtemp(prefix="bench-networks-")) / "autotune.json"
    else:
        cache = Path(args.out).parent / "autotune.json"
    tune_backends = args.tune_backends.split(",")
    if any(b not in EAGER_BACKENDS for b in tune_backends):
        raise ValueError(f"tune-backends: {tune_backends} not allowed; allowed: {', '.join(EAGER_BACKENDS)}")
    tune_backends = available_backends(tune_backends, device)
    if "compiled" in modes:
        prepare_dynamo()
    env = environment(device)
    print(f"{env['device_name']}, {env['threads']} threads, torch {env['torch']}, repeats {repeats}, "
          f"compile plan {plan}, autotune cache {cache}, load {load1()}", flush=True)
    rows: list[dict[str, Any]] = []
    for backbone in args.backbones.split(","):
        group = build_group(backbone, presets=presets.get(backbone, []), pruning=args.pruning)
        for mode in modes:
            for dtype in dtypes:
                for fmt in formats:
                    for batch in batches:
                        config = run_config(group, backbone, batch=batch, dtype=dtype,
                                            formats=list(FORMATS) if fmt == "best" else [fmt], mode=mode,
                                            device=device, repeats=repeats, warmup=warmup, plan=plan, cache=cache,
                                            tune_repeats=args.tune_repeats, tune_backends=tune_backends,
                                            stages=args.stages and mode == "eager")
                        _print_config(config)
                        rows += [{**r, **env} for r in config]
                        write_csv(rows, args.out)  # after every configuration: an interrupt keeps what ran
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
