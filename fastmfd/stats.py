"""What a migration measured: :class:`MigrationStats` (source) and
:class:`ReceiveStats` (destination), built from the shared per-channel
counters the workers keep, plus the main process's clocks."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from .reprs import fields_repr

__all__ = ["ChannelStats", "MigrationStats", "ReceiveStats", "RoundStats"]


@dataclass(frozen=True)
class ChannelStats:
    """One multifd channel's totals:

    channel -- its number: the RAM channels first, then the device-state channels
    kind -- "ram" or "device"
    packets -- RAM packets, SYNC packets included
    device_packets -- device-state packets (a chunk each)
    normal_pages -- pages carried with their bytes
    zero_pages -- pages carried as offsets only
    wire_bytes -- headers plus payloads, as sent or received
    syncs -- SYNC packets (one per round on a RAM channel)
    compressed_payloads -- payloads (a RAM packet's pages, a device chunk) compressed
    raw_payloads -- ... and sent as they are (compression="auto" mixes both)
    """
    channel: int
    kind: str
    packets: int
    device_packets: int
    normal_pages: int
    zero_pages: int
    wire_bytes: int
    syncs: int
    compressed_payloads: int = 0
    raw_payloads: int = 0

    @classmethod
    def from_counters(cls, channel: int, kind: str, row: Mapping[str, int]) -> "ChannelStats":
        """The totals of ``channel`` from its row of the session's shared counters."""
        return cls(channel, kind, row["packets"], row["device_packets"], row["normal_pages"],
                   row["zero_pages"], row["wire_bytes"], row["syncs"],
                   row["compressed_payloads"], row["raw_payloads"])


@dataclass(frozen=True)
class RoundStats:
    """One pass over the dirty pages:

    round -- its number, from 1
    pages -- pages handed to the channels this round
    seconds -- from the round's first job to its ROUND_END
    live -- False for the round after the stop
    """
    round: int
    pages: int
    seconds: float
    live: bool


@dataclass(frozen=True)
class MigrationStats:
    """Returned by :meth:`fastmfd.Source.migrate` (times in seconds):

    total_time_s -- connect to LOADED
    setup_time_s -- connect to every channel up
    downtime_s -- on_stop to LOADED (the source's clock)
    rounds -- passes over the dirty pages, the one after the stop included
    ram_bytes -- (normal + zero pages) * page_size
    wire_bytes -- every byte written on every channel, main channel included
    normal_pages -- pages sent with their bytes
    zero_pages -- pages sent as offsets only
    device_bytes -- device-state chunk bytes (headers included), before compression
    device_chunks -- device-state chunks
    device_live_bytes -- of device_bytes, sent while the workload ran (precopy)
    page_size -- bytes per page
    compression -- the method configured: "none", "zlib", "zstd" or "auto"
    channels -- each data channel's :class:`ChannelStats`
    round_stats -- each round's :class:`RoundStats`
    destination -- the destination's LOADED report: "rounds" (as ReceiveStats) and
        "load_seconds" (as ReceiveStats.load_time_s)
    """
    total_time_s: float
    setup_time_s: float
    downtime_s: float
    rounds: int
    ram_bytes: int
    wire_bytes: int
    normal_pages: int
    zero_pages: int
    device_bytes: int
    device_chunks: int
    device_live_bytes: int
    page_size: int
    compression: str
    channels: tuple[ChannelStats, ...] = ()
    round_stats: tuple[RoundStats, ...] = ()
    destination: dict[str, Any] = field(default_factory=dict)

    @property
    def throughput_bytes_per_s(self) -> float:
        """RAM bytes moved per second of the whole migration."""
        return self.ram_bytes / self.total_time_s if self.total_time_s > 0 else 0.0

    @property
    def packets(self) -> int:
        """Packets sent over every data channel: RAM (SYNCs included) and device-state."""
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
        """Every field (channels and rounds as dicts too) and ``throughput_bytes_per_s``:
        what ``fastmfd send --json`` prints."""
        data = asdict(self)
        data["throughput_bytes_per_s"] = self.throughput_bytes_per_s
        return data

    def __repr__(self) -> str:
        return fields_repr(self)    # bounded: 8 channels, rounds or devices, then a count


@dataclass(frozen=True)
class ReceiveStats:
    """The destination's view, in :attr:`fastmfd.DestinationResult.stats` (times in
    seconds):

    total_time_s -- SETUP to LOADED
    rounds -- the source's rounds (its ROUND_END messages)
    normal_pages -- pages received with their bytes
    zero_pages -- pages received as offsets only
    wire_bytes -- every byte read on the data channels (the main channel not counted)
    device_bytes -- device-state chunk bytes (headers included), decompressed
    device_chunks -- device-state chunks
    load_time_s -- device "idstr/instance" -> seconds from its loader taking the first
        chunk to the last chunk loaded (waits for chunks between included; load_finish()
        not)
    channels -- each data channel's :class:`ChannelStats`
    prealloc_time_s -- with prealloc, faulting the regions in, before SETUP_ACK (not
        in total_time_s); None without
    refused_connections -- connections the destination dropped before authentication
        (strangers, wrong keys, bad certificates), while it waited and received:
        :attr:`fastmfd.Destination.refused_total` once received
    last_refused -- the last of them, "peer: reason"; None without
    """
    total_time_s: float
    rounds: int
    normal_pages: int
    zero_pages: int
    wire_bytes: int
    device_bytes: int
    device_chunks: int
    load_time_s: dict[str, float]
    channels: tuple[ChannelStats, ...] = ()
    prealloc_time_s: float | None = None
    refused_connections: int = 0
    last_refused: str | None = None

    def as_dict(self) -> dict[str, Any]:
        """Every field (channels as dicts too): the ``stats`` of ``fastmfd listen --json``."""
        return asdict(self)

    def __repr__(self) -> str:
        return fields_repr(self)    # bounded: 8 channels or devices, then a count
