"""What a migration measured: :class:`MigrationStats` (source) and
:class:`ReceiveStats` (destination), built from the shared per-channel
counters the workers keep, plus the main process's clocks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["ChannelStats", "MigrationStats", "ReceiveStats", "RoundStats"]


@dataclass(frozen=True)
class ChannelStats:
    """One multifd channel's totals."""
    channel: int
    kind: str                   # "ram" or "device"
    packets: int                # RAM packets, SYNC packets included
    device_packets: int
    normal_pages: int
    zero_pages: int
    wire_bytes: int             # headers plus payloads, as sent or received
    syncs: int
    compressed_payloads: int = 0    # payloads (a RAM packet's pages, a device chunk) compressed
    raw_payloads: int = 0           # ... and sent as they are (compression="auto" mixes both)

    @classmethod
    def from_counters(cls, channel: int, kind: str, row: Mapping[str, int]) -> "ChannelStats":
        return cls(channel, kind, row["packets"], row["device_packets"], row["normal_pages"],
                   row["zero_pages"], row["wire_bytes"], row["syncs"],
                   row["compressed_payloads"], row["raw_payloads"])


@dataclass(frozen=True)
class RoundStats:
    """One pass over the dirty pages."""
    round: int
    pages: int                  # pages handed to the channels this round
    seconds: float              # from the round's first job to its ROUND_END
    live: bool                  # False for the round after the stop


@dataclass(frozen=True)
class MigrationStats:
    """Returned by :meth:`fastmfd.Source.migrate`."""
    total_time_s: float         # connect to LOADED
    setup_time_s: float         # connect to every channel up
    downtime_s: float           # on_stop to LOADED (source clock)
    rounds: int
    ram_bytes: int              # (normal + zero pages) * page_size
    wire_bytes: int             # every byte written on every channel, main channel included
    normal_pages: int
    zero_pages: int
    device_bytes: int           # device-state chunk bytes (headers included), before compression
    device_chunks: int
    device_live_bytes: int      # of device_bytes, sent while the workload ran (precopy)
    page_size: int
    compression: str
    channels: tuple[ChannelStats, ...] = ()
    round_stats: tuple[RoundStats, ...] = ()
    destination: dict[str, Any] = field(default_factory=dict)   # the destination's LOADED report

    @property
    def throughput_bytes_per_s(self) -> float:
        """RAM bytes moved per second of the whole migration."""
        return self.ram_bytes / self.total_time_s if self.total_time_s > 0 else 0.0

    @property
    def packets(self) -> int:
        return sum(c.packets + c.device_packets for c in self.channels)

    @property
    def compressed_payloads(self) -> int:
        """Payloads sent compressed, over every channel."""
        return sum(c.compressed_payloads for c in self.channels)

    @property
    def raw_payloads(self) -> int:
        """Payloads sent raw, over every channel."""
        return sum(c.raw_payloads for c in self.channels)

    def as_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["throughput_bytes_per_s"] = self.throughput_bytes_per_s
        return data


@dataclass(frozen=True)
class ReceiveStats:
    """The destination's view, in :attr:`fastmfd.DestinationResult.stats`."""
    total_time_s: float         # SETUP to LOADED
    rounds: int
    normal_pages: int
    zero_pages: int
    wire_bytes: int
    device_bytes: int
    device_chunks: int
    load_time_s: dict[str, float]  # device "idstr/instance" -> seconds its loader took
    channels: tuple[ChannelStats, ...] = ()
    prealloc_time_s: float | None = None    # prealloc: faulting the regions in, before
                                            # SETUP_ACK (not in total_time_s); None: no prealloc

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
