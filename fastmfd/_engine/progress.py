"""A live progress display for long migrations (``migrate(progress=True)``).

One bar per round: the bytes of the round's pages the channels have completed
(sent whole, as counted by the workers' shared counters), never the pages
merely handed to them, which a round hands out far faster than any link moves
them. Sizes and rates are in binary units (KiB, MiB/s), as everywhere in
fastmfd. Drawn by ``rich`` on stderr, so a command's stdout stays its result;
when disabled every call is a no-op, so the migration code never tests the
flag itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Callable

from ..threads import starting_thread

if TYPE_CHECKING:
    from rich.console import RenderableType
    from rich.progress import Progress, Task, TaskID

    from ..regions import Region

__all__ = ["RoundProgress"]


class RoundProgress:
    """``pages_done()``: pages the workers have completed since the migration began."""

    def __init__(self, *, enabled: bool, regions: Sequence[Region],
                 pages_done: Callable[[], int]) -> None:
        self._enabled = enabled
        self._page_size = regions[0].page_size if regions else 4096
        self._pages_done = pages_done
        self._progress: Progress | None = None
        self._rounds: list[tuple[TaskID, int, int]] = []   # (task, pages done before it, pages)

    def __enter__(self) -> "RoundProgress":
        if self._enabled:
            progress = _progress(self._refresh)
            try:
                with starting_thread("progress bar"):       # rich's, to redraw it
                    progress.start()
            except BaseException:
                progress.stop()         # the terminal as it was: its cursor shown
                raise
            self._progress = progress
        return self

    def start_round(self, number: int, pages: int, live: bool) -> None:
        if self._progress is None:
            return
        label = f"round {number}" + ("" if live else " (stopped)")
        task = self._progress.add_task(label, total=max(pages, 1) * self._page_size)
        self._rounds.append((task, self._pages_done(), pages))

    def _refresh(self) -> None:
        """Before each redraw: each round's bar from the counters. Rounds overlap
        little (a round's pages all go out before the next is collected), so the
        pages done past a round's start fill its bar up to its size."""
        if self._progress is None:
            return
        done = self._pages_done()
        for task, before, pages in self._rounds:
            completed = min(max(done - before, 0), pages)
            self._progress.update(task, completed=completed * self._page_size)

    def __exit__(self, *exc: object) -> None:
        if self._progress is None:
            return
        try:
            self._progress.stop()           # draws once more: the final counts
        except Exception:
            # A display's error (a terminal that hung up: EIO) never replaces the
            # exception in flight: the peer heard "Input/output error" where the
            # session was stopped.
            if exc[0] is None:
                raise


def _progress(before_redraw: Callable[[], None]) -> Progress:
    from rich.console import Console
    from rich.progress import (BarColumn, DownloadColumn, Progress, ProgressColumn,
                               TextColumn, TimeElapsedColumn)
    from rich.text import Text

    from ..units import format_rate

    class BinaryRateColumn(ProgressColumn):
        """rich's TransferSpeedColumn prints decimal MB/s; fastmfd prints MiB/s."""

        def render(self, task: Task) -> Text:
            speed = task.speed          # recent samples; a finished round: its average
            if task.finished and task.finished_time:
                speed = task.completed / task.finished_time
            return Text("?" if speed is None else format_rate(speed), style="progress.data.speed")

    class CountingProgress(Progress):
        def get_renderables(self) -> Iterable[RenderableType]:
            before_redraw()
            yield from super().get_renderables()

    return CountingProgress(
        TextColumn("[bold]{task.description}"), BarColumn(), DownloadColumn(binary_units=True),
        BinaryRateColumn(), TimeElapsedColumn(), console=Console(stderr=True), transient=False)
