"""Run a whole migration on this machine: a Destination receiving in a thread
and a Source sending to it, over loopback TCP (or a Unix socket).

The demo, ``fastmfd bench`` and the benchmarks all need exactly this; the
destination's regions are only valid inside the session, so a ``check``
callback inspects the :class:`~fastmfd.DestinationResult` before the
destination closes.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

from .config import MigrationConfig
from .destination import Destination, DestinationResult
from .source import Source
from .stats import MigrationStats, ReceiveStats

__all__ = ["LoopbackResult", "migrate_locally"]


@dataclass(frozen=True)
class LoopbackResult:
    stats: MigrationStats
    received: ReceiveStats
    checked: object                 # what ``check`` returned


def migrate_locally(config: MigrationConfig, regions: list, *, devices: list = (),
                    loaders: dict | None = None, live: bool = False, on_stop=None,
                    on_resume=None, progress: bool = False, receive_into: list = (),
                    check: Callable[[DestinationResult], object] | None = None,
                    address: str = "tcp:127.0.0.1:0") -> LoopbackResult:
    """Migrate ``regions`` and ``devices`` to a destination in this process.

    ``loaders`` maps ``(idstr, instance_id)`` to a loader; ``receive_into``
    lists regions the destination receives into instead of creating its own.
    Raises the source's error if the session fails.
    """
    outcome: dict = {}
    with Destination(address, workers=config.total_channels) as dst:
        for region in receive_into:
            dst.add_region(region)
        for (idstr, instance_id), loader in (loaders or {}).items():
            dst.add_loader(idstr, instance_id, loader)

        def receive() -> None:
            try:
                result = dst.receive()
                outcome["checked"] = check(result) if check is not None else None
                outcome["received"] = result.stats
            except BaseException as exc:        # reported below, after the source
                outcome["error"] = exc

        thread = threading.Thread(target=receive, name="fastmfd loopback destination")
        thread.start()
        try:
            with Source(dst.address, config) as src:
                for region in regions:
                    src.add_region(region)
                for device in devices:
                    src.add_device(device)
                stats = src.migrate(live=live, on_stop=on_stop, on_resume=on_resume,
                                    progress=progress)
        except BaseException as exc:
            # The destination may not have heard from the source at all.
            dst.cancel(f"the source failed: {exc}")
            raise
        finally:
            thread.join()
    if "error" in outcome:
        raise outcome["error"]
    return LoopbackResult(stats, outcome["received"], outcome["checked"])
