"""What a running migration reports: :class:`StatusBoard`, the source's answer
to QEMU's ``query-migrate`` (:meth:`fastmfd.Source.status`).

The session's thread writes the board as it goes (round boundaries, the stop,
what devices still want to send); the per-channel counters live in shared
memory, written by the send workers. ``report()`` reads both from any thread
without a lock: every value is one Python object swapped whole, so a report
may be a moment old, never torn. Once the migration is over the report is
made from its :class:`~fastmfd.MigrationStats` (:meth:`StatusBoard.final`), so the two
agree.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from ..stats import ChannelStats, MigrationStats, RoundStats

if TYPE_CHECKING:
    from .._core import Counters
    from ..config import MigrationConfig
    from ..protocol.main_channel import Loaded
    from ..regions import Region
    from .saving import DeviceStream

__all__ = ["StatusBoard"]


@dataclass
class StatusBoard:
    """What the session's thread records for status reports."""
    started_at: float = field(default_factory=time.monotonic)
    setup_s: float | None = None
    stopped_at: float | None = None         # on_stop ran (the downtime began)
    rounds: list[RoundStats] = field(default_factory=list)   # rounds sent so far
    round_pages: int = 0                    # pages of the round being sent
    round_base: int = 0                     # pages the workers had cleared when it began
    device_pending: int = 0                 # what devices said at the last estimate
    dirty_rate: float = 0.0                 # pages dirtied per second, last live round

    def report(self, state: str, config: MigrationConfig, counters: Counters,
               regions: Sequence[Region], *, running: bool,
               bandwidth: float, main_bytes: int, old_way_bytes: int,
               streams: Sequence[DeviceStream],
               switchover_ack: str | None, final: MigrationStats | None) -> dict[str, Any]:
        """The status as a JSON-ready dict (field names after QEMU's MigrationInfo)."""
        now = time.monotonic()
        channels: list[dict[str, Any]]          # counters, their channel and kind: JSON
        channels = [dict(channel=ch, kind="ram" if ch < config.channels else "device",
                         **counters.read(ch)) for ch in range(config.total_channels)]
        normal = sum(c["normal_pages"] for c in channels)
        zero = sum(c["zero_pages"] for c in channels)
        remaining = device_remaining = 0
        if running:
            # What the workers have not cleared of the round being sent, and what
            # was dirtied since it began; devices: their last estimate, until the stop.
            in_round = max(0, self.round_pages - (normal + zero - self.round_base))
            remaining = (in_round + sum(map(_dirty_pages, regions))) * config.page_size
            device_remaining = self.device_pending if self.stopped_at is None else 0
        expected = (remaining + device_remaining) / bandwidth if bandwidth > 0 else None
        elapsed = final.total_time_s if final else now - self.started_at
        downtime = final.downtime_s if final else (
            None if self.stopped_at is None else now - self.stopped_at)
        ram_bytes = (normal + zero) * config.page_size
        return {
            "status": state,
            "total_time_ms": elapsed * 1000,
            "setup_time_ms": None if self.setup_s is None else self.setup_s * 1000,
            "downtime_ms": None if downtime is None else downtime * 1000,
            "expected_downtime_ms": None if expected is None else expected * 1000,
            "rounds": len(self.rounds),
            "transferred": sum(c["wire_bytes"] for c in channels) + main_bytes,
            "throughput_bytes_per_s": ram_bytes / elapsed if elapsed > 0 else 0.0,
            "switchover_ack": switchover_ack,
            "ram": {"total": sum(r.size for r in regions), "transferred": ram_bytes,
                    "remaining": remaining, "normal": normal, "duplicate": zero,
                    "normal_bytes": normal * config.page_size,
                    "dirty_pages_rate": self.dirty_rate, "dirty_sync_count": len(self.rounds)},
            "device": {"transferred": counters.total("device_bytes") + old_way_bytes,
                       "live_transferred": sum(s.live_bytes for s in streams),
                       "remaining": device_remaining,
                       "chunks": sum(s.next_idx for s in streams)},
            "channels": channels,
        }

    def final(self, end: float, config: MigrationConfig, counters: Counters,
              streams: Sequence[DeviceStream], old_way_bytes: int, main_bytes: int,
              loaded: Loaded) -> MigrationStats:
        """The migration's statistics once the destination's LOADED came (at ``end``,
        monotonic): the board's times and rounds, the counters' totals, LOADED's."""
        assert self.setup_s is not None and self.stopped_at is not None, "after the stop"
        channels = tuple(
            ChannelStats.from_counters(ch, "ram" if ch < config.channels else "device",
                                       counters.read(ch))
            for ch in range(config.total_channels))
        normal = sum(c.normal_pages for c in channels)
        zero = sum(c.zero_pages for c in channels)
        return MigrationStats(
            total_time_s=end - self.started_at, setup_time_s=self.setup_s,
            downtime_s=end - self.stopped_at, rounds=len(self.rounds),
            ram_bytes=(normal + zero) * config.page_size,
            wire_bytes=sum(c.wire_bytes for c in channels) + main_bytes,
            normal_pages=normal, zero_pages=zero,
            device_bytes=counters.total("device_bytes") + old_way_bytes,
            device_chunks=sum(stream.next_idx for stream in streams),
            device_live_bytes=sum(stream.live_bytes for stream in streams),
            page_size=config.page_size, compression=config.compression, channels=channels,
            round_stats=tuple(self.rounds),
            destination={"rounds": loaded.rounds, "load_seconds": loaded.load_seconds})


def _dirty_pages(region: Region) -> int:
    """``region``'s dirty pages; none once it is closed under the session (whose
    rounds then fail naming it): status() from another thread meanwhile reports,
    it does not raise its bitmap's ValueError."""
    try:
        return int(region.dirty.count())
    except ValueError:
        if region.closed:
            return 0
        raise
