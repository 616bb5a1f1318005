"""The comparison drawn: one table and one throughput bar chart per image, and
(``--compare``) each result beside the same one of an earlier run."""

from __future__ import annotations

import os

from rich.console import Console
from rich.table import Table
from rich.text import Text

from ...units import format_bytes, format_rate
from .document import Baseline, RunConditions
from .matrix import Result
from .trial import FOREIGN_LOAD_FLAG

__all__ = ["render", "comparison_table", "BAR_WIDTH"]

BAR_WIDTH = 40


def render(results: list[Result], console: Console, *, note: str = "") -> None:
    """Print one table and one throughput bar chart per image (``note`` in the titles)."""
    for kind in dict.fromkeys(r.image for r in results):
        rows = [r for r in results if r.image == kind]
        console.print(_table(kind, rows, note))
        _chart(kind, rows, console)
        console.print()


def _table(kind: str, rows: list[Result], note: str) -> Table:
    fastest = min(r.median_seconds for r in rows)
    peer = next((r for r in rows if r.setting.method == "sendall"), None)
    qemu = {(r.setting.channels, r.setting.compression): r.median_seconds
            for r in rows if r.setting.method == "qemu"}
    runs = len(rows[0].measurements)
    title = f"{kind} image, {format_bytes(rows[0].best.image_bytes)}{note}"
    if runs > 1:
        title += f" (median of {runs}; odd runs in reverse order)"
    versus = "vs: their time over this one's; " if peer is not None or qemu else ""
    table = Table(title=title, title_justify="left",
                  caption=f"CPU s: the source's/destination's processes (+ the bench "
                          f"process's, which runs fastmfd's main threads); {versus}"
                          f"* a run beside more than {FOREIGN_LOAD_FLAG} cores of other "
                          f"load" if rows else None, caption_justify="left")
    table.add_column("setting", no_wrap=True)
    columns = ["time", "throughput", "wire bytes"]
    if runs > 1:
        columns[1:1] = ["min", "first", "spread"]
    for column in columns:
        table.add_column(column, justify="right")
    table.add_column("CPU s", justify="right", no_wrap=True)
    if peer is not None:
        table.add_column("vs sendall", justify="right")
    if qemu:
        table.add_column("vs QEMU", justify="right")
    for r in rows:
        median = r.median_seconds
        cells = [r.setting.label + (" *" if r.loaded_runs else ""), f"{median * 1000:.0f} ms"]
        if runs > 1:
            cells += [f"{r.best.seconds * 1000:.0f} ms", f"{r.first_seconds * 1000:.0f} ms",
                      f"{r.spread:.2f}"]
        cells += [format_rate(r.median_throughput),
                  "-" if r.best.wire_bytes is None else format_bytes(r.best.wire_bytes),
                  _cpu_cell(r)]
        if peer is not None:
            cells.append(f"{peer.median_seconds / median:.2f}x")
        if qemu:
            # every row but QEMU -> QEMU's own: QEMU's time in the same cell over its
            same = qemu.get((r.setting.channels, r.setting.compression))
            cells.append(f"{same / median:.2f}x"
                         if r.setting.method != "qemu" and same else "")
        table.add_row(*cells, style="bold" if median == fastest else None)
    return table


def _cpu_cell(r: Result) -> str:
    source, destination, main = (r.median_cpu_s(side)
                                 for side in ("source", "destination", "main"))
    if source is None or destination is None:
        return "-"
    return f"{source:.2f}/{destination:.2f}" + (f"+{main:.2f}" if main is not None else "")


def _chart(kind: str, rows: list[Result], console: Console) -> None:
    top = max(r.median_throughput for r in rows)
    width = max(len(r.setting.label) for r in rows)
    console.print(f"throughput (median), {kind} image")
    for r in rows:
        fill = r.median_throughput / top * BAR_WIDTH if top else 0
        bar = "█" * int(fill) + ("▌" if fill - int(fill) >= 0.5 else "")
        line = Text(f"  {r.setting.label:<{width}} ")
        line.append(f"{bar:<{BAR_WIDTH}}", style="cyan")
        line.append(f" {format_rate(r.median_throughput)}")
        console.print(line)


def comparison_table(results: list[Result], baseline: dict[str, Baseline], source: str,
                     conditions: RunConditions) -> Table:
    """Each result's best time beside the same benchmark's in ``baseline``
    (:func:`.document.load_baseline`) when that one moved an image of the same size
    under the same ``conditions``: the speed-up is its time over this one's (> 1x: faster
    now); else "—" and why not."""
    table = Table(title=f"compared with {os.path.basename(source)} (best times)",
                  title_justify="left")
    table.add_column("benchmark")
    for column in ("before", "now", "speed-up"):
        table.add_column(column, justify="right")
    rows = []
    for r in results:
        before, now = baseline.get(r.name), r.best.seconds
        why = "" if before is None else \
            before.differences(conditions.of(r.setting, r.best.image_bytes))
        speed_up = "" if before is None else "—" if why else f"{before.seconds / now:.2f}x"
        # The best of more runs is lower by chance alone: say so beside a ratio of two
        # bests of unlike counts (a --repeat 1 run against a --repeat 6 file).
        runs = len(r.measurements)
        unlike = before is not None and not why and before.runs not in (None, runs)
        note = f"not comparable: {why}" if why else \
            f"best of {before.runs} before, of {runs} now" if unlike and before else ""
        rows.append([r.name, "-" if before is None else f"{before.seconds * 1000:.0f} ms",
                     f"{now * 1000:.0f} ms", speed_up] + ([note] if note else []))
    if any(len(row) > 4 for row in rows):
        table.add_column("note")
    for row in rows:
        table.add_row(*row)
    return table
