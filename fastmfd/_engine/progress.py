"""A live progress display for long migrations (``migrate(progress=True)``).

One bar per round: pages handed to the channels out of the round's pages,
with the rate and the round number. Built on ``rich``; when disabled every
call is a no-op, so the migration code never tests the flag itself.
"""

from __future__ import annotations

__all__ = ["RoundProgress"]


class RoundProgress:
    def __init__(self, *, enabled: bool, regions: list) -> None:
        self._enabled = enabled
        self._page_size = regions[0].page_size if regions else 4096
        self._progress = None
        self._task = None

    def __enter__(self) -> "RoundProgress":
        if self._enabled:
            from rich.progress import (BarColumn, DownloadColumn, Progress, TextColumn,
                                       TimeElapsedColumn, TransferSpeedColumn)
            self._progress = Progress(
                TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
                TransferSpeedColumn(), TimeElapsedColumn(), transient=False)
            self._progress.start()
        return self

    def start_round(self, number: int, pages: int, live: bool) -> None:
        if self._progress is None:
            return
        if self._task is not None:
            self._progress.update(self._task, completed=self._progress.tasks[-1].total)
        label = f"round {number}" + ("" if live else " (stopped)")
        self._task = self._progress.add_task(label, total=max(pages, 1) * self._page_size)

    def advance(self, pages: int) -> None:
        if self._progress is not None:
            self._progress.advance(self._task, pages * self._page_size)

    def __exit__(self, *exc) -> None:
        if self._progress is not None:
            self._progress.stop()
