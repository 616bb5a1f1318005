"""Migration settings: :class:`MigrationConfig`.

The source holds the configuration; its SETUP message carries every value
the destination needs, so a destination is started with no matching
parameters at all. Bad values raise :class:`~fastmfd.errors.ConfigError` when
the config is made, before anything starts.
"""

from __future__ import annotations

import dataclasses
import ssl
from dataclasses import dataclass

from .errors import ConfigError

__all__ = ["MigrationConfig", "COMPRESSION_METHODS", "COMPRESSION_LEVELS"]

COMPRESSION_METHODS = ("none", "zlib", "zstd")
# Accepted levels, as QEMU's multifd-zlib-level and multifd-zstd-level.
COMPRESSION_LEVELS = {"none": range(0, 1 << 31), "zlib": range(0, 10), "zstd": range(1, 21)}
MAX_CHANNELS = 255          # the init packet's channel id is a u8


@dataclass(frozen=True)
class MigrationConfig:
    """Everything a source needs to run a migration (names follow QEMU's parameters)."""

    channels: int = 2
    """Multifd RAM channels (QEMU ``multifd-channels``)."""
    device_state_channels: int = 0
    """Extra channels reserved for device state; they skip RAM syncs."""
    compression: str = "none"
    """``"none"``, ``"zlib"`` or ``"zstd"`` (``multifd-compression``)."""
    compression_level: int = 1
    """zlib 0..9 or zstd 1..20 (``multifd-zlib-level`` / ``multifd-zstd-level``)."""
    zero_page_detection: bool = True
    """Detect zero pages in the send workers and send them as offsets only."""
    channel_header: bool = True
    """Start every connection with a channel header; False is the "old way":
    no headers, device state on the main channel."""
    packet_pages: int = 128
    """Pages per RAM packet (QEMU: 512 KiB / page size)."""
    page_size: int = 4096
    downtime_limit: float = 0.3
    """Seconds the final stop-and-copy may take at the measured bandwidth."""
    max_rounds: int = 30
    """Stop iterating after this many live rounds whatever the dirty rate."""
    max_bandwidth: int | None = None
    """Bytes per second cap on the wire, or None."""
    max_queued_bytes: int = 256 << 20
    """Per device, the bytes the destination may hold out of order."""
    tls: ssl.SSLContext | None = None
    """Client-side TLS context (not supported yet: must be None)."""
    checksum: bool = False
    """A CRC-32 of every RAM packet's payload, checked by the destination."""
    device_chunk_size: int = 1 << 20
    """Largest device-state chunk (VFIO reads up to 1 MiB at a time)."""
    job_packets: int = 8
    """RAM packets handed to a send worker per job (fewer wake-ups per GiB)."""
    timeout: float = 30.0
    """Seconds any setup step (connect, handshake) may take."""

    def __post_init__(self) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise ConfigError(message)

        for name in ("channels", "device_state_channels", "compression_level", "packet_pages",
                     "page_size", "max_rounds", "max_queued_bytes", "device_chunk_size",
                     "job_packets"):
            value = getattr(self, name)
            need(isinstance(value, int) and not isinstance(value, bool),
                 f"{name} must be an integer, not {value!r}")
        need(1 <= self.channels, f"channels must be at least 1, not {self.channels}")
        need(0 <= self.device_state_channels,
             f"device_state_channels must be >= 0, not {self.device_state_channels}")
        need(self.channels + self.device_state_channels <= MAX_CHANNELS,
             f"at most {MAX_CHANNELS} channels in all (the init packet's id is one byte)")
        need(self.compression in COMPRESSION_METHODS,
             f"unknown compression {self.compression!r}; choose one of {COMPRESSION_METHODS}")
        levels = COMPRESSION_LEVELS[self.compression]
        need(self.compression == "none" or self.compression_level in levels,
             f"{self.compression} level must be in {levels.start}..{levels.stop - 1}, "
             f"not {self.compression_level}")
        need(self.page_size >= 512 and self.page_size & (self.page_size - 1) == 0
             and self.page_size <= 1 << 21,
             f"page_size must be a power of two in 512..2 MiB, not {self.page_size}")
        need(1 <= self.packet_pages <= 65536,
             f"packet_pages must be in 1..65536, not {self.packet_pages}")
        need(self.packet_pages * self.page_size <= 1 << 27,
             "a packet may carry at most 128 MiB (packet_pages * page_size)")
        need(1 <= self.job_packets <= 64, f"job_packets must be in 1..64, not {self.job_packets}")
        need(self.downtime_limit > 0, f"downtime_limit must be > 0, not {self.downtime_limit}")
        need(self.max_rounds >= 1, f"max_rounds must be >= 1, not {self.max_rounds}")
        need(self.max_bandwidth is None or self.max_bandwidth > 0,
             f"max_bandwidth must be positive or None, not {self.max_bandwidth}")
        need(self.max_queued_bytes >= self.device_chunk_size,
             "max_queued_bytes must hold at least one device chunk")
        need(4096 <= self.device_chunk_size <= 64 << 20,
             f"device_chunk_size must be in 4 KiB..64 MiB, not {self.device_chunk_size}")
        need(self.timeout > 0, f"timeout must be > 0, not {self.timeout}")
        need(self.channel_header or self.device_state_channels == 0,
             "dedicated device_state_channels need channel headers (channel_header=True): "
             "the old way sends device state on the main channel")
        need(self.tls is None or isinstance(self.tls, ssl.SSLContext),
             "tls must be an ssl.SSLContext or None")
        need(self.tls is None, "TLS is not supported by this version of fastmfd")

    @property
    def total_channels(self) -> int:
        return self.channels + self.device_state_channels

    def replace(self, **changes) -> "MigrationConfig":
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)
