"""The comparison drawn: one table and one throughput bar chart per image."""

from __future__ import annotations

from rich.table import Table
from rich.text import Text

from ..units import format_bytes, format_rate
from .matrix import Result

__all__ = ["render", "BAR_WIDTH"]

BAR_WIDTH = 40


def render(results: list[Result], console, *, note: str = "") -> None:
    """Print one table and one throughput bar chart per image (``note`` in the titles)."""
    for kind in dict.fromkeys(r.image for r in results):
        rows = [r for r in results if r.image == kind]
        console.print(_table(kind, rows, note))
        _chart(kind, rows, console)
        console.print()


def _table(kind: str, rows: list[Result], note: str) -> Table:
    fastest = min(r.best.seconds for r in rows)
    peer = next((r for r in rows if r.setting.method == "sendall"), None)
    qemu = {(r.setting.channels, r.setting.compression): r.best.seconds
            for r in rows if r.setting.method == "qemu"}
    runs = len(rows[0].measurements)
    title = f"{kind} image, {format_bytes(rows[0].best.image_bytes)}{note}"
    table = Table(title=f"{title} (best of {runs})" if runs > 1 else title,
                  title_justify="left")
    table.add_column("setting")
    for column in ("time", "throughput", "wire bytes", "time / fastest"):
        table.add_column(column, justify="right")
    if peer is not None:
        table.add_column("speed vs sendall", justify="right")
    if qemu:
        table.add_column("speed vs QEMU", justify="right")
    for r in rows:
        best = r.best
        cells = [r.setting.label, f"{best.seconds * 1000:.0f} ms", format_rate(best.throughput),
                 "-" if best.wire_bytes is None else format_bytes(best.wire_bytes),
                 f"{best.seconds / fastest:.2f}x"]
        if peer is not None:
            cells.append(f"{peer.best.seconds / best.seconds:.2f}x")
        if qemu:
            # every row but QEMU -> QEMU's own: QEMU's time in the same cell over its
            same = qemu.get((r.setting.channels, r.setting.compression))
            cells.append(f"{same / best.seconds:.2f}x"
                         if r.setting.method != "qemu" and same else "")
        table.add_row(*cells, style="bold" if best.seconds == fastest else None)
    return table


def _chart(kind: str, rows: list[Result], console) -> None:
    top = max(r.best.throughput for r in rows)
    width = max(len(r.setting.label) for r in rows)
    console.print(f"throughput, {kind} image")
    for r in rows:
        fill = r.best.throughput / top * BAR_WIDTH if top else 0
        bar = "█" * int(fill) + ("▌" if fill - int(fill) >= 0.5 else "")
        line = Text(f"  {r.setting.label:<{width}} ")
        line.append(f"{bar:<{BAR_WIDTH}}", style="cyan")
        line.append(f" {format_rate(r.best.throughput)}")
        console.print(line)
