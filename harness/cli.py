"""``bunitbench``: run suites, list what is registered, inspect BUnit forms, plot and report.

The suite file carries the detail; the command line carries only paths, filters and ``section.field=value``
overrides. Bad input prints one line naming the field and the allowed values and exits with status 2,
before anything is written. Each command imports what it needs when it runs (marked ``# on demand``): ``list`` does
not load pandas or matplotlib, ``run`` does not load ONNX Runtime or OpenVINO, and a local run does not load Ray.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

__all__ = ["build_parser", "main"]

EXECUTORS = ("local", "ray")


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump), exit status 2."""

    def error(self, message: str):
        self.exit(2, f"bunitbench: error: {message} (see {self.prog} --help)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bunitbench", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = sub.add_parser("run", help="run a suite (a bundled name or a path to a .toml)")
    run.add_argument("suite", help="bundled suite name (see `bunitbench list`) or path/to/suite.toml")
    run.add_argument("overrides", nargs="*", help="section.field=value, e.g. train.epochs=3")
    run.add_argument("--only", action="append", metavar="PATTERN", help="run keys matching this wildcard (repeatable)")
    run.add_argument("--device", default="auto", help="auto, cpu, cuda or cuda:N (default auto)")
    run.add_argument("--dry-run", action="store_true", help="print the grid and exit")
    run.add_argument("--results-dir", default="results", help="rows go to RESULTS_DIR/<suite>/runs.jsonl")
    run.add_argument("--plugin", action="append", default=[], metavar="FILE", help="a .py file registering methods")
    run.add_argument("--executor", default="local", help="local or ray")
    run.add_argument("--address", default=None, help="Ray cluster address (with --executor ray), e.g. auto")
    run.add_argument("--no-progress", action="store_true", help="no progress bars")
    run.add_argument("--report", action="store_true", help="write plots and the report when the suite ends")
    run.add_argument("--rerun-other-revisions", action="store_true",
                     help="run again the keys whose ok row another git revision wrote (default: keep them, warn)")

    lst = sub.add_parser("list", help="list suites, datasets, backbones and methods")
    lst.add_argument("what", nargs="?", default="all", choices=("all", "suites", "datasets", "backbones", "methods"))
    lst.add_argument("--plugin", action="append", default=[], metavar="FILE")

    ins = sub.add_parser("inspect", help="params and MACs of a backbone, dense vs BUnit form, per stage")
    ins.add_argument("backbone")
    ins.add_argument("--plan", default="paper", help="a BUnit preset name or a JSON plan (default: paper, the "
                     "paper's choice for this backbone)")
    ins.add_argument("--image-size", type=int, default=32)
    ins.add_argument("--num-classes", type=int, default=10)
    ins.add_argument("--in-channels", type=int, default=3)

    tim = sub.add_parser("time", help="re-time the trained models of a results directory against their dense "
                         "reference, from the artefacts alone (rows go to DIR/timings.jsonl)")
    tim.add_argument("results_dir", metavar="DIR", help="a suite directory, e.g. results/quick")
    tim.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N (default cpu)")
    tim.add_argument("--runtime", default="eager", help="eager, compile, onnx, openvino or openvino+units; several "
                     "comma-separated are timed one after another (default eager)")
    tim.add_argument("--memory-format", default="contiguous", help="contiguous or channels_last (eager and compile; "
                     "default contiguous)")
    tim.add_argument("--threads", default=None, help="intra-op threads (default: torch's current count)")
    tim.add_argument("--batch-sizes", default="1,64", help="comma-separated batch sizes (default 1,64)")
    tim.add_argument("--rounds", default="40", help="timed rounds per session (default 40)")
    tim.add_argument("--warmup", default="5", help="untimed rounds first (default 5)")
    tim.add_argument("--repeats", default="3", help="sessions per condition, models loaded afresh each time, rounds "
                     "pooled (default 3)")
    tim.add_argument("--only", action="append", metavar="PATTERN", help="time keys matching this wildcard "
                     "(repeatable; dense references are timed regardless)")
    tim.add_argument("--no-progress", action="store_true", help="no per-session lines")

    plot = sub.add_parser("plot", help="draw the comparison plots of a results directory")
    plot.add_argument("results_dir")
    rep = sub.add_parser("report", help="write report.md and report.html for a results directory")
    rep.add_argument("results_dir")
    rep.add_argument("--latency-view", default="best",
                     help="what the verdict's latency axis reads: best (each model at its fastest runtime and format "
                          "the timing pass timed, the default) or eager (eager PyTorch alone)")
    rep.add_argument("--no-plots", action="store_true", help="tables and text only: draw no figures (about 10 s "
                     "less per report)")
    return parser


def _err(message: str) -> int:
    print(f"bunitbench: error: {message}", file=sys.stderr)
    return 2


def _cmd_run(args) -> int:
    # on demand: a command loads only what it uses
    from harness.core.config import apply_overrides, expand, load_suite
    from harness.core.devices import resolve_device
    from harness.run.runner import load_plugin, select

    if args.executor not in EXECUTORS:
        return _err(f"--executor: {args.executor!r} not allowed; allowed: {', '.join(EXECUTORS)}")
    for plugin in args.plugin:
        load_plugin(plugin)
    suite = apply_overrides(load_suite(args.suite), args.overrides)
    grid = select(expand(suite), args.only)
    if args.only and not grid:
        return _err(f"--only: no experiment key matches {args.only}; see --dry-run for the keys")
    if args.dry_run:
        for exp in grid:
            print(exp.key)
        print(f"{len(grid)} experiments in suite {suite.name!r}", file=sys.stderr)
        return 0
    if args.executor == "ray":  # the device is the workers' business, not the driver's
        # on demand: a command loads only what it uses
        from harness.run.ray_executor import run_suite_ray

        outcome = run_suite_ray(suite, results_dir=args.results_dir, device=args.device, only=args.only,
                                address=args.address, plugins=args.plugin, progress=not args.no_progress,
                                rerun_other_revisions=args.rerun_other_revisions)
    else:
        # on demand: a command loads only what it uses
        from harness.run.executors import run_suite_local

        resolve_device(args.device)
        outcome = run_suite_local(suite, results_dir=args.results_dir, device=args.device, only=args.only,
                                  progress=not args.no_progress, plugins=args.plugin,
                                  rerun_other_revisions=args.rerun_other_revisions)
    print(f"suite {suite.name}: {outcome.ok} ok, {outcome.failed} failed, {outcome.skipped} already done "
          f"-> {args.results_dir}/{suite.name}/runs.jsonl")
    if args.report:
        # on demand: a command loads only what it uses
        from harness.analyse.report import write_report

        out = Path(args.results_dir) / suite.name
        md, html = write_report(out)
        print(f"report: {md} and {html}")
    return 0 if outcome.failed == 0 else 1


def _cmd_list(args) -> int:
    # on demand: a command loads only what it uses
    from baselines import list_methods, method_info
    from harness.core.config import list_suites
    from harness.core.data import list_datasets
    from harness.core.models import list_backbones
    from harness.run.runner import load_plugin

    for plugin in args.plugin:
        load_plugin(plugin)
    sections = {
        "suites": list_suites,
        "datasets": list_datasets,
        "backbones": list_backbones,
        "methods": lambda: [f"{m} ({method_info(m).family})" for m in list_methods()],
    }
    for name, fn in sections.items():
        if args.what in ("all", name):
            print(f"{name}: " + ", ".join(fn()))
    return 0


def _cmd_inspect(args) -> int:
    # on demand: a command loads only what it uses
    from harness.measure.inspection import format_inspection, inspect_backbone

    rows = inspect_backbone(args.backbone, args.plan, image_size=args.image_size, num_classes=args.num_classes,
                            in_channels=args.in_channels)
    print(format_inspection(rows))
    return 0


def _int_option(name: str, text: str | None, minimum: int) -> int | None:
    if text is None:
        return None
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or value < minimum:
        raise ValueError(f"{name}: {text!r} not allowed; allowed: an integer >= {minimum}")
    return value


def _cmd_time(args) -> int:
    # on demand: a command loads only what it uses
    from harness.measure.runtimes import RUNTIMES
    from harness.measure.timing_pass import format_timings, load_timings, time_store
    from harness.measure.timing_table import best_deployment, format_best

    runtimes = [r.strip() for r in args.runtime.split(",")]
    for runtime in runtimes:
        if runtime not in RUNTIMES:
            return _err(f"--runtime: {runtime!r} not allowed; allowed: {', '.join(RUNTIMES)}")
    batches = tuple(_int_option("--batch-sizes", b.strip(), 1) for b in args.batch_sizes.split(","))
    errors = 0
    for runtime in runtimes:
        outcome = time_store(args.results_dir, device=args.device, runtime=runtime,
                             threads=_int_option("--threads", args.threads, 1), batch_sizes=batches,
                             rounds=_int_option("--rounds", args.rounds, 3),
                             warmup=_int_option("--warmup", args.warmup, 0),
                             repeats=_int_option("--repeats", args.repeats, 1), only=args.only,
                             memory_format=args.memory_format, progress=not args.no_progress)
        for error in outcome.errors:
            print(f"[error] {error}", file=sys.stderr)
        errors += len(outcome.errors)
        print(f"time: {runtime}: {outcome.written} rows written, {outcome.skipped} already timed, "
              f"{outcome.busy_sessions} of {outcome.sessions} sessions on a busy machine, "
              f"{outcome.unsteady_sessions} unsteady -> {outcome.path}")
    table = load_timings(args.results_dir)
    if table is not None:
        for runtime in runtimes:
            print(format_timings(table, runtime=runtime))
        print("\nEach model at its fastest runtime and format, over dense at its own fastest (every runtime timed):")
        print(format_best(best_deployment(table)))
        table.to_csv(Path(args.results_dir) / "timings.csv", index=False)
    return 0 if not errors else 1


def _cmd_plot(args) -> int:
    # on demand: a command loads only what it uses
    from harness.analyse.plots import write_plots

    for path in write_plots(args.results_dir):
        print(path)
    return 0


def _cmd_report(args) -> int:
    # on demand: a command loads only what it uses
    from harness.analyse.latency_source import VIEWS
    from harness.analyse.report import write_report

    if args.latency_view not in VIEWS:
        return _err(f"--latency-view: {args.latency_view!r} not allowed; allowed: {', '.join(VIEWS)}")
    for path in write_report(args.results_dir, plots=not args.no_plots, latency_view=args.latency_view):
        print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # overrides may follow options: `run quick --device cpu train.epochs=3`
        if args.command != "run" or any(x.startswith("-") or "=" not in x for x in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    import harness  # noqa: F401  (torchvision shim first)

    commands = {"run": _cmd_run, "list": _cmd_list, "inspect": _cmd_inspect, "plot": _cmd_plot,
                "report": _cmd_report, "time": _cmd_time}
    try:
        return commands[args.command](args)
    except ValueError as err:  # ConfigError included: one clear line, nothing written
        return _err(str(err))
    except KeyboardInterrupt:
        print("bunitbench: interrupted; completed rows are kept, run again to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
