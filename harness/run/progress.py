"""Progress display for long runs: a bar over the runs of a suite and one over the epochs of the current
phase, with loss, accuracy and time left. Drawn with rich on stderr; silent when disabled."""
from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

__all__ = ["Reporter"]


class Reporter:
    def __init__(self, total_runs: int, *, enabled: bool = True):
        self.enabled = enabled
        self.console = Console(stderr=True)
        self._progress = Progress(
            TextColumn("{task.description}", justify="left"), BarColumn(bar_width=24), MofNCompleteColumn(),
            TextColumn("{task.fields[info]}"), TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(),
            console=self.console, disable=not enabled, transient=False)
        self._runs = self._progress.add_task("runs", total=total_runs, info="")
        self._phase = None

    def __enter__(self) -> "Reporter":
        self._progress.start()
        return self

    def __exit__(self, *exc) -> None:
        self._progress.stop()

    def message(self, text: str) -> None:
        if self.enabled:
            self._progress.console.print(text, markup=False, highlight=False)

    def start_run(self, key: str) -> None:
        self._progress.update(self._runs, info=key)

    def start_phase(self, name: str, epochs: int) -> None:
        if self._phase is not None:
            self._progress.remove_task(self._phase)
        self._phase = self._progress.add_task(f"  {name}", total=max(epochs, 1), info="")
        if epochs <= 0:
            self._progress.update(self._phase, completed=1)

    def epoch_done(self, record: dict) -> None:
        if self._phase is not None:
            self._progress.update(self._phase, completed=record["epoch"], info=f"loss {record['loss']:.3f}")

    def evaluated(self, top1: float) -> None:
        if self._phase is not None:
            self._progress.update(self._phase, info=f"top-1 {top1:.2f}%")

    def run_done(self, row: dict) -> None:
        self._progress.advance(self._runs)
        if self.enabled and row.get("status") == "ok":
            lat = row.get("latency_ms_p50_b1")
            lat_text = f", {lat:.2f} ms b1" if isinstance(lat, (int, float)) else ""
            self.message(f"[ok] {row['key']}: top-1 {row['top1']:.2f}%, {row['params']:,} params, "
                         f"{row['macs'] / 1e6:.2f}M MACs{lat_text}")
